//! A JSON body extractor whose rejections are OpenAI error bodies (400), not
//! axum's plain-text ones, and [`from_body`] for reading several views of one
//! body with errors that name the offending field.

use super::error::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(ApiError::bad_request(rejection_message(&rejection), None)),
        }
    }
}

fn rejection_message(r: &JsonRejection) -> String {
    match r {
        JsonRejection::JsonDataError(e) => format!("Invalid request body: {}", e.body_text()),
        JsonRejection::JsonSyntaxError(e) => format!("Malformed JSON: {}", e.body_text()),
        JsonRejection::MissingJsonContentType(_) => {
            "Expected a JSON body with `Content-Type: application/json`".to_string()
        }
        other => other.body_text(),
    }
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
