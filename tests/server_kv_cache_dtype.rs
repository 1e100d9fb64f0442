//! `--kv-cache-dtype bf16`: a half-size KV cache on the CPU that keeps the
//! on-policy guarantees: teacher-forced scores equal the log-probs generation
//! reported, and requests batched together equal the same requests run
//! alone; only the bf16 rounding of cached keys and values separates its
//! numbers from the f32 cache's.

mod common;

use common::server::{floats, ids, Server};
use gym_serve::config::Architecture;
use serde_json::{json, Value};

/// Token-ID prompts of different lengths (longer than a block, and not).
fn prompts() -> Vec<Vec<u32>> {
    let base: Vec<u32> = (0..80).map(|i| 3 + (i * 37 % 400) as u32).collect();
    vec![
        base[..5].to_vec(),
        base[..23].to_vec(),
        base[..41].to_vec(),
        base.clone(),
    ]
}

fn completion(server: &Server, prompt: &[u32], seed: u64) -> Value {
    server.ok(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 16, "seed": seed, "temperature": 0.8,
                "ignore_eos": true}),
    )
}

fn scores(server: &Server, tokens: &[u32], start: usize) -> Vec<f64> {
    floats(
        &server.ok(
            "/v1/logprobs",
            &json!({"token_ids": tokens, "start": start, "temperature": 0.8}),
        )["token_logprobs"],
    )
}

#[test]
fn bf16_cache_scores_what_it_generated_and_batches_like_alone() {
    let dir = common::write_model(&common::tiny_options(Architecture::Qwen3, 61));
    let bf16 = Server::start(dir.path(), &["--kv-cache-dtype", "bf16"]);
    let f32 = Server::start(dir.path(), &[]);
    let prompts = prompts();

    let alone: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| completion(&bf16, p, i as u64))
        .collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let server = &bf16;
                s.spawn(move || completion(server, p, i as u64))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut worst_vs_f32 = 0f64;
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let (ca, cb) = (&a["choices"][0], &b["choices"][0]);
        assert_eq!(
            ca["generation_token_ids"], cb["generation_token_ids"],
            "prompt {i}: batched tokens differ from the request run alone"
        );
        assert_eq!(
            ca["generation_log_probs"], cb["generation_log_probs"],
            "prompt {i}: batched log-probs differ from the request run alone"
        );
        let generated = ids(&ca["generation_token_ids"]);
        let reported = floats(&ca["generation_log_probs"]);
        assert_eq!(generated.len(), 16);
        let mut tokens = prompts[i].clone();
        tokens.extend(&generated);
        let teacher_forced = scores(&bf16, &tokens, prompts[i].len());
        for (k, (g, t)) in reported.iter().zip(&teacher_forced).enumerate() {
            assert!(
                (g - t).abs() <= 1e-4,
                "prompt {i} token {k}: generated {g}, teacher-forced {t}"
            );
        }
        let with_f32_cache = scores(&f32, &tokens, prompts[i].len());
        for (t, r) in teacher_forced.iter().zip(&with_f32_cache) {
            worst_vs_f32 = worst_vs_f32.max((t - r).abs());
        }
    }
    // The flag took effect (bf16 keeps 8 significant bits, so some score
    // moves), and it is only rounding: log-probs stay within a hundredth.
    assert!(
        worst_vs_f32 > 0.0,
        "the bf16 cache gave exactly the f32 scores"
    );
    assert!(
        worst_vs_f32 < 0.01,
        "bf16 cache moved a log-prob by {worst_vs_f32} from the f32 cache's"
    );
}

#[test]
fn an_unknown_kv_cache_dtype_is_refused_at_start() {
    let dir = common::write_model(&common::tiny_options(Architecture::Qwen3, 62));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .arg("--model")
        .arg(dir.path())
        .args(["--port", "0", "--kv-cache-dtype", "fp8"])
        .output()
        .expect("run gym-serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--kv-cache-dtype") && stderr.contains("bf16"),
        "{stderr}"
    );
}
