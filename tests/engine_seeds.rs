//! Seeded sampling: reproducible, different per choice, and independent of
//! whatever else shares the engine step.

mod common;

use gym_serve::engine::core::{EngineCore, GenerationJob, SchedulerConfig};
use gym_serve::engine::{
    ChoiceOutput, DistributionParams, EngineEvent, EngineHandle, SamplingParams,
};
use std::sync::Arc;
use tokio::sync::mpsc;

fn params(seed: u64, n: usize, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        distribution: DistributionParams {
            temperature: 1.0,
            top_p: 0.95,
            ..DistributionParams::default()
        },
        max_tokens,
        seed: Some(seed),
        n,
        ignore_eos: true,
        ..SamplingParams::default()
    }
}

#[test]
fn same_seed_same_output_and_choices_differ() {
    let (_dir, loaded) = common::tiny_qwen3(21);
    let prompt = common::prompts(&loaded)[1].clone();
    let engine = EngineHandle::spawn(
        loaded.model,
        loaded.chat.eos_token_ids().to_vec(),
        Default::default(),
    )
    .unwrap();
    let first = engine
        .generate(prompt.clone(), params(7, 2, 16))
        .unwrap()
        .collect_blocking()
        .unwrap();
    let again = engine
        .generate(prompt.clone(), params(7, 2, 16))
        .unwrap()
        .collect_blocking()
        .unwrap();
    // The second run reuses the first's cached prompt blocks; IDs are identical
    // and log-probs agree to float rounding (the tail runs in a smaller matmul).
    assert_same(&first, &again);
    assert_ne!(
        first[0].token_ids, first[1].token_ids,
        "two choices of one request differ"
    );
    let other_seed = engine
        .generate(prompt, params(8, 1, 16))
        .unwrap()
        .collect_blocking()
        .unwrap();
    assert_ne!(first[0].token_ids, other_seed[0].token_ids);
}

fn assert_same(a: &[ChoiceOutput], b: &[ChoiceOutput]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.token_ids, y.token_ids);
        assert_eq!(x.finish_reason, y.finish_reason);
        for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
            assert!((p - q).abs() <= 1e-5, "log-prob {p} vs {q}");
        }
    }
}

fn scheduler() -> SchedulerConfig {
    SchedulerConfig {
        block_size: 16,
        num_blocks: 256,
        max_num_batched_tokens: 2048,
        max_num_seqs: 64,
    }
}

/// Drives the engine core by hand so the co-batching is certain: requests are
/// added at chosen steps and every step runs them together.
struct Harness {
    core: EngineCore,
    receivers: Vec<mpsc::UnboundedReceiver<EngineEvent>>,
}

impl Harness {
    fn add(&mut self, prompt: &[u32], p: SamplingParams) -> usize {
        let (events, rx) = mpsc::unbounded_channel();
        self.core.add(GenerationJob {
            request_id: self.receivers.len() as u64,
            prompt: prompt.to_vec(),
            seed: p.seed.unwrap(),
            budget: p.max_tokens,
            params: Arc::new(p),
            events,
        });
        self.receivers.push(rx);
        self.receivers.len() - 1
    }

    fn outputs(&mut self, request: usize, n: usize) -> Vec<ChoiceOutput> {
        let mut out = vec![ChoiceOutput::default(); n];
        while let Ok(EngineEvent::Token(t)) = self.receivers[request].try_recv() {
            out[t.choice].token_ids.push(t.token);
            out[t.choice].logprobs.push(t.logprob);
            out[t.choice].finish_reason = t.finish;
        }
        out
    }
}

#[test]
fn output_does_not_depend_on_other_sequences_in_the_batch() {
    let (_dir, loaded) = common::tiny_qwen3(22);
    let prompts = common::prompts(&loaded);
    let eos = loaded.chat.eos_token_ids().to_vec();
    let model = loaded.model;

    let mut alone = Harness {
        core: EngineCore::new(model.clone(), eos.clone(), "0", scheduler()).unwrap(),
        receivers: Vec::new(),
    };
    let id = alone.add(&prompts[1], params(3, 2, 12));
    while alone.core.has_work() {
        alone.core.step();
    }
    let reference = alone.outputs(id, 2);

    // The same request joins mid-flight, next to decoding sequences of other
    // lengths, and shares its prefill step with their decode tokens.
    let mut crowded = Harness {
        core: EngineCore::new(model, eos, "0", scheduler()).unwrap(),
        receivers: Vec::new(),
    };
    crowded.add(&prompts[0], params(100, 3, 20));
    crowded.add(&prompts[2], params(101, 1, 20));
    crowded.core.step();
    crowded.core.step();
    let id = crowded.add(&prompts[1], params(3, 2, 12));
    crowded.core.step();
    assert_eq!(crowded.core.running_sequences(), 6);
    while crowded.core.has_work() {
        crowded.core.step();
    }
    let batched = crowded.outputs(id, 2);
    assert_same(&reference, &batched);
}
