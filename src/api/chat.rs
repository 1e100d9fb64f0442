//! `POST /v1/chat/completions`, streaming and not, with the token transport
//! fields of CONTRACT.md on every choice.

use super::admission::{RequestShape, Reservation};
use super::error::ApiError;
use super::generation::sse_response;
use super::generation::{
    finite_logprobs, response_id, unix_time, usage, ChatLogprobs, ChoiceState, Progress,
    ResponseMeter, Runner, TokenFormat,
};
use super::json::{from_body, ApiJson};
use super::response::{buffered_json, Finite};
use super::tools::{checked_tools, tool_use, ToolUse};
use super::types::{explicit_null, normalize_messages, SamplingRequest};
use super::AppState;
use crate::chat::parsers::{parse_output, ParsedOutput, ReasoningParser, ToolCallParser};
use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    messages: Vec<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default, deserialize_with = "explicit_null")]
    top_logprobs: Option<Option<usize>>,
    add_generation_prompt: Option<bool>,
    chat_template_kwargs: Option<Map<String, Value>>,
    required_prefix_token_ids: Option<Vec<u32>>,
    /// Read separately from the same body (not `flatten`, which loses field
    /// names in errors).
    #[serde(skip)]
    sampling: SamplingRequest,
}

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
    req.sampling = from_body(&body)?;
    let adapter = state.resolve_model(req.sampling.model.as_deref())?;
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
    let params = req
        .sampling
        .sampling_params(top_logprobs, state.defaults, &state.limits)?;
    let stop = req.sampling.stop_matcher(&state.limits)?;
    let streaming = req.sampling.stream.unwrap_or(false);
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
    let options = req.sampling.run_options(&params, stop, meter);
    let stream = state
        .engine
        .generate_with_adapter(prompt.clone(), params, adapter)?;
    let runner = Runner::new(state.clone(), prompt, stream, options);
    let plan = ChatPlan {
        id: response_id("chatcmpl"),
        created: unix_time(),
        want_logprobs,
        format: TokenFormat {
            as_token_ids: req.sampling.return_tokens_as_token_ids.unwrap_or(false),
        },
        return_token_ids: req.sampling.return_token_ids.unwrap_or(false),
        reasoning: state.reasoning_parser,
        tools: match tool_use {
            ToolUse::Auto => state.tool_call_parser,
            ToolUse::Off => ToolCallParser::None,
        },
        include_usage: req
            .sampling
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

fn tool_calls_json(parsed: &ParsedOutput) -> Vec<Value> {
    parsed
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            json!({
                "id": response_id("call"),
                "index": i,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            })
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

fn logprobs_json(
    state: &AppState,
    c: &ChoiceState,
    range: std::ops::Range<usize>,
    plan: &ChatPlan,
) -> Value {
    if !plan.want_logprobs {
        return Value::Null;
    }
    serde_json::to_value(ChatLogprobs {
        state,
        choice: c,
        range,
        format: plan.format,
    })
    .unwrap_or(Value::Null)
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'static str,
    content: Option<&'a str>,
    tool_calls: Vec<Value>,
    prompt_token_ids: &'a [u32],
    generation_token_ids: &'a [u32],
    generation_log_probs: Finite<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: usize,
    message: ChatMessage<'a>,
    logprobs: Option<ChatLogprobs<'a>>,
    finish_reason: Option<&'static str>,
    stop_reason: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_versions: Option<Value>,
}

#[derive(Serialize)]
struct ChatBody<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChatChoice<'a>>,
    usage: Value,
    weight_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_versions: Option<Value>,
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
            .map(|c| parse_output(&c.text, plan.reasoning, plan.tools, false))
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
                    tool_calls: tool_calls_json(parsed),
                    prompt_token_ids: &runner.prompt,
                    generation_token_ids: &c.token_ids,
                    generation_log_probs: Finite(&c.logprobs),
                    reasoning_content: parsed.reasoning.as_deref(),
                    reasoning: parsed.reasoning.as_deref(),
                },
                logprobs: plan.want_logprobs.then_some(ChatLogprobs {
                    state,
                    choice: c,
                    range: 0..c.token_ids.len(),
                    format: plan.format,
                }),
                finish_reason: finish_reason(c, parsed),
                stop_reason: &c.stop_reason,
                token_ids: plan.return_token_ids.then_some(c.token_ids.as_slice()),
                weight_versions: c.version_spans(),
            })
            .collect();
        let completion_tokens = runner.choices.iter().map(|c| c.token_ids.len()).sum();
        out.write(&ChatBody {
            id: &plan.id,
            object: "chat.completion",
            created: plan.created,
            model: &state.served_model_name,
            choices,
            usage: usage(runner.prompt.len(), completion_tokens),
            weight_version: runner.version(),
            prompt_token_ids: plan.return_token_ids.then_some(runner.prompt.as_slice()),
            weight_versions: runner.version_spans(),
        })
    })
    .await
}

/// What a stream has already sent of one choice's parsed text.
#[derive(Default, Clone)]
struct Sent {
    reasoning: usize,
    content: usize,
}

/// The text `now` adds beyond the `sent` bytes already streamed, if it only grew.
fn growth(now: &str, sent: &mut usize) -> Option<String> {
    if now.len() > *sent && now.is_char_boundary(*sent) {
        let delta = now[*sent..].to_string();
        *sent = now.len();
        Some(delta)
    } else {
        None
    }
}

fn chunk(plan: &ChatPlan, state: &AppState, version: &str, choices: Vec<Value>) -> Value {
    json!({
        "id": plan.id,
        "object": "chat.completion.chunk",
        "created": plan.created,
        "model": state.served_model_name,
        "choices": choices,
        "weight_version": version,
    })
}

fn progress_chunk(
    state: &AppState,
    runner: &Runner,
    plan: &ChatPlan,
    p: &Progress,
    sent: &mut Sent,
) -> Value {
    let c = &runner.choices[p.choice];
    let parsed = parse_output(&c.text, plan.reasoning, plan.tools, !p.finished);
    let mut delta = Map::new();
    if let Some(r) = parsed
        .reasoning
        .as_deref()
        .and_then(|r| growth(r, &mut sent.reasoning))
    {
        delta.insert("reasoning_content".into(), json!(r));
        delta.insert("reasoning".into(), json!(r));
    }
    if let Some(text) = growth(&parsed.content, &mut sent.content) {
        delta.insert("content".into(), json!(text));
    }
    let mut choice = json!({
        "index": p.choice,
        "logprobs": logprobs_json(state, c, p.new_tokens.clone(), plan),
        "finish_reason": Value::Null,
    });
    if plan.return_token_ids {
        choice["token_ids"] = json!(c.token_ids[p.new_tokens.clone()]);
    }
    if p.finished {
        if !parsed.tool_calls.is_empty() {
            delta.insert("tool_calls".into(), json!(tool_calls_json(&parsed)));
        }
        delta.insert("prompt_token_ids".into(), json!(runner.prompt));
        delta.insert("generation_token_ids".into(), json!(c.token_ids));
        delta.insert(
            "generation_log_probs".into(),
            json!(finite_logprobs(&c.logprobs)),
        );
        choice["finish_reason"] = json!(finish_reason(c, &parsed));
        choice["stop_reason"] = c.stop_reason.clone();
        if let Some(spans) = c.version_spans() {
            choice["weight_versions"] = spans;
        }
    }
    choice["delta"] = Value::Object(delta);
    chunk(plan, state, &runner.version(), vec![choice])
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
        let send = |v: Value| sse.send(v);
        let n = runner.choices.len();
        let first: Vec<Value> = (0..n)
            .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
            .collect();
        if !send(chunk(&plan, &state, &runner.version(), first)).await {
            return;
        }
        let mut sent = vec![Sent::default(); n];
        loop {
            match runner.next().await {
                Ok(Some(p)) => {
                    let body = progress_chunk(&state, &runner, &plan, &p, &mut sent[p.choice]);
                    runner.choices[p.choice].forget_alternatives(p.new_tokens.clone());
                    // A closed channel means the client left: dropping the
                    // runner cancels its sequences in the engine.
                    if !send(body).await {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = send(e.body()).await;
                    break;
                }
            }
        }
        if plan.include_usage {
            let completion = runner.choices.iter().map(|c| c.token_ids.len()).sum();
            let mut last = chunk(&plan, &state, &runner.version(), Vec::new());
            last["usage"] = usage(runner.prompt.len(), completion);
            if !send(last).await {
                return;
            }
        }
        sse.done().await;
    });
    response
}
