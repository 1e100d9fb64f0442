//! `gym-serve validate` passes against gym-serve and fails, naming the check,
//! against broken targets: a proxy that re-tokenizes instead of splicing, and
//! one that reports log10 log-probs.

mod common;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::post;
use axum::Router;
use common::server::Server;
use serde_json::Value;
use std::process::Command;

#[derive(Clone, Copy)]
enum Breakage {
    /// Drops message-level token IDs from requests: the server re-tokenizes.
    Retokenize,
    /// Reports log10 instead of natural-log probabilities.
    Log10,
}

/// A proxy in front of `upstream` that breaks one thing.
fn broken_proxy(upstream: String, breakage: Breakage) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let forward = |State((upstream, breakage)): State<(String, Breakage)>,
                           Path(path): Path<String>,
                           body: Bytes| async move {
                tokio::task::spawn_blocking(move || {
                    let mut request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    if let (Breakage::Retokenize, Some(messages)) = (
                        breakage,
                        request.get_mut("messages").and_then(Value::as_array_mut),
                    ) {
                        for m in messages {
                            if let Some(o) = m.as_object_mut() {
                                o.remove("prompt_token_ids");
                                o.remove("generation_token_ids");
                                o.remove("generation_log_probs");
                            }
                        }
                    }
                    let body = if request.is_null() {
                        body.to_vec()
                    } else {
                        request.to_string().into_bytes()
                    };
                    let resp = reqwest::blocking::Client::new()
                        .post(format!("{upstream}/{path}"))
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .unwrap();
                    let status = resp.status();
                    let mut out: Value = resp.json().unwrap_or(Value::Null);
                    if let (Breakage::Log10, Some(choices)) = (
                        breakage,
                        out.get_mut("choices").and_then(Value::as_array_mut),
                    ) {
                        for c in choices {
                            if let Some(lps) = c["message"]["generation_log_probs"].as_array_mut() {
                                for lp in lps {
                                    *lp = serde_json::json!(
                                        lp.as_f64().unwrap() / std::f64::consts::LN_10
                                    );
                                }
                            }
                        }
                    }
                    (status, axum::Json(out))
                })
                .await
                .unwrap()
            };
            let app = Router::new()
                .route("/{*path}", post(forward))
                .with_state((upstream, breakage));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

fn validate(url: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .args(["validate", "--url", url])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn validate_passes_on_gym_serve_and_names_what_broke_elsewhere() {
    let model = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        111,
    ));
    let other = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        112,
    ));
    let server = Server::start(model.path(), &[]);
    let weights = other.path().join("model.safetensors");
    let (ok, out) = validate(&server.base, &["--weights", weights.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("[PASS]").count(), 5, "{out}");

    let (ok, out) = validate(
        &broken_proxy(server.base.clone(), Breakage::Retokenize),
        &[],
    );
    assert!(!ok);
    assert!(
        out.contains("[FAIL] three-turn tool-calling rollout keeps its prefix tokens"),
        "{out}"
    );
    assert!(out.contains("[PASS] generation log-probs match"), "{out}");

    let (ok, out) = validate(&broken_proxy(server.base.clone(), Breakage::Log10), &[]);
    assert!(!ok);
    assert!(
        out.contains("[FAIL] generation log-probs match /v1/logprobs"),
        "{out}"
    );
    assert!(out.contains("[SKIP] a weight push"), "{out}");
}
