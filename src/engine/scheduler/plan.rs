//! Deciding one step: every running sequence gets its next tokens from the
//! step's budget (decode tokens first, in arrival order), preempting the
//! youngest when the pool runs out; then waiting sequences are admitted,
//! reusing cached prefix blocks, with chunks of what is left of the budget.

use super::Scheduler;

/// One sequence's share of a step: `tokens` at positions `offset..`, with
/// their keys and values written into `block_table`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledChunk {
    /// Where the sequence is in the running list for this plan.
    pub(super) index: usize,
    /// Positions already cached (where `tokens` start).
    pub offset: usize,
    pub tokens: Vec<u32>,
    /// The sequence's blocks, covering `offset + tokens.len()` positions.
    pub block_table: Vec<u32>,
    /// The chunk reaches the sequence's last known token: its logits sample
    /// the next one.
    pub samples: bool,
}

/// What one step runs, in forward-pass order. Valid until the scheduler
/// changes: hand it back to [`Scheduler::update_from_output`] in the same
/// step.
#[derive(Debug, Default)]
pub struct StepPlan {
    pub chunks: Vec<ScheduledChunk>,
    /// Sequences preempted (their blocks freed, queued again) to make room.
    pub preempted: usize,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Tokens the forward pass runs.
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum()
    }

    /// The LoRA adapter of each chunk's sequence, in forward-pass order.
    pub fn adapters<'a>(
        &self,
        scheduler: &'a Scheduler,
    ) -> Vec<Option<&'a crate::lora::LoraAdapter>> {
        self.chunks
            .iter()
            .map(|c| scheduler.running[c.index].adapter.as_deref())
            .collect()
    }

    /// The chunks whose logits sample, in the order of the logits rows.
    pub fn sampling(&self) -> impl Iterator<Item = &ScheduledChunk> {
        self.chunks.iter().filter(|c| c.samples)
    }
}

impl Scheduler {
    /// Decides this step's work. With `admit` false (paused, or a swap
    /// waiting) only running sequences go on.
    pub fn schedule(&mut self, admit: bool) -> StepPlan {
        let mut budget = self.config.max_num_batched_tokens;
        let mut preempted = 0;
        let mut planned = self.schedule_running(&mut budget, &mut preempted);
        if admit {
            self.admit_waiting(&mut budget, &mut planned);
        }
        self.running.sort_by_key(|s| s.arrival);
        let chunks = planned
            .into_iter()
            .filter_map(|(arrival, len)| {
                let index = self.running.iter().position(|s| s.arrival == arrival)?;
                let s = &self.running[index];
                let end = s.num_computed + len;
                Some(ScheduledChunk {
                    index,
                    offset: s.num_computed,
                    tokens: s.tokens[s.num_computed..end].to_vec(),
                    block_table: s.blocks.ids().to_vec(),
                    samples: end == s.tokens.len(),
                })
            })
            .filter(|c| !c.tokens.is_empty())
            .collect();
        StepPlan { chunks, preempted }
    }

    /// Gives each running sequence, oldest first, its uncomputed tokens up to
    /// what is left of `budget`. When the pool is out, the youngest running
    /// sequence is preempted; with none younger, the sequence itself waits.
    /// Returns `(arrival, tokens)` per scheduled sequence.
    fn schedule_running(&mut self, budget: &mut usize, preempted: &mut usize) -> Vec<(u64, usize)> {
        self.running.sort_by_key(|s| s.arrival);
        let mut planned = Vec::new();
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let want = self.running[i].uncomputed().min(*budget);
            let upto = self.running[i].num_computed + want;
            loop {
                let seq = &mut self.running[i];
                if self.kv.allocate_slots(&mut seq.blocks, upto).is_some() {
                    planned.push((seq.arrival, want));
                    *budget -= want;
                    i += 1;
                    break;
                }
                *preempted += 1;
                if i + 1 < self.running.len() {
                    // The youngest is younger than `i`, so index i is unchanged.
                    self.preempt_at(self.running.len() - 1);
                } else {
                    // Nothing younger to free: this one waits its turn instead.
                    self.preempt_at(i);
                    break;
                }
            }
        }
        planned
    }

    /// Admits waiting sequences in order while the budget, the pool and
    /// `max_num_seqs` allow; the first that does not fit stays at the front.
    fn admit_waiting(&mut self, budget: &mut usize, planned: &mut Vec<(u64, usize)>) {
        let bs = self.kv.block_size();
        while *budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            seq.hash_full_blocks(self.hash_seed, bs);
            // Reuse cached full blocks, always leaving the last token to compute.
            let reusable = (seq.tokens.len() - 1) / bs;
            let cached = self
                .kv
                .take_cached_prefix(&mut seq.blocks, &seq.block_hashes[..reusable]);
            seq.num_computed = cached * bs;
            let want = seq.uncomputed().min(*budget);
            let upto = seq.num_computed + want;
            if self.kv.allocate_slots(&mut seq.blocks, upto).is_none() {
                seq.free_blocks(&mut self.kv);
                self.waiting.push_front(seq);
                break;
            }
            self.kv.record_prompt(seq.num_computed, seq.uncomputed());
            planned.push((seq.arrival, want));
            *budget -= want;
            self.running.push(seq);
        }
    }
}
