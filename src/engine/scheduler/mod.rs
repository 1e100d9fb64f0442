//! The scheduler: which sequences wait and which run, their KV blocks
//! (through [`KvManager`]), admission, preemption and forking.
//!
//! Each engine step asks [`Scheduler::schedule`] for a [`StepPlan`] (which
//! sequences run how many tokens on which blocks), runs it through the model,
//! samples, and hands the samples back to [`Scheduler::update_from_output`],
//! which appends them, forks waiting siblings, reports tokens and retires
//! finished sequences. No tensors here except the one block copy a fork asks
//! of a [`BlockCopier`].

mod plan;
mod update;

#[cfg(test)]
mod tests;

pub use plan::StepPlan;
pub use update::{SampledGroup, TentativeSample};

use super::events::EngineEvent;
use super::jobs::GenerationJob;
use super::kv_manager::KvManager;
use super::sequence::Sequence;
use crate::lora::LoraAdapter;
use candle_core::DType;
use std::collections::VecDeque;
use std::sync::Arc;

#[cfg(doc)]
use super::kv_manager::BlockCopier;

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

pub struct Scheduler {
    config: SchedulerConfig,
    kv: KvManager,
    eos_token_ids: Vec<u32>,
    /// Queued sequences in arrival order (new, preempted, or restarted).
    waiting: VecDeque<Sequence>,
    /// In arrival order after every step.
    running: Vec<Sequence>,
    next_arrival: u64,
    /// Seed of the prefix cache's hash chains: the weights' label, so KV of
    /// other weights never matches.
    hash_seed: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, eos_token_ids: Vec<u32>, hash_seed: u64) -> Self {
        Self {
            config,
            kv: KvManager::new(config.num_blocks, config.block_size),
            eos_token_ids,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            hash_seed,
        }
    }

    /// The pool's bookkeeping (read-only: blocks change through scheduling).
    pub fn kv(&self) -> &KvManager {
        &self.kv
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn reset_prefix_cache(&mut self) {
        self.kv.reset_prefix_cache();
    }

    /// Queues a request. Choice 0 leads; the other choices wait on it and fork
    /// from its computed prompt, so a group of n samples prefills once.
    pub fn add(&mut self, job: GenerationJob) {
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
        for c in &mut choices {
            c.adapter = job.adapter.clone();
        }
        let mut leader = choices.remove(0);
        leader.siblings = choices;
        self.waiting.push_back(leader);
    }

    /// Drops the sequences of a request (one choice, or all of them).
    pub fn cancel(&mut self, request_id: u64, choice: Option<usize>) {
        let matches =
            |s: &Sequence| s.request_id == request_id && choice.is_none_or(|c| c == s.choice);
        let mut orphans = Vec::new();
        let mut keep = |s: &mut Sequence, kv: &mut KvManager| {
            s.siblings.retain(|sib| !matches(sib));
            if !matches(s) {
                return true;
            }
            s.free_blocks(kv);
            // Parked siblings of a cancelled leader go on by themselves.
            orphans.append(&mut s.siblings);
            false
        };
        let kv = &mut self.kv;
        self.running.retain_mut(|s| keep(s, kv));
        self.waiting.retain_mut(|s| keep(s, kv));
        for orphan in orphans {
            self.requeue(orphan);
        }
    }

    /// Ends every sequence, running or queued, with `finish_reason: "abort"`;
    /// returns how many choices that ended.
    pub fn abort_all(&mut self) -> usize {
        let mut aborted = 0;
        let all: Vec<Sequence> = self
            .running
            .drain(..)
            .chain(self.waiting.drain(..))
            .collect();
        for mut seq in all {
            seq.free_blocks(&mut self.kv);
            for s in std::iter::once(&seq).chain(&seq.siblings) {
                let _ = s.events.send(EngineEvent::Aborted { choice: s.choice });
                aborted += 1;
            }
        }
        aborted
    }

    /// Sends every running sequence back to the queue to recompute its cache
    /// under new weights, keeping its tokens and RNG state, and chains
    /// prefix hashes from `hash_seed` from now on. Returns how many ran.
    pub fn restart_all(&mut self, hash_seed: u64) -> usize {
        let kept = self.running.len();
        while !self.running.is_empty() {
            let mut seq = self.running.remove(0);
            seq.free_blocks(&mut self.kv);
            self.requeue(seq);
        }
        // Their block hashes were chained from the old seed: recompute them.
        for seq in self.waiting.iter_mut() {
            seq.block_hashes.clear();
        }
        self.hash_seed = hash_seed;
        kept
    }

    /// Adapter `name` changed: its sequences go on under the new version
    /// `current` (`keep`: recomputing their cache, queued ones too) or end
    /// (`keep` false). Other sequences are untouched. Returns (aborted, kept).
    pub fn swap_adapter(
        &mut self,
        name: &str,
        current: Option<Arc<LoraAdapter>>,
        keep: bool,
    ) -> (usize, usize) {
        let uses = |s: &Sequence| s.adapter.as_ref().is_some_and(|a| a.name == name);
        let (hit, rest): (Vec<Sequence>, Vec<Sequence>) =
            self.running.drain(..).partition(|s| uses(s));
        self.running = rest;
        for mut seq in hit {
            seq.free_blocks(&mut self.kv);
            self.requeue(seq);
        }
        let (mut aborted, mut kept) = (0, 0);
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
        (aborted, kept)
    }

    /// Ends every running request with `message` (a failed forward pass)
    /// and frees their blocks.
    pub fn fail_running(&mut self, message: &str) {
        for mut seq in self.running.drain(..) {
            seq.free_blocks(&mut self.kv);
            let _ = seq.events.send(EngineEvent::Failed(message.to_string()));
        }
    }

    /// After a panic inside a step: fails every request and starts over with
    /// an empty pool (the bookkeeping may be half updated).
    pub fn reset(&mut self, message: &str) {
        for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = seq.events.send(EngineEvent::Failed(message.to_string()));
        }
        self.kv = KvManager::new(self.config.num_blocks, self.config.block_size);
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

    /// Frees `running[index]`'s blocks and queues it to start over.
    fn preempt_at(&mut self, index: usize) {
        let mut seq = self.running.remove(index);
        seq.free_blocks(&mut self.kv);
        self.requeue(seq);
    }
}
