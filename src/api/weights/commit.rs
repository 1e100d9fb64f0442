//! The commit of a weight update: build the model, swap it into the engine,
//! make it the served store, count and log it. Callers run this on a task
//! of their own (see `owned` in the parent module): once the engine has the new
//! weights, the store, metrics and log must follow whatever the client
//! does, so the version, the weights a partial push builds on, and
//! `/metrics` always agree.

use crate::api::error::ApiError;
use crate::api::AppState;
use crate::engine::PauseMode;
use crate::model::Model;
use crate::weights::ParamStore;
use std::time::Instant;

/// What an update that reached the engine did.
pub struct Committed {
    /// The store it replaced.
    pub previous: ParamStore,
    /// From the request's start to serving.
    pub seconds: f64,
}

/// Swaps `staged` in as `version` and records it; `served` (the locked
/// store) becomes `staged`. A failure before the swap changes nothing.
pub async fn commit(
    state: &AppState,
    served: &mut ParamStore,
    staged: ParamStore,
    version: &str,
    pause: PauseMode,
    started: Instant,
) -> Result<Committed, ApiError> {
    let config = state.config.clone();
    let device = state.device.clone();
    let (staged, model) = tokio::task::spawn_blocking(move || {
        let model = Model::new(&config, &staged, &device);
        (staged, model)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("staging thread: {e}")))?;
    let model = model.map_err(|e| ApiError::Internal(format!("building the model: {e}")))?;
    let asked = Instant::now();
    let report = state
        .engine
        .set_weights(model, version.to_string(), pause)
        .await?;
    let previous = std::mem::replace(served, staged);
    let seconds = started.elapsed().as_secs_f64();
    state.refits.record(seconds);
    tracing::info!(
        %version,
        seconds,
        waited = asked.elapsed().as_secs_f64(),
        swap = report.swap_seconds,
        aborted = report.aborted,
        kept = report.kept,
        "weights updated (waited: seconds for a step boundary; swap: the swap itself)"
    );
    Ok(Committed { previous, seconds })
}
