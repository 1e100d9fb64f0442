//! Driving the engine core by hand, so tests control exactly which requests
//! share which steps.

use gym_serve::engine::core::{EngineCore, GenerationJob, SchedulerConfig};
use gym_serve::engine::{ChoiceOutput, DistributionParams, EngineEvent, SamplingParams};
use gym_serve::model::Model;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Seeded sampling that never stops early (`ignore_eos`), so lengths are fixed.
pub fn sampling(
    seed: u64,
    n: usize,
    max_tokens: usize,
    temperature: f32,
    top_p: f32,
) -> SamplingParams {
    SamplingParams {
        distribution: DistributionParams {
            temperature,
            top_p,
            ..DistributionParams::default()
        },
        max_tokens,
        seed: Some(seed),
        n,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

pub fn scheduler(num_blocks: usize, max_num_batched_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        block_size: 16,
        num_blocks,
        max_num_batched_tokens,
        max_num_seqs: 64,
        kv_dtype: None,
    }
}

/// An engine core and the event channels of the requests added to it.
pub struct Run {
    pub core: EngineCore,
    receivers: Vec<(mpsc::UnboundedReceiver<EngineEvent>, usize)>,
}

impl Run {
    pub fn new(model: &Model, eos: &[u32], config: SchedulerConfig) -> Self {
        Run {
            core: EngineCore::new(model.clone(), eos.to_vec(), "0", config).unwrap(),
            receivers: Vec::new(),
        }
    }

    pub fn add(&mut self, prompt: &[u32], p: SamplingParams) {
        let (events, rx) = mpsc::unbounded_channel();
        self.receivers.push((rx, p.n));
        self.core.add(GenerationJob {
            request_id: self.receivers.len() as u64,
            prompt: prompt.to_vec(),
            seed: p.seed.unwrap(),
            budget: p.max_tokens,
            params: Arc::new(p),
            events,
            adapter: None,
        });
    }

    /// Steps until idle; returns every request's choices, in the order added.
    pub fn finish(&mut self) -> Vec<Vec<ChoiceOutput>> {
        let mut steps = 0;
        while self.core.has_work() {
            self.core.step();
            steps += 1;
            assert!(steps < 100_000, "engine made no progress");
        }
        self.receivers
            .iter_mut()
            .map(|(rx, n)| {
                let mut out = vec![ChoiceOutput::default(); *n];
                while let Ok(EngineEvent::Token(t)) = rx.try_recv() {
                    out[t.choice].token_ids.push(t.token);
                    out[t.choice].logprobs.push(t.logprob);
                    out[t.choice].finish_reason = t.finish;
                }
                out
            })
            .collect()
    }
}

/// Same token IDs and finish reasons; log-probs within 1e-5.
pub fn assert_close(a: &[Vec<ChoiceOutput>], b: &[Vec<ChoiceOutput>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: request counts differ");
    for (ra, rb) in a.iter().zip(b) {
        assert_eq!(ra.len(), rb.len());
        for (x, y) in ra.iter().zip(rb) {
            assert_eq!(x.token_ids, y.token_ids, "{what}: token IDs differ");
            assert!(x.finish_reason.is_some(), "{what}: unfinished");
            assert_eq!(x.finish_reason, y.finish_reason);
            for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
                assert!((p - q).abs() <= 1e-5, "{what}: log-prob {p} vs {q}");
            }
        }
    }
}
