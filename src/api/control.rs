//! Generation control for trainers: `POST /pause?mode=abort|wait|keep`,
//! `POST /resume`, `GET /is_paused`, `POST /reset_prefix_cache`.

use super::error::ApiError;
use super::protocol::request::PauseQuery;
use super::protocol::ControlResponse;
use super::AppState;
use crate::engine::PauseMode;
use axum::extract::{RawQuery, State};
use axum::Json;
use std::sync::Arc;

fn answer(success: Option<bool>, is_paused: Option<bool>) -> Json<ControlResponse> {
    Json(ControlResponse { success, is_paused })
}

/// Returns once the pause is in effect (with `wait`: when running requests finished).
pub async fn pause(
    State(state): State<Arc<AppState>>,
    RawQuery(raw_query): RawQuery,
) -> Result<Json<ControlResponse>, ApiError> {
    // Parsed like the weight endpoints' queries: a bad mode's error names `mode`.
    let q: PauseQuery = super::weights::query::parse(raw_query.as_deref())?;
    state
        .engine
        .pause(q.mode.unwrap_or(PauseMode::Abort))
        .await?;
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
