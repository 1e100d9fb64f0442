//! Receiving a weight push's body: bounded in size (an over-limit
//! `Content-Length` is refused before a byte is read) and in idle time (a
//! stalled upload is cut, so it cannot hold the weights lock), and refused
//! bodies discarded off to the side, holding nothing.

use crate::api::error::ApiError;
use crate::weights::stream::StreamingUpdate;
use axum::body::Body;
use axum::http::{header, HeaderMap};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::time::Duration;

pub const CHECKSUM_HEADER: &str = "x-weights-sha256";

/// How much of a refused body is still read (and dropped) after answering,
/// so a client still sending gets the answer rather than a reset.
const DRAIN_CAP: usize = 64 << 20;

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Refuses a body that says it is larger than `limit`, before reading it.
pub fn check_declared(headers: &HeaderMap, limit: usize) -> Result<(), ApiError> {
    match declared_length(headers) {
        Some(n) if n > limit as u64 => Err(ApiError::PayloadTooLarge { limit }),
        _ => Ok(()),
    }
}

/// The next frame's bytes, `None` at the end; an error after `idle`
/// without any.
async fn next_chunk(
    body: &mut Body,
    idle: Duration,
) -> Result<Option<axum::body::Bytes>, ApiError> {
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| ApiError::BodyTimeout {
                flag: "--weights-body-idle-timeout",
            })?;
        let Some(frame) = frame else { return Ok(None) };
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("reading the body failed: {e}"), None))?;
        if let Ok(data) = frame.into_data() {
            return Ok(Some(data));
        }
    }
}

/// Streams the body into `stage`, at most `limit` bytes, hashing it on the
/// way in when the client sent a checksum to compare with. Stops at the
/// first refusal (the caller discards the rest once it has let go of the
/// weights). Returns the body's size and digest.
pub async fn receive(
    body: &mut Body,
    headers: &HeaderMap,
    limit: usize,
    idle: Duration,
    stage: &mut StreamingUpdate,
) -> Result<(usize, Option<String>), ApiError> {
    let mut hasher = headers.contains_key(CHECKSUM_HEADER).then(Sha256::new);
    let mut total = 0usize;
    while let Some(chunk) = next_chunk(body, idle).await? {
        total += chunk.len();
        if total > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        stage.push(&chunk)?;
    }
    let digest = hasher.map(|h| h.finalize().iter().map(|b| format!("{b:02x}")).collect());
    Ok((total, digest))
}

/// Drops the rest of a refused body without delaying the answer: read (up
/// to a cap, each frame within `idle`) on a task of its own, or not at all
/// where the client waits for `100 Continue` and so has sent nothing.
pub fn discard(body: Body, headers: &HeaderMap, idle: Duration) {
    if headers.contains_key(header::EXPECT) {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let mut seen = 0usize;
        while let Ok(Some(chunk)) = next_chunk(&mut body, idle).await {
            seen += chunk.len();
            if seen > DRAIN_CAP {
                break;
            }
        }
    });
}
