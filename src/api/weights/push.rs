//! `POST /v1/weights`: a safetensors body streamed into a stage as it
//! arrives, checked, then committed.

use super::body::{self, CHECKSUM_HEADER};
use super::commit::commit;
use super::{engine_spawner, next_version, owned, parse};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::engine::PauseMode;
use crate::weights::stream::StreamingUpdate;
use crate::weights::update::UpdateMode;
use crate::weights::{clip, ParamStore};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Deserialize)]
pub struct WeightsQuery {
    version: Option<String>,
    mode: Option<String>,
    pause: Option<PauseMode>,
}

/// On the CPU, keeps what an update replaced (no longer read by the engine,
/// whose old model is gone, nor served) for the next push to convert into.
fn retire_replaced(state: &AppState, previous: ParamStore, served: &ParamStore) {
    if !state.device.is_cpu() {
        return;
    }
    let retired: HashMap<String, Tensor> = previous
        .sorted()
        .into_iter()
        .filter(|(name, old)| served.get(name).map_or(true, |new| new.id() != old.id()))
        .map(|(name, old)| (name.to_string(), old.clone()))
        .collect();
    if let Ok(mut spare) = state.spare_weights.lock() {
        *spare = retired;
    }
}

/// A push's query, checked.
struct PushOptions {
    version: Option<String>,
    mode: UpdateMode,
    pause: PauseMode,
}

fn push_options(
    query: Result<Query<WeightsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<PushOptions, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text(), None))?;
    Ok(PushOptions {
        mode: parse(q.mode.as_deref(), UpdateMode::Full, "mode")?,
        pause: q.pause.unwrap_or(PauseMode::Wait),
        version: q.version,
    })
}

/// What a successful push answers.
struct Pushed {
    version: String,
    tensors: usize,
    bytes: usize,
    seconds: f64,
}

/// The whole push, under the weights lock: stream the body into a stage,
/// check it, commit. A refused body is discarded after the lock is let go.
async fn run_push(
    state: Arc<AppState>,
    options: PushOptions,
    headers: HeaderMap,
    mut body: Body,
    started: Instant,
) -> Result<Pushed, ApiError> {
    let idle = state.weights_body_idle;
    let result = async {
        // Holding the lock for the whole update serializes concurrent pushes.
        let mut served = state.weights.lock().await;
        let reuse = state
            .spare_weights
            .lock()
            .map(|mut spare| std::mem::take(&mut *spare))
            .unwrap_or_default();
        let mut stage = StreamingUpdate::new(
            &state.config,
            options.mode,
            served.dtype(),
            &state.device,
            Some(engine_spawner(&state)),
            reuse,
            state.push_buffers.clone(),
        );
        let limit = state.max_weights_bytes;
        let (bytes, digest) = body::receive(&mut body, &headers, limit, idle, &mut stage).await?;
        let received = started.elapsed().as_secs_f64();
        if let (Some(expected), Some(digest)) = (headers.get(CHECKSUM_HEADER), digest) {
            let expected = expected.to_str().unwrap_or("").trim().to_ascii_lowercase();
            if expected != digest {
                return Err(ApiError::bad_request(
                    format!(
                        "checksum mismatch: x-weights-sha256 is {}, the body's SHA-256 is {digest}",
                        clip(&expected)
                    ),
                    Some(CHECKSUM_HEADER),
                ));
            }
        }
        let updates = stage.finish().await?;
        let tensors = updates.len();
        let staged = served.with_replacements(updates);
        let version = options
            .version
            .clone()
            .unwrap_or_else(|| next_version(&state.engine.stats().weight_version()));
        tracing::info!(
            received,
            staged = started.elapsed().as_secs_f64(),
            "weight push staged (seconds since the request began)"
        );
        let done = commit(
            &state,
            &mut served,
            staged,
            &version,
            options.pause,
            started,
        )
        .await?;
        retire_replaced(&state, done.previous, &served);
        Ok(Pushed {
            version,
            tensors,
            bytes,
            seconds: done.seconds,
        })
    }
    .await;
    if let Err(e) = &result {
        state.refits.record_failure();
        tracing::warn!(error = %e, "weight update refused; served weights unchanged");
        body::discard(body, &headers, idle);
    }
    result
}

/// `POST /v1/weights?version=V&mode=full|partial&pause=wait|abort|keep`
pub async fn push_weights(
    State(state): State<Arc<AppState>>,
    query: Result<Query<WeightsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    let options = match push_options(query) {
        Ok(options) => options,
        Err(e) => {
            state.refits.record_failure();
            body::discard(body, &headers, state.weights_body_idle);
            return Err(e);
        }
    };
    if let Err(e) = body::check_declared(&headers, state.max_weights_bytes) {
        state.refits.record_failure();
        body::discard(body, &headers, state.weights_body_idle);
        return Err(e);
    }
    let pushed = owned(run_push(state.clone(), options, headers, body, started)).await?;
    Ok(Json(json!({
        "weight_version": pushed.version,
        "tensors": pushed.tensors,
        "bytes": pushed.bytes,
        "seconds": pushed.seconds,
    })))
}
