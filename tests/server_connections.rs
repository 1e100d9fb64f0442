//! Connections that misbehave cannot hold the server: headers and bodies
//! have timeouts, and shutdown finishes within its grace period whatever
//! the clients are doing.

mod common;

use common::probe::{closed_within, connect, metric, read_reply};
use common::server::Server;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

fn model() -> tempfile::TempDir {
    common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        142,
    ))
}

#[test]
fn slow_headers_and_stalled_bodies_are_cut() {
    let dir = model();
    let server = Server::start(
        dir.path(),
        &["--header-read-timeout", "1", "--body-idle-timeout", "1"],
    );
    // Slowloris: 50 connections that never finish their headers, and 10
    // that send nothing at all.
    let mut slow: Vec<_> = (0..60)
        .map(|i| {
            let mut s = connect(&server.base);
            if i < 50 {
                s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(metric(&server, "gym_serve_open_connections") >= 60.0);
    for (i, s) in slow.iter_mut().enumerate() {
        assert!(
            closed_within(s, Duration::from_secs(4)),
            "connection {i} still open"
        );
    }
    // A body that stops halfway gets 408 naming the timeout.
    let started = Instant::now();
    let mut s = connect(&server.base);
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages\": [",
    )
    .unwrap();
    let reply = read_reply(&mut s, Duration::from_secs(5));
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("--body-idle-timeout"), "{reply}");
    assert!(started.elapsed() < Duration::from_secs(4));
    // Only the scraping connection is left, and the server serves.
    std::thread::sleep(Duration::from_millis(200));
    assert!(metric(&server, "gym_serve_open_connections") <= 2.0);
    let v = server.ok(
        "/v1/chat/completions",
        &serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    );
    assert_eq!(
        v["choices"][0]["message"]["generation_token_ids"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

/// SIGTERM with a half-sent header, a stalled upload and a long stream in
/// flight: the process exits within the grace period plus a little, and the
/// stream gets its end.
#[test]
fn shutdown_finishes_within_its_grace_period() {
    let dir = model();
    let mut server = Server::start(
        dir.path(),
        &[
            "--shutdown-grace",
            "1",
            "--header-read-timeout",
            "60",
            "--body-idle-timeout",
            "60",
        ],
    );
    let mut half_header = connect(&server.base);
    half_header
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut stalled = connect(&server.base);
    stalled
        .write_all(b"POST /v1/weights HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc")
        .unwrap();
    let mut stream = connect(&server.base);
    let body = r#"{"prompt": "hello", "max_tokens": 4000, "ignore_eos": true, "stream": true}"#;
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut lines = BufReader::new(stream.try_clone().unwrap());
    let mut first = String::new();
    lines.read_line(&mut first).unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut line = String::new();
        while lines.read_line(&mut line).unwrap_or(0) > 0 {
            rest.push_str(&line);
            line.clear();
        }
        rest
    });
    let exited = loop {
        if let Some(status) = server.try_wait() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "server did not exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exited.success(), "exit status {exited}");
    let rest = reader.join().unwrap();
    assert!(
        rest.contains("\"finish_reason\":\"abort\""),
        "stream got no final chunk"
    );
    assert!(rest.contains("data: [DONE]"), "stream got no [DONE]");
    assert!(closed_within(&mut half_header, Duration::from_secs(1)));
    assert!(closed_within(&mut stalled, Duration::from_secs(1)));
}
