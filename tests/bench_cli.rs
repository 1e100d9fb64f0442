//! `gym-serve bench` against a running server: consistent numbers counted
//! from the responses, errors counted rather than fatal, refits reported.

mod common;

use common::server::Server;
use serde_json::Value;
use std::process::Command;

fn bench(url: &str, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .args(["bench", "--url", url, "--json", out_path.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| output tokens/s |"), "{table}");
    serde_json::from_str(&std::fs::read_to_string(out_path).unwrap()).unwrap()
}

#[test]
fn bench_counts_tokens_errors_and_refits() {
    let model = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        121,
    ));
    let other = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        122,
    ));
    let server = Server::start(model.path(), &[]);
    let common = [
        "--requests",
        "12",
        "--concurrency",
        "3",
        "--prompt-len",
        "16",
    ];

    let r = bench(
        &server.base,
        &[&common[..], &["--completions", "--max-tokens", "8"]].concat(),
    );
    assert_eq!(r["completed"], 12);
    assert_eq!(r["errors"], serde_json::json!({}));
    assert_eq!(
        r["prompt_tokens"],
        12 * 16,
        "synthetic prompts have the exact length"
    );
    assert_eq!(r["output_tokens"], 12 * 8);
    let secs = r["duration_s"].as_f64().unwrap();
    assert!((r["output_tok_s"].as_f64().unwrap() - 96.0 / secs).abs() < 1e-6);

    let r = bench(
        &server.base,
        &[&common[..], &["--stream", "--n", "2", "--max-tokens", "8"]].concat(),
    );
    assert_eq!(r["completed"], 12);
    assert_eq!(r["output_tokens"], 12 * 8 * 2);
    assert!(r["itl_s"]["p50"].as_f64().unwrap() > 0.0);

    // A server that refuses every request: counted by kind, the run completes.
    let r = bench(
        &server.base,
        &[&common[..], &["--model", "not-served", "--max-tokens", "8"]].concat(),
    );
    assert_eq!(r["completed"], 0);
    assert_eq!(r["errors"]["http_404"], 12);

    let weights = other.path().join("model.safetensors");
    let r = bench(
        &server.base,
        &[
            &common[..],
            &[
                "--stream",
                "--max-tokens",
                "60",
                "--duration",
                "1.0",
                "--refit",
                weights.to_str().unwrap(),
                "--refit-every",
                "0.2",
            ],
        ]
        .concat(),
    );
    // Requests keep being sent for a second, so several pushes land mid-run.
    assert!(r["completed"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(r["errors"], serde_json::json!({}));
    assert!(r["refit"]["pushes"].as_u64().unwrap() >= 2, "{r}");
    assert_eq!(r["refit"]["failed"], 0);
}
