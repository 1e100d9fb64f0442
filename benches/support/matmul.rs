//! The GEMM table of the engine benchmark: GFLOP/s of one decoder layer's
//! projections (the preset's real shapes) at several row counts, with the
//! weights streamed from memory as in a real step, for f32 and bf16 weights
//! and, when `GYM_SERVE_BENCH_BLAS=1` finds a system OpenBLAS, its sgemm on
//! the same f32 weights; where the CPU has AVX512-BF16, also the bf16
//! products of `--compute-dtype bf16` on the bf16 weights. Kernels alternate within each row count, best of
//! three passes each, so drift hits all of them alike.

use super::blas::blas;
use candle_core::{DType, Device, Tensor};
use gym_serve::config::ModelConfig;
use gym_serve::model::gemm::bf16_products;
use gym_serve::model::linear::{set_bf16_products, Linear};
use std::time::Instant;

/// `[out, in]` of every projection in one decoder layer.
fn layer_shapes(cfg: &ModelConfig) -> Vec<(usize, usize)> {
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    vec![(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
}

struct Weights {
    f32: Vec<(Vec<f32>, usize, usize)>,
    ours_f32: Vec<Linear>,
    ours_bf16: Vec<Linear>,
}

fn weights(cfg: &ModelConfig, layers: usize) -> Weights {
    let mut w = Weights {
        f32: Vec::new(),
        ours_f32: Vec::new(),
        ours_bf16: Vec::new(),
    };
    for _ in 0..layers {
        for (n, k) in layer_shapes(cfg) {
            let t = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
            w.ours_bf16
                .push(Linear::new(t.to_dtype(DType::BF16).unwrap(), None));
            w.f32
                .push((t.flatten_all().unwrap().to_vec1().unwrap(), n, k));
            w.ours_f32.push(Linear::new(t, None));
        }
    }
    w
}

/// Best seconds of three passes of `f` (after one warm-up pass).
fn best_of_three(mut f: impl FnMut()) -> f64 {
    f();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

pub fn table(cfg: &ModelConfig, rows: &[usize]) {
    // Enough layers that the f32 weights (~250 MB) come from memory.
    let layers = 4;
    let w = weights(cfg, layers);
    let flops_per_row: f64 = w.f32.iter().map(|(_, n, k)| 2.0 * (n * k) as f64).sum();
    let blas = std::env::var("GYM_SERVE_BENCH_BLAS")
        .is_ok_and(|v| v == "1")
        .then(blas)
        .flatten();
    let products = bf16_products::supported();
    println!(
        "\n| rows @ {layers} layers' projections (weights from memory) | gym-serve GEMM f32 | gym-serve GEMM bf16 weights | bf16 products (--compute-dtype bf16) | {} | ours f32 / BLAS |",
        blas.map_or("OpenBLAS (GYM_SERVE_BENCH_BLAS=1)".to_string(), |b| b.name.clone())
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for &m in rows {
        let x = Tensor::randn(0f32, 1.0, (m, cfg.hidden_size), &Device::Cpu).unwrap();
        let xi = Tensor::randn(0f32, 1.0, (m, cfg.intermediate_size), &Device::Cpu).unwrap();
        let xq = Tensor::randn(
            0f32,
            1.0,
            (m, cfg.num_attention_heads * cfg.head_dim),
            &Device::Cpu,
        )
        .unwrap();
        let input = |k: usize| {
            if k == cfg.hidden_size {
                &x
            } else if k == cfg.intermediate_size {
                &xi
            } else {
                &xq
            }
        };
        let ours = |ws: &[Linear]| {
            best_of_three(|| {
                for (l, (_, _, k)) in ws.iter().zip(&w.f32) {
                    std::hint::black_box(l.forward(input(*k)).unwrap());
                }
            })
        };
        let f32_s = ours(&w.ours_f32);
        let bf16_s = ours(&w.ours_bf16);
        let products_s = products.then(|| {
            set_bf16_products(true);
            let s = ours(&w.ours_bf16);
            set_bf16_products(false);
            s
        });
        let blas_s = blas.map(|b| {
            let xs: Vec<Vec<f32>> = [&x, &xi, &xq]
                .iter()
                .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
                .collect();
            let mut out = vec![0f32; m * cfg.intermediate_size.max(cfg.hidden_size * 4)];
            best_of_three(|| {
                for (wv, n, k) in &w.f32 {
                    let xv = if *k == cfg.hidden_size {
                        &xs[0]
                    } else if *k == cfg.intermediate_size {
                        &xs[1]
                    } else {
                        &xs[2]
                    };
                    b.matmul_t(xv, m, *k, wv, *n, &mut out);
                }
            })
        });
        let g = |s: f64| flops_per_row * m as f64 / s / 1e9;
        let (blas_col, ratio) = match blas_s {
            Some(s) => (format!("{:.1}", g(s)), format!("{:.2}x", s / f32_s)),
            None => ("-".to_string(), "-".to_string()),
        };
        let products_col = products_s.map_or("- (no AVX512-BF16)".to_string(), |s| {
            format!("{:.1} GFLOP/s", g(s))
        });
        println!(
            "| {m} | {:.1} GFLOP/s | {:.1} GFLOP/s | {products_col} | {blas_col} | {ratio} |",
            g(f32_s),
            g(bf16_s)
        );
    }
}
