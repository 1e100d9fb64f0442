//! The engine loop's state: the model and its KV pool, the [`Scheduler`]
//! and the [`PauseControl`]. Owned by one thread; everything else talks to
//! it through [`super::EngineHandle`].
//!
//! Each [`EngineCore::step`] is one continuous-batching iteration: the
//! scheduler plans it (decode tokens first, then prefill chunks, so a long
//! prompt never stalls decoding), one forward pass runs the plan, every
//! sequence that reached the end of its known tokens samples, and the
//! scheduler applies the samples.

use super::block_pool::version_seed;
use super::device_sampling::{self, SamplingTransfer};
use super::logits::HostLogits;
use super::params::SamplingParams;
use super::pause::{PauseControl, SwapDecision};
use super::sampler::{self, SampledToken};
use super::scheduler::{SampledGroup, Scheduler, StepPlan, TentativeSample};
use super::sequence::Sequence;
use super::stats::EngineStats;
use crate::lora::{LoraAdapter, LoraRegistry};
use crate::model::{KvPool, LogitsFor, Model, Segment};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

pub use super::jobs::{GenerationJob, ScoreJob, ScoreOutput};
pub use super::pause::{PauseMode, PendingSwap, SwapReport};
pub use super::scheduler::SchedulerConfig;

pub struct EngineCore {
    model: Model,
    eos_token_ids: Vec<u32>,
    pool: KvPool,
    scheduler: Scheduler,
    control: PauseControl,
    weight_version: Arc<str>,
    stats: Arc<EngineStats>,
    /// Swaps so far: part of the prefix cache's hash seed, so re-using a
    /// version label never revives stale KV.
    swaps: u64,
    /// The adapters being served: a queued sequence runs under the version
    /// current when it reaches the engine.
    adapters: Arc<LoraRegistry>,
    /// Whether sampled rows come to the host as a summary (from a GPU).
    summarize_logits: bool,
}

impl EngineCore {
    pub fn new(
        model: Model,
        eos_token_ids: Vec<u32>,
        weight_version: &str,
        config: SchedulerConfig,
    ) -> candle_core::Result<Self> {
        let kv_dtype = config.kv_dtype.unwrap_or(model.dtype());
        let pool = model.new_pool(config.num_blocks, config.block_size, kv_dtype)?;
        let scheduler = Scheduler::new(config, eos_token_ids.clone(), version_seed(weight_version));
        Ok(Self {
            model,
            eos_token_ids,
            pool,
            scheduler,
            control: PauseControl::default(),
            weight_version: Arc::from(weight_version),
            stats: Arc::new(EngineStats::default()),
            swaps: 0,
            adapters: Arc::default(),
            summarize_logits: false,
        })
        .inspect(|core| core.stats.set_weight_version(core.weight_version.clone()))
    }

    /// The adapters requests resolve against (shared with the HTTP layer).
    pub fn set_adapters(&mut self, adapters: Arc<LoraRegistry>) {
        self.adapters = adapters;
    }

    /// How the step's sampled rows reach the sampler, on this model's device.
    pub fn set_sampling_transfer(&mut self, transfer: SamplingTransfer) {
        self.summarize_logits = transfer.summarizes(self.model.device());
    }

    /// The version of `adapter` being served now (the one given, if it was
    /// unloaded since: the request finishes under it).
    fn current_adapter(&self, adapter: Option<Arc<LoraAdapter>>) -> Option<Arc<LoraAdapter>> {
        adapter.map(|a| self.adapters.get(&a.name).unwrap_or(a))
    }

    /// Adapter `name` changed in the registry: its sequences go on under
    /// `mode`. `keep` (or while paused): they switch to the new version and
    /// recompute their cache; `abort`: they end; `wait`: they finish under
    /// the version they started with. Other sequences are untouched.
    pub fn swap_adapter(&mut self, name: &str, mode: PauseMode) -> SwapReport {
        let started = Instant::now();
        let keep = mode == PauseMode::Keep || !self.control.admitting();
        let (aborted, kept) = if keep || mode == PauseMode::Abort {
            let current = self.adapters.get(name);
            self.scheduler.swap_adapter(name, current, keep)
        } else {
            (0, 0)
        };
        self.publish_stats();
        SwapReport {
            aborted,
            kept,
            swap_seconds: started.elapsed().as_secs_f64(),
        }
    }

    pub fn stats(&self) -> &Arc<EngineStats> {
        &self.stats
    }

    pub fn weight_version(&self) -> &Arc<str> {
        &self.weight_version
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    pub fn running_sequences(&self) -> usize {
        self.scheduler.num_running()
    }

    pub fn waiting_sequences(&self) -> usize {
        self.scheduler.num_waiting()
    }

    /// Blocks referenced by some sequence.
    pub fn used_blocks(&self) -> usize {
        self.scheduler.kv().num_used()
    }

    /// Prompt tokens served from the prefix cache, and prompt tokens computed.
    pub fn prefix_counters(&self) -> (u64, u64) {
        self.scheduler.kv().prefix_counters()
    }

    pub fn reset_prefix_cache(&mut self) {
        self.scheduler.reset_prefix_cache();
    }

    /// Queues a request (see [`Scheduler::add`]).
    pub fn add(&mut self, mut job: GenerationJob) {
        self.stats.add_prompt_tokens(job.prompt.len());
        job.adapter = self.current_adapter(job.adapter.take());
        self.scheduler.add(job);
        self.publish_stats();
    }

    /// Drops the sequences of a request (one choice, or all of them).
    pub fn cancel(&mut self, request_id: u64, choice: Option<usize>) {
        self.scheduler.cancel(request_id, choice);
        self.publish_stats();
    }

    /// Serves `model` from the next step on, labelled `version`. Cached prefixes
    /// of the old weights stop matching: their hash chains had another seed
    /// (which also counts swaps, so re-using a label never revives stale KV).
    /// Running sequences go back to the queue and recompute their cache under
    /// the new weights, keeping their tokens and RNG state.
    pub fn set_weights(&mut self, model: Model, version: &str) -> usize {
        self.swaps += 1;
        let kept = self
            .scheduler
            .restart_all(version_seed(&format!("{version}#{}", self.swaps)));
        self.model = model;
        self.weight_version = Arc::from(version);
        self.stats.set_weight_version(self.weight_version.clone());
        self.publish_stats();
        kept
    }

    /// Ends every sequence, running or queued, with `finish_reason: "abort"`.
    fn abort_all(&mut self) -> usize {
        let aborted = self.scheduler.abort_all();
        self.publish_stats();
        aborted
    }

    fn apply_swap(&mut self, swap: PendingSwap, aborted: usize) {
        let started = Instant::now();
        let kept = self.set_weights(swap.model, &swap.version);
        let _ = swap.reply.send(SwapReport {
            aborted,
            kept,
            swap_seconds: started.elapsed().as_secs_f64(),
        });
    }

    /// Swaps weights in under `mode` (see [`PauseControl::request_swap`]).
    pub fn request_swap(&mut self, swap: PendingSwap, mode: PauseMode) {
        match self.control.request_swap(swap, mode) {
            SwapDecision::Apply(swap) => self.apply_swap(swap, 0),
            SwapDecision::AbortThenApply(swap) => {
                let aborted = self.abort_all();
                self.apply_swap(swap, aborted);
            }
            SwapDecision::Deferred => self.settle(),
        }
    }

    /// Stops admitting new work; see [`PauseMode`]. `reply` is answered once
    /// the pause is in effect (for `wait`, when running sequences are done).
    pub fn pause(&mut self, mode: PauseMode, reply: oneshot::Sender<()>) {
        if mode == PauseMode::Abort {
            self.abort_all();
        }
        self.control.pause(mode, reply);
        self.stats.set_paused(true);
        self.settle();
    }

    pub fn resume(&mut self) {
        self.control.resume();
        self.stats.set_paused(false);
    }

    /// After a panic inside a step: fail every request (their clients get an
    /// error) and start over with an empty pool, so the server keeps serving.
    pub fn recover(&mut self, message: &str) {
        self.scheduler.reset(message);
        self.control.drop_pending_swap();
        self.publish_stats();
    }

    /// Whether a step would do anything.
    pub fn can_step(&self) -> bool {
        self.control
            .can_step(self.scheduler.num_running(), self.scheduler.num_waiting())
    }

    /// Completes what was waiting on running sequences to drain.
    pub fn settle(&mut self) {
        if !self.control.drained(self.scheduler.num_running()) {
            return;
        }
        if let Some(swap) = self.control.take_pending_swap() {
            self.apply_swap(swap, 0);
        }
        self.control.wake_waiters();
    }

    fn publish_stats(&self) {
        let kv = self.scheduler.kv();
        let (hits, computed) = kv.prefix_counters();
        self.stats
            .set_queues(self.scheduler.num_running(), self.scheduler.num_waiting());
        self.stats.set_blocks(kv.num_used(), kv.num_free());
        self.stats.set_prefix(hits, computed);
    }

    /// One engine step: plan, forward, sample, apply.
    pub fn step(&mut self) {
        let plan = self.scheduler.schedule(self.control.admitting());
        for _ in 0..plan.preempted {
            self.stats.record_preemption();
        }
        if plan.is_empty() {
            self.publish_stats();
            return;
        }
        let sampled = match self.forward_and_sample(&plan) {
            Ok(sampled) => sampled,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed; failing running requests");
                self.scheduler.fail_running(&e.to_string());
                return self.publish_stats();
            }
        };
        self.scheduler.update_from_output(
            &plan,
            sampled,
            &self.pool,
            &self.weight_version,
            &self.stats,
        );
        self.stats.record_step(plan.num_tokens());
        self.publish_stats();
    }

    /// Runs the plan through the model and samples every sequence that
    /// reached its end, in parallel: each draws from its own RNG, so the
    /// result does not depend on the batch.
    fn forward_and_sample(&mut self, plan: &StepPlan) -> candle_core::Result<Vec<SampledGroup>> {
        let segments: Vec<Segment<'_>> = plan
            .chunks
            .iter()
            .map(|c| Segment {
                tokens: &c.tokens,
                offset: c.offset,
                block_table: &c.block_table,
                logits: if c.samples {
                    LogitsFor::Last
                } else {
                    LogitsFor::Nothing
                },
            })
            .collect();
        let adapters = plan.adapters(&self.scheduler);
        let logits = self
            .model
            .forward_with_adapters(&segments, &adapters, &self.pool)?;
        drop(adapters);
        let eos = &self.eos_token_ids;
        let sequences = self.scheduler.sampling_sequences(plan);
        if self.summarize_logits {
            return device_sampling::sample_groups(&logits, sequences, eos);
        }
        let host = HostLogits::new(&logits)?;
        let rows: Vec<&[f32]> = host.rows()?.collect();
        Ok(sequences
            .into_par_iter()
            .zip(rows)
            .map(|(seq, row)| sample_group(seq, row, eos))
            .collect())
    }

    /// Teacher-forced log-probs of `token_ids[start..]`, from one fresh forward
    /// pass (no cache reuse).
    pub fn score(&self, job: &ScoreJob) -> candle_core::Result<ScoreOutput> {
        let tokens = &job.token_ids;
        let adapter = self.current_adapter(job.adapter.clone());
        let mut out = ScoreOutput {
            token_logprobs: Vec::with_capacity(tokens.len() - job.start),
            top_logprobs: Vec::with_capacity(tokens.len() - job.start),
            weight_version: adapter
                .as_ref()
                .map_or(self.weight_version.clone(), |a| a.version.clone()),
        };
        let on_device = self.summarize_logits
            && device_sampling::scores_on_device(&job.distribution, job.mode, job.top_logprobs);
        self.model.logits_in_chunks(
            tokens,
            job.start - 1,
            tokens.len() - 1,
            self.pool.dtype(),
            SCORE_CHUNK_ROWS,
            adapter.as_deref(),
            |first, logits| {
                let (rows, _) = logits.dims2()?;
                let Some(given) = tokens.get(first + 1..first + 1 + rows) else {
                    candle_core::bail!("{rows} rows of logits from position {first}");
                };
                if on_device {
                    let scored = device_sampling::score_rows(
                        &logits,
                        &job.distribution,
                        job.mode,
                        given,
                        job.top_logprobs,
                    )?;
                    for (lp, top) in scored {
                        out.token_logprobs.push(lp);
                        out.top_logprobs.push(top);
                    }
                    return Ok(());
                }
                let rows = logits.to_vec2::<f32>()?;
                for (row, &t) in rows.iter().zip(given) {
                    let (lp, top) =
                        sampler::score(row, &job.distribution, job.mode, t, job.top_logprobs);
                    out.token_logprobs.push(lp);
                    out.top_logprobs.push(top);
                }
                Ok(())
            },
        )?;
        Ok(out)
    }
}

/// Positions scored per forward pass: bounds a scoring request's logits to
/// this many rows of the vocabulary (150 MB at a 150k vocabulary).
const SCORE_CHUNK_ROWS: usize = 256;

/// The next token of `seq` from its logits `row`, and the first of each
/// parked sibling (from the same row, with a copy of its own RNG).
fn sample_group(seq: &mut Sequence, row: &[f32], eos: &[u32]) -> SampledGroup {
    let siblings = seq
        .siblings
        .iter()
        .map(|sib| {
            let mut rng = sib.rng.clone();
            let token = draw(&sib.params, &sib.banned_tokens(eos), row, &mut rng);
            TentativeSample { token, rng }
        })
        .collect();
    let banned = seq.banned_tokens(eos);
    let leader = draw(&seq.params, &banned, row, &mut seq.rng);
    SampledGroup { leader, siblings }
}

/// A token from logits `row` under `params`, drawing from `rng`.
fn draw(
    params: &SamplingParams,
    banned: &[u32],
    row: &[f32],
    rng: &mut ChaCha8Rng,
) -> SampledToken {
    sampler::sample(
        row,
        &params.distribution,
        params.logprobs_mode,
        banned,
        params.top_logprobs,
        rng,
    )
}
