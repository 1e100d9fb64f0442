//! Request-body bounds, per endpoint group: a `Content-Length` over the
//! group's limit is refused before a byte of the body is read, and every
//! body gets an idle timeout (no byte for that long) and a total one, so a
//! stalled upload cannot hold a handler (or the weights lock) forever.

use super::error::ApiError;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The bounds of one endpoint group.
#[derive(Debug, Clone, Copy)]
pub struct BodyBounds {
    pub limit: BodyLimit,
    /// Refuse an over-limit `Content-Length` up front (off where the handler
    /// answers the refusal itself after draining, as weight pushes do).
    pub precheck: bool,
    pub idle: Duration,
    pub total: Duration,
    /// Flag of the total timeout, for the error message.
    pub total_flag: &'static str,
}

/// Largest body of an endpoint and the flag that sets it; also put in the
/// request's extensions for the JSON extractor to name.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit {
    pub bytes: usize,
    pub flag: &'static str,
}

/// A body that stalled (`--body-idle-timeout`) or ran past its total time.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body took too long ({flag})")]
pub struct BodyTimedOut {
    pub flag: &'static str,
}

/// Middleware applying `bounds` to every request of a route group.
pub async fn bound(State(bounds): State<BodyBounds>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if bounds.precheck && declared.is_some_and(|n| n > bounds.limit.bytes as u64) {
        return ApiError::BodyTooLarge {
            limit: bounds.limit.bytes,
            flag: bounds.limit.flag,
        }
        .into_response();
    }
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(bounds.limit);
    let timed = TimedBody {
        inner: body,
        idle_after: bounds.idle,
        idle: Box::pin(tokio::time::sleep(bounds.idle)),
        total: Box::pin(tokio::time::sleep(bounds.total)),
        total_flag: bounds.total_flag,
    };
    next.run(Request::from_parts(parts, Body::new(timed))).await
}

struct TimedBody {
    inner: Body,
    idle_after: Duration,
    idle: Pin<Box<Sleep>>,
    total: Pin<Box<Sleep>>,
    total_flag: &'static str,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.idle.as_mut().reset(Instant::now() + this.idle_after);
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.total.as_mut().poll(cx).is_ready() {
            let flag = this.total_flag;
            return Poll::Ready(Some(Err(BodyTimedOut { flag }.into())));
        }
        if this.idle.as_mut().poll(cx).is_ready() {
            let flag = "--body-idle-timeout";
            return Poll::Ready(Some(Err(BodyTimedOut { flag }.into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The timeout in an error's source chain, if that is what it was.
pub fn timed_out(e: &(dyn std::error::Error + 'static)) -> Option<BodyTimedOut> {
    let mut at: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = at {
        if let Some(t) = err.downcast_ref::<BodyTimedOut>() {
            return Some(*t);
        }
        at = err.source();
    }
    None
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_limited(body: Body, limit: BodyLimit) -> Result<Bytes, ApiError> {
    match http_body_util::Limited::new(body, limit.bytes)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(ApiError::BodyTooLarge {
                    limit: limit.bytes,
                    flag: limit.flag,
                });
            }
            let err: &(dyn std::error::Error + 'static) = &*e;
            if let Some(t) = timed_out(err) {
                return Err(ApiError::BodyTimeout { flag: t.flag });
            }
            Err(ApiError::bad_request(
                format!("reading the body failed: {e}"),
                None,
            ))
        }
    }
}
