//! Probes for fault tests: what the server serves (a seeded greedy
//! fingerprint), what it says about its weights (version and metrics),
//! whether it is healthy, its memory, and raw HTTP for requests a client
//! library will not send (a lying `Content-Length`, a stalled body).

use super::server::Server;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const PROMPT: [u32; 10] = [1, 317, 263, 201, 480, 293, 262, 409, 311, 448];

/// Greedy generation token IDs and log-probs, with the prefix cache reset
/// first (a cache hit moves log-probs by ~5e-7): bit-identical exactly
/// when the served weights are.
pub fn fingerprint(server: &Server) -> Value {
    let (status, _) = server.post("/reset_prefix_cache", &json!({}));
    assert_eq!(status, 200, "reset_prefix_cache");
    let reply = server.ok(
        "/v1/completions",
        &json!({"prompt": PROMPT, "max_tokens": 16, "temperature": 0.0, "seed": 5, "ignore_eos": true}),
    );
    let choice = &reply["choices"][0];
    json!([
        choice["generation_token_ids"],
        choice["generation_log_probs"]
    ])
}

/// What the server says about its weights.
#[derive(Debug, PartialEq)]
pub struct Truth {
    pub version: String,
    pub updates: u64,
    pub failures: u64,
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no metric {name}")) as u64
}

/// Version from `/get_weight_version` (checked against `/metrics`) and the
/// update counters.
pub fn truth(server: &Server) -> Truth {
    let (_, body) = server.get("/get_weight_version");
    let version: Value = serde_json::from_str(&body).unwrap();
    let version = version["weight_version"].as_str().unwrap().to_string();
    let (_, metrics) = server.get("/metrics");
    assert!(
        metrics.contains(&format!(
            "gym_serve_weight_version{{version=\"{version}\"}} 1"
        )),
        "/metrics disagrees with /get_weight_version {version}: {metrics}"
    );
    Truth {
        version,
        updates: metric(&metrics, "gym_serve_weight_updates_total"),
        failures: metric(&metrics, "gym_serve_weight_update_failures_total"),
    }
}

pub fn truth_is(server: &Server, version: &str, updates: u64, failures: u64) {
    let expected = Truth {
        version: version.to_string(),
        updates,
        failures,
    };
    assert_eq!(truth(server), expected);
}

/// Panics unless `/health` answers 200 within `bound`.
pub fn healthy_within(server: &Server, bound: Duration) {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let deadline = Instant::now() + bound;
    loop {
        if let Ok(r) = client.get(server.url("/health")).send() {
            if r.status().as_u16() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "not healthy within {bound:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resident memory of `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// `host:port` of the server.
pub fn addr(server: &Server) -> String {
    server
        .base
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// A connection that has sent `head` (request line and headers, without the
/// blank line) and then `body`, and can read the answer.
pub struct Raw {
    stream: TcpStream,
    sent: Instant,
}

impl Raw {
    pub fn send(server: &Server, head: &str, body: &[u8]) -> Raw {
        let mut stream = TcpStream::connect(addr(server)).unwrap();
        stream
            .write_all(format!("{head}\r\nHost: test\r\n\r\n").as_bytes())
            .unwrap();
        // The server may answer (and stop reading) before all of it is in.
        let _ = stream.write_all(body);
        Raw {
            stream,
            sent: Instant::now(),
        }
    }

    /// The status and body of the answer, and the seconds since sending,
    /// waiting at most `bound`.
    pub fn answer(mut self, bound: Duration) -> (u16, String, f64) {
        self.stream.set_read_timeout(Some(bound)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            if let Some(done) = complete_response(&got) {
                let text = String::from_utf8_lossy(&got[done.0..done.1]).to_string();
                let status = std::str::from_utf8(&got[9..12]).unwrap().parse().unwrap();
                return (status, text, self.sent.elapsed().as_secs_f64());
            }
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("connection closed without a full answer: {got:?}"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!(
                    "no answer within {bound:?} ({e}); got {:?}",
                    String::from_utf8_lossy(&got)
                ),
            }
        }
    }
}

/// Where the body of a complete `Content-Length` response lies.
fn complete_response(got: &[u8]) -> Option<(usize, usize)> {
    let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    (got.len() >= end + len).then_some((end, end + len))
}
