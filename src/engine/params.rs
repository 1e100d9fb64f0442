//! Sampling parameters of one generation request, and their validation.

use serde::{Deserialize, Serialize};

/// Which distribution reported log-probs are taken from (CONTRACT.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogprobsMode {
    /// The distribution the token was sampled from: temperature, min-p, top-k,
    /// top-p applied, renormalized.
    #[default]
    Processed,
    /// `log_softmax` of the model's logits.
    Raw,
}

/// The parts of [`SamplingParams`] that shape the sampling distribution; also
/// what teacher-forced scoring needs to reproduce `processed` log-probs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DistributionParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// `None` disables.
    pub top_k: Option<usize>,
    /// 0.0 disables.
    pub min_p: f32,
}

impl Default for DistributionParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            min_p: 0.0,
        }
    }
}

impl DistributionParams {
    /// Temperatures this small are treated as greedy decoding, as vLLM does.
    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ParamError::new(
                "temperature",
                "must be a finite number >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ParamError::new("top_p", "must be in (0, 1]"));
        }
        if self.top_k == Some(0) {
            return Err(ParamError::new(
                "top_k",
                "must be >= 1, or -1 / absent to disable",
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(ParamError::new("min_p", "must be in [0, 1]"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub distribution: DistributionParams,
    pub max_tokens: usize,
    /// EOS and stop tokens are suppressed until this many tokens exist.
    pub min_tokens: usize,
    /// Extra token IDs that end the sequence (the ID is kept in the output).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Seed of the request; choice `i` draws from stream `i` of this seed.
    pub seed: Option<u64>,
    /// Number of choices.
    pub n: usize,
    pub logprobs_mode: LogprobsMode,
    /// Alternatives reported per token (0 = none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            distribution: DistributionParams::default(),
            max_tokens: 16,
            min_tokens: 0,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            seed: None,
            n: 1,
            logprobs_mode: LogprobsMode::Processed,
            top_logprobs: 0,
        }
    }
}

/// Upper bound on `n`, to keep one request from monopolizing the engine.
pub const MAX_N: usize = 256;

impl SamplingParams {
    pub fn validate(&self) -> Result<(), ParamError> {
        self.distribution.validate()?;
        if self.max_tokens == 0 {
            return Err(ParamError::new("max_tokens", "must be >= 1"));
        }
        if self.min_tokens > self.max_tokens {
            return Err(ParamError::new("min_tokens", "must be <= max_tokens"));
        }
        if self.n == 0 || self.n > MAX_N {
            return Err(ParamError::new("n", "must be in [1, 256]"));
        }
        Ok(())
    }
}

/// A sampling parameter outside its allowed range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{param} {message}")]
pub struct ParamError {
    pub param: &'static str,
    pub message: &'static str,
}

impl ParamError {
    fn new(param: &'static str, message: &'static str) -> Self {
        Self { param, message }
    }
}
