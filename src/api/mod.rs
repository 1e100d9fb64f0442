//! HTTP layer: OpenAI-compatible and vLLM-extension routes over the engine.
//! Routes are grouped by capability, one file each; they validate and
//! translate, and never touch tensors.

pub mod chat;
pub mod completions;
pub mod error;
pub mod generation;
pub mod json;
pub mod metrics;
pub mod scoring;
pub mod tokenize;
pub mod types;

use crate::chat::parsers::{ReasoningParser, ToolCallParser};
use crate::chat::ChatProcessor;
use crate::engine::EngineHandle;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use error::ApiError;
use serde_json::json;
use std::sync::Arc;
use types::SamplingDefaults;

pub struct AppState {
    pub engine: EngineHandle,
    pub chat: Arc<ChatProcessor>,
    pub served_model_name: String,
    /// Where the weights came from (shown in `/v1/models`).
    pub model_root: String,
    pub api_key: Option<String>,
    pub reasoning_parser: ReasoningParser,
    pub tool_call_parser: ToolCallParser,
    pub defaults: SamplingDefaults,
    pub initial_weight_version: String,
    pub created: u64,
}

impl AppState {
    /// Requests may name the served model or leave `model` out.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        match model {
            Some(m) if m != self.served_model_name && m != self.model_root => {
                Err(ApiError::ModelNotFound(m.to_string()))
            }
            _ => Ok(()),
        }
    }

    pub fn max_model_len(&self) -> usize {
        self.engine.limits().max_model_len
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/logprobs", post(scoring::logprobs))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics::metrics))
        .merge(protected)
        .fallback(not_found)
        .with_state(state)
}

async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.api_key {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

async fn health() -> &'static str {
    ""
}

async fn not_found(uri: axum::http::Uri) -> Response {
    let body = json!({"error": {"message": format!("no route for {uri}"), "type": "NotFoundError", "param": null, "code": 404}});
    (axum::http::StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.served_model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "gym-serve",
            "root": state.model_root,
            "max_model_len": state.max_model_len(),
        }]
    }))
}
