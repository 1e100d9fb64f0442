//! Receiving a weight push's body: bounded in size (an over-limit
//! `Content-Length` is refused before a byte is read) and in idle time (a
//! stalled upload is cut, so it cannot hold the weights lock), hashed for
//! the `x-weights-sha256` check, and refused bodies discarded off to the
//! side, holding nothing.

use super::chain::Forward;
use crate::api::error::ApiError;
use crate::engine::refit::Update;
use crate::weights::clip;
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

/// The SHA-256 a client declared in `x-weights-sha256`, checked against
/// the bytes as they pass.
struct Checksum(Option<Sha256>);

impl Checksum {
    fn new(headers: &HeaderMap) -> Self {
        Self(headers.contains_key(CHECKSUM_HEADER).then(Sha256::new))
    }

    fn update(&mut self, chunk: &[u8]) {
        if let Some(h) = self.0.as_mut() {
            h.update(chunk);
        }
    }

    fn verify(self, headers: &HeaderMap) -> Result<(), ApiError> {
        let (Some(expected), Some(hasher)) = (headers.get(CHECKSUM_HEADER), self.0) else {
            return Ok(());
        };
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let expected = expected.to_str().unwrap_or("").trim().to_ascii_lowercase();
        if expected != digest {
            return Err(ApiError::bad_request(
                format!(
                    "checksum mismatch: x-weights-sha256 is {}, the body's SHA-256 is {digest}",
                    clip(&expected)
                ),
                Some(CHECKSUM_HEADER),
            ));
        }
        Ok(())
    }
}

/// A body read frame by frame within `limit` bytes and `idle` between
/// frames, hashed for the `x-weights-sha256` check as it passes.
struct Bounded<'b> {
    body: &'b mut Body,
    limit: usize,
    idle: Duration,
    total: usize,
    checksum: Checksum,
}

impl<'b> Bounded<'b> {
    fn new(body: &'b mut Body, headers: &HeaderMap, limit: usize, idle: Duration) -> Self {
        Self {
            body,
            limit,
            idle,
            total: 0,
            checksum: Checksum::new(headers),
        }
    }

    async fn next(&mut self) -> Result<Option<axum::body::Bytes>, ApiError> {
        let Some(chunk) = next_chunk(self.body, self.idle).await? else {
            return Ok(None);
        };
        self.total += chunk.len();
        if self.total > self.limit {
            return Err(ApiError::PayloadTooLarge { limit: self.limit });
        }
        self.checksum.update(&chunk);
        Ok(Some(chunk))
    }
}

/// Streams the body into `update` (and, frame by frame, to the next replica
/// of a chain), at most `limit` bytes, and checks it against the client's
/// `x-weights-sha256`, if sent. Stops at the first
/// refusal (the caller aborts the update, then discards the rest).
pub async fn receive(
    body: &mut Body,
    headers: &HeaderMap,
    limit: usize,
    idle: Duration,
    update: &mut Update,
    mut forward: Option<&mut Forward>,
) -> Result<(), ApiError> {
    let mut body = Bounded::new(body, headers, limit, idle);
    while let Some(chunk) = body.next().await? {
        // On first, so the next replica works while this one converts.
        if let Some(f) = forward.as_deref_mut() {
            f.send(chunk.clone()).await?;
        }
        update.feed(&chunk)?;
    }
    body.checksum.verify(headers)
}

/// Hands the body to `sink` frame by frame (an adapter push), with the
/// bounds and checksum of [`receive`].
pub async fn receive_with(
    body: &mut Body,
    headers: &HeaderMap,
    limit: usize,
    idle: Duration,
    mut sink: impl FnMut(&[u8]) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    check_declared(headers, limit)?;
    let mut body = Bounded::new(body, headers, limit, idle);
    while let Some(chunk) = body.next().await? {
        sink(&chunk)?;
    }
    body.checksum.verify(headers)
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
