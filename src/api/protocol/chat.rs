//! `POST /v1/chat/completions` responses: the completion, its stream's
//! chunks, and the OpenAI `logprobs.content` entries.

use super::common::{
    finite_f64, token_name, Finite, SeqWith, StopReason, TokenFormat, Usage, WeightSpans,
};
use crate::chat::TextTokenizer;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

pub const CHAT_COMPLETION: &str = "chat.completion";
pub const CHAT_COMPLETION_CHUNK: &str = "chat.completion.chunk";

#[derive(Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChatChoice<'a>>,
    pub usage: Usage,
    pub weight_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<WeightSpans<'a>>,
}

#[derive(Serialize)]
pub struct ChatChoice<'a> {
    pub index: usize,
    pub message: ChatMessage<'a>,
    pub logprobs: Option<ChatLogprobs<'a>>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: &'a StopReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<WeightSpans<'a>>,
}

#[derive(Serialize)]
pub struct ChatMessage<'a> {
    pub role: &'static str,
    pub content: Option<&'a str>,
    pub tool_calls: Vec<ToolCall<'a>>,
    pub prompt_token_ids: &'a [u32],
    pub generation_token_ids: &'a [u32],
    pub generation_log_probs: Finite<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<&'a str>,
}

#[derive(Serialize)]
pub struct ToolCall<'a> {
    pub id: String,
    pub index: usize,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall<'a>,
}

#[derive(Serialize)]
pub struct FunctionCall<'a> {
    pub name: &'a str,
    pub arguments: &'a str,
}

/// One event of a chat stream; `C` is the kind of choice it carries.
#[derive(Serialize)]
pub struct ChatChunk<'a, C> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    pub weight_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A choice of the stream's first chunk: the assistant's role.
#[derive(Serialize)]
pub struct RoleChoice {
    pub index: usize,
    pub delta: RoleDelta,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
pub struct RoleDelta {
    pub role: &'static str,
    pub content: &'static str,
}

/// A choice of a later chunk: what one token added. The fields after
/// `token_ids` come only in the choice's final chunk.
#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: usize,
    pub logprobs: Option<ChatLogprobs<'a>>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<&'a StopReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<WeightSpans<'a>>,
    pub delta: ChunkDelta<'a>,
}

#[derive(Serialize, Default)]
pub struct ChunkDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_log_probs: Option<Finite<'a>>,
}

/// One OpenAI chat `logprobs.content` entry (`top_logprobs` left out on the
/// alternatives themselves).
pub struct ChatLogprobEntry<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub id: u32,
    pub logprob: f32,
    /// `None` for an alternative.
    pub top: Option<&'a [(u32, f32)]>,
    pub format: TokenFormat,
}

impl Serialize for ChatLogprobEntry<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(if self.top.is_some() { 4 } else { 3 }))?;
        m.serialize_entry("token", &token_name(self.tokenizer, self.id, self.format))?;
        m.serialize_entry("logprob", &finite_f64(self.logprob))?;
        m.serialize_entry("bytes", &self.tokenizer.token_bytes(self.id))?;
        if let Some(top) = self.top {
            let alternatives = top.iter().map(|&(id, logprob)| ChatLogprobEntry {
                tokenizer: self.tokenizer,
                id,
                logprob,
                top: None,
                format: self.format,
            });
            m.serialize_entry("top_logprobs", &SeqWith(|| alternatives.clone()))?;
        }
        m.end()
    }
}

/// A choice's chat `logprobs` object (`{"content": [...]}`) for some of its
/// tokens: the slices are parallel, one element per token.
pub struct ChatLogprobs<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub token_ids: &'a [u32],
    pub logprobs: &'a [f32],
    pub top_logprobs: &'a [Vec<(u32, f32)>],
    pub format: TokenFormat,
}

impl Serialize for ChatLogprobs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let entries = self
            .token_ids
            .iter()
            .zip(self.logprobs)
            .zip(self.top_logprobs)
            .map(|((&id, &logprob), top)| ChatLogprobEntry {
                tokenizer: self.tokenizer,
                id,
                logprob,
                top: Some(top),
                format: self.format,
            });
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("content", &SeqWith(|| entries.clone()))?;
        m.end()
    }
}
