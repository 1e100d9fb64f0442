//! `gym-serve push-weights` with several `--url`s against real replicas:
//! the update lands on every replica, or (one replica refusing) on none and
//! nothing stays staged, with the refusing replica named; `--chain` the
//! same with the body sent once; an adapter fans out with a per-replica
//! report.

mod common;

use candle_core::{Device, Tensor};
use common::probe::fingerprint;
use common::server::Server;
use gym_serve::config::Architecture;
use gym_serve::weights::names::{lora_param, LayerModule, LoraFactor};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Output};
use tempfile::TempDir;

const KEY: &str = "fleet-key";

fn model(seed: u64) -> TempDir {
    common::write_model(&common::tiny_options(Architecture::Qwen3, seed))
}

/// A replica with `--admin-api-key KEY`, its test client sending the key.
fn keyed(dir: &Path) -> Server {
    Server::start_keyed(dir, KEY)
}

fn push(urls: &[&str], args: &[&str], env_urls: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gym-serve"));
    command
        .arg("push-weights")
        .args(["--admin-api-key", KEY])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("GYM_SERVE_URL");
    for url in urls {
        command.args(["--url", url]);
    }
    if let Some(list) = env_urls {
        command.env("GYM_SERVE_URL", list);
    }
    command.output().expect("run push-weights")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn get(server: &Server, path: &str) -> Value {
    let (code, body) = server.get(path);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn version(server: &Server) -> Value {
    get(server, "/get_weight_version")["weight_version"].clone()
}

fn staged(server: &Server) -> Value {
    get(server, "/v1/weights/staged")["staged"].clone()
}

#[test]
fn one_refusing_replica_changes_none_and_the_same_push_then_lands_on_all() {
    let (x, y) = (model(401), model(402));
    let file = y.path().join("model.safetensors");
    let file = file.to_str().unwrap();
    let replicas = [keyed(x.path()), keyed(x.path()), keyed(x.path())];
    let baseline = fingerprint(&replicas[0]);
    let target = fingerprint(&keyed(y.path()));
    let urls: Vec<&str> = replicas.iter().map(|s| s.base.as_str()).collect();

    // The third replica holds someone else's stage: it refuses ours (409).
    let (code, held) = replicas[2].post_bytes(
        "/v1/weights/stage?version=other",
        std::fs::read(file).unwrap(),
    );
    assert_eq!(code, 200, "{held}");
    let out = push(&urls, &["--file", file, "--version", "y"], None);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("no replica changed weights"), "{said}");
    assert!(
        said.contains(&format!("{}: stage failed: 409", urls[2])),
        "{said}"
    );
    for server in &replicas {
        assert_eq!(version(server), "0");
        assert_eq!(fingerprint(server), baseline);
    }
    // Ours was aborted where it staged; the other stage is left alone.
    assert_eq!(staged(&replicas[0]), Value::Null);
    assert_eq!(staged(&replicas[1]), Value::Null);
    assert_eq!(staged(&replicas[2])["version"], "other");
    let (code, _) = replicas[2].post_bytes("/v1/weights/abort", Vec::new());
    assert_eq!(code, 200);

    let out = push(&urls, &["--file", file, "--version", "y"], None);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("all 3 replicas serve version y"), "{said}");
    for (server, url) in replicas.iter().zip(&urls) {
        assert_eq!(version(server), "y");
        assert_eq!(fingerprint(server), target);
        assert_eq!(staged(server), Value::Null);
        // One table line per replica.
        assert!(
            said.lines()
                .any(|l| l.starts_with(url) && l.contains("committed") && l.ends_with(" y")),
            "{said}"
        );
    }
}

#[test]
fn a_chained_push_from_the_url_list_in_the_environment_lands_on_all() {
    let (x, y) = (model(403), model(404));
    let file = y.path().join("model.safetensors");
    let file = file.to_str().unwrap();
    let replicas = [keyed(x.path()), keyed(x.path()), keyed(x.path())];
    let target = fingerprint(&keyed(y.path()));
    let list = replicas
        .iter()
        .map(|s| s.base.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let out = push(&[], &["--file", file, "--chain"], Some(&list));
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    // No --version: each stages as 0 + 1, and they agree.
    assert!(said.contains("all 3 replicas serve version 1"), "{said}");
    for server in &replicas {
        assert_eq!(version(server), "1");
        assert_eq!(fingerprint(server), target);
    }
}

/// A PEFT adapter directory on q_proj of the tiny preset (2 layers, 64 wide).
fn adapter_dir() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    for layer in 0..2 {
        for (factor, shape) in [(LoraFactor::A, (4, 64)), (LoraFactor::B, (64, 4))] {
            let n = shape.0 * shape.1;
            let values: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) / 50.0).collect();
            let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
            tensors.push((lora_param(layer, LayerModule::QProj, factor), t));
        }
    }
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.path().join("adapter_model.safetensors"), bytes).unwrap();
    let config = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none",
                        "target_modules": ["q_proj"]});
    std::fs::write(dir.path().join("adapter_config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn an_adapter_fans_out_and_the_report_says_which_replica_took_it() {
    let x = model(405);
    let adapter = adapter_dir();
    let dir = adapter.path().to_str().unwrap();
    let replicas = [keyed(x.path()), keyed(x.path())];
    let dead = "http://127.0.0.1:9";
    let args = ["--dir", dir, "--adapter", "policy", "--version", "a1"];
    let out = push(&[&replicas[0].base, dead], &args, None);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("reached 1 of 2 replicas"), "{said}");
    assert!(said.contains(&format!("{dead}: ")), "{said}");
    assert!(
        said.lines()
            .any(|l| l.starts_with(&replicas[0].base) && l.contains("pushed")),
        "{said}"
    );
    let request = json!({"model": "policy", "prompt": [1, 5, 9], "max_tokens": 2});
    let (code, reply) = replicas[0].post("/v1/completions", &request);
    assert_eq!(code, 200, "{reply}");
    assert_eq!(replicas[1].post("/v1/completions", &request).0, 404);

    let urls = [replicas[0].base.as_str(), replicas[1].base.as_str()];
    let out = push(&urls, &args, None);
    assert!(out.status.success(), "{}", text(&out));
    for server in &replicas {
        let (code, reply) = server.post("/v1/completions", &request);
        assert_eq!(code, 200, "{reply}");
    }
    let out = push(&urls, &[&args[..], &["--chain"]].concat(), None);
    assert!(!out.status.success());
    assert!(text(&out).contains("--chain pushes base weights only"));
}
