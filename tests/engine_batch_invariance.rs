//! Bitwise batch invariance, property style: seeded requests produce the
//! same token IDs, log-probs and top alternatives (compared as f32 bit
//! patterns) alone, inside a mix of other requests arriving at random
//! steps, after a prefix-cache hit, under small and large chunked-prefill
//! budgets, and with a pool small enough to force preemption.

mod common;

use gym_serve::engine::core::{EngineCore, GenerationJob, SchedulerConfig};
use gym_serve::engine::{DistributionParams, EngineEvent, LogprobsMode, SamplingParams};
use gym_serve::model::Model;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use tokio::sync::mpsc;

/// One request: prompt, sampling, seed, and the step it arrives at.
#[derive(Clone)]
struct Request {
    prompt: Vec<u32>,
    params: Arc<SamplingParams>,
    seed: u64,
    arrival: usize,
}

/// Per choice: (token, log-prob bits, top alternatives as (token, bits)).
type Trace = Vec<Vec<(u32, u32, Vec<(u32, u32)>)>>;

fn config(budget: usize, num_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        block_size: 16,
        num_blocks,
        max_num_batched_tokens: budget,
        max_num_seqs: 64,
        kv_dtype: None,
    }
}

/// Runs `requests` on one engine core (in arrival order) to the end and
/// returns each one's trace.
fn run(model: &Model, cfg: SchedulerConfig, requests: &[Request]) -> Vec<Trace> {
    let mut core = EngineCore::new(model.clone(), vec![], "0", cfg).unwrap();
    let mut receivers = Vec::new();
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| requests[i].arrival);
    let mut next = 0;
    let mut step = 0;
    while next < order.len() || core.has_work() {
        while next < order.len() && requests[order[next]].arrival <= step {
            let r = &requests[order[next]];
            let (events, rx) = mpsc::unbounded_channel();
            core.add(GenerationJob {
                request_id: order[next] as u64,
                prompt: r.prompt.clone(),
                params: r.params.clone(),
                seed: r.seed,
                budget: r.params.max_tokens,
                events,
                adapter: None,
            });
            receivers.push((order[next], rx));
            next += 1;
        }
        core.step();
        step += 1;
        assert!(step < 100_000, "engine did not finish");
    }
    let mut traces = vec![Trace::new(); requests.len()];
    for (i, mut rx) in receivers {
        let mut trace = vec![Vec::new(); requests[i].params.n];
        while let Ok(event) = rx.try_recv() {
            match event {
                EngineEvent::Token(t) => trace[t.choice].push((
                    t.token,
                    t.logprob.to_bits(),
                    t.top_logprobs
                        .iter()
                        .map(|&(id, lp)| (id, lp.to_bits()))
                        .collect(),
                )),
                other => panic!("request {i}: {other:?}"),
            }
        }
        traces[i] = trace;
    }
    traces
}

fn requests(vocab: u32, count: usize, seed: u64, targets: bool) -> Vec<Request> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let len = rng.random_range(3..70);
            let (temperature, top_p, top_k) = match i % 3 {
                0 => (1.0, 1.0, None),
                1 => (0.7, 0.9, Some(20)),
                _ => (1.0, 0.8, None),
            };
            let params = SamplingParams {
                distribution: DistributionParams {
                    temperature,
                    top_p,
                    top_k,
                    ..DistributionParams::default()
                },
                max_tokens: rng.random_range(4..14),
                ignore_eos: true,
                n: if i % 5 == 4 { 2 } else { 1 },
                logprobs_mode: if i % 2 == 0 {
                    LogprobsMode::Processed
                } else {
                    LogprobsMode::Raw
                },
                top_logprobs: 3,
                ..SamplingParams::default()
            };
            Request {
                prompt: (0..len).map(|_| rng.random_range(1..vocab)).collect(),
                params: Arc::new(params),
                seed: rng.random(),
                arrival: if targets { 0 } else { rng.random_range(0..30) },
            }
        })
        .collect()
}

#[test]
fn seeded_requests_give_the_same_bits_in_any_company() {
    let (_dir, loaded) = common::tiny_qwen3(301);
    let model = &loaded.model;
    let vocab = model.config().vocab_size as u32;
    let targets = requests(vocab, 12, 1, true);
    let others = requests(vocab, 20, 2, false);
    // Each target alone on a fresh engine: the reference.
    let alone: Vec<Trace> = targets
        .iter()
        .map(|r| run(model, config(8192, 64), std::slice::from_ref(r)).remove(0))
        .collect();
    // A prefix-cache hit: the same request twice in a row on one engine.
    for (i, r) in targets.iter().enumerate().take(4) {
        let mut later = r.clone();
        later.arrival = 40;
        let twice = run(model, config(8192, 64), &[r.clone(), later]);
        assert_eq!(twice[1], alone[i], "target {i} after a cache hit");
    }
    // Mixed with the others arriving at random steps, under three chunk
    // budgets, then with a pool of 12 blocks (preemption and recompute).
    for (budget, blocks) in [(8192, 512), (64, 512), (16, 512), (256, 12)] {
        let mut mix: Vec<Request> = others.clone();
        for (j, t) in targets.iter().enumerate() {
            let mut t = t.clone();
            t.arrival = 3 * j;
            mix.push(t);
        }
        let traces = run(model, config(budget, blocks), &mix);
        for (i, want) in alone.iter().enumerate() {
            assert_eq!(
                &traces[others.len() + i],
                want,
                "target {i} in a mix, budget {budget}, {blocks} blocks"
            );
        }
    }
}
