//! `POST /v1/completions` responses: the completion, its stream's chunks,
//! the legacy `logprobs` object and vLLM's `prompt_logprobs`.

use super::common::{
    finite_f64, token_name, Finite, SeqWith, StopReason, TokenFormat, Usage, WeightSpans,
};
use crate::chat::TextTokenizer;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

pub const TEXT_COMPLETION: &str = "text_completion";

#[derive(Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<CompletionChoice<'a>>,
    pub usage: Usage,
    pub weight_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<WeightSpans<'a>>,
}

#[derive(Serialize)]
pub struct CompletionChoice<'a> {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<LegacyLogprobs<'a>>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: &'a StopReason,
    pub prompt_token_ids: &'a [u32],
    pub generation_token_ids: &'a [u32],
    pub generation_log_probs: Finite<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<WeightSpans<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs<'a>>,
}

/// One event of a completions stream (the usage event has no choices and
/// no `weight_version`).
#[derive(Serialize)]
pub struct CompletionChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<CompletionChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// What one token added to a choice; the fields after `token_ids` come only
/// in the choice's final chunk.
#[derive(Serialize)]
pub struct CompletionChunkChoice<'a> {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<LegacyLogprobs<'a>>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<&'a StopReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation_log_probs: Option<Finite<'a>>,
}

/// Teacher-forced scores of a prompt: entry `i` is about prompt token `i + 1`.
#[derive(Clone, Copy)]
pub struct PromptScores<'a> {
    pub prompt: &'a [u32],
    pub token_logprobs: &'a [f32],
    pub top_logprobs: &'a [Vec<(u32, f32)>],
}

impl<'a> PromptScores<'a> {
    /// The log-prob and alternatives of prompt token `i` (`i >= 1`).
    fn at(&self, i: usize) -> (f32, &'a [(u32, f32)]) {
        let logprob = self
            .token_logprobs
            .get(i - 1)
            .copied()
            .unwrap_or(f32::NEG_INFINITY);
        let top = self.top_logprobs.get(i - 1).map_or(&[][..], Vec::as_slice);
        (logprob, top)
    }
}

/// vLLM's shape: `null` for the first token, then `{id: {logprob, rank, decoded_token}}`
/// holding the prompt token and the `k` best alternatives.
pub struct PromptLogprobs<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub scores: PromptScores<'a>,
    pub k: usize,
}

/// One `{logprob, rank, decoded_token}` of `prompt_logprobs`.
#[derive(Serialize)]
struct PromptEntry {
    logprob: f64,
    rank: Option<usize>,
    decoded_token: String,
}

/// The entries of one prompt position, keyed by token ID.
struct PromptPosition<'a> {
    tokenizer: &'a TextTokenizer,
    token: u32,
    logprob: f32,
    top: &'a [(u32, f32)],
    k: usize,
}

impl Serialize for PromptPosition<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let decoded = |t: u32| self.tokenizer.decode(&[t], false).unwrap_or_default();
        let mut m = s.serialize_map(None)?;
        let rank = self
            .top
            .iter()
            .position(|(t, _)| *t == self.token)
            .map(|r| r + 1);
        m.serialize_entry(
            &self.token.to_string(),
            &PromptEntry {
                logprob: finite_f64(self.logprob),
                rank,
                decoded_token: decoded(self.token),
            },
        )?;
        // The prompt token comes first; an alternative equal to it is not repeated.
        for (r, &(t, l)) in self.top.iter().take(self.k).enumerate() {
            if t != self.token {
                let entry = PromptEntry {
                    logprob: finite_f64(l),
                    rank: Some(r + 1),
                    decoded_token: decoded(t),
                };
                m.serialize_entry(&t.to_string(), &entry)?;
            }
        }
        m.end()
    }
}

impl Serialize for PromptLogprobs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let positions = self.scores.prompt.iter().enumerate().map(|(i, &token)| {
            (i > 0).then(|| {
                let (logprob, top) = self.scores.at(i);
                PromptPosition {
                    tokenizer: self.tokenizer,
                    token,
                    logprob,
                    top,
                    k: self.k,
                }
            })
        });
        s.collect_seq(positions)
    }
}

/// A reported token: its ID and, unless it opens the echoed prompt, its
/// log-prob and alternatives.
type Position<'a> = (u32, Option<(f32, &'a [(u32, f32)])>);

/// Legacy completions `logprobs` for some of a choice's tokens (parallel
/// slices, one element per token); with echo, the prompt's tokens come first
/// (the very first has no log-prob).
pub struct LegacyLogprobs<'a> {
    pub tokenizer: &'a TextTokenizer,
    pub token_ids: &'a [u32],
    pub logprobs: &'a [f32],
    pub top_logprobs: &'a [Vec<(u32, f32)>],
    pub k: usize,
    pub format: TokenFormat,
    pub prompt: Option<PromptScores<'a>>,
}

/// `{name: logprob}` of a token's alternatives; a name two IDs share keeps
/// its first place and its last value (as a JSON object built by insertion).
struct AlternativeMap(Vec<(String, f64)>);

impl Serialize for AlternativeMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl LegacyLogprobs<'_> {
    fn alternatives(&self, top: &[(u32, f32)]) -> AlternativeMap {
        let mut out: Vec<(String, f64)> = Vec::with_capacity(self.k.min(top.len()));
        for &(t, l) in top.iter().take(self.k) {
            let name = token_name(self.tokenizer, t, self.format);
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some(slot) => slot.1 = finite_f64(l),
                None => out.push((name, finite_f64(l))),
            }
        }
        AlternativeMap(out)
    }

    /// (token ID, log-prob, alternatives) of every reported position; the
    /// echoed prompt's first token has neither.
    fn positions(&self) -> impl Iterator<Item = Position<'_>> + Clone {
        let prompt = self.prompt.into_iter().flat_map(|scores| {
            scores
                .prompt
                .iter()
                .enumerate()
                .map(move |(i, &t)| (t, (i > 0).then(|| scores.at(i))))
        });
        let generated = self
            .token_ids
            .iter()
            .zip(self.logprobs)
            .zip(self.top_logprobs)
            .map(|((&t, &l), top)| (t, Some((l, top.as_slice()))));
        prompt.chain(generated)
    }
}

impl Serialize for LegacyLogprobs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<String> = self
            .positions()
            .map(|(t, _)| token_name(self.tokenizer, t, self.format))
            .collect();
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("tokens", &names)?;
        let positions = self.positions();
        m.serialize_entry(
            "token_logprobs",
            &SeqWith(|| {
                positions
                    .clone()
                    .map(|(_, p)| p.map(|(l, _)| finite_f64(l)))
            }),
        )?;
        m.serialize_entry(
            "top_logprobs",
            &SeqWith(|| {
                positions
                    .clone()
                    .map(|(_, p)| p.map(|(_, top)| self.alternatives(top)))
            }),
        )?;
        let offsets = names.iter().scan(0usize, |at, t| {
            let here = *at;
            *at += t.len();
            Some(here)
        });
        m.serialize_entry("text_offset", &SeqWith(|| offsets.clone()))?;
        m.end()
    }
}
