//! Refit counters for `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct RefitStats {
    count: AtomicU64,
    failures: AtomicU64,
    /// Total seconds, in microseconds (atomics hold integers).
    total_micros: AtomicU64,
    last_micros: AtomicU64,
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
}
