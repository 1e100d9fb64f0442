//! `POST /v1/chat/completions`, streaming and not, with the token transport
//! fields of CONTRACT.md on every choice.

use super::admission::{RequestShape, Reservation};
use super::error::ApiError;
use super::generation::{sse_response, ChoiceState, Progress, ResponseMeter, Runner};
use super::json::{from_body, ApiJson};
use super::protocol::chat::{
    ChatChoice, ChatChunk, ChatCompletion, ChatLogprobs, ChatMessage, ChunkChoice, ChunkDelta,
    FunctionCall, RoleChoice, RoleDelta, ToolCall, CHAT_COMPLETION, CHAT_COMPLETION_CHUNK,
};
use super::protocol::request::{ChatRequest, SamplingRequest};
use super::protocol::{response_id, unix_time, Finite, TokenFormat, Usage};
use super::response::buffered_json;
use super::tools::{checked_tools, tool_use, ToolUse};
use super::types::normalize_messages;
use super::AppState;
use crate::chat::parsers::{parse_output, ParsedOutput, ReasoningParser, ToolCallParser};
use crate::chat::text_output::{ChatDelta, ChatStreamText};
use axum::extract::State;
use axum::response::Response;
use serde_json::Value;
use std::sync::Arc;

/// Everything a response needs to know besides the generated tokens.
struct ChatPlan {
    id: String,
    created: u64,
    want_logprobs: bool,
    format: TokenFormat,
    return_token_ids: bool,
    reasoning: ReasoningParser,
    tools: ToolCallParser,
    include_usage: bool,
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let mut req: ChatRequest = from_body(&body)?;
    let sampling: SamplingRequest = from_body(&body)?;
    state.check_model(sampling.model.as_deref())?;
    let want_logprobs = req.logprobs.unwrap_or(false);
    let top_logprobs = match req.top_logprobs {
        Some(None) if want_logprobs => {
            return Err(ApiError::bad_request(
                "top_logprobs must be an integer in [0, 20] when logprobs is true, not null",
                Some("top_logprobs"),
            ))
        }
        Some(Some(k)) if want_logprobs => k,
        _ => 0,
    };
    normalize_messages(&mut req.messages)?;
    let tools = checked_tools(req.tools.as_ref())?;
    let tool_use = tool_use(tools, req.tool_choice.as_ref())?;
    let prompt = state.chat.encode_chat_on_policy(
        &req.messages,
        tools,
        req.add_generation_prompt.unwrap_or(true),
        &req.chat_template_kwargs.clone().unwrap_or_default(),
        req.required_prefix_token_ids.as_deref(),
    )?;
    let params = sampling.sampling_params(top_logprobs, state.defaults, &state.limits)?;
    let stop = sampling.stop_matcher(&state.limits)?;
    let streaming = sampling.stream.unwrap_or(false);
    let meter = (!streaming).then(|| {
        Arc::new(ResponseMeter::new(
            state.limits.max_response_bytes,
            min_token_bytes(want_logprobs, top_logprobs),
        ))
    });
    if let Some(m) = &meter {
        // Every choice repeats the prompt's IDs (at least 2 bytes each).
        m.charge(2 * params.n * prompt.len())?;
    }
    let shape = RequestShape {
        sequences: params.n,
        prompt_tokens: prompt.len(),
        max_tokens: params
            .max_tokens
            .min(state.max_model_len().saturating_sub(prompt.len())),
        top_logprobs,
        buffered: !streaming,
    };
    let reservation = state
        .memory
        .reserve(shape.cost(state.limits.max_response_bytes))
        .await?;
    let options = sampling.run_options(&params, stop, meter);
    let stream = state.engine.generate(prompt.clone(), params)?;
    let runner = Runner::new(state.clone(), prompt, stream, options);
    let plan = ChatPlan {
        id: response_id("chatcmpl"),
        created: unix_time(),
        want_logprobs,
        format: TokenFormat {
            as_token_ids: sampling.return_tokens_as_token_ids.unwrap_or(false),
        },
        return_token_ids: sampling.return_token_ids.unwrap_or(false),
        reasoning: state.reasoning_parser,
        tools: match tool_use {
            ToolUse::Auto => state.tool_call_parser,
            ToolUse::Off => ToolCallParser::None,
        },
        include_usage: sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    };
    if streaming {
        Ok(stream_response(state, runner, plan, reservation))
    } else {
        full_response(state, runner, plan, reservation).await
    }
}

/// The fewest bytes one generated token adds to a chat response: its ID and
/// log-prob, and with `logprobs` its entry and each alternative's.
fn min_token_bytes(logprobs: bool, top_logprobs: usize) -> usize {
    if logprobs {
        4 + 50 + 40 * top_logprobs
    } else {
        4
    }
}

fn tool_calls(parsed: &ParsedOutput) -> Vec<ToolCall<'_>> {
    parsed
        .tool_calls
        .iter()
        .enumerate()
        .map(|(index, call)| ToolCall {
            id: response_id("call"),
            index,
            kind: "function",
            function: FunctionCall {
                name: &call.name,
                arguments: &call.arguments,
            },
        })
        .collect()
}

/// `tool_calls` replaces `stop` when the model called a tool.
fn finish_reason(choice: &ChoiceState, parsed: &ParsedOutput) -> Option<&'static str> {
    match choice.finish_reason {
        Some("stop") if !parsed.tool_calls.is_empty() => Some("tool_calls"),
        other => other,
    }
}

/// The choice's `logprobs` for `range` of its tokens, if the request asked.
fn logprobs<'a>(
    state: &'a AppState,
    c: &'a ChoiceState,
    range: std::ops::Range<usize>,
    plan: &ChatPlan,
) -> Option<ChatLogprobs<'a>> {
    plan.want_logprobs.then(|| ChatLogprobs {
        tokenizer: &state.chat.tokenizer,
        token_ids: &c.token_ids[range.clone()],
        logprobs: &c.logprobs[range.clone()],
        top_logprobs: &c.top_logprobs[range],
        format: plan.format,
    })
}

async fn full_response(
    state: Arc<AppState>,
    mut runner: Runner,
    plan: ChatPlan,
    reservation: Reservation,
) -> Result<Response, ApiError> {
    runner.run_to_end().await?;
    let limit = state.limits.max_response_bytes;
    buffered_json(limit, Some(reservation), move |out| {
        let state = &*state;
        let parsed: Vec<ParsedOutput> = runner
            .choices
            .iter()
            .map(|c| parse_output(c.text(), plan.reasoning, plan.tools, false))
            .collect();
        let choices = runner
            .choices
            .iter()
            .zip(&parsed)
            .enumerate()
            .map(|(index, (c, parsed))| ChatChoice {
                index,
                message: ChatMessage {
                    role: "assistant",
                    content: (!parsed.content.is_empty() || parsed.tool_calls.is_empty())
                        .then_some(parsed.content.as_str()),
                    tool_calls: tool_calls(parsed),
                    prompt_token_ids: &runner.prompt,
                    generation_token_ids: &c.token_ids,
                    generation_log_probs: Finite(&c.logprobs),
                    reasoning_content: parsed.reasoning.as_deref(),
                    reasoning: parsed.reasoning.as_deref(),
                },
                logprobs: logprobs(state, c, 0..c.token_ids.len(), &plan),
                finish_reason: finish_reason(c, parsed),
                stop_reason: &c.stop_reason,
                token_ids: plan.return_token_ids.then_some(c.token_ids.as_slice()),
                weight_versions: c.version_spans(),
            })
            .collect();
        let completion_tokens = runner.choices.iter().map(|c| c.token_ids.len()).sum();
        out.write(&ChatCompletion {
            id: &plan.id,
            object: CHAT_COMPLETION,
            created: plan.created,
            model: &state.served_model_name,
            choices,
            usage: Usage::new(runner.prompt.len(), completion_tokens),
            weight_version: runner.version(),
            prompt_token_ids: plan.return_token_ids.then_some(runner.prompt.as_slice()),
            weight_versions: runner.version_spans(),
        })
    })
    .await
}

fn chunk<'a, C>(
    plan: &'a ChatPlan,
    state: &'a AppState,
    version: &'a str,
    choices: Vec<C>,
) -> ChatChunk<'a, C> {
    ChatChunk {
        id: &plan.id,
        object: CHAT_COMPLETION_CHUNK,
        created: plan.created,
        model: &state.served_model_name,
        choices,
        weight_version: version,
        usage: None,
    }
}

/// The chunk choice for what `p` added; `delta` is its text's share.
fn progress_choice<'a>(
    state: &'a AppState,
    runner: &'a Runner,
    plan: &ChatPlan,
    p: &Progress,
    delta: &'a ChatDelta,
) -> ChunkChoice<'a> {
    let c = &runner.choices[p.choice];
    let mut choice = ChunkChoice {
        index: p.choice,
        logprobs: logprobs(state, c, p.new_tokens.clone(), plan),
        finish_reason: None,
        token_ids: plan
            .return_token_ids
            .then(|| &c.token_ids[p.new_tokens.clone()]),
        stop_reason: None,
        weight_versions: None,
        delta: ChunkDelta {
            reasoning_content: delta.reasoning.as_deref(),
            reasoning: delta.reasoning.as_deref(),
            content: delta.content.as_deref(),
            ..ChunkDelta::default()
        },
    };
    if let Some(parsed) = &delta.finished {
        if !parsed.tool_calls.is_empty() {
            choice.delta.tool_calls = Some(tool_calls(parsed));
        }
        choice.delta.prompt_token_ids = Some(&runner.prompt);
        choice.delta.generation_token_ids = Some(&c.token_ids);
        choice.delta.generation_log_probs = Some(Finite(&c.logprobs));
        choice.finish_reason = finish_reason(c, parsed);
        choice.stop_reason = Some(&c.stop_reason);
        choice.weight_versions = c.version_spans();
    }
    choice
}

fn stream_response(
    state: Arc<AppState>,
    mut runner: Runner,
    plan: ChatPlan,
    reservation: Reservation,
) -> Response {
    let (sse, response) = sse_response();
    tokio::spawn(async move {
        // Held until the stream ends.
        let _reservation = reservation;
        let n = runner.choices.len();
        let first: Vec<RoleChoice> = (0..n)
            .map(|index| RoleChoice {
                index,
                delta: RoleDelta {
                    role: "assistant",
                    content: "",
                },
                logprobs: None,
                finish_reason: None,
            })
            .collect();
        if !sse
            .send(&chunk(&plan, &state, &runner.version(), first))
            .await
        {
            return;
        }
        let mut texts = vec![ChatStreamText::new(plan.reasoning, plan.tools); n];
        loop {
            match runner.next().await {
                Ok(Some(p)) => {
                    let c = &runner.choices[p.choice];
                    let delta = texts[p.choice].delta(&c.output, p.finished);
                    let version = runner.version();
                    let choice = progress_choice(&state, &runner, &plan, &p, &delta);
                    // A closed channel means the client left: dropping the
                    // runner cancels its sequences in the engine.
                    if !sse
                        .send(&chunk(&plan, &state, &version, vec![choice]))
                        .await
                    {
                        return;
                    }
                    runner.choices[p.choice].forget_alternatives(p.new_tokens.clone());
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = sse.send(&e.body()).await;
                    break;
                }
            }
        }
        if plan.include_usage {
            let completion = runner.choices.iter().map(|c| c.token_ids.len()).sum();
            let version = runner.version();
            let mut last: ChatChunk<'_, RoleChoice> = chunk(&plan, &state, &version, Vec::new());
            last.usage = Some(Usage::new(runner.prompt.len(), completion));
            if !sse.send(&last).await {
                return;
            }
        }
        sse.done().await;
    });
    response
}
