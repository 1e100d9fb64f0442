//! The binary itself: `make-model` then `generate`, as a newcomer runs them.

use std::process::Command;

fn gym_serve(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .args(args)
        .output()
        .expect("run gym-serve")
}

/// A seeded two-choice chat generation, as JSON.
fn generate_json(model: &str) -> std::process::Output {
    gym_serve(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "Hello there",
        "--chat",
        "--max-tokens",
        "8",
        "--seed",
        "1",
        "--n",
        "2",
        "--temperature",
        "0.7",
        "--json",
    ])
}

#[test]
fn make_model_then_generate_prints_ids_and_log_probs() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let model = model.to_str().unwrap();
    let out = gym_serve(&["make-model", "--out", model, "--seed", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(
            dir.path().join("tiny").join(file).exists(),
            "{file} missing"
        );
    }
    let out = generate_json(model);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let prompt = v["prompt_token_ids"].as_array().unwrap();
    assert!(!prompt.is_empty());
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for c in choices {
        let ids = c["generation_token_ids"].as_array().unwrap();
        let lps = c["generation_log_probs"].as_array().unwrap();
        assert_eq!(ids.len(), lps.len());
        assert!(!ids.is_empty() && ids.len() <= 8);
        assert!(lps.iter().all(|l| l.as_f64().unwrap() <= 0.0));
    }
    // Same seed from a fresh process: the same output.
    let again = generate_json(model);
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn bad_input_fails_with_a_message() {
    let out = gym_serve(&["generate", "--model", "/nonexistent/model", "--prompt", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().to_str().unwrap();
    assert!(gym_serve(&["make-model", "--out", model]).status.success());
    let out = gym_serve(&[
        "generate", "--model", model, "--prompt", "x", "--top-p", "0",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
}
