//! `POST /v1/completions`: prompts as text, token IDs, or a batch of either;
//! `echo`, legacy `logprobs`, `prompt_logprobs`, streaming.

use super::error::ApiError;
use super::generation::sse_response;
use super::generation::{
    finite, finite_logprobs, response_id, token_name, unix_time, usage, ChoiceState, Runner,
    TokenFormat,
};
use super::json::{from_body, ApiJson};
use super::types::SamplingRequest;
use super::AppState;
use crate::engine::{DistributionParams, LogprobsMode, ScoreOutput};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
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
    state.check_model(req.sampling.model.as_deref())?;
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
    let params = req.sampling.sampling_params(top, state.defaults)?;
    let plan = Plan {
        id: response_id("cmpl"),
        created: unix_time(),
        logprobs: req.logprobs,
        echo: req.echo,
        format: TokenFormat {
            as_token_ids: req.sampling.return_tokens_as_token_ids.unwrap_or(false),
        },
        return_token_ids: req.sampling.return_token_ids.unwrap_or(false),
        n: params.n,
    };
    // Submit every prompt before waiting on any, so they run in the same steps.
    let mut runners = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let options = req.sampling.run_options(&params);
        let stream = state.engine.generate(prompt.clone(), params.clone())?;
        runners.push(Runner::new(state.clone(), prompt, stream, options));
    }
    let mut prompt_scores = Vec::new();
    let wants_prompt_scores =
        req.prompt_logprobs.is_some() || (plan.echo && plan.logprobs.is_some());
    if wants_prompt_scores {
        let k = req
            .prompt_logprobs
            .unwrap_or(0)
            .max(plan.logprobs.unwrap_or(0));
        for r in &runners {
            prompt_scores.push(score_prompt(&state, &r.prompt, k).await?);
        }
    }
    if req.sampling.stream.unwrap_or(false) {
        let include_usage = req
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        return Ok(stream_response(state, runners, plan, include_usage));
    }
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    let mut prompt_tokens = 0;
    let mut version = None;
    let mut spans = None;
    for (p, mut runner) in runners.into_iter().enumerate() {
        runner.run_to_end().await?;
        prompt_tokens += runner.prompt.len();
        version.get_or_insert_with(|| runner.version());
        if spans.is_none() {
            spans = runner.version_spans();
        }
        for (j, c) in runner.choices.iter().enumerate() {
            completion_tokens += c.token_ids.len();
            let scores = prompt_scores.get(p);
            let mut choice = choice_json(&state, &runner, c, p * plan.n + j, &plan, scores);
            if let (Some(k), Some(s)) = (req.prompt_logprobs, scores) {
                choice["prompt_logprobs"] = prompt_logprobs_json(&state, &runner.prompt, s, k);
            }
            choices.push(choice);
        }
    }
    let mut body = json!({
        "id": plan.id,
        "object": "text_completion",
        "created": plan.created,
        "model": state.served_model_name,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
        "weight_version": version.unwrap_or_default(),
    });
    if let Some(spans) = spans {
        body["weight_versions"] = spans;
    }
    Ok(Json(body).into_response())
}

async fn score_prompt(
    state: &AppState,
    prompt: &[u32],
    top: usize,
) -> Result<ScoreOutput, ApiError> {
    if prompt.len() < 2 {
        return Ok(ScoreOutput {
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            weight_version: state.engine.stats().weight_version(),
        });
    }
    let dist = DistributionParams::default();
    Ok(state
        .engine
        .score(prompt.to_vec(), 1, dist, LogprobsMode::Raw, top)
        .await?)
}

/// vLLM's shape: `null` for the first token, then `{id: {logprob, rank, decoded_token}}`
/// holding the prompt token and the `k` best alternatives.
fn prompt_logprobs_json(state: &AppState, prompt: &[u32], scores: &ScoreOutput, k: usize) -> Value {
    let mut out = vec![Value::Null];
    for (i, &tok) in prompt.iter().enumerate().skip(1) {
        let mut entry = Map::new();
        let lp = scores
            .token_logprobs
            .get(i - 1)
            .copied()
            .unwrap_or(f32::NEG_INFINITY);
        let top = scores.top_logprobs.get(i - 1).cloned().unwrap_or_default();
        let rank = top.iter().position(|(t, _)| *t == tok).map(|r| r + 1);
        let decoded = |t: u32| state.chat.tokenizer.decode(&[t], false).unwrap_or_default();
        entry.insert(
            tok.to_string(),
            json!({"logprob": finite(lp), "rank": rank, "decoded_token": decoded(tok)}),
        );
        for (r, (t, l)) in top.iter().take(k).enumerate() {
            entry.entry(t.to_string()).or_insert_with(
                || json!({"logprob": finite(*l), "rank": r + 1, "decoded_token": decoded(*t)}),
            );
        }
        out.push(Value::Object(entry));
    }
    Value::Array(out)
}

/// Legacy completions `logprobs` for `range` of a choice's tokens; with echo,
/// the prompt's tokens come first (the very first has no log-prob).
fn legacy_logprobs(
    state: &AppState,
    c: &ChoiceState,
    range: std::ops::Range<usize>,
    plan: &Plan,
    prompt: Option<(&[u32], &ScoreOutput)>,
) -> Value {
    let Some(k) = plan.logprobs else {
        return Value::Null;
    };
    let mut tokens = Vec::new();
    let mut token_logprobs = Vec::new();
    let mut top_logprobs = Vec::new();
    let top_map = |top: &[(u32, f32)]| -> Value {
        let m: Map<String, Value> = top
            .iter()
            .take(k)
            .map(|&(t, l)| (token_name(state, t, plan.format), json!(finite(l))))
            .collect();
        Value::Object(m)
    };
    if let Some((ids, scores)) = prompt {
        for (i, &t) in ids.iter().enumerate() {
            tokens.push(token_name(state, t, plan.format));
            if i == 0 {
                token_logprobs.push(Value::Null);
                top_logprobs.push(Value::Null);
            } else {
                token_logprobs.push(json!(finite(scores.token_logprobs[i - 1])));
                top_logprobs.push(top_map(&scores.top_logprobs[i - 1]));
            }
        }
    }
    for i in range {
        tokens.push(token_name(state, c.token_ids[i], plan.format));
        token_logprobs.push(json!(finite(c.logprobs[i])));
        top_logprobs.push(top_map(&c.top_logprobs[i]));
    }
    let mut offsets = Vec::with_capacity(tokens.len());
    let mut at = 0usize;
    for t in &tokens {
        offsets.push(at);
        at += t.len();
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets})
}

fn choice_json(
    state: &AppState,
    runner: &Runner,
    c: &ChoiceState,
    index: usize,
    plan: &Plan,
    scores: Option<&ScoreOutput>,
) -> Value {
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
    let mut choice = json!({
        "index": index,
        "text": text,
        "logprobs": legacy_logprobs(state, c, 0..c.token_ids.len(), plan, echo_scores),
        "finish_reason": c.finish_reason,
        "stop_reason": c.stop_reason,
        "prompt_token_ids": runner.prompt,
        "generation_token_ids": c.token_ids,
        "generation_log_probs": finite_logprobs(&c.logprobs),
    });
    if plan.return_token_ids {
        choice["token_ids"] = json!(c.token_ids);
    }
    if let Some(spans) = c.version_spans() {
        choice["weight_versions"] = spans;
    }
    choice
}

fn stream_response(
    state: Arc<AppState>,
    runners: Vec<Runner>,
    plan: Plan,
    include_usage: bool,
) -> Response {
    let (sse, response) = sse_response();
    tokio::spawn(async move {
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
                    "logprobs": legacy_logprobs(&state, c, progress.new_tokens.clone(), &plan, None),
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
