//! `POST /v1/logprobs` (ours): teacher-forced log-probs of given tokens, the
//! reference a trainer checks generation log-probs against.

use super::error::ApiError;
use super::json::ApiJson;
use super::AppState;
use crate::engine::{DistributionParams, LogprobsMode};
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
pub struct LogprobsRequest {
    model: Option<String>,
    token_ids: Vec<u32>,
    start: usize,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    logprobs_mode: Option<LogprobsMode>,
}

pub async fn logprobs(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<LogprobsRequest>,
) -> Result<Json<Value>, ApiError> {
    let adapter = state.resolve_model(req.model.as_deref())?;
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
        .score_with_adapter(req.token_ids, req.start, distribution, mode, 0, adapter)
        .await?;
    // A token outside the sampling distribution has probability 0: null in JSON.
    let lps: Vec<Option<f32>> = out
        .token_logprobs
        .iter()
        .map(|l| l.is_finite().then_some(*l))
        .collect();
    Ok(Json(json!({
        "token_logprobs": lps,
        "weight_version": &*out.weight_version,
    })))
}
