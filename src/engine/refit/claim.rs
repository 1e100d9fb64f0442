//! [`Claim`]: the right to change the weights, from the start of an update
//! to its end. It holds the served store's lock (so updates serialize) and,
//! for a stage, the staging slot; it lands the converted tensors (a swap
//! now, or a staged update), and counts exactly one outcome: dropped
//! without landing, it is a refused update and changes nothing.

use super::staged::{self, Reservation};
use super::{next_version, since, Committed, Landed, Landing, RefitError, Shared, UpdatePlan};
use crate::engine::PauseMode;
use crate::model::Model;
use crate::weights::ParamStore;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::OwnedMutexGuard;

/// Converted weights, ready to swap in.
pub(super) struct Prepared {
    pub store: ParamStore,
    pub model: Model,
    pub version: String,
    pub tensors: usize,
    /// Body bytes received.
    pub bytes: usize,
    /// Memory the new tensors take.
    pub held_bytes: usize,
    pub pause: PauseMode,
    /// Whether the tensors it replaces are kept for the next update to
    /// convert into.
    pub retire: bool,
}

pub(super) struct Claim {
    shared: Arc<Shared>,
    served: OwnedMutexGuard<ParamStore>,
    plan: UpdatePlan,
    reservation: Option<Reservation>,
    started: Instant,
    settled: bool,
}

impl Claim {
    /// Waits for the update in progress, if any, to end. A stage first
    /// takes the staging slot; a direct update finds it empty.
    pub async fn take(shared: Arc<Shared>, plan: UpdatePlan) -> Result<Self, RefitError> {
        let started = Instant::now();
        let refused = |e: RefitError| {
            shared.stats.record_failure();
            tracing::warn!(error = %e, "weight update refused; served weights unchanged");
            e
        };
        let reservation = match plan.landing {
            Landing::Stage => {
                Some(staged::reserve(&shared, plan.version.as_deref()).map_err(refused)?)
            }
            Landing::Commit => None,
        };
        let served = shared.served.clone().lock_owned().await;
        if plan.landing == Landing::Commit {
            // Under the lock: a staged update was built on these weights.
            staged::check_clear(&shared).map_err(refused)?;
        }
        Ok(Self {
            shared,
            served,
            plan,
            reservation,
            started,
            settled: false,
        })
    }

    pub fn plan(&self) -> &UpdatePlan {
        &self.plan
    }

    pub fn run_dtype(&self) -> DType {
        self.served.dtype()
    }

    /// What the served weight matrices are held in.
    pub fn matrix_dtype(&self) -> DType {
        self.served.matrix_dtype()
    }

    /// Ends the update refused, for `reason`; returns it.
    pub fn refuse<E: std::fmt::Display>(mut self, reason: E) -> E {
        self.settle_refused(&reason);
        reason
    }

    fn settle_refused(&mut self, reason: &dyn std::fmt::Display) {
        self.settled = true;
        self.shared.stats.record_failure();
        tracing::warn!(error = %reason, "weight update refused; served weights unchanged");
    }

    /// Builds the new weights from `updates` and swaps them in or stages
    /// them, as planned.
    pub async fn land(
        mut self,
        updates: HashMap<String, Tensor>,
        bytes: usize,
        retire: bool,
    ) -> Result<Landed, RefitError> {
        match self.try_land(updates, bytes, retire).await {
            Ok(landed) => {
                self.settled = true;
                Ok(landed)
            }
            Err(e) => Err(self.refuse(e)),
        }
    }

    async fn try_land(
        &mut self,
        updates: HashMap<String, Tensor>,
        bytes: usize,
        retire: bool,
    ) -> Result<Landed, RefitError> {
        let tensors = updates.len();
        let held_bytes = updates
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let store = self.served.with_replacements(updates)?;
        let (store, model) = build_model(&self.shared, store).await?;
        let version = self
            .plan
            .version
            .clone()
            .unwrap_or_else(|| next_version(&self.shared.engine.stats().weight_version()));
        tracing::info!(
            staged = since(self.started),
            tensors,
            "weight update converted (seconds since it began)"
        );
        let prepared = Prepared {
            store,
            model,
            version,
            tensors,
            bytes,
            held_bytes,
            pause: self.plan.pause,
            retire,
        };
        match self.reservation.take() {
            Some(reservation) => Ok(Landed::Staged(staged::hold(
                &self.shared,
                reservation,
                self.plan.mode,
                prepared,
            ))),
            None => {
                let pause = prepared.pause;
                let done = swap(
                    &self.shared,
                    &mut self.served,
                    prepared,
                    pause,
                    self.started,
                )
                .await?;
                Ok(Landed::Committed(done))
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.settled {
            self.settle_refused(&"the update ended before its body did (the client left?)");
        }
    }
}

/// The model over `store`, built off the async threads.
async fn build_model(
    shared: &Shared,
    store: ParamStore,
) -> Result<(ParamStore, Model), RefitError> {
    let (config, device) = (shared.config.clone(), shared.device.clone());
    let (store, model) = tokio::task::spawn_blocking(move || {
        let model = Model::new(&config, &store, &device);
        (store, model)
    })
    .await
    .map_err(|e| RefitError::Internal(format!("staging thread: {e}")))?;
    let model = model.map_err(|e| RefitError::Internal(format!("building the model: {e}")))?;
    Ok((store, model))
}

/// Swaps `prepared` in with `pause` and records it; `served` (the locked
/// store) becomes its store. A failure before the swap changes nothing.
pub(super) async fn swap(
    shared: &Shared,
    served: &mut ParamStore,
    prepared: Prepared,
    pause: PauseMode,
    started: Instant,
) -> Result<Committed, RefitError> {
    let asked = Instant::now();
    let version = prepared.version;
    let report = shared
        .engine
        .set_weights(prepared.model, version.clone(), pause)
        .await?;
    let previous = std::mem::replace(served, prepared.store);
    let seconds = since(started);
    shared.stats.record(seconds);
    tracing::info!(
        %version,
        seconds,
        waited = since(asked),
        swap = report.swap_seconds,
        aborted = report.aborted,
        kept = report.kept,
        "weights updated (waited: seconds for a step boundary; swap: the swap itself)"
    );
    if prepared.retire {
        retire_replaced(shared, previous, served);
    }
    Ok(Committed {
        version,
        tensors: prepared.tensors,
        bytes: prepared.bytes,
        seconds,
        stage_id: None,
    })
}

/// On the CPU, keeps what an update replaced (no longer read by the engine,
/// whose old model is gone, nor served) for the next update to convert into.
fn retire_replaced(shared: &Shared, previous: ParamStore, served: &ParamStore) {
    if !shared.device.is_cpu() {
        return;
    }
    let retired: HashMap<String, Tensor> = previous
        .sorted()
        .into_iter()
        .filter(|(name, old)| served.get(name).map_or(true, |new| new.id() != old.id()))
        .map(|(name, old)| (name.to_string(), old.clone()))
        .collect();
    if let Ok(mut spare) = shared.spare.lock() {
        *spare = retired;
    }
}
