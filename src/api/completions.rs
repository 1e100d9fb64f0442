//! `POST /v1/completions`: prompts as text, token IDs, or a batch of either;
//! `echo`, legacy `logprobs`, `prompt_logprobs`, streaming.

use super::admission::{RequestShape, Reservation};
use super::error::ApiError;
use super::generation::{sse_response, ChoiceState, ResponseMeter, Runner};
use super::json::{from_body, ApiJson};
use super::limits::RequestLimits;
use super::protocol::completion::{
    Completion, CompletionChoice, CompletionChunk, CompletionChunkChoice, LegacyLogprobs,
    PromptLogprobs, PromptScores, TEXT_COMPLETION,
};
use super::protocol::request::{CompletionRequest, PromptField, SamplingRequest};
use super::protocol::{response_id, unix_time, Finite, TokenFormat, Usage};
use super::response::buffered_json;
use super::AppState;
use crate::chat::text_output::growth;
use crate::engine::{DistributionParams, LogprobsMode, ScoreOutput};
use axum::extract::State;
use axum::response::Response;
use serde_json::Value;
use std::sync::Arc;

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
    let req: CompletionRequest = from_body(&body)?;
    let sampling: SamplingRequest = from_body(&body)?;
    drop(body);
    state.check_model(sampling.model.as_deref())?;
    let limits = &state.limits;
    let count = match &req.prompt {
        PromptField::Text(_) | PromptField::Tokens(_) => 1,
        PromptField::Texts(ts) => ts.len(),
        PromptField::TokenLists(ls) => ls.len(),
    };
    // Before tokenizing anything: a request's size is bounded up front.
    limits.check_sequences(count, sampling.n.unwrap_or(1))?;
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
    let params = sampling.sampling_params(top, state.defaults, limits)?;
    let stop = sampling.stop_matcher(limits)?;
    let streaming = sampling.stream.unwrap_or(false);
    let plan = Arc::new(Plan {
        id: response_id("cmpl"),
        created: unix_time(),
        logprobs: req.logprobs,
        echo: req.echo,
        format: TokenFormat {
            as_token_ids: sampling.return_tokens_as_token_ids.unwrap_or(false),
        },
        return_token_ids: sampling.return_token_ids.unwrap_or(false),
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
        let options = sampling.run_options(&params, stop.clone(), meter.clone());
        let stream = state.engine.generate(prompt.clone(), params.clone())?;
        runners.push(Runner::new(state.clone(), prompt, stream, options));
    }
    let mut prompt_scores = Vec::new();
    if wants_prompt_scores {
        let k = req
            .prompt_logprobs
            .unwrap_or(0)
            .max(plan.logprobs.unwrap_or(0));
        for r in &runners {
            prompt_scores.push(score_prompt(&state, &r.prompt, k).await?);
        }
    }
    if streaming {
        let include_usage = sampling
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
            out.write(&Completion {
                id: &plan.id,
                object: TEXT_COMPLETION,
                created: plan.created,
                model: &state.served_model_name,
                choices,
                usage: Usage::new(prompt_tokens, completion_tokens),
                weight_version: first.map(Runner::version).unwrap_or_default(),
                weight_versions: runners.iter().find_map(Runner::version_spans),
            })
        },
    )
    .await
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

fn prompt_scores<'a>(prompt: &'a [u32], scores: &'a ScoreOutput) -> PromptScores<'a> {
    PromptScores {
        prompt,
        token_logprobs: &scores.token_logprobs,
        top_logprobs: &scores.top_logprobs,
    }
}

fn legacy_logprobs<'a>(
    state: &'a AppState,
    c: &'a ChoiceState,
    range: std::ops::Range<usize>,
    plan: &Plan,
    prompt: Option<PromptScores<'a>>,
) -> Option<LegacyLogprobs<'a>> {
    plan.logprobs.map(|k| LegacyLogprobs {
        tokenizer: &state.chat.tokenizer,
        token_ids: &c.token_ids[range.clone()],
        logprobs: &c.logprobs[range.clone()],
        top_logprobs: &c.top_logprobs[range],
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
    text.push_str(c.text());
    let scores = scores.map(|s| prompt_scores(&runner.prompt, s));
    CompletionChoice {
        index,
        text,
        logprobs: legacy_logprobs(
            state,
            c,
            0..c.token_ids.len(),
            plan,
            scores.filter(|_| plan.echo),
        ),
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
                tokenizer: &state.chat.tokenizer,
                scores,
                k,
            }),
    }
}

fn chunk<'a>(
    plan: &'a Plan,
    state: &'a AppState,
    choices: Vec<CompletionChunkChoice<'a>>,
    weight_version: Option<&'a str>,
    usage: Option<Usage>,
) -> CompletionChunk<'a> {
    CompletionChunk {
        id: &plan.id,
        object: TEXT_COMPLETION,
        created: plan.created,
        model: &state.served_model_name,
        choices,
        weight_version,
        usage,
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
                        let _ = sse.send(&e.body()).await;
                        return;
                    }
                };
                let c = &runner.choices[progress.choice];
                let text = c.output.streamable(progress.finished);
                let delta = growth(text, &mut sent[progress.choice]).unwrap_or_default();
                let new = progress.new_tokens.clone();
                let finished = progress.finished;
                let mut choice = CompletionChunkChoice {
                    index: p * plan.n + progress.choice,
                    text: delta,
                    logprobs: legacy_logprobs(&state, c, new.clone(), &plan, None),
                    finish_reason: c.finish_reason.filter(|_| finished),
                    token_ids: plan.return_token_ids.then(|| &c.token_ids[new.clone()]),
                    stop_reason: None,
                    prompt_token_ids: None,
                    generation_token_ids: None,
                    generation_log_probs: None,
                };
                if finished {
                    choice.stop_reason = Some(&c.stop_reason);
                    choice.prompt_token_ids = Some(&runner.prompt);
                    choice.generation_token_ids = Some(&c.token_ids);
                    choice.generation_log_probs = Some(Finite(&c.logprobs));
                    completion_tokens += c.token_ids.len();
                }
                let version = runner.version();
                let body = chunk(&plan, &state, vec![choice], Some(&version), None);
                let delivered = sse.send(&body).await;
                drop(body);
                if !delivered {
                    return;
                }
                runner.choices[progress.choice].forget_alternatives(new);
            }
        }
        if include_usage {
            let usage = Usage::new(prompt_tokens, completion_tokens);
            if !sse
                .send(&chunk(&plan, &state, Vec::new(), None, Some(usage)))
                .await
            {
                return;
            }
        }
        sse.done().await;
    });
    response
}
