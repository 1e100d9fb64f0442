//! `POST /v1/completions`: prompts as text, token IDs, or a batch of either;
//! `echo`, legacy `logprobs`, `prompt_logprobs`, streaming.

use super::admission::{RequestShape, Reservation};
use super::error::ApiError;
use super::generation::sse_response;
use super::generation::{
    finite_f64, finite_logprobs, response_id, token_name, unix_time, usage, ChoiceState,
    ResponseMeter, Runner, TokenFormat,
};
use super::json::{from_body, ApiJson};
use super::limits::RequestLimits;
use super::response::{buffered_json, Finite, SeqWith};
use super::types::SamplingRequest;
use super::AppState;
use crate::engine::{DistributionParams, LogprobsMode, ScoreOutput};
use axum::extract::State;
use axum::response::Response;
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    prompt: PromptField,
    /// Legacy: how many alternatives per token (0 = only the sampled token).
    logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
    prompt_logprobs: Option<usize>,
    /// Read separately from the same body (not `flatten`, which loses field
    /// names in errors).
    #[serde(skip)]
    sampling: SamplingRequest,
}

struct Plan {
    id: String,
    created: u64,
    logprobs: Option<usize>,
    echo: bool,
    format: TokenFormat,
    return_token_ids: bool,
    n: usize,
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let mut req: CompletionRequest = from_body(&body)?;
    req.sampling = from_body(&body)?;
    drop(body);
    let adapter = state.resolve_model(req.sampling.model.as_deref())?;
    let limits = &state.limits;
    let count = match &req.prompt {
        PromptField::Text(_) | PromptField::Tokens(_) => 1,
        PromptField::Texts(ts) => ts.len(),
        PromptField::TokenLists(ls) => ls.len(),
    };
    // Before tokenizing anything: a request's size is bounded up front.
    limits.check_sequences(count, req.sampling.n.unwrap_or(1))?;
    let tokenizer = &state.chat.tokenizer;
    let prompts: Vec<Vec<u32>> = match req.prompt {
        PromptField::Text(t) => vec![tokenizer.encode(&t, true)?],
        PromptField::Tokens(ids) => vec![ids],
        PromptField::Texts(ts) => ts
            .iter()
            .map(|t| tokenizer.encode(t, true))
            .collect::<Result<_, _>>()?,
        PromptField::TokenLists(lists) => lists,
    };
    if prompts.is_empty() {
        return Err(ApiError::bad_request(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    let top = req.logprobs.unwrap_or(0);
    limits.check_top_logprobs("logprobs", top)?;
    if let Some(k) = req.prompt_logprobs {
        RequestLimits::check(
            "prompt_logprobs",
            k,
            limits.max_prompt_logprobs,
            "--max-prompt-logprobs",
        )?;
    }
    let params = req.sampling.sampling_params(top, state.defaults, limits)?;
    let stop = req.sampling.stop_matcher(limits)?;
    let streaming = req.sampling.stream.unwrap_or(false);
    let plan = Arc::new(Plan {
        id: response_id("cmpl"),
        created: unix_time(),
        logprobs: req.logprobs,
        echo: req.echo,
        format: TokenFormat {
            as_token_ids: req.sampling.return_tokens_as_token_ids.unwrap_or(false),
        },
        return_token_ids: req.sampling.return_token_ids.unwrap_or(false),
        n: params.n,
    });
    let wants_prompt_scores =
        req.prompt_logprobs.is_some() || (plan.echo && plan.logprobs.is_some());
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let meter = (!streaming).then(|| {
        let per_token = if plan.logprobs.is_some() {
            4 + 30 + 25 * top
        } else {
            4
        };
        Arc::new(ResponseMeter::new(limits.max_response_bytes, per_token))
    });
    if let Some(m) = &meter {
        // Known before generating: every choice repeats its prompt's IDs,
        // and scored prompts add an entry per token and alternative.
        let k = req.prompt_logprobs.unwrap_or(0).max(top);
        let scored = if wants_prompt_scores {
            prompt_tokens * (20 + 20 * k)
        } else {
            0
        };
        m.charge(2 * params.n * prompt_tokens + scored)?;
    }
    let shape = RequestShape {
        sequences: prompts.len() * params.n,
        prompt_tokens: longest,
        max_tokens: params
            .max_tokens
            .min(state.max_model_len().saturating_sub(longest)),
        top_logprobs: top,
        buffered: !streaming,
    };
    let reservation = state
        .memory
        .reserve(shape.cost(limits.max_response_bytes))
        .await?;
    // Submit every prompt before waiting on any, so they run in the same steps.
    let mut runners = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let options = req
            .sampling
            .run_options(&params, stop.clone(), meter.clone());
        let stream =
            state
                .engine
                .generate_with_adapter(prompt.clone(), params.clone(), adapter.clone())?;
        runners.push(Runner::new(state.clone(), prompt, stream, options));
    }
    let mut prompt_scores = Vec::new();
    if wants_prompt_scores {
        let k = req
            .prompt_logprobs
            .unwrap_or(0)
            .max(plan.logprobs.unwrap_or(0));
        for r in &runners {
            prompt_scores.push(score_prompt(&state, &r.prompt, k, adapter.clone()).await?);
        }
    }
    if streaming {
        let include_usage = req
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        return Ok(stream_response(
            state,
            runners,
            plan,
            include_usage,
            reservation,
        ));
    }
    for runner in &mut runners {
        runner.run_to_end().await?;
    }
    let prompt_logprobs = req.prompt_logprobs;
    buffered_json(
        state.limits.max_response_bytes,
        Some(reservation),
        move |out| {
            let state = &*state;
            let mut choices = Vec::new();
            let (mut prompt_tokens, mut completion_tokens) = (0, 0);
            for (p, runner) in runners.iter().enumerate() {
                prompt_tokens += runner.prompt.len();
                let scores = prompt_scores.get(p);
                for (j, c) in runner.choices.iter().enumerate() {
                    completion_tokens += c.token_ids.len();
                    choices.push(choice_body(
                        state,
                        runner,
                        c,
                        p * plan.n + j,
                        &plan,
                        scores,
                        prompt_logprobs,
                    ));
                }
            }
            let first = runners.first();
            out.write(&CompletionBody {
                id: &plan.id,
                object: "text_completion",
                created: plan.created,
                model: &state.served_model_name,
                choices,
                usage: usage(prompt_tokens, completion_tokens),
                weight_version: first.map(Runner::version).unwrap_or_default(),
                weight_versions: runners.iter().find_map(Runner::version_spans),
            })
        },
    )
    .await
}

#[derive(Serialize)]
struct CompletionBody<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<CompletionChoice<'a>>,
    usage: Value,
    weight_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_versions: Option<Value>,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: usize,
    text: String,
    logprobs: Option<LegacyLogprobs<'a>>,
    finish_reason: Option<&'static str>,
    stop_reason: &'a Value,
    prompt_token_ids: &'a [u32],
    generation_token_ids: &'a [u32],
    generation_log_probs: Finite<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_versions: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_logprobs: Option<PromptLogprobs<'a>>,
}

async fn score_prompt(
    state: &AppState,
    prompt: &[u32],
    top: usize,
    adapter: Option<Arc<crate::lora::LoraAdapter>>,
) -> Result<ScoreOutput, ApiError> {
    if prompt.len() < 2 {
        return Ok(ScoreOutput {
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            weight_version: adapter.map_or_else(
                || state.engine.stats().weight_version(),
                |a| a.version.clone(),
            ),
        });
    }
    let dist = DistributionParams::default();
    Ok(state
        .engine
        .score_with_adapter(prompt.to_vec(), 1, dist, LogprobsMode::Raw, top, adapter)
        .await?)
}

/// vLLM's shape: `null` for the first token, then `{id: {logprob, rank, decoded_token}}`
/// holding the prompt token and the `k` best alternatives.
struct PromptLogprobs<'a> {
    state: &'a AppState,
    prompt: &'a [u32],
    scores: &'a ScoreOutput,
    k: usize,
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
    state: &'a AppState,
    token: u32,
    logprob: f32,
    top: &'a [(u32, f32)],
    k: usize,
}

impl Serialize for PromptPosition<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let decoded = |t: u32| {
            self.state
                .chat
                .tokenizer
                .decode(&[t], false)
                .unwrap_or_default()
        };
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
        let positions = self.prompt.iter().enumerate().map(|(i, &token)| {
            (i > 0).then(|| PromptPosition {
                state: self.state,
                token,
                logprob: self
                    .scores
                    .token_logprobs
                    .get(i - 1)
                    .copied()
                    .unwrap_or(f32::NEG_INFINITY),
                top: self
                    .scores
                    .top_logprobs
                    .get(i - 1)
                    .map_or(&[][..], Vec::as_slice),
                k: self.k,
            })
        });
        s.collect_seq(positions)
    }
}

/// A reported token: its ID and, unless it opens the echoed prompt, its
/// log-prob and alternatives.
type Position<'a> = (u32, Option<(f32, &'a [(u32, f32)])>);

/// Legacy completions `logprobs` for `range` of a choice's tokens; with echo,
/// the prompt's tokens come first (the very first has no log-prob).
struct LegacyLogprobs<'a> {
    state: &'a AppState,
    choice: &'a ChoiceState,
    range: std::ops::Range<usize>,
    k: usize,
    format: TokenFormat,
    prompt: Option<(&'a [u32], &'a ScoreOutput)>,
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
            let name = token_name(self.state, t, self.format);
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
        let prompt = self.prompt.into_iter().flat_map(|(ids, scores)| {
            ids.iter().enumerate().map(move |(i, &t)| {
                let scored = (i > 0).then(|| {
                    let top = scores
                        .top_logprobs
                        .get(i - 1)
                        .map_or(&[][..], Vec::as_slice);
                    (scores.token_logprobs[i - 1], top)
                });
                (t, scored)
            })
        });
        let c = self.choice;
        let generated = self.range.clone().map(move |i| {
            let top: &[(u32, f32)] = &c.top_logprobs[i];
            (c.token_ids[i], Some((c.logprobs[i], top)))
        });
        prompt.chain(generated)
    }
}

impl Serialize for LegacyLogprobs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<String> = self
            .positions()
            .map(|(t, _)| token_name(self.state, t, self.format))
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

fn legacy_logprobs<'a>(
    state: &'a AppState,
    c: &'a ChoiceState,
    range: std::ops::Range<usize>,
    plan: &Plan,
    prompt: Option<(&'a [u32], &'a ScoreOutput)>,
) -> Option<LegacyLogprobs<'a>> {
    plan.logprobs.map(|k| LegacyLogprobs {
        state,
        choice: c,
        range,
        k,
        format: plan.format,
        prompt,
    })
}

fn choice_body<'a>(
    state: &'a AppState,
    runner: &'a Runner,
    c: &'a ChoiceState,
    index: usize,
    plan: &Plan,
    scores: Option<&'a ScoreOutput>,
    prompt_logprobs: Option<usize>,
) -> CompletionChoice<'a> {
    let mut text = String::new();
    if plan.echo {
        text = state
            .chat
            .tokenizer
            .decode(&runner.prompt, false)
            .unwrap_or_default();
    }
    text.push_str(&c.text);
    let echo_scores = scores
        .filter(|_| plan.echo)
        .map(|s| (runner.prompt.as_slice(), s));
    CompletionChoice {
        index,
        text,
        logprobs: legacy_logprobs(state, c, 0..c.token_ids.len(), plan, echo_scores),
        finish_reason: c.finish_reason,
        stop_reason: &c.stop_reason,
        prompt_token_ids: &runner.prompt,
        generation_token_ids: &c.token_ids,
        generation_log_probs: Finite(&c.logprobs),
        token_ids: plan.return_token_ids.then_some(c.token_ids.as_slice()),
        weight_versions: c.version_spans(),
        prompt_logprobs: prompt_logprobs
            .zip(scores)
            .map(|(k, scores)| PromptLogprobs {
                state,
                prompt: &runner.prompt,
                scores,
                k,
            }),
    }
}

fn stream_response(
    state: Arc<AppState>,
    runners: Vec<Runner>,
    plan: Arc<Plan>,
    include_usage: bool,
    reservation: Reservation,
) -> Response {
    let (sse, response) = sse_response();
    tokio::spawn(async move {
        // Held until the stream ends.
        let _reservation = reservation;
        let send = |v: Value| sse.send(v);
        let mut prompt_tokens = 0;
        let mut completion_tokens = 0;
        for (p, mut runner) in runners.into_iter().enumerate() {
            prompt_tokens += runner.prompt.len();
            let mut sent = vec![0usize; runner.choices.len()];
            loop {
                let progress = match runner.next().await {
                    Ok(Some(progress)) => progress,
                    Ok(None) => break,
                    Err(e) => {
                        let _ = send(e.body()).await;
                        return;
                    }
                };
                let c = &runner.choices[progress.choice];
                let delta = if c.text.len() > sent[progress.choice]
                    && c.text.is_char_boundary(sent[progress.choice])
                {
                    let d = c.text[sent[progress.choice]..].to_string();
                    sent[progress.choice] = c.text.len();
                    d
                } else {
                    String::new()
                };
                let mut choice = json!({
                    "index": p * plan.n + progress.choice,
                    "text": delta,
                    "logprobs": serde_json::to_value(legacy_logprobs(&state, c, progress.new_tokens.clone(), &plan, None)).unwrap_or(Value::Null),
                    "finish_reason": c.finish_reason.filter(|_| progress.finished),
                });
                if plan.return_token_ids {
                    choice["token_ids"] = json!(c.token_ids[progress.new_tokens.clone()]);
                }
                if progress.finished {
                    choice["stop_reason"] = c.stop_reason.clone();
                    choice["prompt_token_ids"] = json!(runner.prompt);
                    choice["generation_token_ids"] = json!(c.token_ids);
                    choice["generation_log_probs"] = json!(finite_logprobs(&c.logprobs));
                    completion_tokens += c.token_ids.len();
                }
                let body = json!({
                    "id": plan.id, "object": "text_completion", "created": plan.created,
                    "model": state.served_model_name, "choices": [choice], "weight_version": runner.version(),
                });
                runner.choices[progress.choice].forget_alternatives(progress.new_tokens.clone());
                if !send(body).await {
                    return;
                }
            }
        }
        if include_usage {
            let body = json!({
                "id": plan.id, "object": "text_completion", "created": plan.created,
                "model": state.served_model_name, "choices": [], "usage": usage(prompt_tokens, completion_tokens),
            });
            if !send(body).await {
                return;
            }
        }
        sse.done().await;
    });
    response
}
