//! Log-prob semantics: cached decoding agrees with teacher-forced scoring,
//! greedy is the argmax of the raw logits, and the numbers are natural logs.

mod common;

use gym_serve::engine::{DistributionParams, LogprobsMode, SamplingParams};

fn dist(temperature: f32, top_p: f32) -> DistributionParams {
    DistributionParams {
        temperature,
        top_p,
        ..DistributionParams::default()
    }
}

#[test]
fn cached_decode_log_probs_equal_teacher_forced_scores() {
    let (_dir, loaded) = common::tiny_qwen3(11);
    let prompts = common::prompts(&loaded);
    let engine = common::spawn_engine(loaded);
    let mut checked = 0;
    for mode in [LogprobsMode::Processed, LogprobsMode::Raw] {
        for d in [
            dist(0.7, 1.0),
            dist(1.0, 1.0),
            dist(1.0, 0.9),
            dist(0.7, 0.9),
        ] {
            for (p, prompt) in prompts.iter().enumerate() {
                for seed in [1u64, 2] {
                    let params = SamplingParams {
                        distribution: d,
                        max_tokens: 24,
                        seed: Some(seed + p as u64),
                        logprobs_mode: mode,
                        ..SamplingParams::default()
                    };
                    let out = engine
                        .generate(prompt.clone(), params)
                        .unwrap()
                        .collect_blocking()
                        .unwrap();
                    let choice = &out[0];
                    let mut tokens = prompt.clone();
                    tokens.extend(&choice.token_ids);
                    let scored = engine
                        .score_blocking(tokens, prompt.len(), d, mode)
                        .unwrap();
                    assert_eq!(scored.len(), choice.logprobs.len());
                    for (i, (a, b)) in choice.logprobs.iter().zip(&scored).enumerate() {
                        assert!(a.is_finite(), "sampled token {i} has log-prob {a}");
                        assert!(
                            (a - b).abs() <= 1e-4,
                            "{mode:?} {d:?} prompt {p} seed {seed} token {i}: decode {a} vs score {b}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked > 200, "only {checked} tokens compared");
}

#[test]
fn greedy_picks_the_raw_argmax_at_every_step() {
    let (_dir, loaded) = common::tiny_qwen3(12);
    let model = loaded.model.clone();
    let prompt = common::prompts(&loaded)[1].clone();
    let engine = common::spawn_engine(loaded);
    for mode in [LogprobsMode::Processed, LogprobsMode::Raw] {
        let params = SamplingParams {
            distribution: dist(0.0, 1.0),
            max_tokens: 20,
            ignore_eos: true,
            logprobs_mode: mode,
            ..SamplingParams::default()
        };
        let out = engine
            .generate(prompt.clone(), params)
            .unwrap()
            .collect_blocking()
            .unwrap();
        let choice = &out[0];
        assert_eq!(choice.token_ids.len(), 20);
        let mut tokens = prompt.clone();
        tokens.extend(&choice.token_ids);
        let logits = model
            .full_logits(&tokens)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, &tok) in choice.token_ids.iter().enumerate() {
            let row = &logits[prompt.len() - 1 + i];
            let best = row
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |acc, (j, &v)| {
                    if v > acc.1 {
                        (j, v)
                    } else {
                        acc
                    }
                });
            assert_eq!(
                tok as usize, best.0,
                "step {i}: greedy token is not the argmax"
            );
            // Greedy reports raw log-probs in both modes.
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
            assert!((choice.logprobs[i] - (row[tok as usize] - lse)).abs() < 1e-5);
        }
    }
}

#[test]
fn log_probs_are_natural_logs_over_the_full_vocabulary() {
    let (_dir, loaded) = common::tiny_qwen3(13);
    let vocab = loaded.config.vocab_size;
    let prompt = common::prompts(&loaded)[0].clone();
    let engine = common::spawn_engine(loaded);
    for mode in [LogprobsMode::Processed, LogprobsMode::Raw] {
        let params = SamplingParams {
            distribution: dist(1.0, 1.0),
            max_tokens: 1,
            seed: Some(5),
            logprobs_mode: mode,
            top_logprobs: vocab,
            ..SamplingParams::default()
        };
        let out = engine
            .generate(prompt.clone(), params)
            .unwrap()
            .collect_blocking()
            .unwrap();
        let top = &out[0].top_logprobs[0];
        assert_eq!(top.len(), vocab);
        let total: f64 = top.iter().map(|(_, lp)| (*lp as f64).exp()).sum();
        assert!(
            (total - 1.0).abs() < 1e-4,
            "{mode:?}: exp(log-probs) sums to {total}"
        );
        assert!(
            top.windows(2).all(|w| w[0].1 >= w[1].1),
            "top log-probs are sorted best first"
        );
        let sampled = out[0].token_ids[0];
        let listed = top.iter().find(|(t, _)| *t == sampled).unwrap().1;
        assert_eq!(listed, out[0].logprobs[0]);
    }
}

#[test]
fn processed_log_probs_renormalize_over_the_nucleus() {
    let (_dir, loaded) = common::tiny_qwen3(14);
    let prompt = common::prompts(&loaded)[2].clone();
    let engine = common::spawn_engine(loaded);
    let params = SamplingParams {
        distribution: DistributionParams {
            temperature: 0.8,
            top_p: 0.5,
            top_k: Some(50),
            min_p: 0.0,
        },
        max_tokens: 3,
        seed: Some(3),
        top_logprobs: 1024,
        ..SamplingParams::default()
    };
    let out = engine
        .generate(prompt, params)
        .unwrap()
        .collect_blocking()
        .unwrap();
    for top in &out[0].top_logprobs {
        // Only the kept tokens are listed, and they carry all the mass.
        assert!(top.len() <= 50 && !top.is_empty());
        let total: f64 = top.iter().map(|(_, lp)| (*lp as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "nucleus mass {total}");
    }
}
