//! Response pieces every endpoint shares, and the small bodies of the
//! non-generation endpoints.

use crate::chat::TextTokenizer;
use serde::ser::{SerializeSeq, Serializer};
use serde::Serialize;
use std::sync::Arc;

/// vLLM's stand-in for a log-prob JSON cannot carry (-inf).
const NEG_INF_LOGPROB: f32 = -9999.0;

pub fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        NEG_INF_LOGPROB
    }
}

/// A log-prob as the JSON number clients have always read: the f32's exact
/// value as an f64 (`-7.066963195800781`, not the shortest f32 `-7.066963`,
/// which a Python float reads as a different number).
pub fn finite_f64(lp: f32) -> f64 {
    f64::from(finite(lp))
}

/// Log-probs as JSON numbers, -inf as vLLM's -9999.0, without a copy.
#[derive(Clone, Copy)]
pub struct Finite<'a>(pub &'a [f32]);

impl Serialize for Finite<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for &lp in self.0 {
            seq.serialize_element(&finite_f64(lp))?;
        }
        seq.end()
    }
}

/// A sequence serialized from an iterator made on demand.
pub struct SeqWith<F>(pub F);

impl<F, I> Serialize for SeqWith<F>
where
    F: Fn() -> I,
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq((self.0)())
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// One run of generated tokens from one weight version: (version, start,
/// end), end exclusive, over generation token indices.
pub type VersionRun = (Arc<str>, usize, usize);

/// `weight_versions`: `[{"version", "start", "end"}]`.
#[derive(Clone, Copy)]
pub struct WeightSpans<'a>(pub &'a [VersionRun]);

impl Serialize for WeightSpans<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Span<'a> {
            version: &'a str,
            start: usize,
            end: usize,
        }
        s.collect_seq(self.0.iter().map(|(version, start, end)| Span {
            version,
            start: *start,
            end: *end,
        }))
    }
}

/// `stop_reason`: the stop string or stop token ID that ended a choice, or null.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StopReason {
    #[default]
    None,
    Text(String),
    TokenId(u32),
}

impl Serialize for StopReason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StopReason::None => s.serialize_unit(),
            StopReason::Text(t) => s.serialize_str(t),
            StopReason::TokenId(id) => s.serialize_u32(*id),
        }
    }
}

/// How a token is named in `logprobs` entries.
#[derive(Clone, Copy)]
pub struct TokenFormat {
    pub as_token_ids: bool,
}

/// `"token_id:N"`, or the token's text.
pub fn token_name(tokenizer: &TextTokenizer, id: u32, format: TokenFormat) -> String {
    if format.as_token_ids {
        format!("token_id:{id}")
    } else {
        tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

/// A random response ID with the given prefix (`chatcmpl`, `cmpl`, `call`).
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The OpenAI error body `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: u16,
}

/// `GET /v1/models`.
#[derive(Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    /// The base model, then each LoRA adapter.
    pub data: Vec<ModelCard<'a>>,
}

#[derive(Serialize)]
pub struct ModelCard<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: &'a str,
    pub max_model_len: usize,
    /// An adapter's base model (vLLM's field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<&'a str>,
    /// An adapter's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<&'a str>,
    /// Whether results are bitwise batch-invariant (true on CPU).
    pub deterministic: bool,
    /// `"f32"` (exact CPU arithmetic) or `"bf16"` (`--compute-dtype bf16`,
    /// and GPUs).
    pub compute_dtype: &'static str,
}

/// `POST /tokenize`.
#[derive(Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Vec<String>,
}

/// `POST /detokenize`.
#[derive(Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

/// `POST /v1/logprobs`: null for a token outside the sampling distribution.
#[derive(Serialize)]
pub struct ScoreResponse<'a> {
    pub token_logprobs: Vec<Option<f64>>,
    pub weight_version: &'a str,
}

/// `POST /pause`, `POST /resume`: `{success, is_paused}`; `POST
/// /reset_prefix_cache`: `{success}`; `GET /is_paused`: `{is_paused}`.
#[derive(Serialize)]
pub struct ControlResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_paused: Option<bool>,
}
