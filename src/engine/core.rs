//! The engine loop's state: the model, the KV pool, and the sequences, waiting
//! and running. Owned by one thread; everything else talks to it through
//! [`super::EngineHandle`].
//!
//! Each [`EngineCore::step`] is one continuous-batching iteration: every
//! running sequence that is decoding gets one token of the step's budget, then
//! unfinished prefills and newly admitted sequences get chunks of what is
//! left (so a long prompt never stalls decoding), one forward pass runs them
//! all, and every sequence that reached the end of its known tokens samples.

use super::block_pool::{version_seed, BlockPool};
use super::events::{EngineEvent, EventSender, TokenEvent};
use super::logits::HostLogits;
use super::params::{DistributionParams, LogprobsMode, SamplingParams};
use super::sampler;
use super::sequence::Sequence;
use super::stats::EngineStats;
use crate::lora::{LoraAdapter, LoraRegistry};
use crate::model::{KvPool, LogitsFor, Model, Segment};
use candle_core::DType;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

/// What happens to running requests when generation pauses (or weights
/// change): `abort` ends them with what they have; `wait` lets them finish
/// first; `keep` freezes them and continues them afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseMode {
    Abort,
    Wait,
    Keep,
}

impl std::str::FromStr for PauseMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "abort" => Ok(Self::Abort),
            "wait" => Ok(Self::Wait),
            "keep" => Ok(Self::Keep),
            other => Err(format!(
                "unknown pause mode {other:?} (expected abort, wait or keep)"
            )),
        }
    }
}

/// New weights waiting to be swapped in.
pub struct PendingSwap {
    pub model: Model,
    pub version: String,
    pub reply: oneshot::Sender<SwapReport>,
}

/// What a swap did.
#[derive(Debug, Clone)]
pub struct SwapReport {
    /// Sequences ended with `finish_reason: "abort"`.
    pub aborted: usize,
    /// Running sequences that continue, recomputing their cache under the new weights.
    pub kept: usize,
    /// Time the engine loop spent on the swap itself.
    pub swap_seconds: f64,
}

/// Sizes of the scheduler and the pool.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub block_size: usize,
    pub num_blocks: usize,
    /// Token budget of one step (decode tokens plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// What the KV pool stores keys and values as (`None`: the model's dtype).
    pub kv_dtype: Option<DType>,
}

pub struct EngineCore {
    model: Model,
    eos_token_ids: Vec<u32>,
    pool: KvPool,
    blocks: BlockPool,
    config: SchedulerConfig,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    next_arrival: u64,
    weight_version: Arc<str>,
    hash_seed: u64,
    stats: Arc<EngineStats>,
    /// Set by `pause`: no admissions; `keep` also freezes running sequences.
    paused: Option<PauseMode>,
    /// A swap waiting for running sequences to finish (`wait` mode).
    pending_swap: Option<PendingSwap>,
    /// `pause(wait)` callers waiting for running sequences to finish.
    pause_waiters: Vec<oneshot::Sender<()>>,
    swaps: u64,
    /// The adapters being served: a queued sequence runs under the version
    /// current when it reaches the engine.
    adapters: Arc<LoraRegistry>,
}

/// A validated generation request (see [`super::EngineHandle::generate`]).
pub struct GenerationJob {
    pub request_id: u64,
    pub prompt: Vec<u32>,
    pub params: Arc<SamplingParams>,
    pub seed: u64,
    pub budget: usize,
    pub events: EventSender,
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

/// One sequence's share of a step: run `len` tokens from `num_computed`.
struct Planned {
    index: usize,
    len: usize,
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
        Ok(Self {
            model,
            eos_token_ids,
            pool,
            blocks: BlockPool::new(config.num_blocks, config.block_size),
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            weight_version: Arc::from(weight_version),
            hash_seed: version_seed(weight_version),
            stats: Arc::new(EngineStats::default()),
            paused: None,
            pending_swap: None,
            pause_waiters: Vec::new(),
            swaps: 0,
            adapters: Arc::default(),
        })
        .inspect(|core| core.stats.set_weight_version(core.weight_version.clone()))
    }

    /// The adapters requests resolve against (shared with the HTTP layer).
    pub fn set_adapters(&mut self, adapters: Arc<LoraRegistry>) {
        self.adapters = adapters;
    }

    /// The version of `adapter` being served now (the one given, if it was
    /// unloaded since: the request finishes under it).
    fn current_adapter(&self, adapter: Option<Arc<LoraAdapter>>) -> Option<Arc<LoraAdapter>> {
        adapter.map(|a| self.adapters.get(&a.name).unwrap_or(a))
    }

    /// Adapter `name` changed in the registry: its sequences go on under
    /// `mode`. `keep`: they switch to the new version and recompute their
    /// cache (queued ones too); `abort`: they end; `wait`: they finish
    /// under the version they started with. Other sequences are untouched.
    pub fn swap_adapter(&mut self, name: &str, mode: PauseMode) -> SwapReport {
        let started = Instant::now();
        let current = self.adapters.get(name);
        let uses = |s: &Sequence| s.adapter.as_ref().is_some_and(|a| a.name == name);
        let (mut aborted, mut kept) = (0, 0);
        let keep = mode == PauseMode::Keep || self.paused.is_some();
        if keep || mode == PauseMode::Abort {
            let (hit, rest): (Vec<Sequence>, Vec<Sequence>) =
                self.running.drain(..).partition(|s| uses(s));
            self.running = rest;
            for mut seq in hit {
                seq.free_blocks(&mut self.blocks);
                self.requeue(seq);
            }
            let mut still = VecDeque::with_capacity(self.waiting.len());
            for mut seq in self.waiting.drain(..) {
                if !uses(&seq) {
                    still.push_back(seq);
                } else if keep {
                    kept += 1 + seq.siblings.len();
                    seq.block_hashes.clear();
                    seq.adapter = current.clone().or(seq.adapter.take());
                    for s in seq.siblings.iter_mut() {
                        s.adapter = current.clone().or(s.adapter.take());
                    }
                    still.push_back(seq);
                } else {
                    for s in std::iter::once(&seq).chain(&seq.siblings) {
                        let _ = s.events.send(EngineEvent::Aborted { choice: s.choice });
                        aborted += 1;
                    }
                }
            }
            self.waiting = still;
        }
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
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn running_sequences(&self) -> usize {
        self.running.len()
    }

    pub fn waiting_sequences(&self) -> usize {
        self.waiting.len()
    }

    /// Blocks referenced by some sequence.
    pub fn used_blocks(&self) -> usize {
        self.blocks.num_used()
    }

    /// Prompt tokens served from the prefix cache, and prompt tokens computed.
    pub fn prefix_counters(&self) -> (u64, u64) {
        self.blocks.prefix_counters()
    }

    pub fn reset_prefix_cache(&mut self) {
        self.blocks.reset_prefix_cache();
    }

    /// Serves `model` from the next step on, labelled `version`. Cached prefixes
    /// of the old weights stop matching: their hash chains had another seed
    /// (which also counts swaps, so re-using a label never revives stale KV).
    /// Running sequences go back to the queue and recompute their cache under
    /// the new weights, keeping their tokens and RNG state.
    pub fn set_weights(&mut self, model: Model, version: &str) -> usize {
        let kept = self.running.len();
        while !self.running.is_empty() {
            let mut seq = self.running.remove(0);
            seq.free_blocks(&mut self.blocks);
            self.requeue(seq);
        }
        // Their block hashes were chained from the old seed: recompute them.
        for seq in self.waiting.iter_mut() {
            seq.block_hashes.clear();
        }
        self.swaps += 1;
        self.model = model;
        self.weight_version = Arc::from(version);
        self.hash_seed = version_seed(&format!("{version}#{}", self.swaps));
        self.stats.set_weight_version(self.weight_version.clone());
        self.publish_stats();
        kept
    }

    /// Ends every sequence, running or queued, with `finish_reason: "abort"`.
    fn abort_all(&mut self) -> usize {
        let mut aborted = 0;
        let all: Vec<Sequence> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        for mut seq in all {
            seq.free_blocks(&mut self.blocks);
            for s in std::iter::once(&seq).chain(&seq.siblings) {
                let _ = s.events.send(EngineEvent::Aborted { choice: s.choice });
                aborted += 1;
            }
        }
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

    /// Swaps weights in under `mode`. While paused the swap happens at once
    /// (frozen sequences continue under the new weights on resume).
    pub fn request_swap(&mut self, swap: PendingSwap, mode: PauseMode) {
        if self.paused.is_some() {
            return self.apply_swap(swap, 0);
        }
        match mode {
            PauseMode::Abort => {
                let aborted = self.abort_all();
                self.apply_swap(swap, aborted);
            }
            PauseMode::Keep => self.apply_swap(swap, 0),
            PauseMode::Wait => {
                // A newer update replaces one still waiting: the last weights win.
                self.pending_swap = Some(swap);
                self.settle();
            }
        }
    }

    /// Stops admitting new work; see [`PauseMode`]. `reply` is answered once
    /// the pause is in effect (for `wait`, when running sequences are done).
    pub fn pause(&mut self, mode: PauseMode, reply: oneshot::Sender<()>) {
        if mode == PauseMode::Abort {
            self.abort_all();
        }
        self.paused = Some(mode);
        self.stats.set_paused(true);
        self.pause_waiters.push(reply);
        self.settle();
    }

    pub fn resume(&mut self) {
        self.paused = None;
        self.stats.set_paused(false);
        for waiter in self.pause_waiters.drain(..) {
            let _ = waiter.send(());
        }
    }

    /// New sequences may be admitted (not paused, no swap waiting).
    fn admitting(&self) -> bool {
        self.paused.is_none() && self.pending_swap.is_none()
    }

    /// After a panic inside a step: fail every request (their clients get an
    /// error) and start over with an empty pool, so the server keeps serving.
    pub fn recover(&mut self, message: &str) {
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = seq.events.send(EngineEvent::Failed(message.to_string()));
        }
        self.blocks = BlockPool::new(self.config.num_blocks, self.config.block_size);
        self.pending_swap = None;
        self.publish_stats();
    }

    /// Whether a step would do anything.
    pub fn can_step(&self) -> bool {
        match self.paused {
            Some(PauseMode::Keep) | Some(PauseMode::Abort) => false,
            Some(PauseMode::Wait) => !self.running.is_empty(),
            None if self.pending_swap.is_some() => !self.running.is_empty(),
            None => self.has_work(),
        }
    }

    /// Completes what was waiting on running sequences to drain.
    pub fn settle(&mut self) {
        let drained = self.running.is_empty() || matches!(self.paused, Some(PauseMode::Keep));
        if !drained {
            return;
        }
        if let Some(swap) = self.pending_swap.take() {
            self.apply_swap(swap, 0);
        }
        if self.paused.is_some() {
            for waiter in self.pause_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    fn publish_stats(&self) {
        let (hits, computed) = self.blocks.prefix_counters();
        self.stats
            .set_queues(self.running.len(), self.waiting.len());
        self.stats
            .set_blocks(self.blocks.num_used(), self.blocks.num_free());
        self.stats.set_prefix(hits, computed);
    }

    /// Queues a request. Choice 0 leads; the other choices wait on it and fork
    /// from its computed prompt, so a group of n samples prefills once.
    pub fn add(&mut self, job: GenerationJob) {
        self.stats.add_prompt_tokens(job.prompt.len());
        let mut choices: Vec<Sequence> = (0..job.params.n)
            .map(|choice| {
                self.next_arrival += 1;
                Sequence::new(
                    job.request_id,
                    choice,
                    self.next_arrival,
                    job.prompt.clone(),
                    job.seed,
                    job.params.clone(),
                    job.budget,
                    job.events.clone(),
                )
            })
            .collect();
        let adapter = self.current_adapter(job.adapter);
        for c in &mut choices {
            c.adapter = adapter.clone();
        }
        let mut leader = choices.remove(0);
        leader.siblings = choices;
        self.waiting.push_back(leader);
        self.publish_stats();
    }

    /// Drops the sequences of a request (one choice, or all of them).
    pub fn cancel(&mut self, request_id: u64, choice: Option<usize>) {
        let matches =
            |s: &Sequence| s.request_id == request_id && choice.is_none_or(|c| c == s.choice);
        let mut orphans = Vec::new();
        let mut keep = |s: &mut Sequence, blocks: &mut BlockPool| {
            s.siblings.retain(|sib| !matches(sib));
            if !matches(s) {
                return true;
            }
            s.free_blocks(blocks);
            // Parked siblings of a cancelled leader go on by themselves.
            orphans.append(&mut s.siblings);
            false
        };
        let blocks = &mut self.blocks;
        self.running.retain_mut(|s| keep(s, blocks));
        self.waiting.retain_mut(|s| keep(s, blocks));
        for orphan in orphans {
            self.requeue(orphan);
        }
        self.publish_stats();
    }

    /// Puts a sequence back in the queue in arrival order.
    fn requeue(&mut self, seq: Sequence) {
        let at = self
            .waiting
            .iter()
            .position(|w| w.arrival > seq.arrival)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, seq);
    }

    /// Gives `seq` blocks for `upto` positions; false if the pool is out.
    fn reserve(blocks: &mut BlockPool, seq: &mut Sequence, upto: usize) -> bool {
        let needed = upto.div_ceil(blocks.block_size());
        if needed.saturating_sub(seq.block_table.len()) > blocks.num_free() {
            return false;
        }
        while seq.block_table.len() < needed {
            match blocks.allocate() {
                Some(b) => seq.block_table.push(b),
                None => return false,
            }
        }
        true
    }

    /// Preempts the youngest running sequence younger than `running[current]`
    /// (the running list is in arrival order). False if there is none.
    fn preempt_younger_than(&mut self, current: usize) -> bool {
        if current + 1 >= self.running.len() {
            return false;
        }
        self.preempt_at(self.running.len() - 1);
        true
    }

    /// Decides this step's work: decode tokens first, then prefill chunks.
    fn schedule(&mut self) -> Vec<Planned> {
        let mut budget = self.config.max_num_batched_tokens;
        self.running.sort_by_key(|s| s.arrival);
        let mut planned: Vec<(u64, usize)> = Vec::new(); // (arrival, len)
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let want = self.running[i].uncomputed().min(budget);
            let upto = self.running[i].num_computed + want;
            loop {
                let (blocks, seq) = (&mut self.blocks, &mut self.running[i]);
                if Self::reserve(blocks, seq, upto) {
                    planned.push((seq.arrival, want));
                    budget -= want;
                    i += 1;
                    break;
                }
                if !self.preempt_younger_than(i) {
                    // Nothing younger to free: this one waits its turn instead.
                    self.preempt_at(i);
                    break;
                }
                // The preempted sequence was younger, so index i is unchanged.
            }
        }
        // Admit waiting sequences while the budget and the pool allow.
        while self.admitting() && budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let bs = self.blocks.block_size();
            seq.hash_full_blocks(self.hash_seed, bs);
            // Reuse cached full blocks, always leaving the last token to compute.
            let reusable = (seq.tokens.len() - 1) / bs;
            for &h in seq.block_hashes.iter().take(reusable) {
                match self.blocks.lookup(h) {
                    Some(b) => seq.block_table.push(b),
                    None => break,
                }
            }
            seq.num_computed = seq.block_table.len() * bs;
            let want = seq.uncomputed().min(budget);
            let upto = seq.num_computed + want;
            if !Self::reserve(&mut self.blocks, &mut seq, upto) {
                seq.free_blocks(&mut self.blocks);
                self.waiting.push_front(seq);
                break;
            }
            self.blocks
                .record_prompt(seq.num_computed, seq.uncomputed());
            planned.push((seq.arrival, want));
            budget -= want;
            self.running.push(seq);
        }
        self.running.sort_by_key(|s| s.arrival);
        planned
            .into_iter()
            .filter_map(|(arrival, len)| {
                self.running
                    .iter()
                    .position(|s| s.arrival == arrival)
                    .map(|index| Planned { index, len })
            })
            .filter(|p| p.len > 0)
            .collect()
    }

    fn preempt_at(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        seq.free_blocks(&mut self.blocks);
        self.stats.record_preemption();
        self.requeue(seq);
    }

    /// One engine step.
    pub fn step(&mut self) {
        let plan = self.schedule();
        if plan.is_empty() {
            self.publish_stats();
            return;
        }
        let chunks: Vec<Vec<u32>> = plan
            .iter()
            .map(|p| {
                let s = &self.running[p.index];
                s.tokens[s.num_computed..s.num_computed + p.len].to_vec()
            })
            .collect();
        let segments: Vec<Segment<'_>> = plan
            .iter()
            .zip(&chunks)
            .map(|(p, tokens)| {
                let s = &self.running[p.index];
                let done = s.num_computed + p.len == s.tokens.len();
                Segment {
                    tokens,
                    offset: s.num_computed,
                    block_table: &s.block_table,
                    logits: if done {
                        LogitsFor::Last
                    } else {
                        LogitsFor::Nothing
                    },
                }
            })
            .collect();
        let samplers: Vec<usize> = plan
            .iter()
            .filter(|p| {
                let s = &self.running[p.index];
                s.num_computed + p.len == s.tokens.len()
            })
            .map(|p| p.index)
            .collect();
        let adapters: Vec<Option<&LoraAdapter>> = plan
            .iter()
            .map(|p| self.running[p.index].adapter.as_deref())
            .collect();
        let logits = self
            .model
            .forward_with_adapters(&segments, &adapters, &self.pool);
        drop(adapters);
        drop(segments);
        let logits = match logits {
            Ok(logits) => logits,
            Err(e) => return self.fail_running(e),
        };
        let host = match HostLogits::new(&logits) {
            Ok(host) => host,
            Err(e) => return self.fail_running(e),
        };
        let rows = match host.rows() {
            Ok(rows) => rows,
            Err(e) => return self.fail_running(e),
        };
        let bs = self.blocks.block_size();
        for p in &plan {
            let seq = &mut self.running[p.index];
            seq.num_computed += p.len;
            seq.hash_full_blocks(self.hash_seed, bs);
            for b in 0..seq.num_computed / bs {
                self.blocks
                    .register(seq.block_table[b], seq.block_hashes[b]);
            }
        }
        // Sample every sequence that reached its end, in parallel: each draws
        // from its own RNG, so the result does not depend on the batch.
        let mut row_of = vec![None; self.running.len()];
        for (row, &index) in rows.zip(&samplers) {
            row_of[index] = Some(row);
        }
        let eos = &self.eos_token_ids;
        let sampled: Vec<Option<sampler::SampledToken>> = self
            .running
            .par_iter_mut()
            .zip(row_of.par_iter())
            .map(|(seq, row)| row.map(|row| sample_next(seq, row, eos)))
            .collect();
        let mut generated = 0;
        let mut keep = Vec::with_capacity(self.running.len());
        let mut requeue = Vec::new();
        for ((mut seq, sampled), row) in self.running.drain(..).zip(sampled).zip(&row_of) {
            let (Some(s), Some(row)) = (sampled, row) else {
                keep.push(seq);
                continue;
            };
            // Parked siblings fork from the leader's prompt and sample from the
            // same logits with their own streams.
            for mut sib in std::mem::take(&mut seq.siblings) {
                if !fork(&mut self.blocks, &self.pool, &seq, &mut sib) {
                    requeue.push(sib); // no blocks now: it prefills later (prefix cache)
                    continue;
                }
                let first = sample_next(&mut sib, row, eos);
                generated += 1;
                let version = version_of(&sib, &self.weight_version);
                if emit(&mut sib, first, eos, &version) {
                    keep.push(sib);
                } else {
                    sib.free_blocks(&mut self.blocks);
                }
            }
            generated += 1;
            let version = version_of(&seq, &self.weight_version);
            if emit(&mut seq, s, eos, &version) {
                keep.push(seq);
            } else {
                seq.free_blocks(&mut self.blocks);
            }
        }
        self.running = keep;
        for seq in requeue {
            self.requeue(seq);
        }
        self.stats
            .record_step(generated, chunks.iter().map(Vec::len).sum());
        self.publish_stats();
    }

    /// Ends every running request with `e` (a failed forward pass) and
    /// frees their blocks.
    fn fail_running(&mut self, e: candle_core::Error) {
        tracing::error!(error = %e, "forward pass failed; failing running requests");
        for mut seq in self.running.drain(..) {
            seq.free_blocks(&mut self.blocks);
            let _ = seq.events.send(EngineEvent::Failed(e.to_string()));
        }
        self.publish_stats();
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
        self.model.logits_in_chunks(
            tokens,
            job.start - 1,
            tokens.len() - 1,
            self.pool.dtype(),
            SCORE_CHUNK_ROWS,
            adapter.as_deref(),
            |first, logits| {
                let rows = logits.to_vec2::<f32>()?;
                for (row, &t) in rows.iter().zip(&tokens[first + 1..]) {
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

/// The label a token of `seq` carries: its adapter's version, or the base weights'.
fn version_of(seq: &Sequence, base: &Arc<str>) -> Arc<str> {
    seq.adapter
        .as_ref()
        .map_or_else(|| base.clone(), |a| a.version.clone())
}

/// Samples the next token of `seq` from its logits `row`.
fn sample_next(seq: &mut Sequence, row: &[f32], eos: &[u32]) -> sampler::SampledToken {
    let banned = seq.banned_tokens(eos);
    let p = seq.params.clone();
    sampler::sample(
        row,
        &p.distribution,
        p.logprobs_mode,
        &banned,
        p.top_logprobs,
        &mut seq.rng,
    )
}

/// Appends a sampled token and reports it. Returns whether the sequence goes
/// on (false when it finished or its client went away).
fn emit(seq: &mut Sequence, s: sampler::SampledToken, eos: &[u32], version: &Arc<str>) -> bool {
    seq.tokens.push(s.token);
    let finish = seq.finish_after(s.token, eos);
    let event = EngineEvent::Token(TokenEvent {
        choice: seq.choice,
        token: s.token,
        logprob: s.logprob,
        top_logprobs: s.top_logprobs,
        finish,
        weight_version: version.clone(),
    });
    seq.events.send(event).is_ok() && finish.is_none()
}

/// Gives `sib` the leader's computed prompt: full blocks shared, the partly
/// filled last block copied. False if no block is free for the copy.
fn fork(blocks: &mut BlockPool, pool: &KvPool, leader: &Sequence, sib: &mut Sequence) -> bool {
    let bs = blocks.block_size();
    let prompt = leader.prompt_len;
    let (full, partial) = (prompt / bs, prompt % bs);
    let copy = if partial > 0 {
        let Some(dst) = blocks.allocate() else {
            return false;
        };
        if let Err(e) = pool.copy_block(leader.block_table[full], dst, partial) {
            tracing::warn!(error = %e, "copying a shared block failed; the choice will prefill");
            blocks.release(dst);
            return false;
        }
        Some(dst)
    } else {
        None
    };
    for &b in &leader.block_table[..full] {
        blocks.share(b);
    }
    sib.block_table = leader.block_table[..full].to_vec();
    sib.block_table.extend(copy);
    sib.block_hashes = leader.block_hashes[..full.min(leader.block_hashes.len())].to_vec();
    sib.num_computed = prompt;
    true
}
