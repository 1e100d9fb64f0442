//! Trainer-facing weight updates: `POST /v1/weights` (a safetensors body),
//! `POST /update_weights_from_disk` (a checkpoint directory), and
//! `GET /get_weight_version`.
//!
//! An update is validated and converted into a new parameter store beside the
//! served one while generation goes on; the engine then swaps the new model in
//! between two steps. Any failure leaves the served weights untouched. Updates
//! are serialized by the store's lock, and each runs on a task of its own,
//! so a client that leaves cannot cut one short after it reached the engine.

mod body;
mod commit;
mod from_disk;
mod push;
mod stats;

pub use from_disk::update_from_disk;
pub use push::push_weights;
pub use stats::RefitStats;

use super::error::ApiError;
use super::AppState;
use crate::weights::stream::Spawner;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use std::future::Future;
use std::sync::Arc;

/// A query parameter, or `default` without one.
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
pub(crate) fn next_version(current: &str) -> String {
    match current.parse::<u64>() {
        Ok(n) => (n + 1).to_string(),
        Err(_) => format!("{current}+1"),
    }
}

/// Runs an update on a task of its own: dropping the request future (the
/// client left) must not interrupt it between reaching the engine and
/// being recorded.
async fn owned<T: Send + 'static>(
    update: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(update)
        .await
        .map_err(|e| ApiError::Internal(format!("update task: {e}")))?
}

/// Conversions run on the engine thread between steps (see `between_steps`).
fn engine_spawner(state: &AppState) -> Spawner {
    let engine = state.engine.clone();
    Arc::new(move |job| engine.between_steps(job))
}

/// `GET /get_weight_version`
pub async fn get_weight_version(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "weight_version": &*state.engine.stats().weight_version() }))
}
