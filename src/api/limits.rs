//! Server-side bounds on what one request may ask for. Each bound has a
//! flag (see `LimitArgs` in `cli.rs`) and a refusal that names it, so a
//! client can tell a bound from a bug.

use super::error::ApiError;
use crate::cli::LimitArgs;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_request_bytes: usize,
    pub max_control_bytes: usize,
    pub max_prompts: usize,
    pub max_n: usize,
    pub max_sequences: usize,
    pub max_top_logprobs: usize,
    pub max_prompt_logprobs: usize,
    pub max_stop_strings: usize,
    pub max_stop_string_bytes: usize,
    pub max_response_bytes: usize,
    pub body_idle_timeout: Duration,
    pub body_timeout: Duration,
    pub weights_body_timeout: Duration,
}

/// Seconds from a flag, clamped to something a timer accepts.
pub fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.001, 1e9))
}

impl RequestLimits {
    pub fn from_args(a: &LimitArgs) -> Self {
        Self {
            max_request_bytes: a.max_request_bytes,
            max_control_bytes: a.max_control_bytes,
            max_prompts: a.max_prompts.max(1),
            max_n: a.max_n as usize,
            max_sequences: a.max_sequences_per_request.max(1),
            max_top_logprobs: a.max_top_logprobs,
            max_prompt_logprobs: a.max_prompt_logprobs,
            max_stop_strings: a.max_stop_strings,
            max_stop_string_bytes: a.max_stop_string_bytes.max(1),
            max_response_bytes: a.max_response_bytes,
            body_idle_timeout: seconds(a.body_idle_timeout),
            body_timeout: seconds(a.body_timeout),
            weights_body_timeout: seconds(a.weights_body_timeout),
        }
    }

    /// `value` of request field `param` must be at most `limit` (`flag`).
    pub fn check(
        param: &'static str,
        value: usize,
        limit: usize,
        flag: &'static str,
    ) -> Result<(), ApiError> {
        if value > limit {
            return Err(ApiError::LimitExceeded {
                param,
                value,
                limit,
                flag,
            });
        }
        Ok(())
    }

    pub fn check_n(&self, n: usize) -> Result<(), ApiError> {
        Self::check("n", n, self.max_n, "--max-n")
    }

    pub fn check_top_logprobs(&self, param: &'static str, k: usize) -> Result<(), ApiError> {
        Self::check(param, k, self.max_top_logprobs, "--max-top-logprobs")
    }

    /// `prompts` prompts with `n` choices each.
    pub fn check_sequences(&self, prompts: usize, n: usize) -> Result<(), ApiError> {
        Self::check("prompt", prompts, self.max_prompts, "--max-prompts")?;
        Self::check(
            "n",
            prompts.saturating_mul(n),
            self.max_sequences,
            "--max-sequences-per-request",
        )
    }

    pub fn check_stop(&self, stop: &[String]) -> Result<(), ApiError> {
        Self::check(
            "stop",
            stop.len(),
            self.max_stop_strings,
            "--max-stop-strings",
        )?;
        let longest = stop.iter().map(String::len).max().unwrap_or(0);
        Self::check(
            "stop",
            longest,
            self.max_stop_string_bytes,
            "--max-stop-string-bytes",
        )
    }

    /// A response known to reach `bytes` before anything is generated.
    pub fn check_response(&self, bytes: usize) -> Result<(), ApiError> {
        if bytes > self.max_response_bytes {
            return Err(ApiError::ResponseTooLarge {
                limit: self.max_response_bytes,
            });
        }
        Ok(())
    }
}
