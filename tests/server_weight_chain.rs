//! Chained staging against the real binary: `POST /v1/weights/stage` with
//! `forward_to` stages the body on every replica of the chain (each one
//! checking the checksum), the answer lists each stage for the commits,
//! and a refusal anywhere leaves no stage anywhere. Forwarding needs the
//! server's admin key, and `forward_to` must name base URLs.

mod common;

use common::probe::fingerprint;
use common::server::Server;
use common::sha256_hex;
use gym_serve::config::Architecture;
use serde_json::Value;
use std::path::Path;
use tempfile::TempDir;

const KEY: &str = "chain-key";

fn model(seed: u64) -> TempDir {
    common::write_model(&common::tiny_options(Architecture::Qwen3, seed))
}

fn weights_file(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

/// A replica with `--admin-api-key KEY`, its test client sending the key.
fn keyed(dir: &Path) -> Server {
    Server::start_keyed(dir, KEY)
}

/// `POST /v1/weights/stage?{query}` with the body's checksum (or `sha`).
fn stage(server: &Server, body: Vec<u8>, query: &str, sha: Option<&str>) -> (u16, Value) {
    let digest = sha.map_or_else(|| sha256_hex(&body), str::to_string);
    let resp = server
        .http
        .post(server.url(&format!("/v1/weights/stage?{query}")))
        .header("x-weights-sha256", digest)
        .body(body)
        .send()
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn staged(server: &Server) -> Value {
    let (code, body) = server.get("/v1/weights/staged");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["staged"].clone()
}

fn version(server: &Server) -> String {
    let (_, body) = server.get("/get_weight_version");
    serde_json::from_str::<Value>(&body).unwrap()["weight_version"]
        .as_str()
        .unwrap()
        .to_string()
}

fn message(reply: &Value) -> String {
    reply["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn forward_to(servers: &[&Server]) -> String {
    servers
        .iter()
        .map(|s| s.base.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn a_chained_stage_lands_on_every_replica_and_serves_only_after_each_commit() {
    let (x, y) = (model(301), model(302));
    let replicas = [keyed(x.path()), keyed(x.path()), keyed(x.path())];
    let fresh_y = keyed(y.path());
    let baseline = fingerprint(&replicas[0]);
    let target = fingerprint(&fresh_y);
    assert_ne!(baseline, target, "the test needs two different models");

    let query = format!(
        "version=y&forward_to={}",
        forward_to(&[&replicas[1], &replicas[2]])
    );
    let (code, reply) = stage(&replicas[0], weights_file(y.path()), &query, None);
    assert_eq!(code, 200, "{reply}");
    let chain = reply["chain"].as_array().expect("the chain's stages");
    assert_eq!(chain.len(), 2, "{reply}");
    let mut ids = vec![reply["id"].as_str().unwrap().to_string()];
    for (hop, server) in chain.iter().zip(&replicas[1..]) {
        assert_eq!(hop["url"], server.base.as_str(), "{reply}");
        assert_eq!(hop["version"], "y");
        ids.push(hop["id"].as_str().unwrap().to_string());
    }
    // Staged everywhere, serving nowhere.
    for (server, id) in replicas.iter().zip(&ids) {
        assert_eq!(staged(server)["id"], id.as_str());
        assert_eq!(staged(server)["version"], "y");
        assert_eq!(version(server), "0");
        assert_eq!(fingerprint(server), baseline);
    }
    for (server, id) in replicas.iter().zip(&ids) {
        let (code, done) = server.post_bytes(&format!("/v1/weights/commit?id={id}"), Vec::new());
        assert_eq!(code, 200, "{done}");
        assert_eq!(done["weight_version"], "y");
    }
    for server in &replicas {
        assert_eq!(fingerprint(server), target);
        assert_eq!(staged(server), Value::Null);
    }
}

#[test]
fn a_refusal_at_the_end_of_the_chain_stages_nothing_anywhere() {
    let (x, y) = (model(303), model(304));
    let replicas = [keyed(x.path()), keyed(x.path()), keyed(x.path())];
    // The last replica already holds a stage: it refuses (409).
    let (code, held) = stage(&replicas[2], weights_file(y.path()), "version=other", None);
    assert_eq!(code, 200, "{held}");
    let query = format!(
        "version=y&forward_to={}",
        forward_to(&[&replicas[1], &replicas[2]])
    );
    let (code, reply) = stage(&replicas[0], weights_file(y.path()), &query, None);
    assert_eq!(code, 502, "{reply}");
    let text = message(&reply);
    // The error goes back up the chain, naming each hop down to the one that refused.
    assert!(text.contains(&replicas[1].base), "{text}");
    assert!(text.contains(&replicas[2].base), "{text}");
    assert!(text.contains("409"), "{text}");
    assert_eq!(staged(&replicas[0]), Value::Null);
    assert_eq!(staged(&replicas[1]), Value::Null);
    assert_eq!(staged(&replicas[2])["version"], "other");
    for server in &replicas {
        assert_eq!(version(server), "0");
    }
}

#[test]
fn a_wrong_checksum_is_refused_by_the_first_replica_and_stages_nothing() {
    let (x, y) = (model(305), model(306));
    let replicas = [keyed(x.path()), keyed(x.path())];
    let query = format!("version=y&forward_to={}", forward_to(&[&replicas[1]]));
    let wrong = "0".repeat(64);
    let (code, reply) = stage(&replicas[0], weights_file(y.path()), &query, Some(&wrong));
    assert_eq!(code, 400, "{reply}");
    assert!(message(&reply).contains("checksum mismatch"), "{reply}");
    // Give the cut-off next hop a moment to notice.
    std::thread::sleep(std::time::Duration::from_millis(300));
    for server in &replicas {
        assert_eq!(staged(server), Value::Null);
        assert_eq!(version(server), "0");
    }
}

#[test]
fn forward_to_needs_an_admin_key_and_base_urls() {
    let (x, y) = (model(307), model(308));
    let open = Server::start(x.path(), &[]);
    let other = Server::start(x.path(), &[]);
    let query = format!("forward_to={}", other.base);
    let (code, reply) = stage(&open, weights_file(y.path()), &query, None);
    assert_eq!(code, 403, "{reply}");
    assert_eq!(reply["error"]["param"], "forward_to", "{reply}");
    assert_eq!(staged(&open), Value::Null);
    assert_eq!(staged(&other), Value::Null);

    let keyed = keyed(x.path());
    for bad in [
        "file:///etc/passwd",
        "http://127.0.0.1:1/v1/weights",
        "http://user:pw@127.0.0.1:1",
        "not a url",
    ] {
        let query = format!("forward_to={}", urlencode(bad));
        let (code, reply) = stage(&keyed, weights_file(y.path()), &query, None);
        assert_eq!(code, 400, "{bad}: {reply}");
        assert_eq!(reply["error"]["param"], "forward_to", "{reply}");
    }
    let too_many = vec![other.base.as_str(); 33].join(",");
    let (code, reply) = stage(
        &keyed,
        weights_file(y.path()),
        &format!("forward_to={too_many}"),
        None,
    );
    assert_eq!(code, 400, "{reply}");
    assert!(message(&reply).contains("limit of 32"), "{reply}");
    assert_eq!(staged(&keyed), Value::Null);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
