//! The generation endpoints' shared request fields turned into engine
//! [`SamplingParams`] and text options, and chat messages normalized.

use super::error::ApiError;
use super::generation::{ResponseMeter, RunOptions};
use super::limits::RequestLimits;
use super::protocol::request::{SamplingRequest, StopField};
use crate::chat::stop::StopMatcher;
use crate::chat::text_output::TextOptions;
use crate::engine::{DistributionParams, LogprobsMode, SamplingParams};
use serde_json::Value;
use std::sync::Arc;

/// Server-wide defaults a request falls back on.
#[derive(Debug, Clone, Copy)]
pub struct SamplingDefaults {
    pub logprobs_mode: LogprobsMode,
    pub seed: Option<u64>,
}

impl SamplingRequest {
    pub fn stop_strings(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(v)) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }

    /// The request's stop strings, checked against the limits and compiled
    /// once (every prompt of a request shares them).
    pub fn stop_matcher(
        &self,
        limits: &RequestLimits,
    ) -> Result<Option<Arc<StopMatcher>>, ApiError> {
        match &self.stop {
            // Counted as sent, empty strings included, before any copying.
            Some(StopField::Many(all)) => limits.check_stop(all)?,
            Some(StopField::One(one)) => limits.check_stop(std::slice::from_ref(one))?,
            None => {}
        }
        Ok(StopMatcher::new(self.stop_strings()).map(Arc::new))
    }

    /// How the HTTP side treats the generated text (stop strings, decoding).
    pub fn run_options(
        &self,
        params: &SamplingParams,
        stop: Option<Arc<StopMatcher>>,
        meter: Option<Arc<ResponseMeter>>,
    ) -> RunOptions {
        RunOptions {
            text: TextOptions {
                stop,
                include_stop_str_in_output: self.include_stop_str_in_output.unwrap_or(false),
                skip_special_tokens: self.skip_special_tokens.unwrap_or(true),
            },
            stop_token_ids: params.stop_token_ids.clone(),
            meter,
        }
    }

    /// Engine parameters; `max_tokens` defaults to the rest of the context,
    /// and the engine clamps any larger value to what fits.
    pub fn sampling_params(
        &self,
        top_logprobs: usize,
        defaults: SamplingDefaults,
        limits: &RequestLimits,
    ) -> Result<SamplingParams, ApiError> {
        limits.check_top_logprobs("top_logprobs", top_logprobs)?;
        if let Some(n) = self.n {
            limits.check_n(n)?;
        }
        let unsupported = [
            (
                "presence_penalty",
                self.presence_penalty.is_some_and(|p| p != 0.0),
            ),
            (
                "frequency_penalty",
                self.frequency_penalty.is_some_and(|p| p != 0.0),
            ),
            (
                "repetition_penalty",
                self.repetition_penalty.is_some_and(|p| p != 1.0),
            ),
            (
                "logit_bias",
                self.logit_bias.as_ref().is_some_and(|b| !b.is_empty()),
            ),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(ApiError::bad_request(
                format!(
                    "{name} is not supported by gym-serve's sampler; leave it unset (or neutral)"
                ),
                Some(name),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => {
                return Err(ApiError::bad_request(
                    format!("top_k must be -1 (disabled) or a positive integer, got {k}"),
                    Some("top_k"),
                ))
            }
        };
        Ok(SamplingParams {
            distribution: DistributionParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_p: self.top_p.unwrap_or(1.0),
                top_k,
                min_p: self.min_p.unwrap_or(0.0),
            },
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .unwrap_or(usize::MAX),
            min_tokens: self.min_tokens.unwrap_or(0),
            stop_token_ids: self.stop_token_ids.clone().unwrap_or_default(),
            ignore_eos: self.ignore_eos.unwrap_or(false),
            seed: self.seed.or(defaults.seed),
            n: self.n.unwrap_or(1),
            logprobs_mode: self.logprobs_mode.unwrap_or(defaults.logprobs_mode),
            top_logprobs,
        })
    }
}

/// OpenAI `content`: a string, null, or a list of `{"type": "text", "text"}` parts.
/// Templates want a plain string, so parts are joined.
pub fn flatten_content(message: &mut Value) -> Result<(), ApiError> {
    let Some(content) = message.get_mut("content") else {
        return Ok(());
    };
    if let Value::Array(parts) = content {
        let mut text = String::new();
        for part in parts.iter() {
            match part.get("text").and_then(Value::as_str) {
                Some(t) if part.get("type").and_then(Value::as_str) == Some("text") => {
                    text.push_str(t)
                }
                _ => return Err(ApiError::bad_request(
                    "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                    Some("messages"),
                )),
            }
        }
        *content = Value::String(text);
    }
    Ok(())
}

/// Checks each message is an object with a string `role`, and flattens content.
pub fn normalize_messages(messages: &mut [Value]) -> Result<(), ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    for (i, m) in messages.iter_mut().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(ApiError::bad_request(
                format!("messages[{i}] must be an object with a string `role`"),
                Some("messages"),
            ));
        }
        flatten_content(m)?;
    }
    Ok(())
}
