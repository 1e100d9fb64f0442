//! The engine loop's state: the model and the running sequences. Owned by one
//! thread; everything else talks to it through [`super::EngineHandle`].

use super::events::{EngineEvent, EventSender, TokenEvent};
use super::params::{DistributionParams, LogprobsMode, SamplingParams};
use super::sampler;
use super::sequence::Sequence;
use crate::model::{LogitsFor, Model, Segment};
use std::sync::Arc;

pub struct EngineCore {
    model: Model,
    eos_token_ids: Vec<u32>,
    running: Vec<Sequence>,
}

/// A validated generation request (see [`super::EngineHandle::generate`]).
pub struct GenerationJob {
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
}

impl EngineCore {
    pub fn new(model: Model, eos_token_ids: Vec<u32>) -> Self {
        Self {
            model,
            eos_token_ids,
            running: Vec::new(),
        }
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty()
    }

    pub fn running_sequences(&self) -> usize {
        self.running.len()
    }

    /// Admits every choice of a request; they start in the next step.
    pub fn add(&mut self, job: GenerationJob) {
        for choice in 0..job.params.n {
            self.running.push(Sequence::new(
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
            });
            // A closed channel means the client went away: drop the sequence.
            if seq.events.send(event).is_ok() && finish.is_none() {
                still_running.push(seq);
            }
        }
        self.running = still_running;
    }

    /// Teacher-forced log-probs of `token_ids[start..]`, from one fresh forward
    /// pass (no cache reuse).
    pub fn score(&self, job: &ScoreJob) -> candle_core::Result<Vec<f32>> {
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
        Ok(rows
            .iter()
            .zip(&tokens[job.start..])
            .map(|(row, &t)| sampler::score(row, &job.distribution, job.mode, t))
            .collect())
    }
}
