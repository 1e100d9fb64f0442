//! A JSON body extractor whose rejections are OpenAI error bodies (400, or
//! 413/408 for a body over its bound or too slow), not axum's plain-text
//! ones, and [`from_body`] for reading several views of one body with errors
//! that name the offending field.

use super::body::{read_limited, BodyLimit};
use super::error::ApiError;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use serde::de::DeserializeOwned;

pub struct ApiJson<T>(pub T);

/// Bodies larger than this are parsed on a blocking thread: parsing
/// megabytes of JSON on the async runtime stalled every other request
/// (`/health` included) for as long.
const PARSE_INLINE_BYTES: usize = 256 << 10;

/// Without a route group's bound (see `body::bound`), axum's default.
const DEFAULT_LIMIT: BodyLimit = BodyLimit {
    bytes: 2 << 20,
    flag: "--max-request-bytes",
};

fn is_json(request: &Request) -> bool {
    let Some(value) = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    let essence = essence.to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(&req) {
            return Err(ApiError::bad_request(
                "Expected a JSON body with `Content-Type: application/json`",
                None,
            ));
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .copied()
            .unwrap_or(DEFAULT_LIMIT);
        let bytes = read_limited(req.into_body(), limit).await?;
        if bytes.len() <= PARSE_INLINE_BYTES {
            return parse(&bytes).map(ApiJson);
        }
        tokio::task::spawn_blocking(move || parse(&bytes))
            .await
            .map_err(|e| ApiError::Internal(format!("JSON parsing thread: {e}")))?
            .map(ApiJson)
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        let message = if inner.is_data() {
            format!("Invalid request body: {}: {inner}", e.path())
        } else {
            format!("Malformed JSON: {inner}")
        };
        ApiError::bad_request(message, None)
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("Malformed JSON: {e}"), None))?;
    Ok(value)
}

/// Reads `T` from a parsed body; an error names the field path (`temperature`,
/// `messages[0].content`) in the message and in `param`.
pub fn from_body<T: DeserializeOwned>(body: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = format!("Invalid value for `{path}`: {}", e.inner());
        ApiError::bad_request(message, (path != ".").then_some(path.as_str()))
    })
}
