//! `POST /v1/logprobs` (ours): teacher-forced log-probs of given tokens, the
//! reference a trainer checks generation log-probs against.

use super::error::ApiError;
use super::json::ApiJson;
use super::protocol::request::ScoreRequest;
use super::protocol::ScoreResponse;
use super::AppState;
use crate::engine::DistributionParams;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

pub async fn logprobs(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ScoreRequest>,
) -> Result<Response, ApiError> {
    state.check_model(req.model.as_deref())?;
    let distribution = DistributionParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: req.top_k.filter(|&k| k > 0).map(|k| k as usize),
        min_p: req.min_p.unwrap_or(0.0),
    };
    if req.top_k.is_some_and(|k| k < -1) {
        return Err(ApiError::bad_request(
            "top_k must be -1 (disabled) or positive",
            Some("top_k"),
        ));
    }
    let mode = req.logprobs_mode.unwrap_or(state.defaults.logprobs_mode);
    let out = state
        .engine
        .score(req.token_ids, req.start, distribution, mode, 0)
        .await?;
    // A token outside the sampling distribution has probability 0: null in JSON.
    let token_logprobs = out
        .token_logprobs
        .iter()
        .map(|l| l.is_finite().then(|| f64::from(*l)))
        .collect();
    Ok(Json(ScoreResponse {
        token_logprobs,
        weight_version: &out.weight_version,
    })
    .into_response())
}
