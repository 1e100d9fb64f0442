//! What the engine reports back to a request, token by token.

use serde::Serialize;
use std::sync::Arc;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// EOS or a stop token was sampled.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The request was aborted.
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// One generated token of one choice.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub choice: usize,
    pub token: u32,
    /// Natural-log probability in the request's log-prob mode (fp32).
    pub logprob: f32,
    /// Best alternatives under the same mode, best first.
    pub top_logprobs: Vec<(u32, f32)>,
    /// Set on the choice's last token.
    pub finish: Option<FinishReason>,
    /// The weight version that produced this token.
    pub weight_version: Arc<str>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Token(TokenEvent),
    /// The choice was aborted (a pause or weight update in `abort` mode); the
    /// tokens it already reported are all it produced.
    Aborted {
        choice: usize,
    },
    /// The engine failed while running this request; its choices end here.
    Failed(String),
}

pub type EventSender = mpsc::UnboundedSender<EngineEvent>;
pub type EventReceiver = mpsc::UnboundedReceiver<EngineEvent>;
