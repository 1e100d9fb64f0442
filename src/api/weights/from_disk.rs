//! `POST /update_weights_from_disk`: a checkpoint directory read under
//! bounds (see [`crate::weights::disk`]), answered in SGLang's shape.

use super::body;
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::engine::refit::{Landed, Landing, UpdatePlan, UpdateTarget};
use crate::engine::PauseMode;
use crate::weights::{clip, UpdateMode};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

/// Largest `/update_weights_from_disk` request body (it names a directory).
const MAX_DISK_REQUEST_BYTES: usize = 64 << 10;

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
        flag: "the bound of a request that names a checkpoint directory",
    };
    if body::check_declared(headers, limit).is_err() {
        return Err(too_large());
    }
    let bytes = tokio::time::timeout(state.weights_body_idle, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::BodyTimeout {
            flag: "--weights-body-idle-timeout",
        })?
        .map_err(|_| too_large())?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("Invalid request body: {e}"), None))
}

/// The whole disk update (the [`Refitter`] owns it to its end), then
/// `flush_cache`.
///
/// [`Refitter`]: crate::engine::refit::Refitter
async fn run_disk_update(state: &AppState, req: DiskUpdate) -> Result<(String, usize), ApiError> {
    let plan = UpdatePlan {
        // The files decide: one must hold everything, shards together.
        mode: UpdateMode::Full,
        version: req.weight_version.clone(),
        pause: if req.abort_all_requests {
            PauseMode::Abort
        } else {
            PauseMode::Wait
        },
        target: UpdateTarget::Base,
        landing: Landing::Commit,
    };
    let dir = std::path::PathBuf::from(&req.model_path);
    let done = match state.refitter.apply_checkpoint(dir, plan).await? {
        Landed::Committed(done) => done,
        Landed::Staged(s) => {
            return Err(ApiError::Internal(format!(
                "update {} was staged, not committed",
                s.id
            )))
        }
    };
    // After the commit, so a failure here cannot hide an update that happened.
    if req.flush_cache {
        state.engine.reset_prefix_cache().await?;
    }
    Ok((done.version, done.tensors))
}

/// `POST /update_weights_from_disk` in SGLang's shape: `{success, message}`.
pub async fn update_from_disk(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = match disk_request(&state, &headers, body).await {
        Ok(req) => {
            let path = clip(&req.model_path);
            run_disk_update(&state, req).await.map(|done| (done, path))
        }
        Err(e) => {
            state.refitter.refused(&e);
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
