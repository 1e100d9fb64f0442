//! The GPU's way of bringing logits to the sampler (`--sampling-transfer
//! summary`: block masses, then one block per draw), run on the CPU: the
//! same tokens as whole rows, log-probs equal to f32 rounding of the sums,
//! and generation still agrees with teacher-forced scoring.

mod common;

use common::server::{floats, ids, Server};
use serde_json::{json, Value};

fn request(extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": "Name three rivers and a mountain."}],
        "logprobs": true,
        "return_token_ids": true,
        "max_tokens": 20,
        "seed": 5,
        "n": 3,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn close(a: f64, b: f64) -> bool {
    a == b || (a - b).abs() <= 2e-5 * (1.0 + b.abs())
}

fn top_entries(choice: &Value) -> Vec<Vec<(String, f64)>> {
    choice["logprobs"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["token"].as_str().unwrap().to_string(),
                        t["logprob"].as_f64().unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

#[test]
fn summarized_sampling_gives_the_tokens_whole_rows_give() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        73,
    ));
    let rows = Server::start(dir.path(), &["--sampling-transfer", "rows"]);
    let summary = Server::start(dir.path(), &["--sampling-transfer", "summary"]);
    let mut compared = 0usize;
    for (what, extra) in [
        ("t=1", json!({"temperature": 1.0, "top_logprobs": 0})),
        (
            "t=0.7, top 5",
            json!({"temperature": 0.7, "top_logprobs": 5}),
        ),
        (
            "min_p, raw",
            json!({"temperature": 1.2, "min_p": 0.05, "logprobs_mode": "raw", "top_logprobs": 2}),
        ),
        (
            "greedy",
            json!({"temperature": 0.0, "top_logprobs": 3, "n": 1}),
        ),
        // Whole rows inside the summary server: top-p, and EOS banned.
        ("top_p", json!({"temperature": 0.8, "top_p": 0.9})),
        ("min_tokens", json!({"temperature": 1.0, "min_tokens": 20})),
    ] {
        let body = request(extra.clone());
        let want = rows.ok("/v1/chat/completions", &body);
        let got = summary.ok("/v1/chat/completions", &body);
        let (want, got) = (
            want["choices"].as_array().unwrap(),
            got["choices"].as_array().unwrap(),
        );
        assert_eq!(want.len(), got.len(), "{what}");
        for (w, g) in want.iter().zip(got) {
            let (wm, gm) = (&w["message"], &g["message"]);
            let gen = ids(&gm["generation_token_ids"]);
            assert!(!gen.is_empty(), "{what}");
            assert_eq!(ids(&wm["generation_token_ids"]), gen, "{what}: tokens");
            let (wl, gl) = (
                floats(&wm["generation_log_probs"]),
                floats(&gm["generation_log_probs"]),
            );
            assert!(
                wl.iter().zip(&gl).all(|(a, b)| close(*b, *a)),
                "{what}: {wl:?} vs {gl:?}"
            );
            let (wt, gt) = (top_entries(w), top_entries(g));
            assert_eq!(wt.len(), gt.len());
            for (a, b) in wt.iter().zip(&gt) {
                let names = |v: &[(String, f64)]| v.iter().map(|t| t.0.clone()).collect::<Vec<_>>();
                assert_eq!(names(a), names(b), "{what}: top alternatives");
                assert!(a.iter().zip(b).all(|(x, y)| close(y.1, x.1)), "{what}");
            }
            if let Some(n) = extra["top_logprobs"].as_u64() {
                assert!(gt.iter().all(|t| t.len() == n as usize), "{what}");
            }
            compared += gl.len();
            if what == "min_tokens" {
                // Banning EOS renormalizes the rest; scoring knows no bans.
                continue;
            }
            // Scoring the rollout agrees with what generation reported.
            let prompt = ids(&gm["prompt_token_ids"]);
            let mut all = prompt.clone();
            all.extend(&gen);
            let mut score = json!({"token_ids": all, "start": prompt.len()});
            for k in ["temperature", "top_p", "min_p", "logprobs_mode"] {
                if let Some(v) = extra.get(k) {
                    score[k] = v.clone();
                }
            }
            let teacher = floats(&summary.ok("/v1/logprobs", &score)["token_logprobs"]);
            assert!(
                teacher.iter().zip(&gl).all(|(t, g)| close(*g, *t)),
                "{what}: generation {gl:?} vs scoring {teacher:?}"
            );
        }
    }
    assert!(compared >= 6 * 20, "compared {compared} log-probs");
}
