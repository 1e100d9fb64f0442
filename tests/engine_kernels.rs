//! The CPU fast paths (BLAS and skinny matmuls, the paged attention kernel,
//! each instruction set this CPU has) against the portable ones GPUs run.
//! Its own test binary: it flips process-wide switches.

mod common;

use candle_core::DType;
use gym_serve::model::simd::{self, Simd};
use gym_serve::model::{blas, paged_attention, skinny, LogitsFor, Segment};

/// Logits of a whole prompt (one prefill step) and of its last few tokens
/// decoded one step each (a handful of rows: the skinny matmul's case).
fn logits(model: &gym_serve::model::Model, tokens: &[u32]) -> Vec<f32> {
    logits_with_cache(model, tokens, model.dtype())
}

/// [`logits`] with keys and values cached as `kv_dtype`.
fn logits_with_cache(model: &gym_serve::model::Model, tokens: &[u32], kv_dtype: DType) -> Vec<f32> {
    let mut out: Vec<f32> = model
        .logits_range(tokens, 0, tokens.len(), kv_dtype)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let pool = model
        .new_pool(tokens.len().div_ceil(16), 16, kv_dtype)
        .unwrap();
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

/// The switches are process-wide and the test harness runs tests on parallel
/// threads: without this lock one test could flip a path under the other, or
/// compare a path with itself.
static SWITCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn switches() -> std::sync::MutexGuard<'static, ()> {
    SWITCHES.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn every_cpu_matmul_and_attention_path_agrees() {
    let _switches = switches();
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

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn bf16_cache_kernel_agrees_with_the_gather_path() {
    let _switches = switches();
    let (_dir, loaded) = common::tiny_qwen3(106);
    let tokens = common::prompts(&loaded).concat();
    let model = &loaded.model;
    let reference = logits_with_cache(model, &tokens, DType::BF16);
    // The gather path widens the same bf16 values; only summation order differs.
    for (no_kernel, cap) in [
        (true, Simd::Avx512),
        (false, Simd::Avx2),
        (false, Simd::Baseline),
    ] {
        paged_attention::set_cpu_kernel_disabled(no_kernel);
        simd::set_cap(cap);
        let other = logits_with_cache(model, &tokens, DType::BF16);
        paged_attention::set_cpu_kernel_disabled(false);
        simd::set_cap(Simd::Avx512);
        let worst = max_diff(&reference, &other);
        assert!(
            worst < 1e-4,
            "bf16 cache, kernel off {no_kernel}, up to {cap:?}: max logit diff {worst}"
        );
    }
    // Against the f32 cache: bf16 rounding of keys and values (8 significant
    // bits) moves logits a little, never by much.
    let full = logits(model, &tokens);
    let worst = max_diff(&reference, &full);
    let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        worst > 0.0 && worst < 0.02 * scale,
        "bf16 vs f32 cache: max logit diff {worst} (largest logit {scale})"
    );
}
