//! Start-up and shutdown of the real binary.

mod common;

use common::server::Server;
use std::time::{Duration, Instant};

#[test]
fn sigterm_shuts_down_cleanly() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        91,
    ));
    let mut server = Server::start(dir.path(), &[]);
    assert_eq!(server.get("/health").0, 200);
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert!(models.contains("\"tiny\""));
    let pid = server.pid();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.try_wait() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn missing_model_fails_with_a_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .args(["--model", "/no/such/checkpoint", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/checkpoint"));
}
