//! Hostile and unlucky weight updates against the real binary: malformed
//! safetensors framing, over-long and stalled uploads, a client that leaves
//! mid-update, checkpoint directories holding FIFOs, devices and sparse
//! files, NaN/Inf weights, and an empty partial push. Each test ends with the
//! server healthy within a bound, serving bit-identical weights unless a push
//! succeeded, and its version and metrics telling the truth.

mod common;

use candle_core::{DType, Device, Tensor};
use common::probe::{fingerprint, healthy_within, rss_mib, truth_is, Raw};
use common::server::Server;
use gym_serve::config::Architecture;
use gym_serve::weights::checkpoint::{read_checkpoint, write_checkpoint};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// A refusal that used to hang or take memory must come well within this
/// (the machine running the tests may be busy; typical is milliseconds).
const PROMPTLY: Duration = Duration::from_secs(5);
const HEALTHY: Duration = Duration::from_secs(5);

fn model(seed: u64) -> TempDir {
    common::write_model(&common::tiny_options(Architecture::Qwen3, seed))
}

fn weights_file(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

fn tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v: Vec<_> = read_checkpoint(dir, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    v.sort_by(|p, q| p.0.cmp(&q.0));
    v
}

fn serialize(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize(views, None).unwrap()
}

fn push(server: &Server, body: Vec<u8>, query: &str) -> (u16, Value, f64) {
    let started = Instant::now();
    let (status, resp) = server.post_bytes(&format!("/v1/weights?{query}"), body);
    (status, resp, started.elapsed().as_secs_f64())
}

fn message(reply: &Value) -> &str {
    reply["error"]["message"]
        .as_str()
        .or_else(|| reply["message"].as_str())
        .unwrap_or_default()
}

/// A safetensors body: an 8-byte length prefix, then `rest`.
fn framed(length: u64, rest: &[u8]) -> Vec<u8> {
    let mut body = length.to_le_bytes().to_vec();
    body.extend_from_slice(rest);
    body
}

#[test]
fn malformed_header_lengths_are_refused_at_once_and_release_the_lock() {
    let (x, y) = (model(101), model(102));
    let mut a = Server::start(x.path(), &[]);
    let fresh_y = Server::start(y.path(), &[]);
    let baseline = fingerprint(&a);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (framed(0, b"{}"), "header length is 0"),
        (framed(0, b""), "header length is 0"),
        (framed(1, b"{}"), "header length is 1"),
        (framed(u64::MAX, b"{}"), "over the 100000000-byte limit"),
        (framed(100_000_001, b"{}"), "over the 100000000-byte limit"),
        (framed(4, b"nope"), "not a JSON object"),
        (framed(4, b"[12]"), "not a JSON object"),
        (framed(50_000_000, b"{}"), "ends inside its JSON header"),
        (vec![0, 0, 0], "ends inside its 8-byte header length"),
    ];
    let mut slowest = 0f64;
    for (body, needle) in &cases {
        let (status, reply, seconds) = push(&a, body.clone(), "");
        assert_eq!(status, 400, "{needle}: {reply}");
        assert!(
            message(&reply).contains(needle),
            "{reply} should say {needle:?}"
        );
        assert!(seconds < PROMPTLY.as_secs_f64(), "{needle}: {seconds} s");
        slowest = slowest.max(seconds);
    }
    eprintln!("slowest refusal of a malformed header: {slowest:.4} s");
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "0", 0, cases.len() as u64);
    // The lock was let go: a good push goes through, and serves like Y.
    let (status, reply, _) = push(&a, weights_file(y.path()), "version=y");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(fingerprint(&a), fingerprint(&fresh_y));
    truth_is(&a, "y", 1, cases.len() as u64);
    healthy_within(&a, HEALTHY);
    // And the header that used to spin forever no longer keeps SIGTERM waiting.
    let (status, _, _) = push(&a, framed(0, b"{}"), "");
    assert_eq!(status, 400);
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &a.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.try_wait().is_none() {
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn oversized_and_stalled_uploads_release_the_weights_lock() {
    let (x, y) = (model(103), model(104));
    let a = Server::start(
        x.path(),
        &[
            "--max-weights-bytes",
            "2000000",
            "--weights-body-idle-timeout",
            "1",
        ],
    );
    let fresh_y = Server::start(y.path(), &[]);
    let baseline = fingerprint(&a);

    // A declared length over the limit is answered before the body is read.
    let raw = Raw::send(
        &a,
        "POST /v1/weights HTTP/1.1\r\nContent-Length: 2000000000",
        &[0u8; 1000],
    );
    let (status, body, seconds) = raw.answer(PROMPTLY);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("--max-weights-bytes"), "{body}");
    eprintln!("413 for a 2 GB Content-Length after {seconds:.4} s");

    // A stalled upload holds the lock only until the idle timeout cuts it;
    // a push queued behind it then goes through.
    let good = weights_file(y.path());
    let stalled = Raw::send(
        &a,
        &format!(
            "POST /v1/weights HTTP/1.1\r\nContent-Length: {}",
            good.len()
        ),
        &good[..good.len() / 2],
    );
    std::thread::sleep(Duration::from_millis(200));
    let queued = {
        let (base, body) = (a.base.clone(), good.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let resp = reqwest::blocking::Client::new()
                .post(format!("{base}/v1/weights?version=y"))
                .body(body)
                .send()
                .unwrap();
            (resp.status().as_u16(), started.elapsed().as_secs_f64())
        })
    };
    let (status, body, seconds) = stalled.answer(PROMPTLY);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("--weights-body-idle-timeout"), "{body}");
    assert!(seconds >= 0.9, "cut after {seconds} s, before the timeout");
    let (status, waited) = queued.join().unwrap();
    assert_eq!(status, 200);
    eprintln!("stalled upload cut after {seconds:.3} s; the push behind it took {waited:.3} s");
    assert_ne!(fingerprint(&a), baseline);
    assert_eq!(fingerprint(&a), fingerprint(&fresh_y));
    truth_is(&a, "y", 1, 2);
    healthy_within(&a, HEALTHY);
}

/// The disconnect test of issue 14: a full push waiting (`pause=wait`) for
/// a long stream is abandoned by its client; it must still land whole and
/// be recorded, so a later partial push builds on it, not on stale weights.
/// The stream is the test's own connection and ends when the test drops it
/// (the server cancels a request whose client left), so the order of events
/// does not depend on how fast this machine decodes.
#[test]
fn disconnected_push_is_committed_whole_and_recorded() {
    let (x, y, z) = (model(105), model(106), model(107));
    let a = Server::start(x.path(), &[]);
    // Longer than the test could ever wait for: it is ended by disconnecting.
    let request = json!({"prompt": [1, 2, 3], "max_tokens": 4000, "ignore_eos": true, "seed": 1, "stream": true}).to_string();
    let mut stream = Raw::send(
        &a,
        &format!(
            "POST /v1/completions HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
            request.len()
        ),
        request.as_bytes(),
    );
    let mut received = Vec::new();
    stream.read_until(b"data: ", &mut received, PROMPTLY);
    let full = weights_file(y.path());
    let raw = Raw::send(
        &a,
        &format!(
            "POST /v1/weights?pause=wait&version=dropped HTTP/1.1\r\nContent-Length: {}",
            full.len()
        ),
        &full,
    );
    std::thread::sleep(Duration::from_millis(500));
    // The push waits for the stream, which is still going.
    truth_is(&a, "0", 0, 0);
    drop(raw);
    std::thread::sleep(Duration::from_millis(300));
    // Its client left, and it still waits: it was neither dropped nor applied early.
    truth_is(&a, "0", 0, 0);
    let mut later = Vec::new();
    stream.read_until(b"\n\n", &mut later, PROMPTLY);
    received.extend(later);
    let text = String::from_utf8_lossy(&received).to_string();
    assert!(!text.contains("[DONE]"), "the stream ended early: {text}");
    assert!(!text.contains("\"dropped\""), "{text}");
    drop(stream);
    // The dropped push lands once the stream is done.
    let deadline = Instant::now() + Duration::from_secs(20);
    while common::probe::truth(&a).version != "dropped" {
        assert!(Instant::now() < deadline, "the dropped push never landed");
        std::thread::sleep(Duration::from_millis(50));
    }
    truth_is(&a, "dropped", 1, 0);

    let replaced = "model.layers.1.mlp.down_proj.weight";
    let z_tensor: Vec<(String, Tensor)> = tensors(z.path())
        .into_iter()
        .filter(|(n, _)| n == replaced)
        .collect();
    let (status, reply, _) = push(&a, serialize(&z_tensor), "mode=partial&version=p");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["tensors"], 1);
    // What a fresh server serves with Y, then Z's one tensor.
    let mut mixed: HashMap<String, Tensor> = tensors(y.path()).into_iter().collect();
    mixed.extend(z_tensor);
    let mut list: Vec<(String, Tensor)> = mixed.into_iter().collect();
    list.sort_by(|p, q| p.0.cmp(&q.0));
    let reference_dir = model(105);
    write_checkpoint(reference_dir.path(), &list, 1).unwrap();
    let reference = Server::start(reference_dir.path(), &[]);
    assert_eq!(fingerprint(&a), fingerprint(&reference));
    truth_is(&a, "p", 2, 0);
    healthy_within(&a, HEALTHY);
}

/// A checkpoint dir whose `model.safetensors` is made by `make`.
fn dir_with(make: impl FnOnce(&Path)) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    make(&dir.path().join("model.safetensors"));
    dir
}

fn disk_update(server: &Server, body: Vec<u8>) -> (u16, Value, f64) {
    let started = Instant::now();
    let resp = server
        .http
        .post(server.url("/update_weights_from_disk"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    (
        status,
        resp.json().unwrap_or(Value::Null),
        started.elapsed().as_secs_f64(),
    )
}

#[test]
fn disk_updates_read_only_bounded_regular_files() {
    let (x, y) = (model(108), model(109));
    let a = Server::start(x.path(), &[]);
    let fresh_y = Server::start(y.path(), &[]);
    let baseline = fingerprint(&a);
    let rss_before = rss_mib(&a);
    let fifo = dir_with(|p| {
        let made = std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .unwrap();
        assert!(made.success());
    });
    let zero = dir_with(|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap());
    let sparse = dir_with(|p| {
        std::fs::File::create(p)
            .unwrap()
            .set_len(20_000_000_000)
            .unwrap()
    });
    let directory = dir_with(|p| std::fs::create_dir(p).unwrap());
    let longer = dir_with(|p| {
        let mut bytes = weights_file(y.path());
        bytes.extend_from_slice(&[0u8; 4096]);
        std::fs::write(p, bytes).unwrap();
    });
    let index_fifo = tempfile::tempdir().unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(index_fifo.path().join("model.safetensors.index.json"))
        .status()
        .unwrap();
    assert!(made.success());
    let long_path = format!("/{}", "x".repeat(20_000));
    let cases: Vec<(&Path, &str)> = vec![
        (fifo.path(), "is a FIFO, not a regular file"),
        (zero.path(), "is a device, not a regular file"),
        (
            sparse.path(),
            "20000000000 bytes; a checkpoint of this model takes at most",
        ),
        (directory.path(), "is a directory, not a regular file"),
        (longer.path(), "but its header describes"),
        (index_fifo.path(), "is a FIFO, not a regular file"),
        (Path::new(&long_path), "bytes)"),
    ];
    let mut slowest = 0f64;
    for (dir, needle) in &cases {
        let body = serde_json::to_vec(&json!({"model_path": dir})).unwrap();
        let (status, reply, seconds) = disk_update(&a, body);
        assert_eq!(status, 400, "{needle}: {reply}");
        assert_eq!(reply["success"], false);
        let msg = message(&reply);
        assert!(msg.contains(needle), "{msg:?} should say {needle:?}");
        assert!(msg.len() < 1024, "{} bytes of message", msg.len());
        assert!(seconds < PROMPTLY.as_secs_f64(), "{needle}: {seconds} s");
        slowest = slowest.max(seconds);
    }
    // A 256 MB body is refused from its declared length, unread.
    let raw = Raw::send(
        &a,
        "POST /update_weights_from_disk HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 268435456",
        b"{\"model_path\": \"/",
    );
    let (status, body, seconds) = raw.answer(PROMPTLY);
    assert_eq!(status, 413, "{body}");
    assert!(body.len() < 1024);
    slowest = slowest.max(seconds);
    let rss_after = rss_mib(&a);
    eprintln!(
        "slowest disk refusal {slowest:.4} s; RSS {rss_before:.1} MiB before, {rss_after:.1} MiB after"
    );
    assert!(
        rss_after < rss_before + 64.0,
        "RSS grew from {rss_before} to {rss_after} MiB"
    );
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "0", 0, cases.len() as u64 + 1);

    // A symlink to a regular file is followed: it is the file that counts.
    let linked =
        dir_with(|p| std::os::unix::fs::symlink(y.path().join("model.safetensors"), p).unwrap());
    let body =
        serde_json::to_vec(&json!({"model_path": linked.path(), "weight_version": "y"})).unwrap();
    let (status, reply, _) = disk_update(&a, body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(fingerprint(&a), fingerprint(&fresh_y));
    truth_is(&a, "y", 1, cases.len() as u64 + 1);
    // Shards are read the same way, and together must be the whole model.
    let mut opts = common::tiny_options(Architecture::Qwen3, 108);
    opts.shards = 3;
    let sharded_x = common::write_model(&opts);
    let body = serde_json::to_vec(&json!({"model_path": sharded_x.path()})).unwrap();
    let (status, reply, _) = disk_update(&a, body);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "y+1", 2, cases.len() as u64 + 1);
    healthy_within(&a, HEALTHY);
}

/// Y's tensors with one value of `name` set to `bad`, as `dtype`.
fn poisoned(y: &[(String, Tensor)], name: &str, bad: f64, dtype: DType) -> Vec<(String, Tensor)> {
    y.iter()
        .filter(|(n, _)| n == name)
        .map(|(n, t)| {
            let mut values: Vec<f64> = t
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let at = values.len() / 2 + 1;
            values[at] = bad;
            let t = Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap();
            (n.clone(), t.to_dtype(dtype).unwrap())
        })
        .collect()
}

#[test]
fn non_finite_weights_are_refused_by_tensor_name() {
    let (x, y) = (model(110), model(111));
    let a = Server::start(x.path(), &[]);
    let baseline = fingerprint(&a);
    let y_tensors = tensors(y.path());
    let full_with = |name: &str, bad: f64, dtype: DType| {
        let mut all: Vec<_> = y_tensors
            .iter()
            .filter(|(n, _)| n != name)
            .cloned()
            .collect();
        all.extend(poisoned(&y_tensors, name, bad, dtype));
        serialize(&all)
    };
    let up = "model.layers.0.mlp.up_proj.weight";
    let norm = "model.norm.weight";
    let embed = "model.embed_tokens.weight";
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        // Converted as it arrives (f32, bf16, f16 into an f32 engine).
        (full_with(up, f64::NAN, DType::F32), "", up),
        (
            serialize(&poisoned(&y_tensors, norm, f64::INFINITY, DType::BF16)),
            "mode=partial",
            norm,
        ),
        (
            serialize(&poisoned(&y_tensors, embed, f64::NEG_INFINITY, DType::F16)),
            "mode=partial",
            embed,
        ),
        // Buffered and converted whole (f64), including a finite f64 that
        // overflows f32.
        (
            serialize(&poisoned(&y_tensors, up, f64::NAN, DType::F64)),
            "mode=partial",
            up,
        ),
        (
            serialize(&poisoned(&y_tensors, norm, 1e300, DType::F64)),
            "mode=partial",
            norm,
        ),
    ];
    for (body, query, name) in &cases {
        let (status, reply, _) = push(&a, body.clone(), query);
        assert_eq!(status, 400, "{name}: {reply}");
        let msg = message(&reply);
        assert!(
            msg.contains(&format!("tensor {name} has NaN or infinite values")),
            "{msg}"
        );
        assert_eq!(fingerprint(&a), baseline, "{name}");
    }
    // From disk too.
    let bad_dir = model(111);
    let mut all: Vec<_> = y_tensors.iter().filter(|(n, _)| n != up).cloned().collect();
    all.extend(poisoned(&y_tensors, up, f64::NAN, DType::F32));
    write_checkpoint(bad_dir.path(), &all, 1).unwrap();
    let body = serde_json::to_vec(&json!({"model_path": bad_dir.path()})).unwrap();
    let (status, reply, _) = disk_update(&a, body);
    assert_eq!(status, 400, "{reply}");
    assert!(message(&reply).contains(up), "{reply}");
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "0", 0, cases.len() as u64 + 1);
    healthy_within(&a, HEALTHY);
    // And such a checkpoint does not start a server.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .args(["--port", "0", "--model"])
        .arg(bad_dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(up));
}

#[test]
fn an_empty_partial_push_changes_nothing() {
    let x = model(112);
    let a = Server::start(x.path(), &[]);
    let baseline = fingerprint(&a);
    for query in ["mode=partial", "mode=partial&version=7"] {
        let (status, reply, _) = push(&a, serialize(&[]), query);
        assert_eq!(status, 400, "{reply}");
        assert!(message(&reply).contains("no tensors"), "{reply}");
    }
    assert_eq!(fingerprint(&a), baseline);
    truth_is(&a, "0", 0, 2);
    healthy_within(&a, HEALTHY);
}
