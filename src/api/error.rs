//! Every error an endpoint can answer with, mapped once to an HTTP status and
//! an OpenAI error body `{"error": {"message", "type", "param", "code"}}`.

use super::protocol::{ErrorBody, ErrorDetail};
use crate::chat::ChatError;
use crate::engine::refit::RefitError;
use crate::engine::EngineError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("Incorrect or missing API key.")]
    Unauthorized,
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightsError),
    #[error(transparent)]
    Refit(#[from] RefitError),
    #[error("the body is larger than --max-weights-bytes ({limit} bytes)")]
    PayloadTooLarge { limit: usize },
    /// A body over its endpoint's bound (`flag`), refused before it is read
    /// when its `Content-Length` says so.
    #[error("the body is larger than {flag} ({limit} bytes)")]
    BodyTooLarge { limit: usize, flag: &'static str },
    #[error("`{param}` is {value}, over this server's limit of {limit} ({flag})")]
    LimitExceeded {
        param: &'static str,
        value: usize,
        limit: usize,
        flag: &'static str,
    },
    #[error("the response would be larger than --max-response-bytes ({limit} bytes): ask for fewer choices, tokens or log-probs, or stream it (`stream: true`)")]
    ResponseTooLarge { limit: usize },
    /// The request body stalled or took too long (`flag` names the bound).
    #[error("the request body took too long ({flag})")]
    BodyTimeout { flag: &'static str },
    /// A LoRA adapter refused, or not found (`adapter` names it).
    #[error("LoRA adapter `{}`: {source}", crate::weights::clip(.adapter))]
    Lora {
        adapter: String,
        source: crate::lora::LoraError,
    },
    /// The next replica of a chained stage (`forward_to`) failed or refused.
    #[error("forwarding to {hop} failed: {message}")]
    Forward { hop: String, message: String },
    #[error("forward_to is refused on a server without an admin key (--admin-api-key or --api-key): forwarding sends requests where the client says")]
    ForwardNotAllowed,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Engine(e) | ApiError::Refit(RefitError::Engine(e)) => engine_status(e),
            ApiError::Chat(e) => match e {
                ChatError::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            },
            ApiError::Weights(_) | ApiError::Refit(RefitError::Weights(_)) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Refit(
                RefitError::Busy { .. }
                | RefitError::NothingStaged { .. }
                | RefitError::NotThatOne { .. },
            ) => StatusCode::CONFLICT,
            ApiError::Refit(RefitError::Internal(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::PayloadTooLarge { .. } | ApiError::BodyTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::LimitExceeded { .. } | ApiError::ResponseTooLarge { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::Lora { source, .. } => match source {
                crate::lora::LoraError::NotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::BAD_REQUEST,
            },
            ApiError::Forward { .. } => StatusCode::BAD_GATEWAY,
            ApiError::ForwardNotAllowed => StatusCode::FORBIDDEN,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::BadRequest { param, .. } => param.as_deref(),
            ApiError::ModelNotFound(_) => Some("model"),
            ApiError::Lora { .. } => Some("lora_name"),
            ApiError::LimitExceeded { param, .. } => Some(param),
            ApiError::ForwardNotAllowed => Some("forward_to"),
            ApiError::Engine(EngineError::InvalidParam(p)) => Some(p.param),
            ApiError::Engine(EngineError::InvalidStart { .. }) => Some("start"),
            ApiError::Chat(ChatError::Template(_)) | ApiError::Chat(ChatError::Splice(_)) => {
                Some("messages")
            }
            _ => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::FORBIDDEN => "PermissionDeniedError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLargeError",
            StatusCode::REQUEST_TIMEOUT => "RequestTimeoutError",
            StatusCode::CONFLICT => "ConflictError",
            s if s.is_server_error() => "InternalServerError",
            _ => "BadRequestError",
        }
    }

    /// The JSON error body (also sent as an SSE event when a stream fails).
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind(),
                param: self.param(),
                code: self.status().as_u16(),
            },
        }
    }
}

fn engine_status(e: &EngineError) -> StatusCode {
    match e {
        EngineError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        EngineError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// At most 300 characters of `message`, cut on a character boundary.
fn log_excerpt(message: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 300;
    match message.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}... ({} bytes)", &message[..cut], message.len()).into(),
        None => message.into(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status().as_u16();
        if self.status().is_server_error() {
            tracing::error!(status, error = %self, "request failed");
        } else {
            // Once per refusal, so an operator sees why clients get 4xx; the
            // message only (never the body), cut short since it can quote input.
            tracing::warn!(status, error = %log_excerpt(&self.to_string()), "request refused");
        }
        let unread_body = matches!(
            self,
            ApiError::BodyTooLarge { .. } | ApiError::BodyTimeout { .. }
        );
        let mut response = (self.status(), Json(self.body())).into_response();
        if unread_body {
            // The rest of the body is never read, so this connection cannot
            // carry another request: say so, or a client that pools
            // connections sends its next request into a closing socket.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}
