//! Refit counters, read by `/metrics` at scrape time.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct RefitStats {
    count: AtomicU64,
    failures: AtomicU64,
    /// Total seconds, in microseconds (atomics hold integers).
    total_micros: AtomicU64,
    last_micros: AtomicU64,
    staged: AtomicU64,
    aborted: AtomicU64,
    expired: AtomicU64,
    /// Bytes of the update held staged now (0 without one).
    staged_bytes: AtomicU64,
}

impl RefitStats {
    pub(super) fn record(&self, seconds: f64) {
        let micros = (seconds * 1e6) as u64;
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_micros.fetch_add(micros, Ordering::Relaxed);
        self.last_micros.store(micros, Ordering::Relaxed);
    }
    pub(super) fn record_failure(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn record_staged(&self, bytes: usize) {
        self.staged.fetch_add(1, Ordering::Relaxed);
        self.staged_bytes.store(bytes as u64, Ordering::Relaxed);
    }
    /// A staged update left the slot: committed (`None`), aborted or expired.
    pub(super) fn record_unstaged(&self, dropped: Option<Dropped>) {
        self.staged_bytes.store(0, Ordering::Relaxed);
        match dropped {
            Some(Dropped::Aborted) => self.aborted.fetch_add(1, Ordering::Relaxed),
            Some(Dropped::Expired) => self.expired.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
    }
    /// Updates applied (committed), whether in one call or staged first.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
    pub fn total_seconds(&self) -> f64 {
        self.total_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
    pub fn last_seconds(&self) -> f64 {
        self.last_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
    pub fn staged(&self) -> u64 {
        self.staged.load(Ordering::Relaxed)
    }
    pub fn aborted(&self) -> u64 {
        self.aborted.load(Ordering::Relaxed)
    }
    pub fn expired(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }
    pub fn staged_bytes(&self) -> u64 {
        self.staged_bytes.load(Ordering::Relaxed)
    }
}

/// Why a staged update was dropped without serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dropped {
    Aborted,
    Expired,
}
