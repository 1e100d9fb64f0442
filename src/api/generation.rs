//! Running one prompt through the engine for an HTTP response: collecting each
//! choice's tokens and log-probs, detokenizing incrementally, applying stop
//! strings, and formatting the per-token `logprobs` entries.

use super::error::ApiError;
use super::stop::StopMatcher;
use super::AppState;
use crate::engine::{EngineError, EngineEvent, FinishReason, GenerationStream};
use serde_json::{json, Value};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Tokens a choice may go without forming complete UTF-8 before its text
/// is taken as it is (a character spans at most 4 byte tokens; a model
/// emitting invalid bytes must not make every later decode longer).
const MAX_PENDING_TOKENS: usize = 8;

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
    /// Incremental detokenization: `token_ids[prefix_offset..read_offset]`
    /// were the last tokens turned into text; they are decoded again in
    /// front of the new ones for context (leading-space rules), and only
    /// what the new ones add is appended.
    prefix_offset: usize,
    read_offset: usize,
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
    pub stop: Option<Arc<StopMatcher>>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
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
                if let Some(meter) = &self.options.meter {
                    // Dropping the runner with the error cancels its sequences.
                    meter.token()?;
                }
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

    /// Appends what the choice's newest tokens add to its text, then looks
    /// for a stop string in the part of the text they could have completed:
    /// both in time independent of the text's length (decoding the whole
    /// text and scanning it for every stop string after every token made a
    /// long response quadratic).
    fn update_text(&mut self, i: usize) -> Result<(), ApiError> {
        let tokenizer = &self.state.chat.tokenizer;
        let skip = self.options.skip_special_tokens;
        let c = &mut self.choices[i];
        let finished = c.finish_reason.is_some();
        let searched = c.text.len();
        let context = tokenizer.decode(&c.token_ids[c.prefix_offset..c.read_offset], skip)?;
        let window = tokenizer.decode(&c.token_ids[c.prefix_offset..], skip)?;
        let pending = c.token_ids.len() - c.read_offset;
        // A token may end inside a UTF-8 character: wait for the rest.
        if window.ends_with('\u{FFFD}') && !finished && pending < MAX_PENDING_TOKENS {
            return Ok(());
        }
        match window.strip_prefix(context.as_str()) {
            Some(added) => c.text.push_str(added),
            None => c.text = tokenizer.decode(&c.token_ids, skip)?,
        }
        c.prefix_offset = c.read_offset;
        c.read_offset = c.token_ids.len();
        let mut from = searched;
        if finished {
            // The final text is the whole decode, exactly as a one-shot
            // decode gives it; it is searched once more in full.
            let whole = tokenizer.decode(&c.token_ids, skip)?;
            if whole != c.text {
                c.text = whole;
                from = 0;
            }
        }
        let Some(stop) = &self.options.stop else {
            return Ok(());
        };
        if let Some(hit) = stop.find_new(&c.text, from.min(c.text.len())) {
            let s = stop.stop(hit.index);
            let end = if self.options.include_stop_str_in_output {
                hit.at + s.len()
            } else {
                hit.at
            };
            c.text.truncate(end);
            c.finish_reason = Some("stop");
            c.stop_reason = json!(s);
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

/// One OpenAI chat `logprobs.content` entry, serialized straight from the
/// choice's state (`top_logprobs` left out on the alternatives themselves).
pub struct ChatLogprobEntry<'a> {
    pub state: &'a AppState,
    pub id: u32,
    pub logprob: f32,
    /// `None` for an alternative.
    pub top: Option<&'a [(u32, f32)]>,
    pub format: TokenFormat,
}

impl serde::Serialize for ChatLogprobEntry<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(if self.top.is_some() { 4 } else { 3 }))?;
        m.serialize_entry("token", &token_name(self.state, self.id, self.format))?;
        m.serialize_entry("logprob", &finite_f64(self.logprob))?;
        m.serialize_entry("bytes", &self.state.chat.tokenizer.token_bytes(self.id))?;
        if let Some(top) = self.top {
            let alternatives = top.iter().map(|&(id, logprob)| ChatLogprobEntry {
                state: self.state,
                id,
                logprob,
                top: None,
                format: self.format,
            });
            m.serialize_entry(
                "top_logprobs",
                &super::response::SeqWith(|| alternatives.clone()),
            )?;
        }
        m.end()
    }
}

/// A choice's chat `logprobs` object (`{"content": [...]}`) for `range` of
/// its tokens.
pub struct ChatLogprobs<'a> {
    pub state: &'a AppState,
    pub choice: &'a ChoiceState,
    pub range: Range<usize>,
    pub format: TokenFormat,
}

impl serde::Serialize for ChatLogprobs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let c = self.choice;
        let entries = self.range.clone().map(|i| ChatLogprobEntry {
            state: self.state,
            id: c.token_ids[i],
            logprob: c.logprobs[i],
            top: Some(&c.top_logprobs[i]),
            format: self.format,
        });
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("content", &super::response::SeqWith(|| entries.clone()))?;
        m.end()
    }
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

impl ChoiceState {
    /// Drops the per-token alternatives once a stream has sent them (only
    /// the IDs and log-probs are needed for the final chunk).
    pub fn forget_alternatives(&mut self, range: Range<usize>) {
        for alt in &mut self.top_logprobs[range] {
            *alt = Vec::new();
        }
    }
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
