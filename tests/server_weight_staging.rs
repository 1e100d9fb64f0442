//! Two-phase weight updates against the real binary: a staged update
//! changes nothing until its commit, an abort or an expiry drops it, only
//! one may be staged, a commit needs one, and a corrupt staged body stages
//! nothing. Also the replica's identity in `/get_weight_version` and
//! `/metrics`.

mod common;

use common::probe::{fingerprint, metric, truth_is};
use common::server::Server;
use gym_serve::config::Architecture;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use tempfile::TempDir;

fn model(seed: u64) -> TempDir {
    common::write_model(&common::tiny_options(Architecture::Qwen3, seed))
}

fn weights_file(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn stage(server: &Server, body: Vec<u8>, query: &str) -> (u16, Value) {
    server.post_bytes(&format!("/v1/weights/stage?{query}"), body)
}

fn commit(server: &Server, query: &str) -> (u16, Value) {
    server.post_bytes(&format!("/v1/weights/commit?{query}"), Vec::new())
}

fn abort(server: &Server, query: &str) -> (u16, Value) {
    server.post_bytes(&format!("/v1/weights/abort?{query}"), Vec::new())
}

fn status(server: &Server) -> Value {
    let (code, body) = server.get("/v1/weights/staged");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn message(reply: &Value) -> String {
    reply["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn stage_then_commit_serves_the_new_weights_only_at_the_commit() {
    let (x, y) = (model(201), model(202));
    let a = Server::start(x.path(), &[]);
    let fresh_y = Server::start(y.path(), &[]);
    let baseline = fingerprint(&a);
    assert_ne!(
        baseline,
        fingerprint(&fresh_y),
        "the test needs two different models"
    );

    let (code, staged) = stage(&a, weights_file(y.path()), "version=y");
    assert_eq!(code, 200, "{staged}");
    let id = staged["id"].as_str().unwrap().to_string();
    assert_eq!(staged["version"], "y");
    assert_eq!(
        staged["weight_version"], "0",
        "the version is published at the commit"
    );
    assert!(staged["tensors"].as_u64().unwrap() > 0, "{staged}");
    // Staged, not serving: same output, same version, nothing counted yet.
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "0", 0, 0);
    let shown = status(&a);
    assert_eq!(shown["staged"]["id"], id.as_str(), "{shown}");
    assert_eq!(shown["staged"]["version"], "y");
    assert!(shown["staged"]["expires_in_seconds"].as_f64().unwrap() > 0.0);
    assert!(metric(&a, "gym_serve_staged_weight_update_bytes") > 0.0);

    // A commit naming another update is refused and changes nothing.
    let (code, reply) = commit(&a, "id=stage-999");
    assert_eq!(code, 409, "{reply}");
    assert!(message(&reply).contains(&id), "{reply}");
    assert_eq!(fingerprint(&a), baseline);

    let (code, done) = commit(&a, &format!("id={id}&pause=wait"));
    assert_eq!(code, 200, "{done}");
    assert_eq!(done["weight_version"], "y");
    assert_eq!(done["stage_id"], id.as_str());
    assert_eq!(fingerprint(&a), fingerprint(&fresh_y));
    // The one refused commit counts as a failed update.
    truth_is(&a, "y", 1, 1);
    assert_eq!(status(&a)["staged"], Value::Null);
    assert_eq!(metric(&a, "gym_serve_staged_weight_update_bytes"), 0.0);
    // Committed once: a second commit has nothing to commit.
    let (code, reply) = commit(&a, "");
    assert_eq!(code, 409, "{reply}");
    assert!(
        message(&reply).contains("no staged weight update"),
        "{reply}"
    );
}

#[test]
fn abort_drops_the_staged_update_and_changes_nothing() {
    let (x, y) = (model(203), model(204));
    let a = Server::start(x.path(), &[]);
    let baseline = fingerprint(&a);
    let (code, staged) = stage(&a, weights_file(y.path()), "");
    assert_eq!(code, 200, "{staged}");
    // Without a version it will serve as the next one.
    assert_eq!(staged["version"], "1");
    let id = staged["id"].as_str().unwrap().to_string();
    let (code, reply) = abort(&a, &format!("id={id}"));
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["aborted"]["id"], id.as_str(), "{reply}");
    assert_eq!(reply["weight_version"], "0");
    assert_eq!(status(&a)["staged"], Value::Null);
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "0", 0, 0);
    assert_eq!(
        metric(&a, "gym_serve_staged_weight_update_aborts_total"),
        1.0
    );
    // Aborting again is harmless (a coordinator aborts everywhere).
    let (code, reply) = abort(&a, "");
    assert_eq!(code, 200, "{reply}");
    assert_eq!(reply["aborted"], Value::Null);
    // And there is nothing left to commit.
    let (code, reply) = commit(&a, "");
    assert_eq!(code, 409, "{reply}");
    assert_eq!(fingerprint(&a), baseline);
}

#[test]
fn one_staged_update_at_a_time() {
    let (x, y, z) = (model(205), model(206), model(207));
    let a = Server::start(x.path(), &[]);
    let fresh_y = Server::start(y.path(), &[]);
    let baseline = fingerprint(&a);
    let (code, first) = stage(&a, weights_file(y.path()), "version=first");
    assert_eq!(code, 200, "{first}");
    let id = first["id"].as_str().unwrap();
    // A second stage, and a direct push (which would change the weights the
    // staged one was built on), get 409 naming the one in progress.
    for (what, (code, reply)) in [
        ("stage", stage(&a, weights_file(z.path()), "version=second")),
        (
            "push",
            a.post_bytes("/v1/weights?version=direct", weights_file(z.path())),
        ),
    ] {
        assert_eq!(code, 409, "{what}: {reply}");
        let text = message(&reply);
        assert!(
            text.contains(id) && text.contains("first"),
            "{what}: {text}"
        );
        assert_eq!(reply["error"]["type"], "ConflictError");
    }
    assert_eq!(fingerprint(&a), baseline);
    // The first is still the one staged, and commits as itself.
    assert_eq!(status(&a)["staged"]["version"], "first");
    let (code, done) = commit(&a, "");
    assert_eq!(code, 200, "{done}");
    assert_eq!(done["weight_version"], "first");
    assert_eq!(fingerprint(&a), fingerprint(&fresh_y));
    truth_is(&a, "first", 1, 2);
}

#[test]
fn a_staged_update_expires_and_its_commit_is_refused() {
    let (x, y) = (model(208), model(209));
    let a = Server::start(x.path(), &["--staged-update-timeout", "1"]);
    let baseline = fingerprint(&a);
    let (code, staged) = stage(&a, weights_file(y.path()), "version=late");
    assert_eq!(code, 200, "{staged}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&a)["staged"] != Value::Null {
        assert!(Instant::now() < deadline, "the staged update never expired");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metric(&a, "gym_serve_staged_weight_update_expiries_total"),
        1.0
    );
    assert_eq!(metric(&a, "gym_serve_staged_weight_update_bytes"), 0.0);
    let (code, reply) = commit(&a, "");
    assert_eq!(code, 409, "{reply}");
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "0", 0, 1);
    // The slot is free again.
    let (code, reply) = stage(&a, weights_file(y.path()), "version=again");
    assert_eq!(code, 200, "{reply}");
}

#[test]
fn commit_without_a_stage_is_a_clear_conflict() {
    let x = model(210);
    let a = Server::start(x.path(), &[]);
    let baseline = fingerprint(&a);
    let (code, reply) = commit(&a, "");
    assert_eq!(code, 409, "{reply}");
    assert!(
        message(&reply).contains("no staged weight update to commit"),
        "{reply}"
    );
    let (code, reply) = commit(&a, "pause=never");
    assert_eq!(code, 400, "{reply}");
    assert_eq!(reply["error"]["param"], "pause");
    assert_eq!(fingerprint(&a), baseline);
    assert_eq!(status(&a)["staged"], Value::Null);
}

#[test]
fn a_corrupt_staged_body_stages_nothing() {
    let (x, y) = (model(211), model(212));
    let a = Server::start(x.path(), &[]);
    let baseline = fingerprint(&a);
    let good = weights_file(y.path());
    let truncated = good[..good.len() / 2].to_vec();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    let checksum = common::sha256_hex(&good);
    let (code, reply) = stage(&a, truncated, "version=bad");
    assert_eq!(code, 400, "{reply}");
    assert!(message(&reply).contains("safetensors"), "{reply}");
    // The right length, one byte off: only the checksum can tell.
    let resp = a
        .http
        .post(a.url("/v1/weights/stage?version=bad"))
        .header("x-weights-sha256", &checksum)
        .body(flipped)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let reply: Value = resp.json().unwrap();
    assert!(message(&reply).contains("checksum mismatch"), "{reply}");
    assert_eq!(status(&a)["staged"], Value::Null);
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "0", 0, 2);
    // Nothing was left holding the slot.
    let resp = a
        .http
        .post(a.url("/v1/weights/stage?version=good"))
        .header("x-weights-sha256", &checksum)
        .body(good)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (code, done) = commit(&a, "");
    assert_eq!(code, 200, "{done}");
    assert_eq!(done["weight_version"], "good");
}

#[test]
fn the_replica_says_who_it_is() {
    let x = model(213);
    let named = Server::start(x.path(), &["--replica-id", "rollout-7"]);
    let (_, body) = named.get("/get_weight_version");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["replica_id"], "rollout-7", "{v}");
    let (_, metrics) = named.get("/metrics");
    assert!(
        metrics.contains("gym_serve_replica_info{replica_id=\"rollout-7\"} 1"),
        "{metrics}"
    );
    // By default, the address it serves on.
    let plain = Server::start(x.path(), &[]);
    let (_, body) = plain.get("/get_weight_version");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["replica_id"],
        plain.base.trim_start_matches("http://"),
        "{v}"
    );
}
