//! The CPU fast paths (BLAS and skinny matmuls, the paged attention kernel,
//! each instruction set this CPU has) against the portable ones GPUs run.
//! Its own test binary: it flips process-wide switches.

mod common;

use gym_serve::model::simd::{self, Simd};
use gym_serve::model::{blas, paged_attention, skinny, LogitsFor, Segment};

/// Logits of a whole prompt (one prefill step) and of its last few tokens
/// decoded one step each (a handful of rows: the skinny matmul's case).
fn logits(model: &gym_serve::model::Model, tokens: &[u32]) -> Vec<f32> {
    let mut out: Vec<f32> = model
        .full_logits(tokens)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let pool = model.new_pool(tokens.len().div_ceil(16), 16).unwrap();
    let table: Vec<u32> = (0..tokens.len().div_ceil(16) as u32).collect();
    let split = tokens.len() - 4;
    model
        .forward(
            &[Segment {
                tokens: &tokens[..split],
                offset: 0,
                block_table: &table,
                logits: LogitsFor::Nothing,
            }],
            &pool,
        )
        .unwrap();
    for p in split..tokens.len() {
        let row = model
            .forward(
                &[Segment {
                    tokens: &tokens[p..p + 1],
                    offset: p,
                    block_table: &table,
                    logits: LogitsFor::Last,
                }],
                &pool,
            )
            .unwrap();
        out.extend(row.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

#[test]
fn every_cpu_matmul_and_attention_path_agrees() {
    let (_dir, loaded) = common::tiny_qwen3(105);
    let tokens = common::prompts(&loaded).concat();
    let reference = logits(&loaded.model, &tokens);
    // (BLAS off, skinny off, attention kernel off, instruction-set cap)
    let variants = [
        (true, false, false, Simd::Avx512),
        (false, true, false, Simd::Avx512),
        (false, false, true, Simd::Avx512),
        (true, true, true, Simd::Avx512),
        (false, false, false, Simd::Avx2),
        (false, false, false, Simd::Baseline),
    ];
    for (no_blas, no_skinny, no_kernel, cap) in variants {
        blas::set_disabled(no_blas);
        skinny::set_disabled(no_skinny);
        paged_attention::set_cpu_kernel_disabled(no_kernel);
        simd::set_cap(cap);
        let other = logits(&loaded.model, &tokens);
        blas::set_disabled(false);
        skinny::set_disabled(false);
        paged_attention::set_cpu_kernel_disabled(false);
        simd::set_cap(Simd::Avx512);
        let worst = reference
            .iter()
            .zip(&other)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "blas off {no_blas}, skinny off {no_skinny}, kernel off {no_kernel}, \
             up to {cap:?}: max logit diff {worst}"
        );
    }
}
