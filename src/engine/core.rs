//! The engine loop's state: the model and the running sequences. Owned by one
//! thread; everything else talks to it through [`super::EngineHandle`].

use super::events::{EngineEvent, EventSender, TokenEvent};
use super::params::{DistributionParams, LogprobsMode, SamplingParams};
use super::sampler;
use super::sequence::Sequence;
use super::stats::EngineStats;
use crate::model::{LogitsFor, Model, Segment};
use std::sync::Arc;

pub struct EngineCore {
    model: Model,
    eos_token_ids: Vec<u32>,
    running: Vec<Sequence>,
    weight_version: Arc<str>,
    stats: Arc<EngineStats>,
}

/// A validated generation request (see [`super::EngineHandle::generate`]).
pub struct GenerationJob {
    pub request_id: u64,
    pub prompt: Vec<u32>,
    pub params: Arc<SamplingParams>,
    pub seed: u64,
    pub budget: usize,
    pub events: EventSender,
}

/// A validated scoring request (see [`super::EngineHandle::score`]).
pub struct ScoreJob {
    pub token_ids: Vec<u32>,
    pub start: usize,
    pub distribution: DistributionParams,
    pub mode: LogprobsMode,
    /// Alternatives to report per scored position (0 = none).
    pub top_logprobs: usize,
}

/// Teacher-forced log-probs of `token_ids[start..]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreOutput {
    pub token_logprobs: Vec<f32>,
    /// Per position, the best alternatives (empty unless asked for).
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub weight_version: Arc<str>,
}

impl EngineCore {
    pub fn new(model: Model, eos_token_ids: Vec<u32>, weight_version: &str) -> Self {
        Self {
            model,
            eos_token_ids,
            running: Vec::new(),
            weight_version: Arc::from(weight_version),
            stats: Arc::new(EngineStats::default()),
        }
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    pub fn weight_version(&self) -> &Arc<str> {
        &self.weight_version
    }

    /// Drops the sequences of a request (one choice, or all of them).
    pub fn cancel(&mut self, request_id: u64, choice: Option<usize>) {
        self.running
            .retain(|s| s.request_id != request_id || choice.is_some_and(|c| c != s.choice));
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty()
    }

    pub fn running_sequences(&self) -> usize {
        self.running.len()
    }

    /// Admits every choice of a request; they start in the next step.
    pub fn add(&mut self, job: GenerationJob) {
        self.stats.add_prompt_tokens(job.prompt.len());
        for choice in 0..job.params.n {
            self.stats.set_running(self.running.len() + 1);
            self.running.push(Sequence::new(
                job.request_id,
                choice,
                job.prompt.clone(),
                job.seed,
                job.params.clone(),
                job.budget,
                self.model.new_cache(),
                job.events.clone(),
            ));
        }
    }

    /// One engine step: a forward pass over the pending tokens of every running
    /// sequence, then one sampled token for each.
    pub fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let pending: Vec<Vec<u32>> = self
            .running
            .iter()
            .map(|s| s.pending_tokens().to_vec())
            .collect();
        let mut segments: Vec<Segment<'_>> = self
            .running
            .iter_mut()
            .zip(&pending)
            .map(|(seq, tokens)| Segment {
                tokens,
                cache: &mut seq.cache,
                logits: LogitsFor::Last,
            })
            .collect();
        let logits = self
            .model
            .forward(&mut segments)
            .and_then(|l| l.to_vec2::<f32>());
        let logits = match logits {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing running requests");
                for seq in self.running.drain(..) {
                    let _ = seq.events.send(EngineEvent::Failed(e.to_string()));
                }
                return;
            }
        };
        let eos = &self.eos_token_ids;
        let sampled = self.running.len();
        let mut still_running = Vec::with_capacity(self.running.len());
        for (mut seq, row) in self.running.drain(..).zip(logits) {
            let banned = seq.banned_tokens(eos);
            let params = seq.params.clone();
            let sampled = sampler::sample(
                &row,
                &params.distribution,
                params.logprobs_mode,
                &banned,
                params.top_logprobs,
                &mut seq.rng,
            );
            seq.generated.push(sampled.token);
            let finish = seq.finish_after(sampled.token, eos);
            let event = EngineEvent::Token(TokenEvent {
                choice: seq.choice,
                token: sampled.token,
                logprob: sampled.logprob,
                top_logprobs: sampled.top_logprobs,
                finish,
                weight_version: self.weight_version.clone(),
            });
            // A closed channel means the client went away: drop the sequence.
            if seq.events.send(event).is_ok() && finish.is_none() {
                still_running.push(seq);
            }
        }
        self.stats.record_step(sampled);
        self.running = still_running;
        self.stats.set_running(self.running.len());
    }

    /// Teacher-forced log-probs of `token_ids[start..]`, from one fresh forward
    /// pass (no cache reuse).
    pub fn score(&self, job: &ScoreJob) -> candle_core::Result<ScoreOutput> {
        let tokens = &job.token_ids;
        let mut cache = self.model.new_cache();
        let logits = self.model.forward(&mut [Segment {
            tokens,
            cache: &mut cache,
            logits: LogitsFor::Range {
                from: job.start - 1,
                to: tokens.len() - 1,
            },
        }])?;
        let rows = logits.to_vec2::<f32>()?;
        let mut out = ScoreOutput {
            token_logprobs: Vec::with_capacity(rows.len()),
            top_logprobs: Vec::with_capacity(rows.len()),
            weight_version: self.weight_version.clone(),
        };
        for (row, &t) in rows.iter().zip(&tokens[job.start..]) {
            let (lp, top) = sampler::score(row, &job.distribution, job.mode, t, job.top_logprobs);
            out.token_logprobs.push(lp);
            out.top_logprobs.push(top);
        }
        Ok(out)
    }
}
