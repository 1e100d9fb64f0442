//! Engine throughput on the `qwen3-0.6b-shape` preset (CPU, f32 arithmetic):
//! the machine's f32 matmul peak (the engine's GEMM), decode tokens/s at 1,
//! 8, 32 and 64 concurrent sequences (256-token prompts, 128 generated) with
//! the weight matrices held as f32 and as bf16, a 4,000-token prompt,
//! prefill tokens/s, a GRPO group (one 512-token prompt, n = 16) and peak RSS;
//! and the memory side: read bandwidth, the decode attention kernel's share
//! of it, and each decode figure against the step's memory roofline.
//!
//! `cargo bench --bench engine` (set GYM_SERVE_BENCH_QUICK=1 for a short run,
//! GYM_SERVE_BENCH_SEQS=8,32 for other concurrency levels,
//! GYM_SERVE_BENCH_WEIGHTS=bf16 for one weight dtype (`bf16-products`:
//! bf16 weights with `--compute-dtype bf16`, where the CPU has it), GYM_SERVE_BENCH_LONG=N
//! for the long prompt's length, 0 for none (the quick run's default),
//! GYM_SERVE_BENCH_MEMORY_ONLY=1 to stop after the memory figures,
//! GYM_SERVE_BENCH_MATMUL_ONLY=1 to stop after the matmul tables,
//! GYM_SERVE_BENCH_SIMD=avx2 to run the AVX2 kernels on an AVX-512 machine,
//! GYM_SERVE_BENCH_FAST=1 for `--fast-nondeterministic`,
//! GYM_SERVE_BENCH_PRESET=tiny to try it on the tiny model,
//! GYM_SERVE_BENCH_LORA=1 to add decode at 32 sequences with rank-16 LoRA
//! adapters on all projections (base only, one adapter, four mixed, as a
//! ratio to base; GYM_SERVE_BENCH_LORA=only for those rows alone,
//! GYM_SERVE_BENCH_LORA_ROUNDS=N alternating rounds, 3, or 2 when quick,
//! GYM_SERVE_BENCH_LORA_PROMPT=N for prompts other than 256 tokens)).

use candle_core::{DType, Device, Tensor};
use gym_serve::config::{Architecture, ModelConfig};
use gym_serve::engine::core::{EngineCore, GenerationJob, SchedulerConfig};
use gym_serve::engine::{DistributionParams, EngineEvent, SamplingParams};
use gym_serve::lora::LoraAdapter;
use gym_serve::make_model::{config_json, random_weights, Preset};
use gym_serve::model::gemm::bf16_products;
use gym_serve::model::linear::set_bf16_products;
use gym_serve::model::Model;
use gym_serve::weights::ParamStore;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

#[path = "support/blas.rs"]
mod blas;
#[path = "support/lora.rs"]
mod lora;
#[path = "support/matmul.rs"]
mod matmul;

fn gflops(flops: f64, seconds: f64) -> f64 {
    flops / seconds / 1e9
}

/// GFLOP/s of `a [m,k] @ b[n,k]^T` through the engine's linear path, best of `reps`.
fn matmul_gflops(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let linear = gym_serve::model::linear::Linear::new(w, None);
    let _ = linear.forward(&a).unwrap(); // warm up (threads, caches)
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        let y = linear.forward(&a).unwrap();
        std::hint::black_box(&y);
        best = best.min(t.elapsed().as_secs_f64());
    }
    gflops(2.0 * (m * k * n) as f64, best)
}

/// GB/s of reading 1 GiB with every core: the bound on a decode step, which
/// must read all weights and every sequence's cached keys and values.
fn read_bandwidth_gbs() -> f64 {
    use rayon::prelude::*;
    let data = vec![1f32; 1 << 28];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        let total: f32 = data
            .par_chunks(1 << 16)
            .map(|chunk| {
                // 16 accumulators: one vector register, so the sum vectorizes.
                let mut acc = [0f32; 16];
                for c in chunk.chunks_exact(16) {
                    for l in 0..16 {
                        acc[l] += c[l];
                    }
                }
                acc.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (data.len() * 4) as f64 / best / 1e9
}

/// GB/s of cached keys and values read by the decode attention kernel: one
/// query token per sequence against `context` cached positions, layer after
/// layer of a `layers`-deep pool (far more than any cache), blocks scattered.
fn decode_attention_gbs(
    cfg: &ModelConfig,
    seqs: usize,
    context: usize,
    layers: usize,
    kv_dtype: DType,
) -> f64 {
    use gym_serve::model::paged_attention::{attend, PagedAttention, SeqSpan};
    let (heads, kv_heads, hd, bs) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        16,
    );
    let blocks_per_seq = context.div_ceil(bs);
    let num_blocks = seqs * blocks_per_seq;
    // Sequence s owns blocks s, s + seqs, s + 2 seqs, ...: never adjacent.
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| (0..blocks_per_seq).map(|b| (b * seqs + s) as u32).collect())
        .collect();
    let spans: Vec<SeqSpan<'_>> = tables
        .iter()
        .enumerate()
        .map(|(s, table)| SeqSpan {
            start: s,
            len: 1,
            offset: context - 1,
            block_table: table,
        })
        .collect();
    let op = PagedAttention {
        spans: &spans,
        block_size: bs,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
    };
    let pool = |_| {
        Tensor::randn(0f32, 1.0, (kv_heads, num_blocks * bs, hd), &Device::Cpu)
            .and_then(|t| t.to_dtype(kv_dtype))
            .unwrap()
    };
    let keys: Vec<Tensor> = (0..layers).map(pool).collect();
    let values: Vec<Tensor> = (0..layers).map(pool).collect();
    let q = Tensor::randn(0f32, 1.0, (seqs, heads, hd), &Device::Cpu).unwrap();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for (k, v) in keys.iter().zip(&values) {
            std::hint::black_box(attend(&q, k, v, &op).unwrap());
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    (2 * layers * seqs * context * kv_heads * hd * kv_dtype.size_in_bytes()) as f64 / best / 1e9
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

struct Scenario {
    core: EngineCore,
    receivers: Vec<mpsc::UnboundedReceiver<EngineEvent>>,
}

impl Scenario {
    fn add(&mut self, prompt: Vec<u32>, n: usize, max_tokens: usize, seed: u64) {
        self.add_with(prompt, n, max_tokens, seed, None);
    }

    /// [`Scenario::add`] under `adapter` (`None`: the base model).
    fn add_with(
        &mut self,
        prompt: Vec<u32>,
        n: usize,
        max_tokens: usize,
        seed: u64,
        adapter: Option<Arc<LoraAdapter>>,
    ) {
        let (events, rx) = mpsc::unbounded_channel();
        let params = SamplingParams {
            distribution: DistributionParams {
                temperature: 1.0,
                ..DistributionParams::default()
            },
            max_tokens,
            n,
            seed: Some(seed),
            ignore_eos: true,
            ..SamplingParams::default()
        };
        self.receivers.push(rx);
        self.core.add(GenerationJob {
            request_id: self.receivers.len() as u64,
            prompt,
            params: Arc::new(params),
            seed,
            budget: max_tokens,
            events,
            adapter,
        });
    }

    fn generated(&mut self) -> usize {
        let mut n = 0;
        for rx in &mut self.receivers {
            while let Ok(EngineEvent::Token(_)) = rx.try_recv() {
                n += 1;
            }
        }
        n
    }
}

fn prompt(len: usize, vocab: usize, seed: usize) -> Vec<u32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729 + 13) % (vocab - 1)) as u32 + 1)
        .collect()
}

/// The throughput rows' fixed inputs for one model.
struct Throughput<'a> {
    cfg: &'a ModelConfig,
    model: &'a Model,
    weights_bytes: usize,
    weights: DType,
    /// The weights column: the dtype, or `bf16-products`.
    label: &'static str,
    flops_per_token: f64,
    /// The 2048^3 GEMM figure, GFLOP/s.
    peak: f64,
    /// Memory read bandwidth, GB/s.
    bandwidth: f64,
}

/// One throughput row's measurements.
struct Measured {
    seqs: usize,
    prompt_len: usize,
    gen_len: usize,
    kv_dtype: DType,
    decode: f64,
    prefill: f64,
    rss_mb: f64,
    pool_mb: f64,
}

impl Throughput<'_> {
    /// `seqs` sequences of `prompt_len`-token prompts, `gen_len` generated.
    fn run(&self, seqs: usize, prompt_len: usize, gen_len: usize, kv_dtype: DType) -> Measured {
        let m = self.run_with(seqs, prompt_len, gen_len, kv_dtype, &[]);
        eprintln!(
            "{} weights, {} sequences x {prompt_len}: decode {:.1} tok/s, prefill {:.0} tok/s",
            self.label, seqs, m.decode, m.prefill
        );
        m
    }

    /// [`Throughput::run`] with sequence `i` under `adapters[i % len]`
    /// (none at all when `adapters` is empty).
    fn run_with(
        &self,
        seqs: usize,
        prompt_len: usize,
        gen_len: usize,
        kv_dtype: DType,
        adapters: &[Option<Arc<LoraAdapter>>],
    ) -> Measured {
        let kv_tokens = seqs * (prompt_len + gen_len) + 16 * seqs;
        let config = SchedulerConfig {
            block_size: 16,
            num_blocks: kv_tokens.div_ceil(16),
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
            kv_dtype: Some(kv_dtype),
        };
        reset_peak_rss();
        let mut s = Scenario {
            core: EngineCore::new(self.model.clone(), vec![], "0", config).unwrap(),
            receivers: Vec::new(),
        };
        let kv_bytes_per_token = self.model.kv_bytes_per_token(kv_dtype);
        for i in 0..seqs {
            let adapter = if adapters.is_empty() {
                None
            } else {
                adapters[i % adapters.len()].clone()
            };
            s.add_with(
                prompt(prompt_len, self.cfg.vocab_size, i),
                1,
                gen_len,
                i as u64,
                adapter,
            );
        }
        // Prefill: every prompt computed (each sequence then has its first token).
        let t = Instant::now();
        while s.core.stats().forward_tokens() < (seqs * prompt_len) as u64 {
            s.core.step();
        }
        let prefill_s = t.elapsed().as_secs_f64();
        let first = s.generated();
        let t = Instant::now();
        while s.core.has_work() {
            s.core.step();
        }
        let decode_s = t.elapsed().as_secs_f64();
        let decoded = s.generated();
        assert_eq!(first + decoded, seqs * gen_len);
        Measured {
            seqs,
            prompt_len,
            gen_len,
            kv_dtype,
            decode: decoded as f64 / decode_s,
            prefill: (seqs * prompt_len) as f64 / prefill_s,
            rss_mb: peak_rss_mb(),
            pool_mb: (config.num_blocks * 16 * kv_bytes_per_token) as f64 / (1 << 20) as f64,
        }
    }
}

impl Measured {
    fn row(&self, t: &Throughput<'_>, single: f64) -> String {
        let frac = gflops(self.decode * t.flops_per_token, 1.0) / t.peak;
        let prefill_frac = gflops(self.prefill * t.flops_per_token, 1.0) / t.peak;
        // A decode step reads every weight and, on average, half the
        // generation's worth of cache beyond the prompt for each sequence.
        let kv_bytes_per_token = t.model.kv_bytes_per_token(self.kv_dtype);
        let step_bytes = t.weights_bytes as f64
            + (self.seqs * (self.prompt_len + self.gen_len / 2) * kv_bytes_per_token) as f64;
        let roofline = self.seqs as f64 * t.bandwidth * 1e9 / step_bytes;
        let mut label = self.seqs.to_string();
        if self.kv_dtype != DType::F32 {
            label += &format!(", {:?} KV cache", self.kv_dtype);
        }
        if self.prompt_len != 256 {
            label += &format!(", {}-token prompt", self.prompt_len);
        }
        let vs_single = if single > 0.0 && self.prompt_len == 256 {
            format!("{:.1}x", self.decode / single)
        } else {
            "n/a".to_string()
        };
        let weights_mb = t.weights_bytes as f64 / (1 << 20) as f64;
        format!(
            "| {} | {label} | {:.1} | {vs_single} | {:.0}% | {roofline:.0} ({:.0}%) | {:.0} | {:.0}% | {:.0} MiB / {:.0} MiB |",
            t.label,
            self.decode,
            frac * 100.0,
            self.decode / roofline * 100.0,
            self.prefill,
            prefill_frac * 100.0,
            self.rss_mb,
            weights_mb + self.pool_mb
        )
    }
}

/// Middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Rank of the benchmark's adapters (issue #18's figure).
const LORA_RANK: usize = 16;

/// Decode tokens/s of `seqs` sequences (256-token prompts, or
/// GYM_SERVE_BENCH_LORA_PROMPT) with rank-16
/// adapters on all seven projections of every layer: base model only, every
/// sequence on one adapter, round-robin over four. The configurations
/// alternate over `rounds` rounds, each round starting one configuration
/// later, so drift (other load on the machine) hits all of them alike.
fn lora_rows(bench: &Throughput<'_>, seqs: usize, gen_len: usize, rounds: usize) -> Vec<String> {
    // GYM_SERVE_BENCH_LORA_PROMPT=N: shorter prompts where prefill is slow.
    let prompt_len: usize = std::env::var("GYM_SERVE_BENCH_LORA_PROMPT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let t = Instant::now();
    let adapters: Vec<Arc<LoraAdapter>> = (0..4)
        .map(|i| Arc::new(lora::adapter(bench.cfg, &format!("a{i}"), LORA_RANK, i + 1)))
        .collect();
    println!(
        "
LoRA: 4 random rank-{LORA_RANK} adapters on all {} projections ({:.1} MiB of f32 factors each), built in {:.1}s",
        adapters[0].num_adapted(),
        adapters[0].bytes() as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    let configs: Vec<(&str, Vec<Option<Arc<LoraAdapter>>>)> = vec![
        ("base model only", vec![]),
        (
            "1 adapter (every sequence)",
            vec![Some(adapters[0].clone())],
        ),
        (
            "4 adapters mixed (round-robin)",
            adapters.iter().cloned().map(Some).collect(),
        ),
    ];
    let mut decode = vec![Vec::new(); configs.len()];
    let mut prefill = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for j in 0..configs.len() {
            let c = (round + j) % configs.len();
            let m = bench.run_with(seqs, prompt_len, gen_len, DType::F32, &configs[c].1);
            eprintln!(
                "LoRA round {}: {}: decode {:.1} tok/s, prefill {:.0} tok/s",
                round + 1,
                configs[c].0,
                m.decode,
                m.prefill
            );
            decode[c].push(m.decode);
            prefill[c].push(m.prefill);
        }
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (base_best, base_median) = (best(&decode[0]), median(&decode[0]));
    let mut rows = vec![
        format!("
LoRA decode, {:?} weights, {seqs} sequences x {prompt_len}-token prompts, {gen_len} generated, rank {LORA_RANK} on q,k,v,o,gate,up,down; {rounds} alternating rounds", bench.weights),
        "| configuration | decode tok/s per round | best | vs base (best) | median | vs base (median) | prefill tok/s (best) |".to_string(),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |".to_string(),
    ];
    for (c, (label, _)) in configs.iter().enumerate() {
        let per_round: Vec<String> = decode[c].iter().map(|d| format!("{d:.1}")).collect();
        rows.push(format!(
            "| {label} | {} | {:.1} | {:.2} | {:.1} | {:.2} | {:.0} |",
            per_round.join(", "),
            best(&decode[c]),
            best(&decode[c]) / base_best,
            median(&decode[c]),
            median(&decode[c]) / base_median,
            best(&prefill[c])
        ));
    }
    rows
}

/// Rounds of the LoRA rows (GYM_SERVE_BENCH_LORA_ROUNDS).
fn lora_rounds(quick: bool) -> usize {
    std::env::var("GYM_SERVE_BENCH_LORA_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 2 } else { 3 })
}

/// GYM_SERVE_BENCH_LORA=only: the LoRA rows alone, on f32 weights (or the
/// first of GYM_SERVE_BENCH_WEIGHTS).
fn lora_only_main(cfg: &ModelConfig, gen_len: usize, quick: bool) {
    let weights = match std::env::var("GYM_SERVE_BENCH_WEIGHTS").as_deref() {
        Ok(w) if w.trim_start().starts_with("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let tensors = random_weights(cfg, 0).unwrap().into_iter().collect();
    let store =
        ParamStore::from_tensors_holding(cfg, tensors, DType::F32, weights, &Device::Cpu).unwrap();
    let model = Model::new(cfg, &store, &Device::Cpu).unwrap();
    let bench = Throughput {
        cfg,
        model: &model,
        weights_bytes: store.size_in_bytes(),
        weights,
        label: if weights == DType::BF16 {
            "BF16"
        } else {
            "F32"
        },
        // Only the decode and prefill rates of the LoRA rows are printed.
        flops_per_token: f64::NAN,
        peak: f64::NAN,
        bandwidth: f64::NAN,
    };
    for r in lora_rows(&bench, 32, gen_len, lora_rounds(quick)) {
        println!("{r}");
    }
}

#[global_allocator]
static ALLOC: gym_serve::huge_pages::HugePageAlloc = gym_serve::huge_pages::HugePageAlloc;

fn main() {
    gym_serve::model::cpu_threads::configure();
    let quick = std::env::var("GYM_SERVE_BENCH_QUICK").is_ok();
    let preset = match std::env::var("GYM_SERVE_BENCH_PRESET").as_deref() {
        Ok("tiny") => Preset::Tiny,
        _ => Preset::Qwen3_0_6bShape,
    };
    let gen_len = if quick { 32 } else { 128 };
    if std::env::var("GYM_SERVE_BENCH_FAST").is_ok() {
        // `--fast-nondeterministic`: prefill steps on candle's matmul.
        gym_serve::model::linear::set_fast_nondeterministic(true);
        println!("--fast-nondeterministic (GYM_SERVE_BENCH_FAST)");
    }
    if std::env::var("GYM_SERVE_BENCH_SIMD").as_deref() == Ok("avx2") {
        gym_serve::model::simd::set_cap(gym_serve::model::simd::Simd::Avx2);
    }
    let shape = preset.shape(Architecture::Qwen3);
    let cfg = ModelConfig::from_json(&config_json(&shape, 0, 1).to_string()).unwrap();
    println!(
        "gym-serve engine benchmark: {preset:?} (f32, CPU, {} threads, kernels: {:?})",
        rayon::current_num_threads(),
        gym_serve::model::simd::simd()
    );

    // GYM_SERVE_BENCH_LORA=1 adds the LoRA rows; `only` runs nothing else.
    let lora_mode = std::env::var("GYM_SERVE_BENCH_LORA")
        .ok()
        .filter(|v| !v.is_empty() && v != "0");
    let lora_only = lora_mode.as_deref() == Some("only");
    if lora_only {
        return lora_only_main(&cfg, gen_len, quick);
    }

    // Memory limits: a decode step streams every weight and the whole cache.
    let bandwidth = read_bandwidth_gbs();
    let attention_context = 256 + gen_len / 2;
    println!("\nmemory read bandwidth (1 GiB sum, all cores): {bandwidth:.1} GB/s");
    for kv_dtype in [DType::F32, DType::BF16] {
        let attention = decode_attention_gbs(&cfg, 32, attention_context, 8, kv_dtype);
        println!(
            "decode attention, 32 sequences x {attention_context} cached positions, {kv_dtype:?} cache: {attention:.1} GB/s of KV ({:.0}% of bandwidth)",
            attention / bandwidth * 100.0
        );
    }
    if std::env::var("GYM_SERVE_BENCH_MEMORY_ONLY").is_ok() {
        return;
    }

    // Matmul limits, measured now on this machine (the engine's GEMM).
    let peak_blas = matmul_gflops(2048, 2048, 2048, 3);
    println!("\n2048^3 f32 matmul (the engine's GEMM, warm): {peak_blas:.1} GFLOP/s");
    let matmul_rows: Vec<usize> = std::env::var("GYM_SERVE_BENCH_MATMUL_ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32, 64, 256, 1024]);
    matmul::table(&cfg, &matmul_rows);
    if std::env::var("GYM_SERVE_BENCH_MATMUL_ONLY").is_ok() {
        return;
    }

    let prompt_len = 256;
    let counts: Vec<usize> = std::env::var("GYM_SERVE_BENCH_SEQS")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32, 64]);
    // Weight matrices held as f32, then as bf16 (a bf16 checkpoint's own
    // values, widened in the kernels: the same arithmetic, half the bytes).
    // And bf16 weights multiplied in bf16 (`--compute-dtype bf16`), asked
    // for as `bf16-products`, where the CPU has the instructions.
    let weight_dtypes: Vec<(DType, &'static str)> = std::env::var("GYM_SERVE_BENCH_WEIGHTS")
        .unwrap_or_else(|_| "f32,bf16".into())
        .split(',')
        .filter_map(|w| match w.trim() {
            "f32" => Some((DType::F32, "F32")),
            "bf16" => Some((DType::BF16, "BF16")),
            "bf16-products" if bf16_products::supported() => Some((DType::BF16, "bf16-products")),
            "bf16-products" => {
                println!("bf16-products skipped: this CPU has no AVX512-BF16 or AMX-BF16");
                None
            }
            _ => None,
        })
        .collect();
    // One sequence with a long prompt (multi-turn agents' contexts), then 64
    // generated: prefill attention over thousands of positions.
    let long_prompt: usize = std::env::var("GYM_SERVE_BENCH_LONG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 0 } else { 4000 });
    let mut rows = Vec::new();
    let mut lora_tables = Vec::new();
    let mut model = None;
    for &(weights, label) in &weight_dtypes {
        // The previous dtype's model goes first, so each row's peak RSS is
        // its own weights'.
        drop(model.take());
        set_bf16_products(label == "bf16-products");
        let t = Instant::now();
        let tensors = random_weights(&cfg, 0).unwrap().into_iter().collect();
        let store =
            ParamStore::from_tensors_holding(&cfg, tensors, DType::F32, weights, &Device::Cpu)
                .unwrap();
        let built = Model::new(&cfg, &store, &Device::Cpu).unwrap();
        let embed = cfg.vocab_size * cfg.hidden_size;
        let params = store.elem_count();
        let non_embedding = params - embed * if cfg.tie_word_embeddings { 1 } else { 2 };
        let bench = Throughput {
            cfg: &cfg,
            model: &built,
            weights_bytes: store.size_in_bytes(),
            weights,
            label,
            flops_per_token: 2.0 * non_embedding as f64 + 2.0 * embed as f64,
            peak: peak_blas,
            bandwidth,
        };
        println!(
            "\nmodel: {:.0}M parameters ({:.0}M non-embedding), {:.1} GFLOP per token, weights {label} ({:.0} MiB); built in {:.1}s",
            params as f64 / 1e6,
            non_embedding as f64 / 1e6,
            bench.flops_per_token / 1e9,
            store.size_in_bytes() as f64 / (1 << 20) as f64,
            t.elapsed().as_secs_f64()
        );
        // Every count with the f32 cache, then 32 sequences with a bf16 cache
        // (`--kv-cache-dtype bf16`), which halves what attention reads.
        let mut runs: Vec<(usize, usize, DType)> = counts
            .iter()
            .map(|&n| (n, prompt_len, DType::F32))
            .collect();
        if counts.contains(&32) {
            runs.push((32, prompt_len, DType::BF16));
        }
        if long_prompt > 0 {
            runs.push((1, long_prompt, DType::F32));
        }
        let mut single = 0.0;
        if lora_mode.is_some() && weights == weight_dtypes[0].0 {
            lora_tables.extend(lora_rows(&bench, 32, gen_len, lora_rounds(quick)));
        }
        for (seqs, prompt_len, kv_dtype) in runs {
            let gen = if prompt_len > 256 { 64 } else { gen_len };
            let r = bench.run(seqs, prompt_len, gen, kv_dtype);
            if seqs == 1 && prompt_len == 256 && kv_dtype == DType::F32 {
                single = r.decode;
            }
            rows.push(r.row(&bench, single));
        }
        drop(store);
        model = Some(built);
    }
    println!("\nprompt 256 tokens (or as labelled), {gen_len} generated per sequence (64 after a long prompt); fractions are of the 2048^3 GEMM peak above");
    println!("| weights | sequences | decode tok/s | vs 1 seq | decode % of peak | memory roofline tok/s (reached) | prefill tok/s | prefill % of peak | peak RSS / weights + KV pool |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!("{r}");
    }
    for r in lora_tables {
        println!("{r}");
    }
    let Some(model) = model else {
        return;
    };

    // GRPO: one 512-token prompt, 16 samples.
    let config = SchedulerConfig {
        block_size: 16,
        num_blocks: (16 * (512 + gen_len) + 512).div_ceil(16),
        max_num_batched_tokens: 2048,
        max_num_seqs: 256,
        kv_dtype: None,
    };
    let mut s = Scenario {
        core: EngineCore::new(model.clone(), vec![], "0", config).unwrap(),
        receivers: Vec::new(),
    };
    let grpo_gen = 16;
    s.add(prompt(512, cfg.vocab_size, 99), 16, grpo_gen, 7);
    let t = Instant::now();
    while s.core.has_work() {
        s.core.step();
    }
    let secs = t.elapsed().as_secs_f64();
    let forward = s.core.stats().forward_tokens() as usize;
    let prefill_work = forward - 16 * (grpo_gen - 1);
    println!(
        "\nGRPO group (512-token prompt, n = 16, {grpo_gen} tokens each): prefill work {prefill_work} tokens = {:.2}x one prompt; {:.1}s",
        prefill_work as f64 / 512.0,
        secs
    );
}
