//! Generation control for trainers: `POST /pause?mode=abort|wait|keep`,
//! `POST /resume`, `GET /is_paused`, `POST /reset_prefix_cache`.

use super::error::ApiError;
use super::AppState;
use crate::engine::PauseMode;
use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
pub struct PauseQuery {
    #[serde(default = "default_pause_mode")]
    mode: PauseMode,
}

fn default_pause_mode() -> PauseMode {
    PauseMode::Abort
}

/// Returns once the pause is in effect (with `wait`: when running requests finished).
pub async fn pause(
    State(state): State<Arc<AppState>>,
    query: Result<Query<PauseQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text(), None))?;
    state.engine.pause(q.mode).await?;
    Ok(Json(json!({"success": true, "is_paused": true})))
}

pub async fn resume(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    state.engine.resume().await?;
    Ok(Json(json!({"success": true, "is_paused": false})))
}

pub async fn is_paused(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "is_paused": state.engine.stats().is_paused() }))
}

pub async fn reset_prefix_cache(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Value>, ApiError> {
    state.engine.reset_prefix_cache().await?;
    Ok(Json(json!({"success": true})))
}
