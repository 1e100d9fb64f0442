//! The staging slot: at most one update received, checked and converted
//! beside the serving weights, waiting for its commit. It expires after
//! `--staged-update-timeout`, so a trainer that died cannot pin the memory.

use super::claim::{swap, Prepared};
use super::stats::Dropped;
use super::{Committed, RefitError, Shared};
use crate::engine::PauseMode;
use crate::weights::UpdateMode;
use std::sync::Arc;
use std::time::Instant;

pub(super) enum Slot {
    Empty,
    /// A stage is being received (or waits for the weights lock).
    Receiving {
        id: String,
        version: Option<String>,
    },
    Held(Box<Staged>),
}

pub(super) struct Staged {
    id: String,
    mode: UpdateMode,
    prepared: Prepared,
    at: Instant,
    expires: Instant,
}

/// A staged update, as the status endpoint shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StagedInfo {
    pub id: String,
    /// The version it will serve as.
    pub version: String,
    pub mode: UpdateMode,
    pub tensors: usize,
    /// Body bytes received.
    pub bytes: usize,
    /// Memory its tensors hold.
    pub held_bytes: usize,
    pub age_seconds: f64,
    pub expires_in_seconds: f64,
}

impl Staged {
    fn info(&self) -> StagedInfo {
        let now = Instant::now();
        StagedInfo {
            id: self.id.clone(),
            version: self.prepared.version.clone(),
            mode: self.mode,
            tensors: self.prepared.tensors,
            bytes: self.prepared.bytes,
            held_bytes: self.prepared.held_bytes,
            age_seconds: (now - self.at).as_secs_f64(),
            expires_in_seconds: self.expires.saturating_duration_since(now).as_secs_f64(),
        }
    }
}

/// The slot, taken for a stage until it is held or let go (dropped).
pub(super) struct Reservation {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.shared.slot.lock() {
            if matches!(&*slot, Slot::Receiving { id, .. } if *id == self.id) {
                *slot = Slot::Empty;
            }
        }
    }
}

fn lock(shared: &Shared) -> Result<std::sync::MutexGuard<'_, Slot>, RefitError> {
    shared
        .slot
        .lock()
        .map_err(|_| RefitError::Internal("the staging slot's lock is poisoned".into()))
}

/// Why the slot is not free, if it is not.
fn busy(slot: &Slot) -> Option<RefitError> {
    match slot {
        Slot::Empty => None,
        Slot::Receiving { id, version } => Some(RefitError::Busy {
            id: id.clone(),
            version: version.clone().unwrap_or_else(|| "not yet named".into()),
            state: "being staged",
        }),
        Slot::Held(s) => Some(RefitError::Busy {
            id: s.id.clone(),
            version: s.prepared.version.clone(),
            state: "staged",
        }),
    }
}

/// Takes the free slot for a new stage.
pub(super) fn reserve(
    shared: &Arc<Shared>,
    version: Option<&str>,
) -> Result<Reservation, RefitError> {
    let mut slot = lock(shared)?;
    if let Some(e) = busy(&slot) {
        return Err(e);
    }
    let id = shared.new_id();
    *slot = Slot::Receiving {
        id: id.clone(),
        version: version.map(str::to_string),
    };
    Ok(Reservation {
        shared: shared.clone(),
        id,
    })
}

/// Refuses a direct update while one is staged (or being staged).
pub(super) fn check_clear(shared: &Shared) -> Result<(), RefitError> {
    match busy(&*lock(shared)?) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Holds `prepared` in the reserved slot and starts its expiry clock.
pub(super) fn hold(
    shared: &Arc<Shared>,
    reservation: Reservation,
    mode: UpdateMode,
    prepared: Prepared,
) -> StagedInfo {
    let now = Instant::now();
    let staged = Staged {
        id: reservation.id.clone(),
        mode,
        prepared,
        at: now,
        expires: now + shared.staged_timeout,
    };
    let info = staged.info();
    shared.stats.record_staged(info.held_bytes);
    if let Ok(mut slot) = shared.slot.lock() {
        *slot = Slot::Held(Box::new(staged));
    }
    drop(reservation); // the slot is no longer `Receiving`: this changes nothing
    tracing::info!(id = %info.id, version = %info.version, tensors = info.tensors, "weight update staged");
    let (shared, id, timeout) = (shared.clone(), info.id.clone(), shared.staged_timeout);
    tokio::spawn(async move {
        tokio::time::sleep(timeout).await;
        if let Some(staged) = take_if(&shared, |s| s.id == id) {
            shared.stats.record_unstaged(Some(Dropped::Expired));
            tracing::warn!(%id, "staged weight update expired uncommitted (--staged-update-timeout); dropped");
            release(staged).await;
        }
    });
    info
}

/// Takes the held update out of the slot if `pick` chooses it.
fn take_if(shared: &Shared, pick: impl FnOnce(&Staged) -> bool) -> Option<Box<Staged>> {
    let mut slot = shared.slot.lock().ok()?;
    match &*slot {
        Slot::Held(s) if pick(s) => match std::mem::replace(&mut *slot, Slot::Empty) {
            Slot::Held(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

/// Takes the held update `id` names (any, without `id`) for `action`.
fn take(
    shared: &Shared,
    id: Option<&str>,
    action: &'static str,
) -> Result<Box<Staged>, RefitError> {
    let mut slot = lock(shared)?;
    match &*slot {
        Slot::Empty => return Err(RefitError::NothingStaged { action }),
        Slot::Receiving { .. } => {
            return Err(busy(&slot).unwrap_or(RefitError::NothingStaged { action }))
        }
        Slot::Held(s) => {
            if let Some(asked) = id.filter(|asked| *asked != s.id) {
                return Err(RefitError::NotThatOne {
                    staged: s.id.clone(),
                    asked: crate::weights::clip(asked),
                });
            }
        }
    }
    match std::mem::replace(&mut *slot, Slot::Empty) {
        Slot::Held(s) => Ok(s),
        _ => Err(RefitError::NothingStaged { action }),
    }
}

/// Drops a staged update's tensors off the async threads and gives the
/// freed memory back to the system.
async fn release(staged: Box<Staged>) {
    let _ = tokio::task::spawn_blocking(move || {
        drop(staged);
        crate::memory::trim();
    })
    .await;
}

pub(super) async fn commit(
    shared: Arc<Shared>,
    id: Option<String>,
    pause: Option<PauseMode>,
) -> Result<Committed, RefitError> {
    let started = Instant::now();
    let result = async {
        // The lock first: the staged update was built on the weights it guards.
        let mut served = shared.served.clone().lock_owned().await;
        let staged = take(&shared, id.as_deref(), "commit")?;
        shared.stats.record_unstaged(None);
        let Staged { id, prepared, .. } = *staged;
        let pause = pause.unwrap_or(prepared.pause);
        let mut done = swap(&shared, &mut served, prepared, pause, started).await?;
        done.stage_id = Some(id);
        Ok::<_, RefitError>(done)
    }
    .await;
    if let Err(e) = &result {
        shared.stats.record_failure();
        tracing::warn!(error = %e, "staged weight update not committed; served weights unchanged");
    }
    result
}

pub(super) async fn abort(
    shared: &Shared,
    id: Option<String>,
) -> Result<Option<StagedInfo>, RefitError> {
    let staged = match take(shared, id.as_deref(), "abort") {
        Ok(staged) => staged,
        Err(RefitError::NothingStaged { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    shared.stats.record_unstaged(Some(Dropped::Aborted));
    let info = staged.info();
    tracing::info!(id = %info.id, version = %info.version, "staged weight update aborted");
    release(staged).await;
    Ok(Some(info))
}

pub(super) fn info(shared: &Shared) -> Option<StagedInfo> {
    match &*shared.slot.lock().ok()? {
        Slot::Held(s) => Some(s.info()),
        _ => None,
    }
}
