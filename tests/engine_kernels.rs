//! The CPU fast paths (our GEMM and the paged attention kernel on each
//! instruction set this CPU has) against the portable ones GPUs run, and the
//! bitwise batch invariance they give.
//! Its own test binary: it flips process-wide switches.

mod common;

use candle_core::DType;
use gym_serve::model::simd::{self, Simd};
use gym_serve::model::{paged_attention, LogitsFor, Segment};

/// Logits of a whole prompt (one prefill step) and of its last few tokens
/// decoded one step each (one row per step).
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
    // (attention kernel off, instruction-set cap)
    let variants = [
        (true, Simd::Avx512),
        (false, Simd::Avx2),
        (false, Simd::Baseline),
        (true, Simd::Baseline),
    ];
    for (no_kernel, cap) in variants {
        paged_attention::set_cpu_kernel_disabled(no_kernel);
        simd::set_cap(cap);
        let other = logits(&loaded.model, &tokens);
        paged_attention::set_cpu_kernel_disabled(false);
        simd::set_cap(Simd::Avx512);
        let worst = max_diff(&reference, &other);
        assert!(
            worst < 1e-4,
            "kernel off {no_kernel}, up to {cap:?}: max logit diff {worst}"
        );
    }
}

/// A position's logits are the same bits whether it was computed inside a
/// whole-prompt prefill, a prefill chunk, or a one-token decode step: every
/// CPU kernel reduces each row in an order fixed by the row alone.
#[test]
fn a_positions_logits_do_not_depend_on_how_the_step_was_cut() {
    let _switches = switches();
    let (_dir, loaded) = common::tiny_qwen3(107);
    let tokens = common::prompts(&loaded).concat();
    let vocab = loaded.model.config().vocab_size;
    for cap in [Simd::Avx512, Simd::Avx2, Simd::Baseline] {
        simd::set_cap(cap);
        for kv_dtype in [DType::F32, DType::BF16] {
            let out = logits_with_cache(&loaded.model, &tokens, kv_dtype);
            let (prefill, decoded) = out.split_at(tokens.len() * vocab);
            let last_four = &prefill[(tokens.len() - 4) * vocab..];
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(last_four),
                bits(decoded),
                "{cap:?}, {kv_dtype:?} cache"
            );
            // Scored in chunks of 5 positions (each chunk a prefill step
            // after the cached ones) against the one-pass scores.
            let mut chunked = Vec::new();
            loaded
                .model
                .logits_in_chunks(&tokens, 0, tokens.len(), kv_dtype, 5, None, |_, t| {
                    chunked.extend(t.flatten_all()?.to_vec1::<f32>()?);
                    Ok(())
                })
                .unwrap();
            assert_eq!(
                bits(&chunked),
                bits(prefill),
                "{cap:?}, {kv_dtype:?} chunks"
            );
        }
    }
    simd::set_cap(Simd::Avx512);
}

/// Scoring the end of a prompt longer than one scoring pass prefills (2,048
/// tokens): the prefix goes in bounded passes, and the scores are the bits
/// a single pass over the whole prompt gives.
#[test]
fn scoring_after_a_long_prefix_equals_one_pass() {
    let _switches = switches();
    let (_dir, loaded) = common::tiny_qwen3(108);
    let base = common::prompts(&loaded).concat();
    let tokens: Vec<u32> = base.iter().copied().cycle().take(2_600).collect();
    let model = &loaded.model;
    let vocab = model.config().vocab_size;
    let (from, to) = (2_500, tokens.len() - 1);
    let one_pass = model
        .logits_range(&tokens, from, to, DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut chunked = Vec::new();
    let mut firsts = Vec::new();
    model
        .logits_in_chunks(&tokens, from, to, DType::F32, 37, None, |first, t| {
            firsts.push(first);
            chunked.extend(t.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        })
        .unwrap();
    assert_eq!(chunked.len(), (to - from) * vocab);
    assert_eq!(firsts, [2_500, 2_537, 2_574]);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&chunked), bits(&one_pass));
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

/// A bf16 checkpoint served with its bf16 weight matrices gives the same
/// bits as the same checkpoint with every matrix widened to f32.
#[test]
fn bf16_weights_give_the_bits_of_the_same_values_as_f32() {
    let _switches = switches();
    let mut opts = common::tiny_options(gym_serve::config::Architecture::Qwen3, 108);
    opts.dtype = DType::BF16;
    let dir = common::write_model(&opts);
    let cpu = candle_core::Device::Cpu;
    let narrow =
        gym_serve::loader::LoadedModel::load_holding(dir.path(), &cpu, DType::F32, None).unwrap();
    let wide = gym_serve::loader::LoadedModel::load_holding(
        dir.path(),
        &cpu,
        DType::F32,
        Some(DType::F32),
    )
    .unwrap();
    assert_eq!(narrow.store.matrix_dtype(), DType::BF16);
    assert_eq!(wide.store.matrix_dtype(), DType::F32);
    assert!(narrow.store.size_in_bytes() * 10 < wide.store.size_in_bytes() * 6);
    let tokens = common::prompts(&narrow).concat();
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    for cap in [Simd::Avx512, Simd::Avx2, Simd::Baseline] {
        simd::set_cap(cap);
        let a = bits(logits(&narrow.model, &tokens));
        let b = bits(logits(&wide.model, &tokens));
        simd::set_cap(Simd::Avx512);
        assert_eq!(a, b, "{cap:?}");
    }
}
