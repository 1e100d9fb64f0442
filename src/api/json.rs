//! A JSON body extractor whose rejections are OpenAI error bodies (400), not
//! axum's plain-text ones.

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
