//! `gym-serve bench`: a load generator for any OpenAI-compatible server, so
//! numbers are comparable side by side, with an RL twist: `--refit` pushes
//! weights during the run and reports what that costs.
//!
//! Tokens are counted from the responses (`usage`, or the token IDs), never
//! estimated; failures are counted by kind and the run goes on.

use crate::cli::BenchArgs;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one request produced.
#[derive(Default)]
struct Sample {
    ok: bool,
    error: Option<String>,
    prompt_tokens: u64,
    output_tokens: u64,
    ttft: Option<f64>,
    latency: f64,
    /// Gaps between streamed chunks (seconds).
    itl: Vec<f64>,
    /// When streamed tokens arrived (seconds since the run began).
    token_times: Vec<(f64, u64)>,
}

/// The body of request `i`: a dataset line's messages, or a synthetic prompt.
enum Prompts {
    Dataset(Vec<Value>),
    /// Exact token IDs (from the server's `/tokenize`) and their text.
    Synthetic(Vec<(Vec<u64>, String)>),
}

fn client(timeout: Duration) -> anyhow::Result<reqwest::blocking::Client> {
    Ok(reqwest::blocking::Client::builder()
        .timeout(timeout)
        .build()?)
}

/// Synthetic prompts of exactly `len` tokens where the server can tokenize,
/// else of about `len` words.
fn synthetic(
    base: &str,
    len: usize,
    count: usize,
    seed: u64,
    key: Option<&str>,
) -> Vec<(Vec<u64>, String)> {
    const WORDS: [&str; 16] = [
        "river", "stone", "light", "model", "token", "garden", "number", "signal", "orbit",
        "paper", "window", "cloud", "engine", "forest", "market", "letter",
    ];
    let http = client(Duration::from_secs(30)).ok();
    (0..count)
        .map(|i| {
            let text: String = (0..len + 8)
                .map(|j| WORDS[(j * 7 + i * 13 + seed as usize) % WORDS.len()])
                .collect::<Vec<_>>()
                .join(" ");
            let tokens = http.as_ref().and_then(|h| {
                let mut req = h
                    .post(format!("{base}/tokenize"))
                    .json(&json!({"prompt": text, "add_special_tokens": false}));
                if let Some(k) = key {
                    req = req.bearer_auth(k);
                }
                let v: Value = req.send().ok()?.json().ok()?;
                let ids: Vec<u64> = v["tokens"]
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_u64)
                    .collect();
                (ids.len() >= len).then(|| ids[..len].to_vec())
            });
            (tokens.unwrap_or_default(), text)
        })
        .collect()
}

fn request_body(args: &BenchArgs, prompts: &Prompts, i: usize) -> Value {
    let mut body = match prompts {
        Prompts::Dataset(lines) => {
            let line = &lines[i % lines.len()];
            let messages = line
                .get("messages")
                .cloned()
                .unwrap_or_else(|| line.clone());
            if args.completions {
                json!({"prompt": messages.to_string()})
            } else {
                json!({"messages": messages})
            }
        }
        Prompts::Synthetic(list) => {
            let (ids, text) = &list[i % list.len()];
            match (args.completions, ids.is_empty()) {
                (true, false) => json!({"prompt": ids}),
                (true, true) => json!({"prompt": text}),
                (false, _) => json!({"messages": [{"role": "user", "content": text}]}),
            }
        }
    };
    body["max_tokens"] = json!(args.max_tokens);
    body["n"] = json!(args.n);
    body["seed"] = json!(args.seed + i as u64);
    body["ignore_eos"] = json!(!args.allow_eos);
    if let Some(m) = &args.model {
        body["model"] = json!(m);
    }
    if args.stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn run_one(
    http: &reqwest::blocking::Client,
    url: &str,
    key: Option<&str>,
    body: &Value,
    t0: Instant,
) -> Sample {
    let started = Instant::now();
    let mut s = Sample::default();
    let mut req = http.post(url).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send() {
        Ok(r) => r,
        Err(e) => {
            s.error = Some(
                if e.is_timeout() {
                    "timeout"
                } else {
                    "connection"
                }
                .to_string(),
            );
            return s;
        }
    };
    let status = resp.status().as_u16();
    if status != 200 {
        s.error = Some(format!("http_{status}"));
        s.latency = started.elapsed().as_secs_f64();
        return s;
    }
    let streaming = body.get("stream").is_some();
    if !streaming {
        match resp.json::<Value>() {
            Ok(v) => {
                s.latency = started.elapsed().as_secs_f64();
                s.ttft = Some(s.latency);
                s.prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
                s.output_tokens = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                s.ok = true;
            }
            Err(_) => s.error = Some("bad_json".into()),
        }
        return s;
    }
    let mut last: Option<Instant> = None;
    for line in BufReader::new(resp).lines() {
        let Ok(line) = line else {
            s.error = Some("stream_broken".into());
            return s;
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            s.ok = s.error.is_none();
            break;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            s.error = Some("bad_json".into());
            continue;
        };
        if chunk.get("error").is_some() {
            s.error = Some("stream_error".into());
            continue;
        }
        if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
            s.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
            s.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
        }
        let tokens: u64 = chunk["choices"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .map(|c| c["token_ids"].as_array().map_or(1, |t| t.len() as u64))
                    .sum()
            })
            .unwrap_or(0);
        if tokens > 0 {
            let now = Instant::now();
            if s.ttft.is_none() {
                s.ttft = Some((now - started).as_secs_f64());
            }
            if let Some(prev) = last.replace(now) {
                s.itl.push((now - prev).as_secs_f64());
            }
            s.token_times.push(((now - t0).as_secs_f64(), tokens));
        }
    }
    s.latency = started.elapsed().as_secs_f64();
    s
}

fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({"p50": null, "p90": null, "p99": null});
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    json!({"p50": p(0.5), "p90": p(0.9), "p99": p(0.99)})
}

/// Pushes `file` every `every` seconds until `stop`; returns (start, seconds) per push.
fn refitter(
    base: String,
    file: std::path::PathBuf,
    every: f64,
    key: Option<String>,
    t0: Instant,
    stop: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<Vec<(f64, f64, bool)>> {
    std::thread::spawn(move || {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let http = client(Duration::from_secs(600)).expect("http client");
        let mut pushes = Vec::new();
        let mut version = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_secs_f64(every));
            if stop.load(Ordering::Relaxed) != 0 {
                break;
            }
            version += 1;
            let start = t0.elapsed().as_secs_f64();
            let mut req = http
                .post(format!(
                    "{base}/v1/weights?version=bench-{version}&pause=keep"
                ))
                .body(bytes.clone());
            if let Some(k) = &key {
                req = req.bearer_auth(k);
            }
            let ok = req.send().map(|r| r.status().is_success()).unwrap_or(false);
            pushes.push((start, t0.elapsed().as_secs_f64() - start, ok));
        }
        pushes
    })
}

pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let base = args
        .url
        .trim_end_matches('/')
        .trim_end_matches("/v1")
        .to_string();
    let endpoint = format!(
        "{base}/v1/{}",
        if args.completions {
            "completions"
        } else {
            "chat/completions"
        }
    );
    let key = args.api_key.clone();
    let prompts = match &args.dataset {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let lines: Vec<Value> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()
                .context("each dataset line must be a JSON object with `messages`")?;
            anyhow::ensure!(!lines.is_empty(), "the dataset is empty");
            Prompts::Dataset(lines)
        }
        None => Prompts::Synthetic(synthetic(
            &base,
            args.prompt_len,
            args.concurrency.max(1) * 4,
            args.seed,
            key.as_deref(),
        )),
    };
    let total = args.requests;
    let deadline = args.duration.map(Duration::from_secs_f64);
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicUsize::new(0));
    let refits = args.refit.clone().map(|file| {
        refitter(
            base.clone(),
            file,
            args.refit_every,
            args.admin_api_key.clone(),
            t0,
            stop.clone(),
        )
    });
    let prompts = Arc::new(prompts);
    let args = Arc::new(args);
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (next, samples, bar, prompts, args, endpoint, key) = (
                next.clone(),
                samples.clone(),
                bar.clone(),
                prompts.clone(),
                args.clone(),
                endpoint.clone(),
                key.clone(),
            );
            std::thread::spawn(move || {
                let http = client(Duration::from_secs(3600)).expect("http client");
                loop {
                    if deadline.is_some_and(|d| t0.elapsed() >= d) {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if deadline.is_none() && i >= total {
                        break;
                    }
                    let body = request_body(&args, &prompts, i);
                    let sample = run_one(&http, &endpoint, key.as_deref(), &body, t0);
                    bar.inc(1);
                    if let Ok(mut s) = samples.lock() {
                        s.push(sample);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(1, Ordering::Relaxed);
    bar.finish_and_clear();
    let pushes = refits
        .map(|h| h.join().unwrap_or_default())
        .unwrap_or_default();
    let samples = std::mem::take(
        &mut *samples
            .lock()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))?,
    );
    report(&args, &samples, &pushes, elapsed)
}

fn report(
    args: &BenchArgs,
    samples: &[Sample],
    pushes: &[(f64, f64, bool)],
    elapsed: f64,
) -> anyhow::Result<()> {
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.ok).collect();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for s in samples.iter().filter(|s| !s.ok) {
        *errors
            .entry(s.error.clone().unwrap_or_else(|| "incomplete".into()))
            .or_default() += 1;
    }
    let output: u64 = ok.iter().map(|s| s.output_tokens).sum();
    let prompt: u64 = ok.iter().map(|s| s.prompt_tokens).sum();
    let ttft = percentiles(ok.iter().filter_map(|s| s.ttft).collect());
    let itl = percentiles(ok.iter().flat_map(|s| s.itl.iter().copied()).collect());
    // Output tokens/s while a refit was in flight, and outside, from streamed token times.
    let in_refit = |t: f64| {
        pushes
            .iter()
            .any(|(start, secs, _)| t >= *start && t <= start + secs)
    };
    let refit_time: f64 = pushes.iter().map(|(_, secs, _)| secs).sum();
    let (mut during, mut outside) = (0u64, 0u64);
    for (t, n) in ok.iter().flat_map(|s| s.token_times.iter()) {
        if in_refit(*t) {
            during += n;
        } else {
            outside += n;
        }
    }
    let refit = (!pushes.is_empty()).then(|| {
        let secs: Vec<f64> = pushes.iter().map(|p| p.1).collect();
        json!({
            "pushes": pushes.len(),
            "failed": pushes.iter().filter(|p| !p.2).count(),
            "latency_mean_s": secs.iter().sum::<f64>() / secs.len() as f64,
            "latency_max_s": secs.iter().copied().fold(0.0, f64::max),
            "output_tok_s_during_refit": if args.stream && refit_time > 0.0 { json!(during as f64 / refit_time) } else { Value::Null },
            "output_tok_s_outside_refit": if args.stream && elapsed > refit_time { json!(outside as f64 / (elapsed - refit_time)) } else { Value::Null },
        })
    });
    let summary = json!({
        "url": args.url,
        "endpoint": if args.completions { "completions" } else { "chat/completions" },
        "concurrency": args.concurrency,
        "stream": args.stream,
        "requests": samples.len(),
        "completed": ok.len(),
        "errors": errors,
        "duration_s": elapsed,
        "requests_per_s": ok.len() as f64 / elapsed,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "output_tok_s": output as f64 / elapsed,
        "total_tok_s": (prompt + output) as f64 / elapsed,
        "ttft_s": ttft,
        "itl_s": itl,
        "refit": refit,
    });
    let f = |v: &Value| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{:.1} ms", x * 1e3))
    };
    println!("| metric | value |");
    println!("| --- | ---: |");
    println!(
        "| requests completed / sent | {} / {} |",
        ok.len(),
        samples.len()
    );
    println!(
        "| errors | {} |",
        if errors.is_empty() {
            "none".to_string()
        } else {
            format!("{errors:?}")
        }
    );
    println!("| duration | {elapsed:.2} s |");
    println!("| requests/s | {:.2} |", ok.len() as f64 / elapsed);
    println!("| output tokens/s | {:.1} |", output as f64 / elapsed);
    println!(
        "| total tokens/s | {:.1} |",
        (prompt + output) as f64 / elapsed
    );
    println!(
        "| TTFT p50 / p90 / p99 | {} / {} / {} |",
        f(&ttft["p50"]),
        f(&ttft["p90"]),
        f(&ttft["p99"])
    );
    println!(
        "| ITL p50 / p90 / p99 | {} / {} / {} |",
        f(&itl["p50"]),
        f(&itl["p90"]),
        f(&itl["p99"])
    );
    if let Some(r) = &summary["refit"].as_object() {
        println!("| refits (failed) | {} ({}) |", r["pushes"], r["failed"]);
        println!(
            "| refit latency mean / max | {} / {} |",
            f(&r["latency_mean_s"]),
            f(&r["latency_max_s"])
        );
        let rate = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.1}"));
        println!(
            "| output tok/s during / outside refits | {} / {} |",
            rate(&r["output_tok_s_during_refit"]),
            rate(&r["output_tok_s_outside_refit"])
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
