//! Running one prompt through the engine for an HTTP response: collecting each
//! choice's tokens and log-probs, detokenizing incrementally, applying stop
//! strings, and formatting the per-token `logprobs` entries.

use super::error::ApiError;
use super::AppState;
use crate::engine::{EngineError, EngineEvent, FinishReason, GenerationStream};
use serde_json::{json, Value};
use std::ops::Range;
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

#[derive(Debug, Default, Clone)]
pub struct ChoiceState {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Decoded text so far (cut at a matched stop string).
    pub text: String,
    pub finish_reason: Option<&'static str>,
    /// The stop string or stop token ID that ended the choice.
    pub stop_reason: Value,
    /// Weight version of each run of tokens: (version, start, end), end exclusive.
    pub versions: Vec<(Arc<str>, usize, usize)>,
}

fn spans_json(spans: &[(Arc<str>, usize, usize)]) -> Value {
    spans
        .iter()
        .map(|(v, start, end)| json!({"version": &**v, "start": start, "end": end}))
        .collect()
}

impl ChoiceState {
    /// `weight_versions` spans, or `None` if every token came from one version.
    pub fn version_spans(&self) -> Option<Value> {
        (self.versions.len() > 1).then(|| spans_json(&self.versions))
    }
}

/// What the last call to [`Runner::next`] added to one choice.
pub struct Progress {
    pub choice: usize,
    pub new_tokens: Range<usize>,
    pub finished: bool,
}

pub struct RunOptions {
    pub stop: Vec<String>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
    pub stop_token_ids: Vec<u32>,
}

pub struct Runner {
    state: Arc<AppState>,
    stream: GenerationStream,
    options: RunOptions,
    pub prompt: Vec<u32>,
    pub choices: Vec<ChoiceState>,
    pub weight_version: Option<Arc<str>>,
    started: std::time::Instant,
    /// When each choice's last token arrived (for inter-token latency).
    last_token: Vec<Option<std::time::Instant>>,
}

impl Runner {
    pub fn new(
        state: Arc<AppState>,
        prompt: Vec<u32>,
        stream: GenerationStream,
        options: RunOptions,
    ) -> Self {
        let n = stream.n();
        Self {
            state,
            stream,
            options,
            prompt,
            choices: vec![ChoiceState::default(); n],
            weight_version: None,
            started: std::time::Instant::now(),
            last_token: vec![None; n],
        }
    }

    fn all_finished(&self) -> bool {
        self.choices.iter().all(|c| c.finish_reason.is_some())
    }

    /// The next token of any choice; `None` once every choice has finished.
    pub async fn next(&mut self) -> Result<Option<Progress>, ApiError> {
        while !self.all_finished() {
            let event = match self.stream.next().await {
                Some(EngineEvent::Token(t)) => t,
                Some(EngineEvent::Aborted { choice }) => {
                    let c = &mut self.choices[choice];
                    if c.finish_reason.is_some() {
                        continue;
                    }
                    c.finish_reason = Some("abort");
                    let at = c.token_ids.len();
                    return Ok(Some(Progress {
                        choice,
                        new_tokens: at..at,
                        finished: true,
                    }));
                }
                Some(EngineEvent::Failed(msg)) => return Err(EngineError::Failed(msg).into()),
                None => return Err(EngineError::Stopped.into()),
            };
            let i = event.choice;
            if self.choices[i].finish_reason.is_some() {
                continue; // already cut by a stop string; the engine ran ahead
            }
            if self.weight_version.is_none() {
                self.weight_version = Some(event.weight_version.clone());
            }
            let now = std::time::Instant::now();
            let metrics = &self.state.metrics;
            match self.last_token[i].replace(now) {
                Some(prev) => metrics.itl.observe((now - prev).as_secs_f64()),
                None if self.last_token.iter().filter(|t| t.is_some()).count() == 1 => {
                    metrics.ttft.observe((now - self.started).as_secs_f64())
                }
                None => {}
            }
            let start = self.choices[i].token_ids.len();
            {
                let c = &mut self.choices[i];
                match c.versions.last_mut() {
                    Some((v, _, end)) if *v == event.weight_version => *end += 1,
                    _ => c
                        .versions
                        .push((event.weight_version.clone(), start, start + 1)),
                }
                c.token_ids.push(event.token);
                c.logprobs.push(event.logprob);
                c.top_logprobs.push(event.top_logprobs);
                if let Some(f) = event.finish {
                    c.finish_reason = Some(f.as_str());
                    if f == FinishReason::Stop && self.options.stop_token_ids.contains(&event.token)
                    {
                        c.stop_reason = json!(event.token);
                    }
                }
            }
            self.update_text(i)?;
            return Ok(Some(Progress {
                choice: i,
                new_tokens: start..start + 1,
                finished: self.choices[i].finish_reason.is_some(),
            }));
        }
        Ok(None)
    }

    fn update_text(&mut self, i: usize) -> Result<(), ApiError> {
        let c = &mut self.choices[i];
        let text = self
            .state
            .chat
            .tokenizer
            .decode(&c.token_ids, self.options.skip_special_tokens)?;
        // A token may end inside a UTF-8 character: wait for the rest.
        if text.ends_with('\u{FFFD}') && c.finish_reason.is_none() {
            return Ok(());
        }
        c.text = text;
        let hit = self
            .options
            .stop
            .iter()
            .filter_map(|s| c.text.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        if let Some((at, stop)) = hit {
            let end = if self.options.include_stop_str_in_output {
                at + stop.len()
            } else {
                at
            };
            c.text.truncate(end);
            c.finish_reason = Some("stop");
            c.stop_reason = json!(stop);
            self.stream.cancel_choice(i);
        }
        Ok(())
    }

    /// Runs every choice to the end.
    pub async fn run_to_end(&mut self) -> Result<(), ApiError> {
        while self.next().await?.is_some() {}
        Ok(())
    }

    /// The weight version that produced the first token (the current one if
    /// none was produced).
    pub fn version(&self) -> String {
        match &self.weight_version {
            Some(v) => v.to_string(),
            None => self.state.engine.stats().weight_version().to_string(),
        }
    }

    /// Top-level `weight_versions`: the spans of choice 0 when any choice
    /// crossed an update (each choice also carries its own).
    pub fn version_spans(&self) -> Option<Value> {
        if self.choices.iter().all(|c| c.versions.len() <= 1) {
            return None;
        }
        self.choices.first().map(|c| spans_json(&c.versions))
    }
}

/// How a token is named in `logprobs` entries.
#[derive(Clone, Copy)]
pub struct TokenFormat {
    pub as_token_ids: bool,
}

pub fn token_name(state: &AppState, id: u32, format: TokenFormat) -> String {
    if format.as_token_ids {
        format!("token_id:{id}")
    } else {
        state
            .chat
            .tokenizer
            .decode(&[id], false)
            .unwrap_or_default()
    }
}

/// One OpenAI chat `logprobs.content` entry.
pub fn chat_logprob_entry(
    state: &AppState,
    id: u32,
    lp: f32,
    top: &[(u32, f32)],
    format: TokenFormat,
) -> Value {
    let alt: Vec<Value> = top
        .iter()
        .map(|&(t, l)| {
            json!({
                "token": token_name(state, t, format),
                "logprob": finite(l),
                "bytes": state.chat.tokenizer.token_bytes(t),
            })
        })
        .collect();
    json!({
        "token": token_name(state, id, format),
        "logprob": finite(lp),
        "bytes": state.chat.tokenizer.token_bytes(id),
        "top_logprobs": alt,
    })
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

pub fn finite_logprobs(lps: &[f32]) -> Vec<f32> {
    lps.iter().copied().map(finite).collect()
}

/// A random response ID with the given prefix (`chatcmpl`, `cmpl`).
pub fn response_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

pub fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The sending side of a server-sent-events response.
pub struct SseSender(
    tokio::sync::mpsc::Sender<Result<axum::response::sse::Event, std::convert::Infallible>>,
);

impl SseSender {
    /// Sends one `data:` event; false once the client has gone away.
    pub async fn send(&self, v: Value) -> bool {
        let event = axum::response::sse::Event::default().data(v.to_string());
        self.0.send(Ok(event)).await.is_ok()
    }

    /// Ends the stream the OpenAI way.
    pub async fn done(self) {
        let _ = self
            .0
            .send(Ok(axum::response::sse::Event::default().data("[DONE]")))
            .await;
    }
}

/// A streaming response and the sender that feeds it.
pub fn sse_response() -> (SseSender, axum::response::Response) {
    use axum::response::IntoResponse;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let body = axum::response::sse::Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    (SseSender(tx), body.into_response())
}
