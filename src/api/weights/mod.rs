//! Trainer-facing weight updates over HTTP: `POST /v1/weights` (a
//! safetensors body), its two phases (`/v1/weights/stage`, `commit`,
//! `abort`, `staged`; a stage may forward its body along a chain of
//! replicas), `POST /update_weights_from_disk` (a checkpoint
//! directory), and `GET /get_weight_version`.
//!
//! These handlers parse queries, receive the body's frames (bounded, timed,
//! checked against `x-weights-sha256`) and answer JSON. The update itself
//! (validation, conversion beside the served weights, the swap, what it is
//! recorded as) belongs to [`crate::engine::refit::Refitter`].

pub(crate) mod body;
mod chain;
mod from_disk;
mod push;
pub(crate) mod query;
mod staged;

pub use from_disk::update_from_disk;
pub use push::push_weights;
pub use staged::{abort_weights, commit_weights, stage_weights, staged_status};

use super::AppState;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// `GET /get_weight_version`
pub async fn get_weight_version(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "weight_version": &*state.refitter.serving_version(),
        "replica_id": state.replica_id,
    }))
}
