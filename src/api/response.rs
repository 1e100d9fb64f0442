//! Buffered (non-streamed) JSON responses: serialized straight from the
//! request's token state into one byte buffer, on a blocking thread, never
//! past `--max-response-bytes`. Building a `serde_json::Value` tree first
//! took ten times the body's size in small allocations (a 64-choice request
//! with 20 alternatives per token passed 8 GB), and building it on the async
//! runtime stalled every other request, `/health` included, for seconds.

use super::admission::Reservation;
use super::error::ApiError;
use axum::body::{Body, Bytes};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A `Vec<u8>` writer that refuses to grow past `limit`.
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            return Err(std::io::Error::other("over --max-response-bytes"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where a builder writes its one response body.
pub struct JsonOut {
    limit: usize,
    bytes: Option<Vec<u8>>,
}

impl JsonOut {
    /// Serializes `body`, failing past the limit.
    pub fn write<T: Serialize + ?Sized>(&mut self, body: &T) -> Result<(), ApiError> {
        let limit = self.limit;
        let mut w = Bounded {
            buf: Vec::new(),
            limit,
        };
        serde_json::to_writer(&mut w, body).map_err(|e| {
            if e.is_io() {
                ApiError::ResponseTooLarge { limit }
            } else {
                ApiError::Internal(format!("serializing the response: {e}"))
            }
        })?;
        self.bytes = Some(w.buf);
        Ok(())
    }
}

/// Runs `build` on a blocking thread (it owns what the body borrows) and
/// answers with what it wrote, at most `limit` bytes, keeping `reservation`
/// until the body has been sent.
pub async fn buffered_json<F>(
    limit: usize,
    reservation: Option<Reservation>,
    build: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(&mut JsonOut) -> Result<(), ApiError> + Send + 'static,
{
    let bytes = tokio::task::spawn_blocking(move || {
        let mut out = JsonOut { limit, bytes: None };
        build(&mut out)?;
        out.bytes
            .ok_or_else(|| ApiError::Internal("no response was built".into()))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("response thread: {e}")))??;
    let body = Held {
        bytes: Some(Bytes::from(bytes)),
        _reservation: reservation,
    };
    Ok(([(CONTENT_TYPE, "application/json")], Body::new(body)).into_response())
}

/// A finished body that keeps the request's memory reservation until hyper
/// has sent it (and dropped it).
struct Held {
    bytes: Option<Bytes>,
    _reservation: Option<Reservation>,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(
            self.get_mut()
                .bytes
                .take()
                .map(|b| Ok(http_body::Frame::data(b))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.bytes.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.bytes.as_ref().map_or(0, |b| b.len() as u64))
    }
}
