//! Looking at a running server from outside: its resident memory, its
//! metrics, `/health` latency, a fingerprint of the weights it serves, what
//! it says its weight version is, and raw sockets for clients that misbehave.

use super::server::Server;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

pub fn rss_mib(server: &Server) -> f64 {
    status_kib(server.pid(), "VmRSS") as f64 / 1024.0
}

/// User plus system CPU seconds the process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let after = stat.rsplit_once(')').expect("stat format").1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The value of an unlabelled metric in `/metrics`.
pub fn metric(server: &Server, name: &str) -> f64 {
    let (status, text) = server.get("/metrics");
    assert_eq!(status, 200);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

/// Waits until the engine has nothing running or waiting.
pub fn wait_idle(server: &Server, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let busy = metric(server, "gym_serve_num_requests_running")
            + metric(server, "gym_serve_num_requests_waiting");
        if busy == 0.0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "engine still busy after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `/health` on a fresh connection: how long it took, or panics.
pub fn health_latency(base: &str) -> Duration {
    let started = Instant::now();
    let mut s = connect(base);
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let reply = read_reply(&mut s, Duration::from_secs(30));
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    started.elapsed()
}

pub fn connect(base: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    s
}

/// Everything the server sends until it closes, or until `within` passes.
pub fn read_reply(s: &mut TcpStream, within: Duration) -> String {
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server has closed `s` (reads end) within `within`.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

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

fn metric_in(text: &str, name: &str) -> u64 {
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
        updates: metric_in(&metrics, "gym_serve_weight_updates_total"),
        failures: metric_in(&metrics, "gym_serve_weight_update_failures_total"),
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

impl Raw {
    /// Reads until what has arrived so far contains `needle` (or `bound`
    /// passes), and returns all of it: for answers that stream.
    pub fn read_until(&mut self, needle: &[u8], got: &mut Vec<u8>, bound: Duration) {
        let deadline = Instant::now() + bound;
        let mut buf = [0u8; 8192];
        while !got.windows(needle.len()).any(|w| w == needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{needle:?} not received within {bound:?}");
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("connection closed: {}", String::from_utf8_lossy(got)),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => panic!("{needle:?} not received within {bound:?} ({e})"),
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
