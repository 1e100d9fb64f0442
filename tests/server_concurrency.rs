//! Many concurrent streaming clients, half of whom hang up early: the others
//! all finish, and the engine drops the abandoned sequences.

mod common;

use common::server::Server;
use serde_json::json;
use std::io::Read;
use std::time::{Duration, Instant};

fn running(server: &Server) -> u64 {
    let (_, text) = server.get("/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix("gym_serve_num_requests_running "))
        .expect("running gauge in /metrics")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn sixty_four_streams_half_disconnecting() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        81,
    ));
    let server = std::sync::Arc::new(Server::start(dir.path(), &[]));
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let server = server.clone();
            std::thread::spawn(move || {
                let body = json!({
                    "messages": [{"role": "user", "content": format!("Request number {i}")}],
                    "max_tokens": 400, "ignore_eos": true, "stream": true, "seed": i,
                });
                let mut resp = server
                    .http
                    .post(server.url("/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 200);
                if i % 2 == 1 {
                    let mut first = [0u8; 64];
                    resp.read_exact(&mut first).unwrap();
                    return None; // hang up mid-stream
                }
                let text = resp.text().unwrap();
                assert!(text.trim_end().ends_with("data: [DONE]"));
                let finished = text.matches("\"finish_reason\":\"length\"").count();
                Some(finished)
            })
        })
        .collect();
    let results: Vec<Option<usize>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let completed = results.iter().flatten().filter(|&&f| f == 1).count();
    assert_eq!(
        completed, 32,
        "every client that stayed got a whole response"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while running(&server) != 0 {
        assert!(
            Instant::now() < deadline,
            "abandoned sequences still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, metrics) = server.get("/metrics");
    let generated: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gym_serve_generation_tokens_total "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        generated < 64 * 400,
        "abandoned requests stopped generating early ({generated} tokens)"
    );
}
