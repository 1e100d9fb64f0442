//! Trainer-facing weight updates: `POST /v1/weights` (a safetensors body),
//! `POST /update_weights_from_disk` (a checkpoint directory), and
//! `GET /get_weight_version`.
//!
//! An update is validated and converted into a new parameter store beside the
//! served one while generation goes on; the engine then swaps the new model in
//! between two steps. Any failure leaves the served weights untouched. Updates
//! are serialized by the store's lock.

use super::error::ApiError;
use super::json::ApiJson;
use super::AppState;
use crate::engine::PauseMode;
use crate::model::Model;
use crate::weights::checkpoint::read_checkpoint;
use crate::weights::stream::{Spawner, StreamingUpdate};
use crate::weights::update::{stage_from_tensors, UpdateMode};
use crate::weights::ParamStore;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use candle_core::Tensor;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Refit counters for `/metrics`.
#[derive(Debug, Default)]
pub struct RefitStats {
    count: AtomicU64,
    failures: AtomicU64,
    /// Total seconds, in microseconds (atomics hold integers).
    total_micros: AtomicU64,
    last_micros: AtomicU64,
}

impl RefitStats {
    fn record(&self, seconds: f64) {
        let micros = (seconds * 1e6) as u64;
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_micros.fetch_add(micros, Ordering::Relaxed);
        self.last_micros.store(micros, Ordering::Relaxed);
    }
    fn record_failure(&self) {
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

const CHECKSUM_HEADER: &str = "x-weights-sha256";

/// How much of a refused body is still read (and dropped) before answering.
const DRAIN_CAP: usize = 64 << 20;

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

/// Receives the body into a streaming stage, at most `limit` bytes, hashing
/// it on the way in when the client sent a checksum to compare with. Returns
/// the body's size and digest.
async fn receive(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    stage: &mut StreamingUpdate,
) -> Result<(usize, Option<String>), ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let mut hasher = headers.contains_key(CHECKSUM_HEADER).then(Sha256::new);
    let mut total = 0usize;
    // A refusal is answered after the rest of the body is read and dropped
    // (up to a cap), so the client gets the answer rather than a reset
    // connection while it is still sending.
    let mut refused: Option<ApiError> = declared
        .filter(|&n| n > limit)
        .map(|_| ApiError::PayloadTooLarge { limit });
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("reading the body failed: {e}"), None))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        total += chunk.len();
        if refused.is_some() {
            if total > limit.saturating_add(DRAIN_CAP) {
                break;
            }
            continue;
        }
        if total > limit {
            refused = Some(ApiError::PayloadTooLarge { limit });
            continue;
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        if let Err(e) = stage.push(&chunk) {
            refused = Some(e.into());
        }
    }
    if let Some(e) = refused {
        return Err(e);
    }
    let digest = hasher.map(|h| h.finalize().iter().map(|b| format!("{b:02x}")).collect());
    Ok((total, digest))
}

/// Reads and drops a body (up to the cap) so a refusal reaches the client.
async fn drain(mut body: Body) {
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, |d| d.len());
        if seen > DRAIN_CAP {
            break;
        }
    }
}

/// Builds the model for a staged store and swaps it in; returns the store
/// it replaced.
async fn swap_in(
    state: &AppState,
    served: &mut ParamStore,
    staged: ParamStore,
    version: String,
    pause: PauseMode,
) -> Result<(crate::engine::SwapReport, ParamStore), ApiError> {
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
    let report = state.engine.set_weights(model, version, pause).await?;
    tracing::info!(
        waited = asked.elapsed().as_secs_f64(),
        swap = report.swap_seconds,
        "new weights swapped in (seconds waiting for a step boundary, and the swap itself)"
    );
    let previous = std::mem::replace(served, staged);
    Ok((report, previous))
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

/// `POST /v1/weights?version=V&mode=full|partial&pause=wait|abort|keep`
pub async fn push_weights(
    State(state): State<Arc<AppState>>,
    query: Result<Query<WeightsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let parsed = query
        .map_err(|e| ApiError::bad_request(e.body_text(), None))
        .and_then(|Query(q)| {
            let mode = parse(q.mode.as_deref(), UpdateMode::Full, "mode")?;
            let pause = parse(q.pause.as_deref(), PauseMode::Wait, "pause")?;
            Ok((q, mode, pause))
        });
    let (q, mode, pause) = match parsed {
        Ok(p) => p,
        Err(e) => {
            drain(body).await;
            return Err(e);
        }
    };
    let started = Instant::now();
    let result = async {
        // Holding the lock for the whole update serializes concurrent pushes.
        let mut served = state.weights.lock().await;
        // Conversions run on the engine thread between steps (see `between_steps`).
        let engine = state.engine.clone();
        let spawner: Spawner = Arc::new(move |job| engine.between_steps(job));
        let reuse = state
            .spare_weights
            .lock()
            .map(|mut spare| std::mem::take(&mut *spare))
            .unwrap_or_default();
        let mut stage = StreamingUpdate::new(
            &state.config,
            mode,
            served.dtype(),
            &state.device,
            Some(spawner),
            reuse,
            state.push_buffers.clone(),
        );
        let (total, digest) = receive(body, &headers, state.max_weights_bytes, &mut stage).await?;
        let received = started.elapsed().as_secs_f64();
        if let (Some(expected), Some(digest)) = (headers.get(CHECKSUM_HEADER), digest) {
            let expected = expected.to_str().unwrap_or("").trim().to_ascii_lowercase();
            if expected != digest {
                return Err(ApiError::bad_request(
                    format!("checksum mismatch: x-weights-sha256 is {expected}, the body's SHA-256 is {digest}"),
                    Some("x-weights-sha256"),
                ));
            }
        }
        let updates = stage.finish().await?;
        let tensors = updates.len();
        let staged = served.with_replacements(updates);
        let version = q
            .version
            .clone()
            .unwrap_or_else(|| next_version(&state.engine.stats().weight_version()));
        let staged_at = started.elapsed().as_secs_f64();
        let (report, previous) =
            // What a disk update replaces is dropped: only pushes convert into
        // retired memory.
        swap_in(&state, &mut served, staged, version.clone(), pause).await?;
        retire_replaced(&state, previous, &served);
        tracing::info!(received, staged = staged_at, "weight update timings (seconds since the request began)");
        Ok((version, tensors, total, report))
    }
    .await;
    match result {
        Ok((version, tensors, total, report)) => {
            let seconds = started.elapsed().as_secs_f64();
            state.refits.record(seconds);
            tracing::info!(%version, tensors, bytes = total, seconds, aborted = report.aborted, kept = report.kept, "weights updated");
            Ok(Json(json!({
                "weight_version": version,
                "tensors": tensors,
                "bytes": total,
                "seconds": seconds,
            })))
        }
        Err(e) => {
            state.refits.record_failure();
            tracing::warn!(error = %e, "weight update refused; served weights unchanged");
            Err(e)
        }
    }
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

/// `POST /update_weights_from_disk` in SGLang's shape: `{success, message}`.
pub async fn update_from_disk(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<DiskUpdate>,
) -> Response {
    let started = Instant::now();
    let result = async {
        let mut served = state.weights.lock().await;
        let (current, config, device) =
            (served.clone(), state.config.clone(), state.device.clone());
        let dir = std::path::PathBuf::from(&req.model_path);
        let (staged, tensors) = tokio::task::spawn_blocking(move || {
            let tensors = read_checkpoint(&dir, &candle_core::Device::Cpu)?;
            stage_from_tensors(&current, &config, tensors, UpdateMode::Full, &device)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("staging thread: {e}")))??;
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
        swap_in(&state, &mut served, staged, version.clone(), pause).await?;
        if req.flush_cache {
            state.engine.reset_prefix_cache().await?;
        }
        Ok::<_, ApiError>((version, tensors))
    }
    .await;
    match result {
        Ok((version, tensors)) => {
            state.refits.record(started.elapsed().as_secs_f64());
            let message = format!(
                "loaded {tensors} tensors from {} as weight version {version}",
                req.model_path
            );
            Json(json!({"success": true, "message": message, "weight_version": version}))
                .into_response()
        }
        Err(e) => {
            state.refits.record_failure();
            let status = if e.status().is_server_error() {
                e.status()
            } else {
                StatusCode::BAD_REQUEST
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
