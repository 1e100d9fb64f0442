//! Two-phase updates: `POST /v1/weights/stage` (a body received, checked
//! and converted beside the serving weights), `POST /v1/weights/commit`
//! (swapped in between two steps), `POST /v1/weights/abort` (dropped) and
//! `GET /v1/weights/staged`. The weight version is published only at the
//! commit, as vLLM's `finish_weight_update` publishes it. A stage with
//! `forward_to` also stages on a chain of replicas ([`chain`]).

use super::body;
use super::chain::{self, Forward, Hop};
use super::push::receive_update;
use super::query::{self, StagedQuery};
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::engine::refit::{Landed, Landing, StagedInfo};
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// `POST /v1/weights/stage`'s answer.
#[derive(Serialize)]
pub struct StageReply {
    #[serde(flatten)]
    staged: StagedInfo,
    /// Still the one serving: the staged version serves from its commit.
    weight_version: String,
    replica_id: String,
    /// From the stage's arrival to held (with `forward_to`, the rest of the
    /// chain's stages included).
    seconds: f64,
    /// With `forward_to`: the stage each later replica holds, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    chain: Vec<Hop>,
}

/// `POST /v1/weights/commit`'s answer (a push's, plus the stage's id).
#[derive(Serialize)]
pub struct CommitReply {
    weight_version: String,
    tensors: usize,
    bytes: usize,
    /// From the commit's arrival to serving.
    seconds: f64,
    stage_id: Option<String>,
    replica_id: String,
}

/// `POST /v1/weights/abort`'s answer.
#[derive(Serialize)]
pub struct AbortReply {
    /// The update dropped; null when none was staged.
    aborted: Option<StagedInfo>,
    weight_version: String,
    replica_id: String,
}

/// `GET /v1/weights/staged`'s answer.
#[derive(Serialize)]
pub struct StatusReply {
    /// The update held; null without one.
    staged: Option<StagedInfo>,
    weight_version: String,
    replica_id: String,
}

/// `POST /v1/weights/stage?version=V&mode=full|partial&pause=wait|abort|keep[&forward_to=B,C]`
pub async fn stage_weights(
    State(state): State<Arc<AppState>>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<StageReply>, ApiError> {
    let started = Instant::now();
    let raw_query = raw_query.as_deref();
    let forward = chain::plan(&state, raw_query).and_then(|c| {
        c.map(|c| Forward::start(c, raw_query, &headers))
            .transpose()
    });
    let mut forward = match forward {
        Ok(f) => f,
        Err(e) => {
            state.refitter.refused(&e);
            body::discard(body, &headers, state.weights_body_idle);
            return Err(e);
        }
    };
    let landed = receive_update(
        &state,
        raw_query,
        Landing::Stage,
        headers,
        body,
        forward.as_mut(),
    )
    .await;
    let (staged, forward) = match (landed, forward) {
        (Ok(Landed::Staged(staged)), forward) => (staged, forward),
        (Ok(Landed::Committed(done)), _) => {
            return Err(ApiError::Internal(format!(
                "update {} was committed, not staged",
                done.version
            )))
        }
        (Err(e), Some(f)) => {
            let downstream = f.fail().await;
            // The rest of the chain's own error says more than "stopped receiving".
            return Err(match (e, downstream) {
                (ApiError::Forward { .. }, Some(theirs)) => theirs,
                (ours, _) => ours,
            });
        }
        (Err(e), None) => return Err(e),
    };
    let chain = match forward {
        Some(f) => match f.finish().await {
            Ok(hops) => hops,
            Err(e) => {
                // One stage for the whole chain or none: drop ours.
                state.refitter.abort_staged(Some(staged.id.clone())).await?;
                return Err(e);
            }
        },
        None => Vec::new(),
    };
    Ok(Json(StageReply {
        staged,
        weight_version: state.refitter.serving_version().to_string(),
        replica_id: state.replica_id.clone(),
        seconds: started.elapsed().as_secs_f64(),
        chain,
    }))
}

/// `POST /v1/weights/commit?id=ID&pause=wait|abort|keep`
pub async fn commit_weights(
    State(state): State<Arc<AppState>>,
    RawQuery(raw_query): RawQuery,
) -> Result<Json<CommitReply>, ApiError> {
    let q: StagedQuery = query::parse(raw_query.as_deref())?;
    let done = state.refitter.commit_staged(q.id, q.pause).await?;
    Ok(Json(CommitReply {
        weight_version: done.version,
        tensors: done.tensors,
        bytes: done.bytes,
        seconds: done.seconds,
        stage_id: done.stage_id,
        replica_id: state.replica_id.clone(),
    }))
}

/// `POST /v1/weights/abort?id=ID`: 200 with `aborted: null` when nothing
/// was staged, so a coordinator may abort everywhere.
pub async fn abort_weights(
    State(state): State<Arc<AppState>>,
    RawQuery(raw_query): RawQuery,
) -> Result<Json<AbortReply>, ApiError> {
    let q: StagedQuery = query::parse(raw_query.as_deref())?;
    let aborted = state.refitter.abort_staged(q.id).await?;
    Ok(Json(AbortReply {
        aborted,
        weight_version: state.refitter.serving_version().to_string(),
        replica_id: state.replica_id.clone(),
    }))
}

/// `GET /v1/weights/staged`
pub async fn staged_status(State(state): State<Arc<AppState>>) -> Json<StatusReply> {
    Json(StatusReply {
        staged: state.refitter.staged(),
        weight_version: state.refitter.serving_version().to_string(),
        replica_id: state.replica_id.clone(),
    })
}
