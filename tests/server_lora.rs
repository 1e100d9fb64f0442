//! LoRA adapters on the real server: mixed batches of adapters and the base
//! model equal each request run alone; an adapter pushed under load in
//! `keep` mode serves its new version from the next token (checked against
//! teacher forcing) while other adapters' streams go on untouched; bad
//! adapters are refused with a 4xx naming them and change nothing.

mod common;

use candle_core::{Device, Tensor};
use common::server::{floats, ids, Server};
use gym_serve::config::Architecture;
use gym_serve::weights::names::{lora_param, LayerModule, LoraFactor};
use serde_json::{json, Value};
use std::path::Path;
use tempfile::TempDir;

const LAYERS: usize = 2;

/// `(out, in)` of each projection of the tiny preset (hidden 64, 4 heads and
/// 2 KV heads of 16, intermediate 192).
fn dims(module: LayerModule) -> (usize, usize) {
    match module {
        LayerModule::QProj | LayerModule::OProj => (64, 64),
        LayerModule::KProj | LayerModule::VProj => (32, 64),
        LayerModule::GateProj | LayerModule::UpProj => (192, 64),
        _ => (64, 192),
    }
}

/// Seeded values in [-0.25, 0.25) (a plain LCG: reproducible, no RNG crate).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
        })
        .collect()
}

/// A PEFT state dict on every projection, rank `r`, as safetensors bytes.
fn adapter_tensors(r: usize, seed: u64) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for layer in 0..LAYERS {
        for (k, &m) in LayerModule::PROJECTIONS.iter().enumerate() {
            let (o, i) = dims(m);
            let s = seed * 1000 + (layer * 10 + k) as u64;
            let a = Tensor::from_vec(values(r * i, s), (r, i), &Device::Cpu).unwrap();
            let b = Tensor::from_vec(values(o * r, s + 500), (o, r), &Device::Cpu).unwrap();
            out.push((lora_param(layer, m, LoraFactor::A), a));
            out.push((lora_param(layer, m, LoraFactor::B), b));
        }
    }
    out
}

fn serialize(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize(views, None).unwrap()
}

fn config_json(r: usize) -> Value {
    json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "bias": "none",
           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
}

/// A PEFT adapter directory.
fn write_adapter(dir: &Path, config: &Value, weights: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), weights).unwrap();
}

fn adapters(n: usize) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..n {
        let r = 4 + 4 * i;
        write_adapter(
            &dir.path().join(format!("a{i}")),
            &config_json(r),
            &serialize(&adapter_tensors(r, 7 + i as u64)),
        );
    }
    dir
}

fn lora_args(dir: &Path, n: usize) -> Vec<String> {
    let mut args = vec!["--lora-modules".to_string()];
    args.extend((0..n).map(|i| format!("a{i}={}", dir.join(format!("a{i}")).display())));
    args
}

fn start(model: &Path, args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(model, &args)
}

fn completion(model: &str, seed: u64, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": [1, 317, 263, 201, 480, 293, 262, 409, (seed % 50) as u32 + 300],
           "max_tokens": max_tokens, "seed": seed, "temperature": 1.0, "ignore_eos": true})
}

fn tokens_and_logprobs(v: &Value) -> (Vec<u32>, Vec<f64>) {
    let c = &v["choices"][0];
    (
        ids(&c["generation_token_ids"]),
        floats(&c["generation_log_probs"]),
    )
}

#[test]
fn mixed_batch_of_four_adapters_and_base_equals_each_alone() {
    let model = common::write_model(&common::tiny_options(Architecture::Qwen3, 31));
    let dir = adapters(4);
    let server = std::sync::Arc::new(start(model.path(), &lora_args(dir.path(), 4)));
    let (_, listed) = server.get("/v1/models");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tiny", "a0", "a1", "a2", "a3"]);
    let models = ["tiny", "a0", "a1", "a2", "a3"];
    let requests: Vec<Value> = (0..32)
        .map(|i| completion(models[i % 5], i as u64, 24))
        .collect();
    let batched: Vec<Value> = requests
        .iter()
        .cloned()
        .map(|r| {
            let server = server.clone();
            std::thread::spawn(move || server.ok("/v1/completions", &r))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    for (i, (req, together)) in requests.iter().zip(&batched).enumerate() {
        let alone = server.ok("/v1/completions", req);
        let (ta, la) = tokens_and_logprobs(together);
        let (tb, lb) = tokens_and_logprobs(&alone);
        assert_eq!(
            ta, tb,
            "request {i} ({}): tokens differ batched vs alone",
            req["model"]
        );
        for (a, b) in la.iter().zip(&lb) {
            assert!((a - b).abs() <= 1e-5, "request {i}: log-prob {a} vs {b}");
        }
        // Generation log-probs are what teacher forcing under the same adapter gives.
        let mut all = ids(&req["prompt"]);
        let start = all.len();
        all.extend(&ta);
        let scored = server.ok(
            "/v1/logprobs",
            &json!({"model": req["model"], "token_ids": all, "start": start}),
        );
        for (a, b) in la.iter().zip(floats(&scored["token_logprobs"])) {
            assert!(
                (a - b).abs() <= 1e-4,
                "request {i}: generated {a}, scored {b}"
            );
        }
    }
    // Each adapter changes the output: different adapters on the same seed differ.
    let outs: Vec<Vec<u32>> = models
        .iter()
        .map(|m| tokens_and_logprobs(&server.ok("/v1/completions", &completion(m, 3, 24))).0)
        .collect();
    for i in 0..outs.len() {
        for j in i + 1..outs.len() {
            assert_ne!(
                outs[i], outs[j],
                "{} and {} generate the same",
                models[i], models[j]
            );
        }
    }
    let (status, body) = server.post("/v1/completions", &completion("nope", 1, 4));
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("nope"));
}

/// The `(version, start, end)` spans of a response's tokens.
fn spans(resp: &Value, len: usize) -> Vec<(String, usize, usize)> {
    match resp.get("weight_versions") {
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
        _ => vec![(resp["weight_version"].as_str().unwrap().to_string(), 0, len)],
    }
}

fn push_adapter(
    server: &Server,
    name: &str,
    tensors: &[(String, Tensor)],
    query: &str,
) -> (u16, Value) {
    server.post_bytes(
        &format!("/v1/weights?adapter={name}&{query}"),
        serialize(tensors),
    )
}

#[test]
fn adapter_pushed_under_load_serves_its_new_version_and_leaves_others_alone() {
    let model = common::write_model(&common::tiny_options(Architecture::Qwen3, 32));
    let dir = adapters(2);
    let server = std::sync::Arc::new(start(model.path(), &lora_args(dir.path(), 2)));
    const TOKENS: usize = 200;
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let server = server.clone();
            let name = if i % 2 == 0 { "a0" } else { "a1" };
            std::thread::spawn(move || server.ok("/v1/completions", &completion(name, i, TOKENS)))
        })
        .collect();
    // a0 has rank 4 (see `adapters`); each version has tensors of its own.
    let versions: Vec<(String, Vec<(String, Tensor)>)> =
        std::iter::once(("0".to_string(), adapter_tensors(4, 7)))
            .chain((1..=5).map(|v| (format!("v{v}"), adapter_tensors(4, 100 + v))))
            .collect();
    for (label, tensors) in &versions[1..] {
        std::thread::sleep(std::time::Duration::from_millis(60));
        let (status, reply) = push_adapter(
            &server,
            "a0",
            tensors,
            &format!("version={label}&pause=keep"),
        );
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["weight_version"], label.as_str());
        assert_eq!(reply["tensors"], 28);
    }
    let responses: Vec<Value> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let (mut crossed, mut checked) = (0, 0);
    for (label, tensors) in &versions {
        // Serve that version again to score against it.
        let (status, reply) = push_adapter(
            &server,
            "a0",
            tensors,
            &format!("version={label}&pause=wait"),
        );
        assert_eq!(status, 200, "{reply}");
        for (i, resp) in responses.iter().enumerate() {
            let adapter = if i % 2 == 0 { "a0" } else { "a1" };
            let c = &resp["choices"][0];
            let prompt = ids(&c["prompt_token_ids"]);
            let (gen, lps) = tokens_and_logprobs(resp);
            assert_eq!(gen.len(), TOKENS);
            let spans = spans(resp, gen.len());
            if adapter == "a1" {
                assert_eq!(spans, [("0".to_string(), 0, TOKENS)], "a1 never changed");
                if label != "0" {
                    continue;
                }
            } else if label == "0" && spans.len() > 1 {
                crossed += 1;
            }
            assert!(
                spans.windows(2).all(|w| w[0].2 == w[1].1),
                "spans tile the tokens"
            );
            for (_, start, end) in spans.iter().filter(|s| adapter == "a1" || s.0 == *label) {
                let mut tokens = prompt.clone();
                tokens.extend(&gen[..*end]);
                let scored = server.ok(
                    "/v1/logprobs",
                    &json!({"model": adapter, "token_ids": tokens, "start": prompt.len() + start}),
                );
                for (k, (a, b)) in lps[*start..*end]
                    .iter()
                    .zip(floats(&scored["token_logprobs"]))
                    .enumerate()
                {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "{adapter} at {label}, token {}: generated {a}, scored {b}",
                        start + k
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(
        crossed > 0,
        "no a0 request crossed a push; the test did not test keep mode"
    );
    assert_eq!(checked, 16 * TOKENS);
}

#[test]
fn bad_adapters_are_refused_by_name_and_change_nothing() {
    let model = common::write_model(&common::tiny_options(Architecture::Qwen3, 33));
    let dir = adapters(1); // a0, rank 4
    let mut args = lora_args(dir.path(), 1);
    args.extend(["--max-lora-rank", "8", "--max-loras", "2"].map(String::from));
    let server = start(model.path(), &args);
    let before = server.ok("/v1/completions", &completion("a0", 5, 12));
    let (_, models_before) = server.get("/v1/models");
    let good = adapter_tensors(4, 9);
    let bad_dir = tempfile::tempdir().unwrap();
    let mut wrong_shape = good.clone();
    wrong_shape[3].1 = Tensor::zeros((4, 65), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut dora = config_json(4);
    dora["use_dora"] = json!(true);
    let mut lm_head = config_json(4);
    lm_head["target_modules"] = json!(["q_proj", "lm_head"]);
    let cases: Vec<(&str, Value, Vec<u8>, &str)> = vec![
        (
            "big",
            config_json(16),
            serialize(&adapter_tensors(16, 1)),
            "--max-lora-rank",
        ),
        ("head", lm_head, serialize(&good), "lm_head"),
        ("shape", config_json(4), serialize(&wrong_shape), &good[3].0),
        ("missing", config_json(4), serialize(&good[1..]), &good[0].0),
        (
            "corrupt",
            config_json(4),
            b"not a safetensors file at all".to_vec(),
            "safetensors",
        ),
        ("dora", dora, serialize(&good), "use_dora"),
    ];
    for (name, config, weights, expect) in &cases {
        let path = bad_dir.path().join(name);
        write_adapter(&path, config, weights);
        let (status, body) = server.post(
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": path}),
        );
        assert_eq!(status, 400, "{name}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(name) && msg.contains(expect), "{name}: {msg}");
    }
    // Too many: a second adapter fits, a third does not.
    let ok_path = bad_dir.path().join("second");
    write_adapter(&ok_path, &config_json(4), &serialize(&good));
    let (status, body) = server.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "second", "lora_path": ok_path}),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "third", "lora_path": ok_path}),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-loras"),
        "{body}"
    );
    let (status, body) = server.post(
        "/v1/load_lora_adapter",
        &json!({"lora_name": "second", "lora_path": ok_path}),
    );
    assert_eq!(status, 400, "duplicate name: {body}");
    // A bad push to a served adapter changes neither it nor its version.
    let (status, body) = push_adapter(&server, "a0", &wrong_shape, "version=bad");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("a0"),
        "{body}"
    );
    let (status, body) = push_adapter(&server, "fresh", &good, "");
    assert_eq!(status, 400, "a new adapter without a config: {body}");
    let after = server.ok("/v1/completions", &completion("a0", 5, 12));
    assert_eq!(tokens_and_logprobs(&before), tokens_and_logprobs(&after));
    assert_eq!(after["weight_version"], "0");
    let (status, body) = server.post("/v1/unload_lora_adapter", &json!({"lora_name": "second"}));
    assert_eq!(status, 200, "{body}");
    let (_, models_after) = server.get("/v1/models");
    assert_eq!(models_before, models_after);
    let (status, _) = server.post("/v1/unload_lora_adapter", &json!({"lora_name": "second"}));
    assert_eq!(status, 404);
    let (status, _) = server.post("/v1/completions", &completion("second", 1, 4));
    assert_eq!(status, 404);
}

#[test]
fn bad_adapter_pushes_are_refused_by_name_and_change_nothing() {
    // The push path reads the file as it arrives (not the disk loader's
    // path): every refusal names the adapter and what was wrong.
    let model = common::write_model(&common::tiny_options(Architecture::Qwen3, 34));
    let dir = adapters(1); // a0, rank 4
    let mut args = lora_args(dir.path(), 1);
    args.extend(["--max-lora-rank", "8"].map(String::from));
    let server = start(model.path(), &args);
    let before = server.ok("/v1/completions", &completion("a0", 5, 12));
    let (_, models_before) = server.get("/v1/models");
    let good = adapter_tensors(4, 9);
    let good_bytes = serialize(&good);
    let mut wrong_shape = good.clone();
    wrong_shape[3].1 = Tensor::zeros((4, 65), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut poisoned = good.clone();
    let (r, c) = poisoned[5].1.dims2().unwrap();
    let mut v = values(r * c, 3);
    v[r * c / 2] = f32::INFINITY;
    poisoned[5].1 = Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap();
    let mut extra = good.clone();
    extra.push((
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
        Tensor::zeros(64, candle_core::DType::F32, &Device::Cpu).unwrap(),
    ));
    let mut dora = config_json(4);
    dora["use_dora"] = json!(true);
    let mut lm_head = config_json(4);
    lm_head["target_modules"] = json!(["q_proj", "lm_head"]);
    let mut long = good_bytes.clone();
    long.extend_from_slice(&[0; 8]);
    let wrong_sha = "0".repeat(64);
    // (case, config, body, x-weights-sha256, what the refusal names)
    type BadPush<'a> = (&'a str, Value, Vec<u8>, Option<&'a str>, &'a str);
    let cases: Vec<BadPush> = vec![
        (
            "rank",
            config_json(16),
            serialize(&adapter_tensors(16, 1)),
            None,
            "--max-lora-rank",
        ),
        ("head", lm_head, good_bytes.clone(), None, "lm_head"),
        ("dora", dora, good_bytes.clone(), None, "use_dora"),
        (
            "shape",
            config_json(4),
            serialize(&wrong_shape),
            None,
            &good[3].0,
        ),
        (
            "missing",
            config_json(4),
            serialize(&good[1..]),
            None,
            &good[0].0,
        ),
        ("extra", config_json(4), serialize(&extra), None, "DoRA"),
        (
            "nonfinite",
            config_json(4),
            serialize(&poisoned),
            None,
            &good[5].0,
        ),
        (
            "corrupt",
            config_json(4),
            b"not safetensors".to_vec(),
            None,
            "safetensors",
        ),
        (
            "short",
            config_json(4),
            good_bytes[..good_bytes.len() - 9].to_vec(),
            None,
            "ended before",
        ),
        ("long", config_json(4), long, None, "past its last tensor"),
        (
            "checksum",
            config_json(4),
            good_bytes.clone(),
            Some(&wrong_sha),
            "checksum mismatch",
        ),
    ];
    for (case, config, body, sha, expect) in &cases {
        let mut req = server
            .http
            .post(server.url("/v1/weights?adapter=a0&version=bad"))
            .header("x-adapter-config", config.to_string())
            .body(body.clone());
        if let Some(sha) = sha {
            req = req.header("x-weights-sha256", *sha);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let reply: Value = resp.json().unwrap_or(Value::Null);
        assert_eq!(status, 400, "{case}: {reply}");
        let msg = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("a0") || *case == "checksum", "{case}: {msg}");
        assert!(msg.contains(expect), "{case}: {msg}");
    }
    let after = server.ok("/v1/completions", &completion("a0", 5, 12));
    assert_eq!(tokens_and_logprobs(&before), tokens_and_logprobs(&after));
    assert_eq!(after["weight_version"], "0");
    let (_, models_after) = server.get("/v1/models");
    assert_eq!(models_before, models_after);
    // The same bytes, whole and with their real checksum, are taken.
    let sha = common::sha256_hex(&good_bytes);
    let resp = server
        .http
        .post(server.url("/v1/weights?adapter=a0&version=good"))
        .header("x-weights-sha256", sha)
        .body(good_bytes)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let after = server.ok("/v1/completions", &completion("a0", 5, 12));
    assert_eq!(after["weight_version"], "good");
    assert_ne!(tokens_and_logprobs(&before), tokens_and_logprobs(&after));
}
