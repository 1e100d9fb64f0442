//! Trainer-facing weight updates: `POST /v1/weights` (a safetensors body),
//! `POST /update_weights_from_disk` (a checkpoint directory), and
//! `GET /get_weight_version`.
//!
//! An update is validated and converted into a new parameter store beside the
//! served one while generation goes on; the engine then swaps the new model in
//! between two steps. Any failure leaves the served weights untouched. Updates
//! are serialized by the store's lock, and each runs on a task of its own,
//! so a client that leaves cannot cut one short after it reached the engine.

mod body;
mod commit;
mod stats;

pub use stats::RefitStats;

use super::error::ApiError;
use super::AppState;
use crate::engine::PauseMode;
use crate::weights::disk::{finish_checkpoint, stage_checkpoint, StageTarget};
use crate::weights::stream::{Spawner, StreamingUpdate};
use crate::weights::update::UpdateMode;
use crate::weights::{clip, ParamStore};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use body::CHECKSUM_HEADER;
use candle_core::Tensor;
use commit::commit;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// Largest `/update_weights_from_disk` request body (it names a directory).
const MAX_DISK_REQUEST_BYTES: usize = 64 << 10;

#[derive(Debug, Deserialize)]
pub struct WeightsQuery {
    version: Option<String>,
    mode: Option<String>,
    pause: Option<String>,
}

fn parse<T: std::str::FromStr<Err = String>>(
    value: Option<&str>,
    default: T,
    param: &str,
) -> Result<T, ApiError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|e: String| ApiError::bad_request(e, Some(param))),
    }
}

/// The label after `current`: the next integer when it is one.
fn next_version(current: &str) -> String {
    match current.parse::<u64>() {
        Ok(n) => (n + 1).to_string(),
        Err(_) => format!("{current}+1"),
    }
}

/// Runs an update on a task of its own: dropping the request future (the
/// client left) must not interrupt it between reaching the engine and
/// being recorded.
async fn owned<T: Send + 'static>(
    update: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(update)
        .await
        .map_err(|e| ApiError::Internal(format!("update task: {e}")))?
}

/// Conversions run on the engine thread between steps (see `between_steps`).
fn engine_spawner(state: &AppState) -> Spawner {
    let engine = state.engine.clone();
    Arc::new(move |job| engine.between_steps(job))
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
        pause: parse(q.pause.as_deref(), PauseMode::Wait, "pause")?,
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

#[derive(Debug, Deserialize)]
pub struct DiskUpdate {
    model_path: String,
    weight_version: Option<String>,
    #[serde(default)]
    abort_all_requests: bool,
    #[serde(default)]
    flush_cache: bool,
}

/// Reads the request, at most [`MAX_DISK_REQUEST_BYTES`], within the body
/// idle timeout.
async fn disk_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<DiskUpdate, ApiError> {
    let limit = MAX_DISK_REQUEST_BYTES;
    let too_large = || ApiError::BodyTooLarge {
        limit,
        what: "it names a checkpoint directory",
    };
    if body::check_declared(headers, limit).is_err() {
        return Err(too_large());
    }
    let bytes = tokio::time::timeout(state.weights_body_idle, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::BodyIdle {
            seconds: state.weights_body_idle.as_secs_f64(),
        })?
        .map_err(|_| too_large())?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}"), None))
}

/// The whole disk update, under the weights lock.
async fn run_disk_update(
    state: Arc<AppState>,
    req: DiskUpdate,
    started: Instant,
) -> Result<(String, usize), ApiError> {
    let result = async {
        let mut served = state.weights.lock().await;
        let target = StageTarget {
            run: served.dtype(),
            device: state.device.clone(),
            spawner: Some(engine_spawner(&state)),
            buffers: state.push_buffers.clone(),
        };
        let (dir, config) = (
            std::path::PathBuf::from(&req.model_path),
            state.config.clone(),
        );
        let stages = tokio::task::spawn_blocking(move || stage_checkpoint(&dir, &config, &target))
            .await
            .map_err(|e| ApiError::Internal(format!("staging thread: {e}")))??;
        let updates = finish_checkpoint(&state.config, stages).await?;
        let tensors = updates.len();
        let staged = served.with_replacements(updates);
        let version = req
            .weight_version
            .clone()
            .unwrap_or_else(|| next_version(&state.engine.stats().weight_version()));
        let pause = if req.abort_all_requests {
            PauseMode::Abort
        } else {
            PauseMode::Wait
        };
        // What a disk update replaces is dropped: only pushes convert into
        // retired memory.
        commit(&state, &mut served, staged, &version, pause, started).await?;
        Ok((version, tensors))
    }
    .await;
    if let Err(e) = &result {
        state.refits.record_failure();
        tracing::warn!(error = %e, "disk weight update refused; served weights unchanged");
    }
    // After the commit, so a failure here cannot hide an update that happened.
    if req.flush_cache && result.is_ok() {
        state.engine.reset_prefix_cache().await?;
    }
    result
}

/// `POST /update_weights_from_disk` in SGLang's shape: `{success, message}`.
pub async fn update_from_disk(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let result = match disk_request(&state, &headers, body).await {
        Ok(req) => {
            let path = clip(&req.model_path);
            owned(run_disk_update(state.clone(), req, started))
                .await
                .map(|done| (done, path))
        }
        Err(e) => {
            state.refits.record_failure();
            Err(e)
        }
    };
    match result {
        Ok(((version, tensors), path)) => {
            let message =
                format!("loaded {tensors} tensors from {path} as weight version {version}");
            Json(json!({"success": true, "message": message, "weight_version": version}))
                .into_response()
        }
        Err(e) => {
            // SGLang answers 400 for what it refuses; sizes and timeouts
            // keep their own statuses.
            let status = match e.status() {
                s if s.is_server_error() => s,
                s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT) => s,
                _ => StatusCode::BAD_REQUEST,
            };
            (
                status,
                Json(json!({"success": false, "message": e.to_string()})),
            )
                .into_response()
        }
    }
}

/// `GET /get_weight_version`
pub async fn get_weight_version(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "weight_version": &*state.engine.stats().weight_version() }))
}
