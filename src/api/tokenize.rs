//! `POST /tokenize` and `POST /detokenize` (vLLM's, at the server root).
//! `/tokenize` with `messages` returns exactly the prompt a chat request with
//! the same fields would be given, on-policy splice included.

use super::error::ApiError;
use super::json::ApiJson;
use super::protocol::request::{DetokenizeRequest, TokenizeRequest};
use super::protocol::{DetokenizeResponse, TokenizeResponse};
use super::tools::checked_tools;
use super::types::normalize_messages;
use super::AppState;
use axum::extract::State;
use axum::Json;
use std::sync::Arc;

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    state.check_model(req.model.as_deref())?;
    let tokens = match (req.messages, req.prompt) {
        (Some(mut messages), _) => {
            normalize_messages(&mut messages)?;
            state.chat.encode_chat_on_policy(
                &messages,
                checked_tools(req.tools.as_ref())?,
                req.add_generation_prompt.unwrap_or(true),
                &req.chat_template_kwargs.unwrap_or_default(),
                req.required_prefix_token_ids.as_deref(),
            )?
        }
        (None, Some(prompt)) => {
            let ids = state
                .chat
                .tokenizer
                .encode(&prompt, req.add_special_tokens.unwrap_or(true))?;
            match req.required_prefix_token_ids {
                Some(mut prefix) => {
                    prefix.extend(ids);
                    prefix
                }
                None => ids,
            }
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "give `prompt` or `messages`",
                Some("prompt"),
            ))
        }
    };
    // The same IDs a chat request would refuse are refused here too.
    state.engine.check_vocab(&tokens)?;
    let token_strs: Vec<String> = tokens
        .iter()
        .map(|&t| state.chat.tokenizer.id_to_token(t).unwrap_or_default())
        .collect();
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.max_model_len(),
        tokens,
        token_strs,
    }))
}

pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    state.check_model(req.model.as_deref())?;
    let vocab = state.engine.limits().vocab_size;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_request(
            format!("token id {bad} is out of the vocabulary (size {vocab})"),
            Some("tokens"),
        ));
    }
    let prompt = state.chat.tokenizer.decode(&req.tokens, false)?;
    Ok(Json(DetokenizeResponse { prompt }))
}
