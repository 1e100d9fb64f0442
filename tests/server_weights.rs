//! Hot weight updates over HTTP: equivalence with a fresh server, partial
//! updates, refused updates that change nothing, updates under load in `keep`
//! and `abort` modes, bf16 pushes, pause/resume and the admin key.

mod common;

use candle_core::{DType, Device, Tensor};
use common::server::{floats, ids, Server};
use gym_serve::config::Architecture;
use gym_serve::weights::checkpoint::{read_checkpoint, write_checkpoint};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use tempfile::TempDir;

fn model(seed: u64) -> TempDir {
    common::write_model(&common::tiny_options(Architecture::Qwen3, seed))
}

fn weights_file(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn serialize(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize(views, None).unwrap()
}

fn push(server: &Server, body: Vec<u8>, query: &str) -> (u16, Value) {
    server.post_bytes(&format!("/v1/weights?{query}"), body)
}

const TOKENS: [u32; 14] = [
    1, 317, 263, 201, 480, 293, 262, 409, 311, 448, 33, 2, 201, 1,
];

fn scores(server: &Server) -> Vec<f64> {
    floats(&server.ok("/v1/logprobs", &json!({"token_ids": TOKENS, "start": 1}))["token_logprobs"])
}

fn completion(server: &Server) -> Value {
    server.ok(
        "/v1/completions",
        &json!({"prompt": TOKENS, "max_tokens": 12, "seed": 21, "temperature": 0.8, "ignore_eos": true}),
    )
}

fn same_output(a: &Value, b: &Value) {
    let (ca, cb) = (&a["choices"][0], &b["choices"][0]);
    assert_eq!(ca["generation_token_ids"], cb["generation_token_ids"]);
    assert_eq!(ca["generation_log_probs"], cb["generation_log_probs"]);
}

#[test]
fn pushed_weights_serve_like_a_fresh_server() {
    let (x, y) = (model(1), model(2));
    let a = Server::start(x.path(), &[]);
    let b = Server::start(y.path(), &[]);
    let before = completion(&a);
    let (status, reply) = push(&a, weights_file(y.path()), "version=y&pause=wait");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["weight_version"], "y");
    assert_eq!(reply["tensors"], 25);
    assert!(reply["bytes"].as_u64().unwrap() > 0 && reply["seconds"].as_f64().is_some());
    let after = completion(&a);
    assert_eq!(after["weight_version"], "y");
    same_output(&after, &completion(&b));
    assert_ne!(
        after["choices"][0]["generation_log_probs"],
        before["choices"][0]["generation_log_probs"]
    );
    assert_eq!(scores(&a), scores(&b));
    let shown: Value = serde_json::from_str(&a.get("/get_weight_version").1).unwrap();
    assert_eq!(shown["weight_version"], "y", "{shown}");

    // Without a label the version counts up from a numeric one.
    let c = Server::start(x.path(), &[]);
    let reply = c.ok(
        "/update_weights_from_disk",
        &json!({"model_path": y.path(), "flush_cache": true}),
    );
    assert_eq!(reply["success"], true, "{reply}");
    assert_eq!(reply["weight_version"], "1");
    same_output(&completion(&c), &completion(&b));
    let (status, reply) = push(&c, weights_file(x.path()), "");
    assert_eq!((status, reply["weight_version"].as_str()), (200, Some("2")));
    let (_, metrics) = c.get("/metrics");
    assert!(
        metrics.contains("gym_serve_weight_version{version=\"2\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gym_serve_weight_updates_total 2"),
        "{metrics}"
    );
}

#[test]
fn partial_update_replaces_exactly_the_tensors_sent() {
    let (x, y) = (model(3), model(4));
    let a = Server::start(x.path(), &[]);
    let replaced = [
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.k_norm.weight",
    ];
    let y_tensors = read_checkpoint(y.path(), &Device::Cpu).unwrap();
    let sent: Vec<(String, Tensor)> = replaced
        .iter()
        .map(|n| (n.to_string(), y_tensors[*n].clone()))
        .collect();
    // The reference: X's checkpoint with those tensors swapped, served fresh.
    let mut mixed: HashMap<String, Tensor> = read_checkpoint(x.path(), &Device::Cpu).unwrap();
    mixed.extend(sent.iter().cloned());
    let reference_dir = model(3);
    let mut list: Vec<(String, Tensor)> = mixed.into_iter().collect();
    list.sort_by(|p, q| p.0.cmp(&q.0));
    write_checkpoint(reference_dir.path(), &list, 1).unwrap();
    let reference = Server::start(reference_dir.path(), &[]);

    let original = scores(&a);
    let (status, reply) = push(&a, serialize(&sent), "mode=partial&version=p1");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["tensors"], 3);
    assert_eq!(scores(&a), scores(&reference));
    assert_ne!(scores(&a), original);
    // In full mode the same body is refused: the other parameters are missing.
    let (status, reply) = push(&a, serialize(&sent), "mode=full");
    assert_eq!(status, 400);
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing tensor"),
        "{reply}"
    );
}

#[test]
fn refused_updates_leave_the_weights_bit_for_bit() {
    let (x, y) = (model(5), model(6));
    let a = Server::start(x.path(), &["--max-weights-bytes", "2000000"]);
    let baseline = (scores(&a), completion(&a));
    let y_tensors: Vec<(String, Tensor)> = {
        let mut v: Vec<_> = read_checkpoint(y.path(), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        v.sort_by(|p, q| p.0.cmp(&q.0));
        v
    };
    let with = |name: &str, t: Tensor| -> Vec<u8> {
        let mut v = y_tensors.clone();
        v.retain(|(n, _)| n != name);
        v.push((name.to_string(), t));
        serialize(&v)
    };
    let good = weights_file(y.path());
    let cases: Vec<(Vec<u8>, &str, u16, &str)> = vec![
        (
            with(
                "model.layers.0.bogus.weight",
                Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            ),
            "",
            400,
            "model.layers.0.bogus.weight",
        ),
        (serialize(&y_tensors[1..]), "", 400, &y_tensors[0].0),
        (
            with(
                "model.norm.weight",
                Tensor::zeros(65, DType::F32, &Device::Cpu).unwrap(),
            ),
            "",
            400,
            "model.norm.weight",
        ),
        (
            with(
                "model.norm.weight",
                Tensor::zeros(64, DType::U8, &Device::Cpu).unwrap(),
            ),
            "",
            400,
            "model.norm.weight",
        ),
        (good[..good.len() / 2].to_vec(), "", 400, "safetensors"),
        (
            b"definitely not safetensors".to_vec(),
            "",
            400,
            "safetensors",
        ),
        (good.clone(), "mode=sideways", 400, "mode"),
        (good.clone(), "pause=never", 400, "pause"),
        (vec![0u8; 3_000_000], "", 413, "max-weights-bytes"),
    ];
    for (body, query, status, needle) in cases {
        let (got, reply) = push(&a, body, query);
        assert_eq!(got, status, "{query} {needle}: {reply}");
        let msg = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{msg:?} should name {needle:?}");
        assert_eq!(
            scores(&a),
            baseline.0,
            "weights changed after a refused update ({needle})"
        );
    }
    // A checksum that does not match the body.
    let resp = a
        .http
        .post(a.url("/v1/weights"))
        .header("x-weights-sha256", "00".repeat(32))
        .body(good.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().unwrap().contains("checksum mismatch"));
    let reply = a.post(
        "/update_weights_from_disk",
        &json!({"model_path": "/no/such/dir"}),
    );
    assert_eq!(reply.0, 400);
    assert_eq!(reply.1["success"], false);
    same_output(&completion(&a), &baseline.1);
    assert_eq!(completion(&a)["weight_version"], "0");
    // And the right checksum is accepted.
    let digest = common::sha256_hex(&good);
    let resp = a
        .http
        .post(a.url("/v1/weights"))
        .header("x-weights-sha256", digest)
        .body(good)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// After a good push the server converts later pushes into the memory of the
/// weights it replaced. Refused pushes that got as far as converting (a
/// checksum mismatch, a truncated body) must still change nothing served, and
/// the memory reused must give exactly the weights pushed.
#[test]
fn pushes_into_reused_memory_are_exact_and_refusals_still_change_nothing() {
    let (x, y) = (model(7), model(8));
    let a = Server::start(x.path(), &[]);
    let fresh_x = Server::start(x.path(), &[]);
    let fresh_y = Server::start(y.path(), &[]);
    let (status, reply) = push(&a, weights_file(y.path()), "version=y");
    assert_eq!(status, 200, "{reply}");
    let serving_y = (scores(&a), completion(&a));
    assert_eq!(serving_y.0, scores(&fresh_y));

    // X's bytes, fully converted, then refused for their checksum.
    let resp = a
        .http
        .post(a.url("/v1/weights"))
        .header("x-weights-sha256", "00".repeat(32))
        .body(weights_file(x.path()))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let good = weights_file(x.path());
    let (status, _) = push(&a, good[..good.len() * 2 / 3].to_vec(), "");
    assert_eq!(status, 400);
    assert_eq!(
        scores(&a),
        serving_y.0,
        "a refused push changed the weights"
    );
    same_output(&completion(&a), &serving_y.1);

    // Back and forth: each push lands in memory an earlier version used.
    for (dir, fresh, version) in [
        (&x, &fresh_x, "x"),
        (&y, &fresh_y, "y2"),
        (&x, &fresh_x, "x2"),
    ] {
        let (status, reply) = push(&a, weights_file(dir.path()), &format!("version={version}"));
        assert_eq!(status, 200, "{reply}");
        assert_eq!(scores(&a), scores(fresh), "after pushing {version}");
        same_output(&completion(&a), &completion(fresh));
    }
}

#[test]
fn bf16_push_converts_like_a_bf16_checkpoint() {
    let x = model(7);
    let mut opts = common::tiny_options(Architecture::Qwen3, 8);
    opts.dtype = DType::BF16;
    let y16 = common::write_model(&opts);
    let a = Server::start(x.path(), &[]);
    let b = Server::start(y16.path(), &[]);
    let (status, reply) = push(&a, weights_file(y16.path()), "version=bf16");
    assert_eq!(status, 200, "{reply}");
    same_output(&completion(&a), &completion(&b));
}

fn bf16_model(seed: u64) -> TempDir {
    let mut opts = common::tiny_options(Architecture::Qwen3, seed);
    opts.dtype = DType::BF16;
    common::write_model(&opts)
}

/// A bf16 checkpoint is served with its weight matrices held as bf16
/// (half the memory); pushes convert into that memory, reused push after
/// push, and serve exactly what a fresh server of the pushed checkpoint
/// serves, whether the trainer sends bf16 or f32 holding the same values.
/// An f32 push whose values bf16 cannot hold is rounded, as loading does.
#[test]
fn bf16_held_weights_take_bf16_and_f32_pushes_exactly() {
    let (x, y) = (bf16_model(17), bf16_model(18));
    let a = Server::start(x.path(), &[]);
    let fresh_x = Server::start(x.path(), &[]);
    let fresh_y = Server::start(y.path(), &[]);
    let wide = |dir: &Path| -> Vec<u8> {
        let mut named: Vec<(String, Tensor)> = read_checkpoint(dir, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(DType::F32).unwrap()))
            .collect();
        named.sort_by(|p, q| p.0.cmp(&q.0));
        serialize(&named)
    };
    for (body, fresh, version) in [
        (weights_file(y.path()), &fresh_y, "y"),
        (weights_file(x.path()), &fresh_x, "x"),
        (wide(y.path()), &fresh_y, "y-as-f32"),
        (wide(x.path()), &fresh_x, "x-as-f32"),
    ] {
        let (status, reply) = push(&a, body, &format!("version={version}"));
        assert_eq!(status, 200, "{reply}");
        assert_eq!(scores(&a), scores(fresh), "after pushing {version}");
        same_output(&completion(&a), &completion(fresh));
    }
    // f32 values off the bf16 grid: the served model equals a fresh load of
    // the same f32 checkpoint, which rounds to bf16 too (--weight-dtype bf16).
    let z = model(19);
    let fresh_z = Server::start(z.path(), &["--weight-dtype", "bf16"]);
    let (status, reply) = push(&a, weights_file(z.path()), "version=z");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(scores(&a), scores(&fresh_z));
}

/// Pushes `dir`'s weights with `pause` mode and `version`.
fn push_dir(server: &Server, dir: &Path, version: &str, pause: &str) {
    let (status, reply) = push(
        server,
        weights_file(dir),
        &format!("version={version}&pause={pause}"),
    );
    assert_eq!(status, 200, "{reply}");
}

#[test]
fn keep_mode_under_load_records_which_weights_made_each_token() {
    let base = model(9);
    let versions: Vec<TempDir> = (0..5).map(|i| model(20 + i)).collect();
    let server = std::sync::Arc::new(Server::start(base.path(), &[]));
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let server = server.clone();
            std::thread::spawn(move || {
                let body = json!({"messages": [{"role": "user", "content": format!("client {i}")}],
                    "max_tokens": 400, "ignore_eos": true, "seed": i, "temperature": 1.0});
                server.ok("/v1/chat/completions", &body)
            })
        })
        .collect();
    for (i, dir) in versions.iter().enumerate() {
        std::thread::sleep(std::time::Duration::from_millis(60));
        push_dir(&server, dir.path(), &format!("v{}", i + 1), "keep");
    }
    let responses: Vec<Value> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let mut crossed = 0;
    // Check every span against teacher forcing under its version's weights.
    let dirs: Vec<(&str, &Path)> = std::iter::once(("0", base.path()))
        .chain(
            ["v1", "v2", "v3", "v4", "v5"]
                .into_iter()
                .zip(versions.iter().map(|d| d.path())),
        )
        .collect();
    let mut checked = 0;
    for (label, dir) in &dirs {
        push_dir(&server, dir, label, "wait");
        for resp in &responses {
            let choice = &resp["choices"][0];
            assert_eq!(choice["finish_reason"], "length");
            let prompt = ids(&choice["message"]["prompt_token_ids"]);
            let gen = ids(&choice["message"]["generation_token_ids"]);
            let lps = floats(&choice["message"]["generation_log_probs"]);
            assert_eq!(gen.len(), 400);
            let spans: Vec<(String, usize, usize)> = match resp.get("weight_versions") {
                Some(Value::Array(spans)) => spans
                    .iter()
                    .map(|s| {
                        (
                            s["version"].as_str().unwrap().to_string(),
                            s["start"].as_u64().unwrap() as usize,
                            s["end"].as_u64().unwrap() as usize,
                        )
                    })
                    .collect(),
                _ => vec![(
                    resp["weight_version"].as_str().unwrap().to_string(),
                    0,
                    gen.len(),
                )],
            };
            assert_eq!(spans.first().unwrap().1, 0);
            assert_eq!(spans.last().unwrap().2, gen.len());
            assert!(
                spans.windows(2).all(|w| w[0].2 == w[1].1),
                "spans tile the tokens"
            );
            if *label == "0" && spans.len() > 1 {
                crossed += 1;
            }
            for (version, start, end) in spans.iter().filter(|s| s.0 == *label) {
                let mut tokens = prompt.clone();
                tokens.extend(&gen[..*end]);
                let scored = server.ok(
                    "/v1/logprobs",
                    &json!({"token_ids": tokens, "start": prompt.len() + start}),
                );
                for (k, (a, b)) in lps[*start..*end]
                    .iter()
                    .zip(floats(&scored["token_logprobs"]))
                    .enumerate()
                {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "version {version} token {}: generated {a}, teacher-forced {b}",
                        start + k
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(
        crossed > 0,
        "no request crossed an update; the test did not test keep mode"
    );
    assert_eq!(checked, 32 * 400);
}

#[test]
fn abort_mode_ends_running_requests_with_their_tokens() {
    let (x, y) = (model(30), model(31));
    let server = std::sync::Arc::new(Server::start(x.path(), &[]));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let server = server.clone();
            std::thread::spawn(move || {
                server.ok("/v1/completions", &json!({"prompt": [1, 2, 3 + i], "max_tokens": 4000, "ignore_eos": true, "seed": i}))
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    push_dir(&server, y.path(), "after-abort", "abort");
    for c in clients {
        let resp = c.join().unwrap();
        let choice = &resp["choices"][0];
        assert_eq!(choice["finish_reason"], "abort", "{resp}");
        let n = ids(&choice["generation_token_ids"]).len();
        assert!(n > 0 && n < 4000, "{n} tokens");
        assert_eq!(floats(&choice["generation_log_probs"]).len(), n);
        assert_eq!(resp["weight_version"], "0");
    }
    assert_eq!(completion(&server)["weight_version"], "after-abort");
}

#[test]
fn pause_resume_and_the_admin_key() {
    let x = model(40);
    let server = std::sync::Arc::new(Server::start(
        x.path(),
        &["--admin-api-key", "adm", "--api-key", "usr"],
    ));
    let admin = |path: &str, key: Option<&str>| {
        let mut req = server.http.post(server.url(path));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().unwrap()
    };
    assert_eq!(admin("/pause?mode=keep", None).status().as_u16(), 401);
    assert_eq!(
        admin("/pause?mode=keep", Some("usr")).status().as_u16(),
        401,
        "the user key is not the admin key"
    );
    assert_eq!(admin("/v1/weights", None).status().as_u16(), 401);
    assert_eq!(
        admin("/pause?mode=keep", Some("adm")).status().as_u16(),
        200
    );
    let paused = server
        .http
        .get(server.url("/is_paused"))
        .bearer_auth("adm")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(paused, r#"{"is_paused":true}"#);
    // A request made while paused waits for resume.
    let waiting = {
        let server = server.clone();
        std::thread::spawn(move || {
            server
                .http
                .post(server.url("/v1/completions"))
                .bearer_auth("usr")
                .json(&json!({"prompt": [1, 2, 3], "max_tokens": 3}))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!waiting.is_finished(), "generation ran while paused");
    assert_eq!(
        admin("/reset_prefix_cache", Some("adm")).status().as_u16(),
        200
    );
    assert_eq!(admin("/resume", Some("adm")).status().as_u16(), 200);
    assert_eq!(waiting.join().unwrap(), 200);
    assert_eq!(
        admin("/pause?mode=sideways", Some("adm")).status().as_u16(),
        400
    );
}
