//! Continuous batching over the block KV pool: chunked prefill, preemption,
//! prefix caching, forked GRPO groups, and no leaked blocks.

mod common;

use common::engine::{assert_close, sampling, scheduler as config, Run};
use gym_serve::engine::core::SchedulerConfig;
use gym_serve::engine::SamplingParams;

fn params(seed: u64, n: usize, max_tokens: usize) -> SamplingParams {
    sampling(seed, n, max_tokens, 0.9, 0.95)
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
