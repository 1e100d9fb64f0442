//! Looking at a running server from outside: its resident memory, its
//! metrics, `/health` latency, and raw sockets for clients that misbehave.

use super::server::Server;
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
