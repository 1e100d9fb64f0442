//! Generation control for trainers: `POST /pause?mode=abort|wait|keep`,
//! `POST /resume`, `GET /is_paused`, `POST /reset_prefix_cache`.

use super::error::ApiError;
use super::protocol::request::PauseQuery;
use super::protocol::ControlResponse;
use super::AppState;
use crate::engine::PauseMode;
use axum::extract::{Query, State};
use axum::Json;
use std::sync::Arc;

fn answer(success: Option<bool>, is_paused: Option<bool>) -> Json<ControlResponse> {
    Json(ControlResponse { success, is_paused })
}

/// Returns once the pause is in effect (with `wait`: when running requests finished).
pub async fn pause(
    State(state): State<Arc<AppState>>,
    query: Result<Query<PauseQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ControlResponse>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text(), None))?;
    let mode: PauseMode = match q.mode.as_deref() {
        None => PauseMode::Abort,
        Some(m) => m
            .parse()
            .map_err(|e: String| ApiError::bad_request(e, Some("mode")))?,
    };
    state.engine.pause(mode).await?;
    Ok(answer(Some(true), Some(true)))
}

pub async fn resume(State(state): State<Arc<AppState>>) -> Result<Json<ControlResponse>, ApiError> {
    state.engine.resume().await?;
    Ok(answer(Some(true), Some(false)))
}

pub async fn is_paused(State(state): State<Arc<AppState>>) -> Json<ControlResponse> {
    answer(None, Some(state.engine.stats().is_paused()))
}

pub async fn reset_prefix_cache(
    State(state): State<Arc<AppState>>,
) -> Result<Json<ControlResponse>, ApiError> {
    state.engine.reset_prefix_cache().await?;
    Ok(answer(Some(true), None))
}
