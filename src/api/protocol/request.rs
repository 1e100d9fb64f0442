//! Request bodies. Unknown fields are ignored, as vLLM does. Chat and text
//! completions read [`SamplingRequest`] separately from the same body (not
//! `flatten`, which loses field names in errors).

use crate::engine::LogprobsMode;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// Distinguishes a field sent as `null` (`Some(None)`) from one left out (`None`).
pub fn explicit_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `POST /v1/chat/completions`, besides the sampling fields.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default, deserialize_with = "explicit_null")]
    pub top_logprobs: Option<Option<usize>>,
    pub add_generation_prompt: Option<bool>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub required_prefix_token_ids: Option<Vec<u32>>,
}

/// `prompt` of a text completion: text, token IDs, or a batch of either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`, besides the sampling fields.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptField,
    /// Legacy: how many alternatives per token (0 = only the sampled token).
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: bool,
    pub prompt_logprobs: Option<usize>,
}

/// `stop`: one string or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and output fields common to chat and text completions (OpenAI
/// names plus vLLM's extensions).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingRequest {
    pub model: Option<String>,
    pub n: Option<usize>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub min_tokens: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub ignore_eos: Option<bool>,
    pub logprobs_mode: Option<LogprobsMode>,
    pub return_tokens_as_token_ids: Option<bool>,
    pub return_token_ids: Option<bool>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    // Known OpenAI/vLLM fields the sampler does not implement: accepted only
    // at their neutral values, so nobody gets silently different sampling.
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub logit_bias: Option<Map<String, Value>>,
}

/// `POST /tokenize`.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub tools: Option<Value>,
    pub add_generation_prompt: Option<bool>,
    pub add_special_tokens: Option<bool>,
    pub chat_template_kwargs: Option<Map<String, Value>>,
    pub required_prefix_token_ids: Option<Vec<u32>>,
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// `POST /v1/logprobs`.
#[derive(Debug, Deserialize)]
pub struct ScoreRequest {
    pub model: Option<String>,
    pub token_ids: Vec<u32>,
    pub start: usize,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub logprobs_mode: Option<LogprobsMode>,
}

/// `POST /pause?mode=abort|wait|keep` (default `abort`).
#[derive(Debug, Deserialize)]
pub struct PauseQuery {
    #[serde(default)]
    pub mode: Option<crate::engine::PauseMode>,
}
