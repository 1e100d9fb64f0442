//! A bounded soak (under a minute in a debug build on two cores): rounds of
//! valid load, clients that disconnect mid-stream, bad requests, refused
//! weight pushes, slow clients, and pauses. Between rounds, once the engine
//! is idle, nothing may have grown: RSS, KV blocks in use, open connections.

mod common;

use common::probe::{connect, metric, rss_mib, wait_idle};
use common::server::Server;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const ROUNDS: usize = 16;
/// RSS may settle during the first rounds (allocator arenas, caches); from
/// the second round on it must stay within this of that round's.
const RSS_SLACK_MIB: f64 = 8.0;

fn round(server: &Server, r: usize) {
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": format!("round {r}")}], "max_tokens": 24, "seed": r});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    std::thread::scope(|s| {
        // Valid load: buffered and streamed, with log-probs and groups.
        for i in 0..4 {
            s.spawn(move || {
                let v = server.ok(
                    "/v1/chat/completions",
                    &chat(json!({"n": 4, "logprobs": true, "top_logprobs": 5, "seed": i})),
                );
                assert_eq!(v["choices"].as_array().unwrap().len(), 4);
                let chunks = server.stream(
                    "/v1/completions",
                    &json!({"prompt": "hello", "max_tokens": 16, "stream": true, "logprobs": 2}),
                );
                assert!(!chunks.is_empty());
            });
        }
        // Clients that leave mid-stream.
        for _ in 0..3 {
            s.spawn(|| {
                let mut c = connect(&server.base);
                let body = r#"{"prompt": "bye", "max_tokens": 2000, "ignore_eos": true, "stream": true}"#;
                write!(
                    c,
                    "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let mut buf = [0u8; 2048];
                let _ = c.read(&mut buf);
                std::thread::sleep(Duration::from_millis(150));
                drop(c);
            });
        }
        // Bad requests, slow clients and a refused push.
        s.spawn(|| {
            assert_eq!(server.post("/v1/chat/completions", &json!({"messages": "x"})).0, 400);
            let prompts = vec![vec![1u32]; 64];
            let too_many = json!({"prompt": prompts, "max_tokens": 1});
            assert_eq!(server.post("/v1/completions", &too_many).0, 400);
            let stops = vec!["s"; 99];
            assert_eq!(server.post("/v1/chat/completions", &chat(json!({"stop": stops}))).0, 400);
            let resp = server
                .http
                .post(server.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body("{\"messages\": [")
                .send()
                .unwrap();
            assert_eq!(resp.status().as_u16(), 400);
            let resp = server
                .http
                .post(server.url("/v1/weights?mode=partial"))
                .body(vec![7u8; 4096])
                .send()
                .unwrap();
            assert!(resp.status().is_client_error(), "{}", resp.status());
            let mut slow = connect(&server.base);
            slow.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
            let mut stalled = connect(&server.base);
            stalled
                .write_all(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{")
                .unwrap();
            std::thread::sleep(Duration::from_millis(1500));
        });
        // A pause in the middle of it all.
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(server.post("/pause?mode=keep", &json!({})).0, 200);
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(server.post("/resume", &json!({})).0, 200);
        });
    });
}

#[test]
fn soak_leaves_no_growth_between_rounds() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        143,
    ));
    let server = Server::start(
        dir.path(),
        &[
            // A small KV pool is fully touched within the first rounds, so
            // cached prefixes do not read as growth.
            "--kv-cache-tokens",
            "8192",
            "--header-read-timeout",
            "1",
            "--body-idle-timeout",
            "1",
            "--max-prompts",
            "32",
            "--max-stop-strings",
            "64",
        ],
    );
    let started = Instant::now();
    let mut figures = Vec::new();
    for r in 0..ROUNDS {
        round(&server, r);
        wait_idle(&server, Duration::from_secs(30));
        // Slow and stalled clients are cut by their timeouts (1 s).
        std::thread::sleep(Duration::from_millis(1200));
        let blocks = metric(&server, "gym_serve_kv_blocks_used");
        let open = metric(&server, "gym_serve_open_connections");
        let reserved = metric(&server, "gym_serve_request_memory_reserved_bytes");
        let rss = rss_mib(&server);
        eprintln!(
            "round {r}: RSS {rss:.1} MiB, KV blocks used {blocks}, open connections {open}, reserved {reserved}, {:.0} s",
            started.elapsed().as_secs_f64()
        );
        assert_eq!(blocks, 0.0, "round {r}: KV blocks left in use");
        assert_eq!(reserved, 0.0, "round {r}: memory left reserved");
        // The scrape's own connection and the test client's pooled ones.
        assert!(open <= 8.0, "round {r}: {open} connections open");
        figures.push(rss);
    }
    let settled = figures[1];
    let last = *figures.last().unwrap();
    assert!(
        last <= settled + RSS_SLACK_MIB,
        "RSS grew from {settled:.1} MiB (round 1) to {last:.1} MiB: {figures:?}"
    );
    // And once the pool is touched through, flat.
    let tail = &figures[ROUNDS - 4..];
    let spread = tail.iter().cloned().fold(f64::MIN, f64::max)
        - tail.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        spread <= 1.5,
        "RSS still moving in the last rounds: {figures:?}"
    );
    assert_eq!(server.get("/health").0, 200);
}
