//! The CPU fast paths (BLAS matmuls, the paged attention kernel) against the
//! portable ones GPUs run. Its own test binary: it flips process-wide switches.

mod common;

use gym_serve::model::{blas, paged_attention};

#[test]
fn blas_and_candle_matmuls_and_both_attention_paths_agree() {
    let (_dir, loaded) = common::tiny_qwen3(105);
    let tokens = common::prompts(&loaded).concat();
    let reference = loaded
        .model
        .full_logits(&tokens)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (no_blas, no_kernel) in [(true, false), (false, true), (true, true)] {
        blas::set_disabled(no_blas);
        paged_attention::set_cpu_kernel_disabled(no_kernel);
        let other = loaded
            .model
            .full_logits(&tokens)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        blas::set_disabled(false);
        paged_attention::set_cpu_kernel_disabled(false);
        let worst = reference
            .iter()
            .flatten()
            .zip(other.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "blas off {no_blas}, kernel off {no_kernel}: max logit diff {worst}"
        );
    }
}
