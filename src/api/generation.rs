//! Running one prompt through the engine for an HTTP response: collecting
//! each choice's tokens, log-probs and weight versions, and feeding its text
//! stage (`chat::text_output`: incremental detokenization, stop strings).

use super::error::ApiError;
use super::protocol::{StopReason, VersionRun, WeightSpans};
use super::AppState;
use crate::chat::text_output::{TextOptions, TextOutput};
use crate::engine::{EngineError, EngineEvent, FinishReason, GenerationStream};
use serde::Serialize;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ChoiceState {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// The text so far (cut at a matched stop string).
    pub output: TextOutput,
    pub finish_reason: Option<&'static str>,
    /// The stop string or stop token ID that ended the choice.
    pub stop_reason: StopReason,
    /// Weight version of each run of tokens.
    pub versions: Vec<VersionRun>,
}

impl ChoiceState {
    fn new(text: &TextOptions) -> Self {
        Self {
            token_ids: Vec::new(),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            output: TextOutput::new(text),
            finish_reason: None,
            stop_reason: StopReason::None,
            versions: Vec::new(),
        }
    }

    pub fn text(&self) -> &str {
        self.output.text()
    }

    /// `weight_versions` spans, or `None` if every token came from one version.
    pub fn version_spans(&self) -> Option<WeightSpans<'_>> {
        (self.versions.len() > 1).then_some(WeightSpans(&self.versions))
    }
}

/// What the last call to [`Runner::next`] added to one choice.
pub struct Progress {
    pub choice: usize,
    pub new_tokens: Range<usize>,
    pub finished: bool,
}

pub struct RunOptions {
    pub text: TextOptions,
    pub stop_token_ids: Vec<u32>,
    /// Bounds a buffered response while it is generated (`None` for streams).
    pub meter: Option<Arc<ResponseMeter>>,
}

/// Counts, as tokens arrive, a lower bound of the bytes a buffered response
/// will take, shared by every prompt of a request; past
/// `--max-response-bytes` the request is cut at once instead of finishing
/// generation and then failing (or building a body of gigabytes).
#[derive(Debug)]
pub struct ResponseMeter {
    used: AtomicUsize,
    limit: usize,
    per_token: usize,
}

impl ResponseMeter {
    /// `per_token`: the fewest bytes one generated token adds to the body.
    pub fn new(limit: usize, per_token: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
            per_token,
        }
    }

    /// Adds `bytes`; an error once the total is over the limit.
    pub fn charge(&self, bytes: usize) -> Result<(), ApiError> {
        let used = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if used > self.limit {
            return Err(ApiError::ResponseTooLarge { limit: self.limit });
        }
        Ok(())
    }

    fn token(&self) -> Result<(), ApiError> {
        self.charge(self.per_token)
    }
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
        let choices = vec![ChoiceState::new(&options.text); n];
        Self {
            state,
            stream,
            options,
            prompt,
            choices,
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
                if let Some(meter) = &self.options.meter {
                    // Dropping the runner with the error cancels its sequences.
                    meter.token()?;
                }
                if let Some(f) = event.finish {
                    c.finish_reason = Some(f.as_str());
                    if f == FinishReason::Stop && self.options.stop_token_ids.contains(&event.token)
                    {
                        c.stop_reason = StopReason::TokenId(event.token);
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

    /// Feeds the choice's newest token to its text stage; a stop string
    /// it completes ends the choice.
    fn update_text(&mut self, i: usize) -> Result<(), ApiError> {
        let tokenizer = &self.state.chat.tokenizer;
        let c = &mut self.choices[i];
        let finished = c.finish_reason.is_some();
        if let Some(stop) = c.output.update(tokenizer, &c.token_ids, finished)? {
            c.finish_reason = Some("stop");
            c.stop_reason = StopReason::Text(stop);
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
    pub fn version_spans(&self) -> Option<WeightSpans<'_>> {
        if self.choices.iter().all(|c| c.versions.len() <= 1) {
            return None;
        }
        self.choices.first().map(|c| WeightSpans(&c.versions))
    }
}

impl ChoiceState {
    /// Drops the per-token alternatives once a stream has sent them (only
    /// the IDs and log-probs are needed for the final chunk).
    pub fn forget_alternatives(&mut self, range: Range<usize>) {
        for alt in &mut self.top_logprobs[range] {
            *alt = Vec::new();
        }
    }
}

/// The sending side of a server-sent-events response.
pub struct SseSender(
    tokio::sync::mpsc::Sender<Result<axum::response::sse::Event, std::convert::Infallible>>,
);

impl SseSender {
    /// Sends one `data:` event; false once the client has gone away.
    pub async fn send<T: Serialize>(&self, body: &T) -> bool {
        let data = match serde_json::to_string(body) {
            Ok(data) => data,
            Err(e) => {
                tracing::error!(error = %e, "serializing a stream event");
                return false;
            }
        };
        let event = axum::response::sse::Event::default().data(data);
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
