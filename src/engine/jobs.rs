//! What the handle sends the engine thread: validated generation and
//! scoring requests, and what scoring answers.

use super::events::EventSender;
use super::params::{DistributionParams, LogprobsMode, SamplingParams};
use crate::lora::LoraAdapter;
use std::sync::Arc;

/// A validated generation request (see [`super::EngineHandle::generate`]).
pub struct GenerationJob {
    pub request_id: u64,
    pub prompt: Vec<u32>,
    pub params: Arc<SamplingParams>,
    pub seed: u64,
    pub budget: usize,
    pub events: EventSender,
    /// The LoRA adapter this request runs under (None: the base model).
    pub adapter: Option<Arc<LoraAdapter>>,
}

/// A validated scoring request (see [`super::EngineHandle::score`]).
pub struct ScoreJob {
    pub token_ids: Vec<u32>,
    pub start: usize,
    pub distribution: DistributionParams,
    pub mode: LogprobsMode,
    /// Alternatives to report per scored position (0 = none).
    pub top_logprobs: usize,
    pub adapter: Option<Arc<LoraAdapter>>,
}

/// Teacher-forced log-probs of `token_ids[start..]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutput {
    pub token_logprobs: Vec<f32>,
    /// Per position, the best alternatives (empty unless asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub weight_version: Arc<str>,
}
