//! `POST /v1/weights`: a safetensors body fed to the [`Refitter`] as it
//! arrives, committed at once (staged with `POST /v1/weights/stage`).
//!
//! [`Refitter`]: crate::engine::refit::Refitter

use super::body;
use super::chain::Forward;
use super::query::{self, PushQuery};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::engine::refit::{Landed, Landing};
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// Parses the query, claims the update, streams the body into it and
/// lands it as `landing` says. Every refusal is counted once, and a
/// refused body is discarded after the update has let go of the weights.
pub(super) async fn receive_update(
    state: &AppState,
    raw_query: Option<&str>,
    landing: Landing,
    headers: HeaderMap,
    mut body: Body,
    forward: Option<&mut Forward>,
) -> Result<Landed, ApiError> {
    let idle = state.weights_body_idle;
    let refitter = &state.refitter;
    let checked = query::parse::<PushQuery>(raw_query).and_then(|q| {
        body::check_declared(&headers, state.max_weights_bytes)?;
        Ok(q)
    });
    let plan = match checked {
        Ok(q) => q.plan(landing),
        Err(e) => {
            refitter.refused(&e);
            body::discard(body, &headers, idle);
            return Err(e);
        }
    };
    let mut update = match refitter.begin(plan).await {
        Ok(update) => update,
        Err(e) => {
            body::discard(body, &headers, idle);
            return Err(e.into());
        }
    };
    let limit = state.max_weights_bytes;
    if let Err(e) = body::receive(&mut body, &headers, limit, idle, &mut update, forward).await {
        update.abort(&e);
        body::discard(body, &headers, idle);
        return Err(e);
    }
    Ok(update.finish().await?)
}

/// `POST /v1/weights?version=V&mode=full|partial&pause=wait|abort|keep`
pub async fn push_weights(
    State(state): State<Arc<AppState>>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    // A query that does not parse falls through: the base path answers its error.
    if let Ok(super::query::AdapterQuery {
        adapter: Some(name),
        version,
        pause,
    }) = super::query::parse(raw_query.as_deref())
    {
        let push = crate::api::lora::AdapterPush {
            name,
            version,
            pause,
        };
        let Json(pushed) = crate::api::lora::push_adapter(state, push, headers, body).await?;
        return Ok(Json(json!(pushed)));
    }
    match receive_update(
        &state,
        raw_query.as_deref(),
        Landing::Commit,
        headers,
        body,
        None,
    )
    .await?
    {
        Landed::Committed(done) => Ok(Json(json!({
            "weight_version": done.version,
            "tensors": done.tensors,
            "bytes": done.bytes,
            "seconds": done.seconds,
        }))),
        Landed::Staged(s) => Err(ApiError::Internal(format!(
            "update {} was staged, not committed",
            s.id
        ))),
    }
}
