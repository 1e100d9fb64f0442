//! `--compute-dtype bf16`: projections multiply bf16-rounded activations by
//! bf16 weights on the CPU's BF16 instructions (AMX tiles or AVX512-BF16),
//! and the on-policy guarantees still hold bit for bit: a request batched
//! with others gives what it gives alone, and teacher-forced scores equal
//! the log-probs generation reported. Only bf16 rounding separates its
//! numbers from the exact f32 default's. On a CPU without the instructions
//! the server refuses the mode at start, saying why.

mod common;

use common::server::{floats, ids, Server};
use gym_serve::config::Architecture;
use gym_serve::model::gemm::bf16_products;
use serde_json::{json, Value};

/// A bf16 checkpoint (its own values are what bf16 products multiply).
fn bf16_model(seed: u64) -> tempfile::TempDir {
    let mut opts = common::tiny_options(Architecture::Qwen3, seed);
    opts.dtype = candle_core::DType::BF16;
    common::write_model(&opts)
}

/// Prompts from 5 to 80 tokens: steps of a few rows and of many.
fn prompts() -> Vec<Vec<u32>> {
    let base: Vec<u32> = (0..80).map(|i| 3 + (i * 53 % 450) as u32).collect();
    [5, 17, 40, 80]
        .iter()
        .map(|&n| base[..n].to_vec())
        .collect()
}

fn completion(server: &Server, prompt: &[u32], seed: u64) -> Value {
    server.ok(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 16, "seed": seed, "temperature": 0.9,
                "top_p": 0.95, "ignore_eos": true}),
    )
}

fn scores(server: &Server, tokens: &[u32], start: usize) -> Vec<f64> {
    floats(
        &server.ok(
            "/v1/logprobs",
            &json!({"token_ids": tokens, "start": start, "temperature": 0.9, "top_p": 0.95}),
        )["token_logprobs"],
    )
}

fn bits(v: &[f64]) -> Vec<u32> {
    v.iter().map(|x| (*x as f32).to_bits()).collect()
}

fn refusal(dir: &std::path::Path, extra: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .arg("--model")
        .arg(dir)
        .args(["--port", "0"])
        .args(extra)
        .output()
        .expect("run gym-serve");
    assert!(!out.status.success(), "gym-serve {extra:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bf16_products_batch_like_alone_and_score_what_they_generated() {
    let dir = bf16_model(71);
    if !bf16_products::supported() {
        let stderr = refusal(dir.path(), &["--compute-dtype", "bf16"]);
        assert!(stderr.contains("needs a CPU with"), "{stderr}");
        eprintln!("no AVX512-BF16 or AMX-BF16 here: only the refusal was checked");
        return;
    }
    let bf16 = Server::start(dir.path(), &["--compute-dtype", "bf16"]);
    let exact = Server::start(dir.path(), &[]);
    for (server, want) in [(&bf16, "bf16"), (&exact, "f32")] {
        let (status, models) = server.get("/v1/models");
        assert_eq!(status, 200);
        let card = &serde_json::from_str::<Value>(&models).unwrap()["data"][0];
        assert_eq!(card["compute_dtype"], want);
        assert_eq!(card["deterministic"], true);
    }
    let prompts = prompts();
    let alone: Vec<Value> = (prompts.iter().enumerate())
        .map(|(i, p)| completion(&bf16, p, i as u64))
        .collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (prompts.iter().enumerate())
            .map(|(i, p)| {
                let server = &bf16;
                s.spawn(move || completion(server, p, i as u64))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut worst_vs_exact = 0f64;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let (ca, cb) = (&a["choices"][0], &b["choices"][0]);
        assert_eq!(
            ca["generation_token_ids"], cb["generation_token_ids"],
            "prompt {i}"
        );
        let reported = floats(&ca["generation_log_probs"]);
        assert_eq!(
            bits(&reported),
            bits(&floats(&cb["generation_log_probs"])),
            "prompt {i}: batched log-probs differ from the request run alone"
        );
        let mut tokens = prompts[i].clone();
        tokens.extend(ids(&ca["generation_token_ids"]));
        let teacher_forced = scores(&bf16, &tokens, prompts[i].len());
        assert_eq!(
            bits(&teacher_forced),
            bits(&reported),
            "prompt {i}: scoring differs from generation"
        );
        for (t, e) in teacher_forced
            .iter()
            .zip(&scores(&exact, &tokens, prompts[i].len()))
        {
            worst_vs_exact = worst_vs_exact.max((t - e).abs());
        }
    }
    // The flag took effect (bf16 activations keep 8 significant bits), and
    // it is only rounding.
    assert!(worst_vs_exact > 0.0, "bf16 products gave the exact scores");
    assert!(
        worst_vs_exact < 0.05,
        "bf16 products moved a log-prob by {worst_vs_exact} from the exact one"
    );
}

#[test]
fn bf16_products_refuse_f32_weights() {
    let dir = bf16_model(72);
    let stderr = refusal(
        dir.path(),
        &["--compute-dtype", "bf16", "--weight-dtype", "f32"],
    );
    let why = if bf16_products::supported() {
        "--weight-dtype f32"
    } else {
        "needs a CPU with"
    };
    assert!(stderr.contains(why), "{stderr}");
}
