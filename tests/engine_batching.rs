//! Continuous batching over the block KV pool: chunked prefill, preemption,
//! prefix caching, forked GRPO groups, and no leaked blocks.

mod common;

use gym_serve::engine::core::{EngineCore, GenerationJob, SchedulerConfig};
use gym_serve::engine::{ChoiceOutput, DistributionParams, EngineEvent, SamplingParams};
use gym_serve::model::Model;
use std::sync::Arc;
use tokio::sync::mpsc;

fn params(seed: u64, n: usize, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        distribution: DistributionParams {
            temperature: 0.9,
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

fn config(num_blocks: usize, max_num_batched_tokens: usize) -> SchedulerConfig {
    SchedulerConfig {
        block_size: 16,
        num_blocks,
        max_num_batched_tokens,
        max_num_seqs: 64,
    }
}

/// Runs requests to completion on a core; returns each request's choices.
struct Run {
    core: EngineCore,
    receivers: Vec<(mpsc::UnboundedReceiver<EngineEvent>, usize)>,
}

impl Run {
    fn new(model: &Model, eos: &[u32], config: SchedulerConfig) -> Self {
        Run {
            core: EngineCore::new(model.clone(), eos.to_vec(), "0", config).unwrap(),
            receivers: Vec::new(),
        }
    }

    fn add(&mut self, prompt: &[u32], p: SamplingParams) {
        let (events, rx) = mpsc::unbounded_channel();
        self.receivers.push((rx, p.n));
        self.core.add(GenerationJob {
            request_id: self.receivers.len() as u64,
            prompt: prompt.to_vec(),
            seed: p.seed.unwrap(),
            budget: p.max_tokens,
            params: Arc::new(p),
            events,
        });
    }

    fn finish(&mut self) -> Vec<Vec<ChoiceOutput>> {
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

fn assert_close(a: &[Vec<ChoiceOutput>], b: &[Vec<ChoiceOutput>], what: &str) {
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            assert_eq!(x.token_ids, y.token_ids, "{what}: token IDs differ");
            assert!(x.finish_reason.is_some(), "{what}: unfinished");
            for (p, q) in x.logprobs.iter().zip(&y.logprobs) {
                assert!((p - q).abs() <= 1e-5, "{what}: log-prob {p} vs {q}");
            }
        }
    }
}

/// Prompts of quite different lengths (some longer than a block, some not).
fn prompts(loaded: &gym_serve::loader::LoadedModel) -> Vec<Vec<u32>> {
    let mut p = common::prompts(loaded);
    let long: Vec<u32> = p.iter().flatten().copied().cycle().take(150).collect();
    p.push(long);
    p
}

#[test]
fn chunked_prefill_and_preemption_do_not_change_outputs() {
    let (_dir, loaded) = common::tiny_qwen3(101);
    let eos = loaded.chat.eos_token_ids().to_vec();
    let prompts = prompts(&loaded);
    let run = |config: SchedulerConfig| {
        let mut r = Run::new(&loaded.model, &eos, config);
        for (i, p) in prompts.iter().enumerate() {
            r.add(p, params(i as u64, 2, 40));
        }
        let out = r.finish();
        assert_eq!(r.core.used_blocks(), 0, "blocks leaked");
        (out, r.core.stats().preemptions())
    };
    let (reference, _) = run(config(512, 2048));
    let (chunked, _) = run(config(512, 7));
    assert_close(&reference, &chunked, "chunked prefill");
    // 8 sequences need about 8 * 12 blocks together; 16 blocks hold any one
    // (150 + 40 tokens) but force preemption and recompute.
    let (tight, preemptions) = run(config(16, 64));
    assert!(preemptions > 0, "the pool was meant to be too small");
    assert_close(&reference, &tight, "preemption");
}

#[test]
fn prefix_cache_hits_and_ignores_other_weight_versions() {
    let (_dir, loaded) = common::tiny_qwen3(102);
    let eos = loaded.chat.eos_token_ids().to_vec();
    let prompt = prompts(&loaded)[3].clone();
    let mut r = Run::new(&loaded.model, &eos, config(256, 2048));
    r.add(&prompt, params(1, 1, 24));
    let cold = r.finish();
    let (hits0, computed0) = r.core.prefix_counters();
    assert_eq!(hits0, 0);
    assert_eq!(computed0, prompt.len() as u64);

    r.add(&prompt, params(1, 1, 24));
    let warm = r.finish();
    let (hits1, computed1) = r.core.prefix_counters();
    let reusable = ((prompt.len() - 1) / 16 * 16) as u64;
    assert_eq!(
        hits1 - hits0,
        reusable,
        "every full block of the prompt is reused"
    );
    assert_eq!(computed1 - computed0, prompt.len() as u64 - reusable);
    assert_close(&cold[..1], &warm[1..], "warm vs cold");

    // A turn-2 prompt extending turn 1's prompt + generation reuses both.
    let mut turn2 = prompt.clone();
    turn2.extend(&warm[1][0].token_ids);
    turn2.extend(&prompt[..5]);
    r.add(&turn2, params(2, 1, 4));
    r.finish();
    let (hits2, _) = r.core.prefix_counters();
    assert!(
        hits2 - hits1 > reusable,
        "turn 2 reused turn 1's generated blocks too"
    );

    // New weights (here: a new version label): no old block may be reused.
    r.core.set_weights(loaded.model.clone(), "1");
    r.add(&prompt, params(1, 1, 24));
    r.finish();
    let (hits3, _) = r.core.prefix_counters();
    assert_eq!(
        hits3, hits2,
        "blocks from weight version 0 were reused under version 1"
    );
    assert_eq!(r.core.used_blocks(), 0);
}

#[test]
fn a_group_of_sixteen_prefills_its_prompt_once() {
    let (_dir, loaded) = common::tiny_qwen3(103);
    let eos = loaded.chat.eos_token_ids().to_vec();
    let prompt: Vec<u32> = prompts(&loaded)
        .concat()
        .into_iter()
        .cycle()
        .take(300)
        .collect();
    let mut r = Run::new(&loaded.model, &eos, config(1024, 2048));
    r.add(&prompt, params(5, 16, 8));
    let out = r.finish();
    let stats = r.core.stats();
    let decode_tokens = 16 * 8 - 16; // the first token of each choice comes from the prefill
    let prefill = stats.forward_tokens() - decode_tokens as u64;
    assert!(
        prefill as f64 <= 1.1 * prompt.len() as f64,
        "prefill work {prefill} for a {}-token prompt",
        prompt.len()
    );
    let distinct: std::collections::HashSet<_> =
        out[0].iter().map(|c| c.token_ids.clone()).collect();
    assert_eq!(distinct.len(), 16, "every choice samples its own tokens");
    assert_eq!(r.core.used_blocks(), 0);

    // Each forked choice equals the same choice generated on its own.
    let mut solo = Run::new(&loaded.model, &eos, config(1024, 2048));
    solo.add(&prompt, params(5, 16, 8));
    assert_close(&out, &solo.finish(), "fork vs fresh run");
}

#[test]
fn cancelled_requests_return_their_blocks() {
    let (_dir, loaded) = common::tiny_qwen3(104);
    let eos = loaded.chat.eos_token_ids().to_vec();
    let prompt = prompts(&loaded)[3].clone();
    let mut r = Run::new(&loaded.model, &eos, config(256, 2048));
    r.add(&prompt, params(1, 4, 100));
    r.add(&prompt, params(2, 1, 100));
    r.core.step();
    r.core.step();
    assert!(r.core.used_blocks() > 0);
    r.core.cancel(1, Some(2));
    r.core.cancel(1, None);
    r.core.cancel(2, None);
    assert!(!r.core.has_work());
    assert_eq!(r.core.used_blocks(), 0);
}
