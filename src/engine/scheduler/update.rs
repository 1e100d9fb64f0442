//! Applying what a step produced: computed positions enter the prefix
//! cache, sampled tokens are appended and reported, parked siblings fork
//! from their leader's prompt, and finished sequences give their blocks back.

use super::{Scheduler, StepPlan};
use crate::engine::events::{EngineEvent, TokenEvent};
use crate::engine::kv_manager::BlockCopier;
use crate::engine::sampler::SampledToken;
use crate::engine::sequence::Sequence;
use crate::engine::stats::EngineStats;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// The samples of one sequence whose chunk reached its end.
pub struct SampledGroup {
    pub leader: SampledToken,
    /// One per parked sibling, in order, drawn from the same logits.
    pub siblings: Vec<TentativeSample>,
}

/// A sibling's first token, drawn from a copy of its RNG: it counts (and
/// the RNG advances) only if the sibling gets its blocks; otherwise the
/// sibling prefills later and draws again, as if this never happened.
pub struct TentativeSample {
    pub token: SampledToken,
    pub rng: ChaCha8Rng,
}

impl Scheduler {
    /// The sequences that sample this step, in the order of the logits rows
    /// (the plan's sampling chunks), for the sampler to draw with their RNGs.
    pub fn sampling_sequences(&mut self, plan: &StepPlan) -> Vec<&mut Sequence> {
        let mut slots: Vec<Option<&mut Sequence>> = self.running.iter_mut().map(Some).collect();
        plan.sampling()
            .filter_map(|chunk| slots[chunk.index].take())
            .collect()
    }

    /// Applies a step's outcome: `sampled` holds one group per sampling
    /// chunk of `plan`, in order. Tokens are reported labelled `version`.
    /// Returns the tokens generated.
    pub fn update_from_output(
        &mut self,
        plan: &StepPlan,
        sampled: Vec<SampledGroup>,
        copier: &impl BlockCopier,
        version: &Arc<str>,
        stats: &EngineStats,
    ) -> usize {
        let bs = self.kv.block_size();
        for chunk in &plan.chunks {
            let seq = &mut self.running[chunk.index];
            seq.num_computed += chunk.tokens.len();
            seq.hash_full_blocks(self.hash_seed, bs);
            self.kv
                .cache_full_blocks(&seq.blocks, &seq.block_hashes, seq.num_computed / bs);
        }
        let mut group_of: Vec<Option<SampledGroup>> = self.running.iter().map(|_| None).collect();
        for (chunk, group) in plan.sampling().zip(sampled) {
            group_of[chunk.index] = Some(group);
        }
        let mut generated = 0;
        let mut keep = Vec::with_capacity(self.running.len());
        let mut requeue = Vec::new();
        let running = std::mem::take(&mut self.running);
        for (mut seq, group) in running.into_iter().zip(group_of) {
            let Some(group) = group else {
                keep.push(seq);
                continue;
            };
            // Parked siblings fork from the leader's prompt and take the
            // samples drawn for them from the same logits.
            let siblings = std::mem::take(&mut seq.siblings);
            for (mut sib, first) in siblings.into_iter().zip(group.siblings) {
                if !self.fork(&seq, &mut sib, copier) {
                    requeue.push(sib); // no blocks now: it prefills later (prefix cache)
                    continue;
                }
                sib.rng = first.rng;
                generated += 1;
                self.emit_or_retire(sib, first.token, version, stats, &mut keep);
            }
            generated += 1;
            self.emit_or_retire(seq, group.leader, version, stats, &mut keep);
        }
        self.running = keep;
        for seq in requeue {
            self.requeue(seq);
        }
        generated
    }

    /// Gives `sib` the leader's computed prompt; false if the pool cannot.
    fn fork(&mut self, leader: &Sequence, sib: &mut Sequence, copier: &impl BlockCopier) -> bool {
        let prompt = leader.prompt_len;
        let Some(blocks) = self.kv.fork(&leader.blocks, prompt, copier) else {
            return false;
        };
        let full = prompt / self.kv.block_size();
        sib.blocks = blocks;
        sib.block_hashes = leader.block_hashes[..full.min(leader.block_hashes.len())].to_vec();
        sib.num_computed = prompt;
        true
    }

    /// Appends and reports a sampled token; the sequence stays running
    /// unless it finished or its client went away.
    fn emit_or_retire(
        &mut self,
        mut seq: Sequence,
        sampled: SampledToken,
        version: &Arc<str>,
        stats: &EngineStats,
        running: &mut Vec<Sequence>,
    ) {
        seq.tokens.push(sampled.token);
        let finish = seq.finish_after(sampled.token, &self.eos_token_ids);
        let event = EngineEvent::Token(TokenEvent {
            choice: seq.choice,
            token: sampled.token,
            logprob: sampled.logprob,
            top_logprobs: sampled.top_logprobs,
            finish,
            // An adapter's tokens carry the adapter's version.
            weight_version: seq
                .adapter
                .as_ref()
                .map_or_else(|| version.clone(), |a| a.version.clone()),
        });
        stats.add_generation_token();
        if seq.events.send(event).is_ok() && finish.is_none() {
            running.push(seq);
        } else {
            seq.free_blocks(&mut self.kv);
        }
    }
}
