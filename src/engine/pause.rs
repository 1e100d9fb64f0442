//! The pause and weight-swap state machine of the engine loop: whether new
//! work is admitted, whether a step may run, and when a swap that waits on
//! running sequences is applied. Swaps only ever happen between steps.
//!
//! It holds no sequences: [`super::core::EngineCore`] tells it how many are
//! running and carries out what it decides (abort, swap, wake waiters).

use crate::model::Model;
use tokio::sync::oneshot;

/// What happens to running requests when generation pauses (or weights
/// change): `abort` ends them with what they have; `wait` lets them finish
/// first; `keep` freezes them and continues them afterwards.
/// Parsed from HTTP queries through serde and from the command line through clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PauseMode {
    Abort,
    Wait,
    Keep,
}

/// New weights waiting to be swapped in.
pub struct PendingSwap {
    pub model: Model,
    pub version: String,
    pub reply: oneshot::Sender<SwapReport>,
}

/// What a swap did.
#[derive(Debug, Clone)]
pub struct SwapReport {
    /// Sequences ended with `finish_reason: "abort"`.
    pub aborted: usize,
    /// Running sequences that continue, recomputing their cache under the new weights.
    pub kept: usize,
    /// Time the engine loop spent on the swap itself.
    pub swap_seconds: f64,
}

/// What to do with a requested swap now.
pub enum SwapDecision {
    /// Swap at once; running sequences continue under the new weights.
    Apply(PendingSwap),
    /// End every sequence, then swap.
    AbortThenApply(PendingSwap),
    /// Held until running sequences finish (see [`PauseControl::drained`]).
    Deferred,
}

#[derive(Default)]
pub struct PauseControl {
    /// Set by `pause`: no admissions; `keep` also freezes running sequences.
    paused: Option<PauseMode>,
    /// A swap waiting for running sequences to finish (`wait` mode).
    pending_swap: Option<PendingSwap>,
    /// `pause(wait)` callers waiting for running sequences to finish.
    pause_waiters: Vec<oneshot::Sender<()>>,
}

impl PauseControl {
    /// New sequences may be admitted (not paused, no swap waiting).
    pub fn admitting(&self) -> bool {
        self.paused.is_none() && self.pending_swap.is_none()
    }

    /// Whether a step would do anything, with `running` sequences running
    /// and `waiting` queued.
    pub fn can_step(&self, running: usize, waiting: usize) -> bool {
        match self.paused {
            Some(PauseMode::Keep) | Some(PauseMode::Abort) => false,
            Some(PauseMode::Wait) => running > 0,
            None if self.pending_swap.is_some() => running > 0,
            None => running > 0 || waiting > 0,
        }
    }

    /// Decides a swap requested under `mode`. While paused it happens at
    /// once (frozen sequences continue under the new weights on resume).
    pub fn request_swap(&mut self, swap: PendingSwap, mode: PauseMode) -> SwapDecision {
        if self.paused.is_some() {
            return SwapDecision::Apply(swap);
        }
        match mode {
            PauseMode::Abort => SwapDecision::AbortThenApply(swap),
            PauseMode::Keep => SwapDecision::Apply(swap),
            PauseMode::Wait => {
                // A newer update replaces one still waiting: the last weights win.
                self.pending_swap = Some(swap);
                SwapDecision::Deferred
            }
        }
    }

    /// Enters the pause; `reply` is answered by [`Self::wake_waiters`] or
    /// [`Self::resume`]. The caller aborts first under `abort`.
    pub fn pause(&mut self, mode: PauseMode, reply: oneshot::Sender<()>) {
        self.paused = Some(mode);
        self.pause_waiters.push(reply);
    }

    pub fn resume(&mut self) {
        self.paused = None;
        self.wake_all();
    }

    /// Whether what waits on running sequences can complete: none run, or
    /// they are frozen.
    pub fn drained(&self, running: usize) -> bool {
        running == 0 || self.paused == Some(PauseMode::Keep)
    }

    /// The swap that waited for running sequences (once [`Self::drained`]).
    pub fn take_pending_swap(&mut self) -> Option<PendingSwap> {
        self.pending_swap.take()
    }

    /// Answers the pause callers, if paused (once [`Self::drained`]).
    pub fn wake_waiters(&mut self) {
        if self.paused.is_some() {
            self.wake_all();
        }
    }

    fn wake_all(&mut self) {
        for waiter in self.pause_waiters.drain(..) {
            let _ = waiter.send(());
        }
    }

    /// Drops a waiting swap (after a failed step); its caller sees the
    /// engine stop answering.
    pub fn drop_pending_swap(&mut self) {
        self.pending_swap = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_modes_gate_admission_and_steps() {
        let mut control = PauseControl::default();
        assert!(control.admitting() && control.can_step(0, 1));
        let (reply, mut answered) = oneshot::channel();
        control.pause(PauseMode::Wait, reply);
        assert!(!control.admitting());
        assert!(control.can_step(2, 0), "wait lets running sequences finish");
        assert!(!control.can_step(0, 3), "but admits nothing");
        assert!(!control.drained(2));
        assert!(answered.try_recv().is_err());
        control.wake_waiters();
        assert!(answered.try_recv().is_ok());

        let (reply, _answered) = oneshot::channel();
        control.pause(PauseMode::Keep, reply);
        assert!(!control.can_step(2, 0), "keep freezes running sequences");
        assert!(control.drained(2));
        control.resume();
        assert!(control.admitting() && control.can_step(1, 0));
    }
}
