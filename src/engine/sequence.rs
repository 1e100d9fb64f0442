//! One choice of one request as the engine runs it.

use super::block_pool::chain_hash;
use super::events::{EventSender, FinishReason};
use super::kv_manager::{BlockTable, KvManager};
use super::params::SamplingParams;
use crate::lora::LoraAdapter;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

pub struct Sequence {
    pub request_id: u64,
    pub choice: usize,
    /// Admission order: the youngest sequence is preempted first.
    pub arrival: u64,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose keys and values are in the pool.
    pub num_computed: usize,
    /// Its pool blocks; changed only through [`KvManager`].
    pub blocks: BlockTable,
    /// Prefix-cache hashes of the leading full blocks (a chain).
    pub block_hashes: Vec<u64>,
    pub rng: ChaCha8Rng,
    pub params: Arc<SamplingParams>,
    /// Most tokens this sequence may generate (max_tokens clamped to the context).
    pub budget: usize,
    pub events: EventSender,
    /// The other choices of the request, parked on choice 0 until its prompt
    /// is computed; then they fork from it instead of prefilling again.
    pub siblings: Vec<Sequence>,
    /// The LoRA adapter (version) the sequence runs under; `None`: the base model.
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl Sequence {
    /// Choice `choice` of a request seeded with `seed` draws from ChaCha stream
    /// `choice`: reproducible, and independent of every other sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        request_id: u64,
        choice: usize,
        arrival: u64,
        prompt: Vec<u32>,
        seed: u64,
        params: Arc<SamplingParams>,
        budget: usize,
        events: EventSender,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(choice as u64);
        Self {
            request_id,
            choice,
            arrival,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            blocks: BlockTable::default(),
            block_hashes: Vec::new(),
            rng,
            params,
            budget,
            events,
            siblings: Vec::new(),
            adapter: None,
        }
    }

    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens still to run through the model.
    pub fn uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Extends the hash chain over every full block of known tokens.
    /// A sequence with an adapter chains from a seed of its own, so its
    /// blocks match only blocks of the same adapter version.
    pub fn hash_full_blocks(&mut self, seed: u64, block_size: usize) {
        let seed = match &self.adapter {
            Some(a) => chain_hash(
                seed,
                &[a.instance as u32, (a.instance >> 32) as u32, u32::MAX],
            ),
            None => seed,
        };
        let full = self.tokens.len() / block_size;
        while self.block_hashes.len() < full {
            let i = self.block_hashes.len();
            let prev = if i == 0 {
                seed
            } else {
                self.block_hashes[i - 1]
            };
            let h = chain_hash(prev, &self.tokens[i * block_size..(i + 1) * block_size]);
            self.block_hashes.push(h);
        }
    }

    /// Returns every block to the pool (finished, cancelled or preempted).
    pub fn free_blocks(&mut self, kv: &mut KvManager) {
        kv.free(&mut self.blocks);
        self.num_computed = 0;
    }

    /// Tokens that must not be sampled yet (EOS and stop IDs before `min_tokens`).
    pub fn banned_tokens(&self, eos: &[u32]) -> Vec<u32> {
        if self.generated().len() >= self.params.min_tokens {
            return Vec::new();
        }
        let mut banned = self.params.stop_token_ids.clone();
        if !self.params.ignore_eos {
            banned.extend_from_slice(eos);
        }
        banned
    }

    /// Why the sequence ends after sampling `token`, if it does.
    pub fn finish_after(&self, token: u32, eos: &[u32]) -> Option<FinishReason> {
        if (!self.params.ignore_eos && eos.contains(&token))
            || self.params.stop_token_ids.contains(&token)
        {
            return Some(FinishReason::Stop);
        }
        if self.generated().len() >= self.budget {
            return Some(FinishReason::Length);
        }
        None
    }
}
