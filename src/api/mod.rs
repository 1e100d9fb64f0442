//! HTTP layer: OpenAI-compatible and vLLM-extension routes over the engine.
//! Routes are grouped by capability, one file each; they validate and
//! translate, and never touch tensors.

pub mod admission;
pub mod auth;
pub mod body;
pub mod chat;
pub mod completions;
pub mod control;
pub mod error;
pub mod generation;
pub mod json;
pub mod limits;
pub mod lora;
pub mod metrics;
pub mod protocol;
pub mod response;
pub mod scoring;
pub mod tokenize;
pub mod tools;
pub mod types;
pub mod weights;

use crate::chat::parsers::{ReasoningParser, ToolCallParser};
use crate::chat::ChatProcessor;
use crate::engine::EngineHandle;
use axum::extract::{DefaultBodyLimit, State};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use body::{BodyBounds, BodyLimit};
use error::ApiError;
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
    pub created: u64,
    /// Owns weight updates: the served parameters, staging, the swap.
    pub refitter: crate::engine::refit::Refitter,
    /// This replica's name (`--replica-id`, default host:port).
    pub replica_id: String,
    /// Required on weight and control endpoints when set: `--admin-api-key`,
    /// else `--api-key` (see `auth::admin_key`).
    pub admin_api_key: Option<String>,
    /// Largest accepted `POST /v1/weights` body.
    pub max_weights_bytes: usize,
    /// Longest wait for the next bytes of a weight update's body; a
    /// stalled upload is cut so it cannot hold the weights lock.
    pub weights_body_idle: std::time::Duration,
    pub metrics: metrics::Metrics,
    pub limits: limits::RequestLimits,
    /// Host memory requests may reserve (`--max-memory`).
    pub memory: Arc<admission::MemoryBudget>,
    /// The LoRA adapters served beside the base model (shared with the engine).
    pub lora: Arc<crate::lora::LoraRegistry>,
    /// Bitwise batch invariance: a request's results do not depend on the
    /// batch, cache hits, chunking or preemption (`/v1/models`).
    pub deterministic: bool,
    /// What projections multiply in: `"f32"` (exact) or `"bf16"` (`/v1/models`).
    pub compute_dtype: &'static str,
}

impl AppState {
    /// Requests may name the served model or an adapter, or leave `model` out.
    pub fn check_model(&self, model: Option<&str>) -> Result<(), ApiError> {
        self.resolve_model(model).map(|_| ())
    }

    pub fn max_model_len(&self) -> usize {
        self.engine.limits().max_model_len
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let l = &state.limits;
    let json_bounds = |bytes: usize, flag: &'static str| BodyBounds {
        limit: BodyLimit { bytes, flag },
        precheck: true,
        idle: l.body_idle_timeout,
        total: l.body_timeout,
        total_flag: "--body-timeout",
    };
    let inference = json_bounds(l.max_request_bytes, "--max-request-bytes");
    let control = json_bounds(l.max_control_bytes, "--max-control-bytes");
    // A disk update answers an oversized body itself (its own, smaller bound),
    // so the refusal is counted as a failed update like every other.
    let disk_update = BodyBounds {
        precheck: false,
        ..json_bounds(l.max_control_bytes, "--max-control-bytes")
    };
    let weight_push = BodyBounds {
        limit: BodyLimit {
            bytes: state.max_weights_bytes,
            flag: "--max-weights-bytes",
        },
        // The push handler answers an oversized body itself, after
        // draining some of it so the client sees the refusal.
        precheck: false,
        idle: l.body_idle_timeout,
        total: l.weights_body_timeout,
        total_flag: "--weights-body-timeout",
    };
    // Layers added later run first: the key is checked before the body.
    let protected = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/logprobs", post(scoring::logprobs))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route_layer(from_fn_with_state(inference, body::bound))
        .route_layer(from_fn_with_state(state.clone(), auth::require_api_key));
    let disk = Router::new()
        .route("/update_weights_from_disk", post(weights::update_from_disk))
        .route_layer(from_fn_with_state(disk_update, body::bound))
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin_key));
    let admin = Router::new()
        .route("/get_weight_version", get(weights::get_weight_version))
        .route("/v1/weights/commit", post(weights::commit_weights))
        .route("/v1/weights/abort", post(weights::abort_weights))
        .route("/v1/weights/staged", get(weights::staged_status))
        .route("/pause", post(control::pause))
        .route("/resume", post(control::resume))
        .route("/is_paused", get(control::is_paused))
        .route("/reset_prefix_cache", post(control::reset_prefix_cache))
        .route("/v1/load_lora_adapter", post(lora::load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(lora::unload_lora_adapter))
        .route_layer(from_fn_with_state(control, body::bound))
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin_key));
    let push = Router::new()
        .route("/v1/weights", post(weights::push_weights))
        .route("/v1/weights/stage", post(weights::stage_weights))
        // Bounded by --max-weights-bytes while streaming instead.
        .layer(DefaultBodyLimit::disable())
        .route_layer(from_fn_with_state(weight_push, body::bound))
        .route_layer(from_fn_with_state(state.clone(), auth::require_admin_key));
    Router::new()
        .route("/health", get(health))
        .merge(push)
        .merge(disk)
        .merge(admin)
        .route("/metrics", get(metrics::metrics))
        .merge(protected)
        .route_layer(from_fn_with_state(state.clone(), metrics::count_requests))
        .fallback(not_found)
        .with_state(state)
}

async fn health() -> &'static str {
    ""
}

async fn not_found(uri: axum::http::Uri) -> Response {
    tracing::warn!(status = 404, path = %uri.path().chars().take(200).collect::<String>(), "no such route");
    let body = protocol::ErrorBody {
        error: protocol::ErrorDetail {
            message: format!("no route for {uri}"),
            kind: "NotFoundError",
            param: None,
            code: 404,
        },
    };
    (axum::http::StatusCode::NOT_FOUND, Json(body)).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    let adapters = state.lora.list();
    let mut data = vec![protocol::ModelCard {
        id: &state.served_model_name,
        object: "model",
        created: state.created,
        owned_by: "gym-serve",
        root: &state.model_root,
        max_model_len: state.max_model_len(),
        parent: None,
        weight_version: None,
        deterministic: state.deterministic,
        compute_dtype: state.compute_dtype,
    }];
    data.extend(adapters.iter().map(|a| lora::adapter_card(&state, a)));
    Json(protocol::ModelList {
        object: "list",
        data,
    })
    .into_response()
}
