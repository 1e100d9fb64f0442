//! One choice of one request as the engine runs it.

use super::events::{EventSender, FinishReason};
use super::params::SamplingParams;
use crate::model::KvCache;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

pub struct Sequence {
    pub request_id: u64,
    pub choice: usize,
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
    pub cache: KvCache,
    pub rng: ChaCha8Rng,
    pub params: Arc<SamplingParams>,
    /// Most tokens this sequence may generate (max_tokens clamped to the context).
    pub budget: usize,
    pub events: EventSender,
}

impl Sequence {
    /// Choice `choice` of a request seeded with `seed` draws from ChaCha stream
    /// `choice`: reproducible, and independent of every other sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        request_id: u64,
        choice: usize,
        prompt: Vec<u32>,
        seed: u64,
        params: Arc<SamplingParams>,
        budget: usize,
        cache: KvCache,
        events: EventSender,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(choice as u64);
        Self {
            request_id,
            choice,
            prompt,
            generated: Vec::new(),
            cache,
            rng,
            params,
            budget,
            events,
        }
    }

    /// Tokens to feed in the next step: the whole prompt first, then the last
    /// sampled token.
    pub fn pending_tokens(&self) -> &[u32] {
        if self.cache.is_empty() {
            &self.prompt
        } else {
            let n = self.generated.len();
            &self.generated[n - 1..]
        }
    }

    /// Tokens that must not be sampled yet (EOS and stop IDs before `min_tokens`).
    pub fn banned_tokens(&self, eos: &[u32]) -> Vec<u32> {
        if self.generated.len() >= self.params.min_tokens {
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
        if self.generated.len() >= self.budget {
            return Some(FinishReason::Length);
        }
        None
    }
}
