//! Every request-size bound answers 400/413 naming its flag; large legal
//! responses stay within memory and never stall `/health`; stop strings
//! cost time linear in the output.

mod common;

use common::probe::{
    connect, cpu_seconds, health_latency, metric, read_reply, rss_mib, status_kib, wait_idle,
};
use common::server::Server;
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

fn model() -> tempfile::TempDir {
    common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        141,
    ))
}

/// Asserts an OpenAI error with `status` whose message names `flag`.
fn refused(resp: (u16, Value), status: u16, flag: &str) -> Value {
    let (code, body) = resp;
    assert_eq!(code, status, "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(flag), "{msg:?} does not name {flag}");
    body
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn every_request_bound_is_refused_by_name() {
    let dir = model();
    let server = Server::start(
        dir.path(),
        &[
            "--max-prompts",
            "4",
            "--max-n",
            "4",
            "--max-sequences-per-request",
            "8",
            "--max-top-logprobs",
            "3",
            "--max-prompt-logprobs",
            "2",
            "--max-stop-strings",
            "2",
            "--max-stop-string-bytes",
            "8",
            "--max-request-bytes",
            "4096",
            "--max-response-bytes",
            "20000",
        ],
    );
    let cmpl = "/v1/completions";
    let body = refused(
        server.post(
            cmpl,
            &json!({"prompt": [[1], [2], [3], [4], [5]], "max_tokens": 1}),
        ),
        400,
        "--max-prompts",
    );
    assert_eq!(body["error"]["param"], "prompt");
    refused(
        server.post(
            cmpl,
            &json!({"prompt": [[1], [2], [3]], "n": 3, "max_tokens": 1}),
        ),
        400,
        "--max-sequences-per-request",
    );
    let body = refused(
        server.post("/v1/chat/completions", &chat(json!({"n": 5}))),
        400,
        "--max-n",
    );
    assert_eq!(body["error"]["param"], "n");
    refused(
        server.post(
            "/v1/chat/completions",
            &chat(json!({"logprobs": true, "top_logprobs": 4})),
        ),
        400,
        "--max-top-logprobs",
    );
    refused(
        server.post(
            cmpl,
            &json!({"prompt": "hello", "max_tokens": 1, "logprobs": 4}),
        ),
        400,
        "--max-top-logprobs",
    );
    refused(
        server.post(
            cmpl,
            &json!({"prompt": "hello", "max_tokens": 1, "prompt_logprobs": 3}),
        ),
        400,
        "--max-prompt-logprobs",
    );
    refused(
        server.post(
            "/v1/chat/completions",
            &chat(json!({"stop": ["a", "b", "c"]})),
        ),
        400,
        "--max-stop-strings",
    );
    refused(
        server.post("/v1/chat/completions", &chat(json!({"stop": "123456789"}))),
        400,
        "--max-stop-string-bytes",
    );
    // Over the response bound: cut while generating, not after.
    refused(
        server.post(
            cmpl,
            &json!({"prompt": "hello", "n": 4, "max_tokens": 400, "ignore_eos": true, "logprobs": 3}),
        ),
        400,
        "--max-response-bytes",
    );
    // The same streamed is fine: streams are not buffered.
    let chunks = server.stream(
        cmpl,
        &json!({"prompt": "hello", "n": 4, "max_tokens": 400, "ignore_eos": true, "logprobs": 3, "stream": true}),
    );
    assert!(chunks.len() >= 1600);

    // Body bounds: a chunked body past the limit, and a declared one
    // refused before it is sent (no body byte is written here).
    let big = json!({"messages": [{"role": "user", "content": "x".repeat(5000)}]});
    refused(
        server.post("/v1/chat/completions", &big),
        413,
        "--max-request-bytes",
    );
    let started = Instant::now();
    let mut s = connect(&server.base);
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 2000000000\r\n\r\n",
    )
    .unwrap();
    let reply = read_reply(&mut s, Duration::from_secs(5));
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(reply.contains("--max-request-bytes"), "{reply}");
    // The body is left unread: the connection must not carry another request.
    assert!(
        reply.to_ascii_lowercase().contains("connection: close"),
        "{reply}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let (status, _) = server.post("/pause", &Value::String("x".repeat(2 << 20)));
    assert_eq!(status, 413);

    // Legal requests still work, and the engine is idle again.
    server.ok(
        "/v1/chat/completions",
        &chat(json!({"stop": ["a", "b"], "n": 4})),
    );
    wait_idle(&server, Duration::from_secs(10));
    assert_eq!(metric(&server, "gym_serve_kv_blocks_used"), 0.0);
    assert_eq!(server.get("/health").0, 200);
}

/// Many large legal responses at once under a small memory budget: they
/// wait for each other, `/health` answers within 100 ms throughout, and
/// memory comes back afterwards.
#[test]
fn large_responses_wait_for_memory_and_never_stall_health() {
    let dir = model();
    // 24 MiB of request memory: each request below reserves about 10 MiB,
    // so at most two run at a time.
    let server = Server::start(dir.path(), &["--max-memory", "25165824"]);
    let body = json!({
        "prompt": "hello", "n": 16, "max_tokens": 256, "ignore_eos": true,
        "logprobs": 20, "seed": 1,
    });
    server.ok(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 2}),
    );
    let baseline = rss_mib(&server);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (base, stop) = (server.base.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                latencies.push(health_latency(&base));
                std::thread::sleep(Duration::from_millis(25));
            }
            latencies.sort();
            latencies
        })
    };
    let mut peak_reserved: f64 = 0.0;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (server.url("/v1/completions"), body.clone());
            std::thread::spawn(move || {
                let http = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(300))
                    .build()
                    .unwrap();
                let r = http.post(url).json(&body).send().unwrap();
                assert_eq!(r.status().as_u16(), 200);
                r.bytes().unwrap().len()
            })
        })
        .collect();
    while !clients.iter().all(|c| c.is_finished()) {
        peak_reserved =
            peak_reserved.max(metric(&server, "gym_serve_request_memory_reserved_bytes"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let sizes: Vec<usize> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let latencies = prober.join().unwrap();
    let probes = latencies.len();
    let worst = latencies[probes - 1];
    let p99 = latencies[probes * 99 / 100];
    assert!(sizes.iter().all(|&s| s > 1_000_000), "{sizes:?}");
    assert!(peak_reserved <= 25165824.0, "reserved {peak_reserved}");
    assert!(probes > 10);
    // The bound is on the server; the worst single probe also carries this
    // test's own client threads competing for two cores.
    assert!(p99 < Duration::from_millis(100), "/health p99 {p99:?}");
    // The worst probe is a scheduling hiccup on a loaded 2-core CI machine, not
    // the multi-second stall a response built on the runtime caused: bound it
    // loosely so the test is not flaky.
    assert!(worst < Duration::from_secs(2), "/health took {worst:?}");
    wait_idle(&server, Duration::from_secs(10));
    assert_eq!(
        metric(&server, "gym_serve_request_memory_reserved_bytes"),
        0.0
    );
    // Memory stays bounded after the burst: within 40 MiB
    // of the baseline (the KV pages and allocator arenas a burst touched stay;
    // malloc_trim returns what it can); the peak is what the budget allowed.
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_mib(&server);
    let peak = status_kib(server.pid(), "VmHWM") as f64 / 1024.0;
    eprintln!("RSS baseline {baseline:.0} MiB, peak {peak:.0} MiB, after {after:.0} MiB; /health p99 {p99:?}, worst {worst:?} over {probes} probes");
    assert!(
        after < baseline + 40.0,
        "RSS {after:.0} MiB vs baseline {baseline:.0} MiB"
    );
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn many_stop_strings_cost_time_linear_in_the_output() {
    let dir = model();
    let server = Server::start(dir.path(), &["--max-stop-strings", "100000"]);
    let request = |stop: Option<Vec<String>>| {
        let mut body = json!({"prompt": "hello", "max_tokens": 256, "ignore_eos": true, "seed": 3});
        if let Some(stop) = stop {
            body["stop"] = json!(stop);
        }
        let cpu = cpu_seconds(server.pid());
        let v = server.ok("/v1/completions", &body);
        (cpu_seconds(server.pid()) - cpu, v)
    };
    let (plain, _) = request(None);
    // 100,000 strings that never match: checked against a window of the
    // new text each token, not the whole text once per string.
    let stops: Vec<String> = (0..100_000).map(|i| format!("\u{1}{i}\u{2}")).collect();
    let (many, v) = request(Some(stops));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    eprintln!("CPU: {plain:.2} s without stop strings, {many:.2} s with 100,000");
    assert!(
        many < plain + 2.5,
        "{many:.2} s with stop strings vs {plain:.2} s"
    );
    // A stop string still cuts the text where it first appears.
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    let at = (5..chars.len() - 3)
        .find(|&i| chars[i..i + 3].iter().all(char::is_ascii_alphanumeric))
        .expect("three ASCII letters in a row");
    let stop: String = chars[at..at + 3].iter().collect();
    let cut = server.ok(
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 256, "ignore_eos": true, "seed": 3, "stop": [stop]}),
    );
    let choice = &cut["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(
        choice["text"].as_str().unwrap(),
        &text[..text.find(&stop).unwrap()]
    );
    assert_eq!(server.get("/health").0, 200);
}

/// Scoring more positions than one pass takes (256) runs in chunks and
/// still equals what generation reported.
#[test]
fn long_scoring_runs_in_chunks_and_matches_generation() {
    let dir = model();
    let server = Server::start(dir.path(), &[]);
    let prompt: Vec<u32> = (0..40).map(|i| 5 + (i * 7) % 900).collect();
    let v = server.ok(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 300, "ignore_eos": true, "temperature": 0}),
    );
    let choice = &v["choices"][0];
    let generated = common::server::ids(&choice["generation_token_ids"]);
    let reported = common::server::floats(&choice["generation_log_probs"]);
    assert_eq!(generated.len(), 300);
    let mut all = prompt.clone();
    all.extend(&generated);
    let scored = server.ok(
        "/v1/logprobs",
        &json!({"token_ids": all, "start": prompt.len(), "temperature": 0}),
    );
    let teacher = common::server::floats(&scored["token_logprobs"]);
    assert_eq!(teacher.len(), 300);
    for (i, (a, b)) in reported.iter().zip(&teacher).enumerate() {
        assert!(
            (a - b).abs() < 1e-4,
            "position {i}: generated {a}, scored {b}"
        );
    }
}
