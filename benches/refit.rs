//! Refit latency on the `qwen3-0.6b-shape` preset: a bf16 safetensors push of
//! every parameter over loopback into a running server (f32 engine), from the
//! first byte sent until the new weights serve, against the bound of simply
//! reading the same bytes from memory and converting them to f32 (best of
//! three), measured in the same run. Four pushes while a stream generates
//! (the longest gap between its tokens during a push is the stall): the
//! first converts into fresh memory, later ones into the memory of the
//! weights they replace; a fifth push after the stream has ended.
//!
//! Then, with nothing generating, alternating rounds of: the full bf16 push;
//! a rank-16 LoRA adapter on all seven projections pushed with
//! `POST /v1/weights?adapter=NAME` under a new name (creating it) and over
//! the adapter the server already serves (a hot swap), as f32 (what PEFT
//! saves) and as bf16: bytes and seconds from the first byte sent until
//! the response, which comes once the new version serves.
//!
//! `cargo bench --bench refit` (GYM_SERVE_BENCH_PRESET=tiny for a quick try,
//! GYM_SERVE_BENCH_ROUNDS=N adapter rounds, default 3).

use candle_core::{DType, Device, Tensor};
use gym_serve::config::{Architecture, ModelConfig};
use gym_serve::make_model::{make_model, random_weights, MakeModelOptions, Preset};
use gym_serve::weights::stream::{BufferPool, StreamingUpdate};
use gym_serve::weights::{ParamStore, UpdateMode};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "support/lora.rs"]
mod lora;

/// Frame size the staging row feeds (hyper hands a body over in frames of
/// tens of KiB).
const FRAME: usize = 64 << 10;

#[global_allocator]
static ALLOC: gym_serve::huge_pages::HugePageAlloc = gym_serve::huge_pages::HugePageAlloc;

fn main() {
    let preset = match std::env::var("GYM_SERVE_BENCH_PRESET").as_deref() {
        Ok("tiny") => Preset::Tiny,
        _ => Preset::Qwen3_0_6bShape,
    };
    let shape = preset.shape(Architecture::Qwen3);
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    make_model(
        dir.path(),
        &MakeModelOptions {
            shape,
            seed: 0,
            dtype: DType::F32,
            shards: 1,
        },
    )
    .unwrap();
    let cfg = ModelConfig::from_file(&dir.path().join("config.json")).unwrap();
    println!(
        "gym-serve refit benchmark: {preset:?}; checkpoint written in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    // The push: every parameter of another seed, in bf16 (what a PyTorch trainer sends).
    let new: Vec<(String, Tensor)> = random_weights(&cfg, 1)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(DType::BF16).unwrap()))
        .collect();
    let views: Vec<(&str, &Tensor)> = new.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let body = safetensors::serialize(views, None).unwrap();
    drop(new);
    println!(
        "push body: {:.0} MB of bf16 safetensors",
        body.len() as f64 / 1e6
    );

    let mut server = Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .arg("--model")
        .arg(dir.path())
        .args(["--port", "0", "--kv-cache-tokens", "8192"])
        // One adapter per adapter round is created.
        .args(["--max-loras", "64"])
        .stdout(Stdio::piped())
        .stderr(
            std::fs::File::create(std::env::temp_dir().join("gym-serve-refit-bench.log")).unwrap(),
        )
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("gym-serve listening on ")
        .unwrap()
        .to_string();
    let http = http_client();

    // A stream that keeps generating through the update, timing its tokens.
    let stream_base = base.clone();
    let generator = std::thread::spawn(move || {
        let http = http_client();
        let resp = http
            .post(format!("{stream_base}/v1/completions"))
            .json(&serde_json::json!({"prompt": "The weather today", "max_tokens": 180, "ignore_eos": true, "stream": true}))
            .send()
            .unwrap();
        let mut times = Vec::new();
        for line in BufReader::new(resp).lines() {
            let line = line.unwrap();
            if line.starts_with("data: {") {
                times.push(Instant::now());
            }
        }
        times
    });
    // A push of the whole body as `version`: (sent, seconds, served).
    let push = |version: &str| {
        let push_body = body.clone();
        let sent = Instant::now();
        let reply: serde_json::Value = http
            .post(format!("{base}/v1/weights?version={version}&pause=keep"))
            .body(push_body)
            .send()
            .unwrap()
            .json()
            .unwrap();
        let seconds = sent.elapsed().as_secs_f64();
        assert_eq!(reply["weight_version"], version, "{reply}");
        (sent, seconds, Instant::now())
    };
    // The first push converts into fresh memory, later ones into the memory
    // the previous update freed (a trainer's steady state).
    let pushes: Vec<_> = ["1", "2", "3", "4"]
        .into_iter()
        .map(|version| {
            std::thread::sleep(Duration::from_secs(3));
            push(version)
        })
        .collect();
    let times = generator.join().unwrap();
    // One more once the stream has finished: the same path with the cores
    // to itself.
    let (_, idle_push_s, _) = push("5");

    // Adapter pushes against full pushes, alternating, nothing generating.
    let rank = 16;
    let adapter_f32 = lora::safetensors_bytes_as(&cfg, rank, 1, false);
    let adapter_bf16 = lora::safetensors_bytes_as(&cfg, rank, 2, true);
    let adapter_config = lora::config_json(rank);
    // A push of `bytes` as adapter `name`: (client seconds, server seconds).
    let push_adapter = |name: &str, bytes: &[u8]| {
        let push_body = bytes.to_vec();
        let sent = Instant::now();
        let resp = http
            .post(format!("{base}/v1/weights?adapter={name}"))
            .header("x-adapter-config", &adapter_config)
            .body(push_body)
            .send()
            .unwrap();
        let status = resp.status();
        let reply: serde_json::Value = resp.json().unwrap();
        let seconds = sent.elapsed().as_secs_f64();
        assert!(status.is_success(), "{status}: {reply}");
        assert_eq!(reply["adapter"], name, "{reply}");
        (seconds, reply["seconds"].as_f64().unwrap_or(f64::NAN))
    };
    // The adapter the hot swaps replace.
    push_adapter("hot", &adapter_f32);
    let rounds: usize = std::env::var("GYM_SERVE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .min(60);
    // [full, create f32, hot swap f32, hot swap bf16] x rounds
    let mut timed: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 4];
    for round in 0..rounds {
        let (_, full_s, _) = push(&(6 + round).to_string());
        timed[0].push((full_s, f64::NAN));
        timed[1].push(push_adapter(&format!("new{round}"), &adapter_f32));
        timed[2].push(push_adapter("hot", &adapter_f32));
        timed[3].push(push_adapter("hot", &adapter_bf16));
    }
    let _ = server.kill();
    let _ = server.wait();

    // The bound, on the same bytes: parse and convert bf16 -> f32, nothing else.
    // Three passes: the first into fresh memory (what the first push pays
    // for too), the best one the fastest the machine does it (later passes
    // reuse memory the allocator already mapped).
    let bound_passes: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let st = safetensors::SafeTensors::deserialize(&body).unwrap();
            for (_, view) in st.tensors() {
                let t =
                    Tensor::from_raw_buffer(view.data(), DType::BF16, view.shape(), &Device::Cpu)
                        .unwrap();
                std::hint::black_box(t.to_dtype(DType::F32).unwrap());
            }
            t.elapsed().as_secs_f64()
        })
        .collect();
    let cold_bound_s = bound_passes[0];
    let bound_s = bound_passes.iter().copied().fold(f64::MAX, f64::min);
    let transfer_s = loopback_transfer_seconds(&body);
    // Our staging alone: the server's path (the body fed frame by frame into
    // a streaming update, header checked first, values converted as they
    // arrive) into fresh memory, then the new store, without HTTP or an
    // engine (buffered conversions run on the staging thread).
    let current = ParamStore::from_tensors(
        &cfg,
        random_weights(&cfg, 0).unwrap().into_iter().collect(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let t = Instant::now();
    let mut stage = StreamingUpdate::new(
        &cfg,
        UpdateMode::Full,
        DType::F32,
        &Device::Cpu,
        None,
        HashMap::new(),
        BufferPool::default(),
    );
    for frame in body.chunks(FRAME) {
        stage.push(frame).unwrap();
    }
    let updates = runtime.block_on(stage.finish()).unwrap();
    let staged = current.with_replacements(updates).unwrap();
    let stage_s = t.elapsed().as_secs_f64();
    drop(staged);

    let gaps: Vec<f64> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let mut sorted = gaps.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let stall = |sent: Instant, served: Instant| {
        times
            .windows(2)
            .filter(|w| w[1] >= sent && w[0] <= served)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .fold(0.0, f64::max)
    };
    println!("\n| refit (bf16 push of every parameter, loopback) | seconds | vs bound | longest token gap |");
    println!("| --- | ---: | ---: | ---: |");
    println!("| bound: parse + convert the same bytes to f32 in memory | {bound_s:.2} | 1.00x | |");
    println!(
        "| the bound's first pass (fresh memory) | {cold_bound_s:.2} | {:.2}x | |",
        cold_bound_s / bound_s
    );
    println!(
        "| the body over loopback into a sink (no server, nothing generating) | {transfer_s:.2} | {:.2}x | |",
        transfer_s / bound_s
    );
    println!(
        "| staging alone (the server's streaming path in {} KiB frames, fresh memory) | {stage_s:.2} | {:.2}x | |",
        FRAME >> 10,
        stage_s / bound_s
    );
    for (i, (sent, push_s, served)) in pushes.iter().enumerate() {
        let which = if i == 0 {
            "first push (fresh memory)".to_string()
        } else {
            format!("push {} (memory of the replaced weights)", i + 1)
        };
        println!(
            "| {which}: first byte sent until the new weights serve | {push_s:.2} | {:.2}x | {:.3}s |",
            push_s / bound_s,
            stall(*sent, *served)
        );
    }
    let mut later: Vec<f64> = pushes[1..].iter().map(|p| p.1).collect();
    later.sort_by(|a, b| a.total_cmp(b));
    let median_push = later[later.len() / 2];
    println!(
        "| median of the later pushes | {median_push:.2} | {:.2}x | |",
        median_push / bound_s
    );
    println!(
        "| push 5, after the stream ended (nothing generating) | {idle_push_s:.2} | {:.2}x | |",
        idle_push_s / bound_s
    );
    println!(
        "\ngeneration throughout: median inter-token gap {median:.3}s ({} tokens streamed)",
        times.len()
    );

    let middle = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let full_median = middle(&timed[0].iter().map(|t| t.0).collect::<Vec<_>>());
    println!("\n| push (nothing generating, {rounds} alternating rounds), rank {rank} on all projections | MB | seconds per round | median s | vs full push (median) | the server's own seconds (median) |");
    println!("| --- | ---: | --- | ---: | ---: | ---: |");
    let labels = [
        ("full weights, bf16", body.len()),
        ("adapter, f32, new name (creates it)", adapter_f32.len()),
        (
            "adapter, f32, hot swap of a served adapter",
            adapter_f32.len(),
        ),
        (
            "adapter, bf16, hot swap of a served adapter",
            adapter_bf16.len(),
        ),
    ];
    for ((label, bytes), t) in labels.iter().zip(&timed) {
        let client: Vec<f64> = t.iter().map(|t| t.0).collect();
        let server: Vec<f64> = t.iter().map(|t| t.1).collect();
        let per_round: Vec<String> = client.iter().map(|s| format!("{s:.3}")).collect();
        let own = if server.iter().all(|s| s.is_nan()) {
            String::new()
        } else {
            format!("{:.3}", middle(&server))
        };
        println!(
            "| {label} | {:.1} | {} | {:.3} | {:.3} | {own} |",
            *bytes as f64 / 1e6,
            per_round.join(", "),
            middle(&client),
            middle(&client) / full_median,
        );
    }
}

/// Seconds to POST `body` over loopback to a listener that only reads it:
/// what moving the bytes costs before any parsing or conversion.
fn loopback_transfer_seconds(body: &[u8]) -> f64 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut header = Vec::new();
        // Read the request head, then exactly the announced body.
        let body_start = loop {
            let n = conn.read(&mut buf).unwrap();
            header.extend_from_slice(&buf[..n]);
            if let Some(at) = header.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&header[..body_start]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap();
        let mut left = length - (header.len() - body_start);
        while left > 0 {
            left -= conn.read(&mut buf).unwrap();
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .unwrap();
    });
    let http = http_client();
    let body = body.to_vec();
    let t = Instant::now();
    http.post(format!("http://{addr}/"))
        .body(body)
        .send()
        .unwrap();
    let seconds = t.elapsed().as_secs_f64();
    sink.join().unwrap();
    seconds
}

/// A blocking HTTP client without a timeout (pushes and streams run long).
fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap()
}
