//! `gym-serve validate --url URL`: the integration check NeMo Gym asks
//! framework integrators to run, automated, against any server that claims
//! the contract (CONTRACT.md). Prints a checklist; fails if any check fails.

use anyhow::Context;
use serde_json::{json, Value};

pub struct Target {
    base: String,
    model: Option<String>,
    api_key: Option<String>,
    admin_key: Option<String>,
    http: reqwest::blocking::Client,
}

/// One check's outcome.
pub enum Outcome {
    Pass(String),
    Fail(String),
    Skip(String),
}

impl Target {
    pub fn new(
        url: &str,
        model: Option<String>,
        api_key: Option<String>,
        admin_key: Option<String>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            base: url
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .to_string(),
            model,
            api_key,
            admin_key,
            http: reqwest::blocking::Client::builder()
                .timeout(std::time::Duration::from_secs(600))
                .build()?,
        })
    }

    fn post_raw(
        &self,
        path: &str,
        body: reqwest::blocking::Body,
        admin: bool,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        let key = if admin {
            self.admin_key.as_ref()
        } else {
            self.api_key.as_ref()
        };
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req
            .header("content-type", "application/json")
            .send()
            .with_context(|| format!("POST {path}"))?;
        let status = resp.status().as_u16();
        let text = resp.text()?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let mut body = body.clone();
        if let (Some(m), Some(o)) = (&self.model, body.as_object_mut()) {
            o.entry("model").or_insert(json!(m));
        }
        self.post_raw(path, body.to_string().into(), false)
    }

    fn ok(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        match self.post(path, body)? {
            (200, v) => Ok(v),
            (status, v) => anyhow::bail!("{path} answered {status}: {v}"),
        }
    }
}

fn ids(v: &Value) -> anyhow::Result<Vec<u64>> {
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_u64).collect())
        .with_context(|| format!("expected a list of token IDs, got {v}"))
}

fn floats(v: &Value) -> anyhow::Result<Vec<f64>> {
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect())
        .with_context(|| format!("expected a list of numbers, got {v}"))
}

fn gym_request(messages: Value) -> Value {
    json!({
        "messages": messages, "max_tokens": 16, "temperature": 1.0, "seed": 1234,
        "logprobs": true, "top_logprobs": 0, "return_tokens_as_token_ids": true, "return_token_ids": true,
    })
}

/// Message-level fields, `token_ids` and `token_id:N` entries agree; `/tokenize` matches.
fn token_sources(t: &Target) -> anyhow::Result<Outcome> {
    let messages = json!([{"role": "user", "content": "Name three colors."}]);
    let resp = t.ok("/v1/chat/completions", &gym_request(messages.clone()))?;
    let choice = &resp["choices"][0];
    let message = &choice["message"];
    let gen = ids(&message["generation_token_ids"])?;
    let prompt = ids(&message["prompt_token_ids"])?;
    anyhow::ensure!(!gen.is_empty(), "no generation_token_ids");
    anyhow::ensure!(
        ids(&choice["token_ids"])? == gen,
        "choices[0].token_ids differs from generation_token_ids"
    );
    let from_logprobs: Vec<u64> = choice["logprobs"]["content"]
        .as_array()
        .context("no logprobs.content")?
        .iter()
        .map(|e| {
            e["token"]
                .as_str()
                .and_then(|s| s.strip_prefix("token_id:"))
                .and_then(|s| s.parse().ok())
        })
        .collect::<Option<_>>()
        .context("logprobs.content tokens are not token_id:N")?;
    anyhow::ensure!(
        from_logprobs == gen,
        "token_id:N entries differ from generation_token_ids"
    );
    anyhow::ensure!(
        ids(&resp["prompt_token_ids"])? == prompt,
        "top-level prompt_token_ids differs"
    );
    let lps = floats(&message["generation_log_probs"])?;
    anyhow::ensure!(
        lps.len() == gen.len(),
        "generation_log_probs has {} entries for {} tokens",
        lps.len(),
        gen.len()
    );
    let tokenized = t.ok("/tokenize", &json!({"messages": messages}))?;
    anyhow::ensure!(
        ids(&tokenized["tokens"])? == prompt,
        "/tokenize differs from prompt_token_ids"
    );
    Ok(Outcome::Pass(format!(
        "{} prompt and {} generated tokens agree across all sources",
        prompt.len(),
        gen.len()
    )))
}

/// A three-turn tool-calling rollout: each prompt starts with the previous
/// turn's prompt and generation (minus a final EOS the template re-adds).
fn multi_turn(t: &Target) -> anyhow::Result<Outcome> {
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let mut messages = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let mut previous: Option<(Vec<u64>, Vec<u64>)> = None;
    for turn in 1..=3 {
        let mut body = gym_request(messages.clone());
        body["tools"] = tools.clone();
        let resp = t.ok("/v1/chat/completions", &body)?;
        let m = &resp["choices"][0]["message"];
        let (prompt, gen) = (
            ids(&m["prompt_token_ids"])?,
            ids(&m["generation_token_ids"])?,
        );
        if let Some((p, g)) = &previous {
            // Exactly, whichever stop token ended the turn (or none).
            let full: Vec<u64> = p.iter().chain(g).copied().collect();
            let ok = prompt.starts_with(&full);
            anyhow::ensure!(
                ok,
                "turn {turn}'s prompt does not start with turn {}'s prompt + generation",
                turn - 1
            );
        }
        let list = messages.as_array_mut().context("messages")?;
        let ids_fields = |mut msg: Value| {
            msg["prompt_token_ids"] = json!(prompt);
            msg["generation_token_ids"] = json!(gen);
            msg["generation_log_probs"] = m["generation_log_probs"].clone();
            msg
        };
        match turn {
            1 => {
                list.push(ids_fields(json!({"role": "assistant", "content": m["content"].as_str().unwrap_or(""),
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]})));
                list.push(json!({"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"}));
            }
            _ => {
                list.push(ids_fields(
                    json!({"role": "assistant", "content": m["content"].as_str().unwrap_or("")}),
                ));
                list.push(json!({"role": "user", "content": "Thanks. And tomorrow?"}));
            }
        }
        previous = Some((prompt, gen));
    }
    Ok(Outcome::Pass(
        "turns 2 and 3 start with the exact tokens of the turns before".into(),
    ))
}

/// Generation log-probs against `/v1/logprobs`: `token_mult_prob_error`.
fn logprob_agreement(t: &Target) -> anyhow::Result<Outcome> {
    let (mut sum, mut max, mut count) = (0.0f64, 1.0f64, 0usize);
    for seed in 0..4 {
        let mut body = gym_request(
            json!([{"role": "user", "content": format!("Tell me a fact, number {seed}.")}]),
        );
        body["seed"] = json!(seed);
        body["max_tokens"] = json!(32);
        let resp = t.ok("/v1/chat/completions", &body)?;
        let m = &resp["choices"][0]["message"];
        let (prompt, gen, lps) = (
            ids(&m["prompt_token_ids"])?,
            ids(&m["generation_token_ids"])?,
            floats(&m["generation_log_probs"])?,
        );
        let all: Vec<u64> = prompt.iter().chain(&gen).copied().collect();
        let scored = t.ok(
            "/v1/logprobs",
            &json!({"token_ids": all, "start": prompt.len(), "temperature": 1.0}),
        )?;
        for (a, b) in lps.iter().zip(floats(&scored["token_logprobs"])?) {
            let e = (a - b).abs().exp();
            sum += e;
            max = max.max(e);
            count += 1;
        }
    }
    anyhow::ensure!(count > 0, "no tokens to compare");
    let mean = sum / count as f64;
    let line = format!("token_mult_prob_error mean {mean:.6}, max {max:.6} over {count} tokens");
    Ok(if mean <= 1.05 {
        Outcome::Pass(line)
    } else {
        Outcome::Fail(line)
    })
}

/// A weight push changes the output and the reported version.
fn weight_push(t: &Target, weights: Option<&std::path::Path>) -> anyhow::Result<Outcome> {
    let Some(path) = weights else {
        return Ok(Outcome::Skip("no --weights FILE given".into()));
    };
    let body = gym_request(json!([{"role": "user", "content": "Say something."}]));
    let before = t.ok("/v1/chat/completions", &body)?;
    let version = format!("validate-{}", std::process::id());
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (status, reply) = t.post_raw(
        &format!("/v1/weights?version={version}"),
        bytes.into(),
        true,
    )?;
    anyhow::ensure!(status == 200, "POST /v1/weights answered {status}: {reply}");
    let after = t.ok("/v1/chat/completions", &body)?;
    anyhow::ensure!(
        after["weight_version"] == json!(version),
        "weight_version is {} after pushing {version}",
        after["weight_version"]
    );
    let lp = |v: &Value| v["choices"][0]["message"]["generation_log_probs"].clone();
    anyhow::ensure!(
        lp(&before) != lp(&after),
        "the output did not change after the push"
    );
    Ok(Outcome::Pass(format!(
        "output changed; weight_version {version}"
    )))
}

/// Bad inputs get their errors (and the server keeps answering).
fn bad_inputs(t: &Target) -> anyhow::Result<Outcome> {
    let (status, _) = t.post_raw("/v1/chat/completions", "{not json".into(), false)?;
    anyhow::ensure!(status == 400, "malformed JSON answered {status}, not 400");
    let (status, _) = t.post_raw(
        "/v1/chat/completions",
        json!({"model": "no-such-model-x", "messages": [{"role": "user", "content": "x"}]})
            .to_string()
            .into(),
        false,
    )?;
    anyhow::ensure!(status == 404, "an unknown model answered {status}, not 404");
    let mut body = gym_request(json!([{"role": "user", "content": "x"}]));
    body["top_logprobs"] = Value::Null;
    let (status, v) = t.post("/v1/chat/completions", &body)?;
    anyhow::ensure!(
        status == 400 && v.to_string().contains("top_logprobs"),
        "explicit null top_logprobs answered {status}: {v}"
    );
    let long = "word ".repeat(200_000);
    let (status, v) = t.post(
        "/v1/chat/completions",
        &gym_request(json!([{"role": "user", "content": long}])),
    )?;
    anyhow::ensure!(
        status == 400 && v.to_string().contains("maximum context length"),
        "an over-long prompt answered {status}: {v}"
    );
    t.ok("/tokenize", &json!({"prompt": "still here?"}))?;
    Ok(Outcome::Pass(
        "400 malformed JSON, 404 unknown model, 400 top_logprobs null, 400 maximum context length"
            .into(),
    ))
}

/// Runs every check, prints the checklist, and returns whether all passed.
pub fn run(t: &Target, weights: Option<&std::path::Path>) -> bool {
    type Check<'a> = (&'static str, Box<dyn Fn() -> anyhow::Result<Outcome> + 'a>);
    let checks: Vec<Check> = vec![
        (
            "token sources agree (message fields, token_ids, token_id:N, /tokenize)",
            Box::new(|| token_sources(t)),
        ),
        (
            "three-turn tool-calling rollout keeps its prefix tokens",
            Box::new(|| multi_turn(t)),
        ),
        (
            "generation log-probs match /v1/logprobs",
            Box::new(|| logprob_agreement(t)),
        ),
        (
            "a weight push changes the output and the version",
            Box::new(|| weight_push(t, weights)),
        ),
        ("bad inputs get their errors", Box::new(|| bad_inputs(t))),
    ];
    let mut all_passed = true;
    for (name, check) in checks {
        let (mark, detail) = match check() {
            Ok(Outcome::Pass(d)) => ("PASS", d),
            Ok(Outcome::Skip(d)) => ("SKIP", d),
            Ok(Outcome::Fail(d)) => ("FAIL", d),
            Err(e) => ("FAIL", format!("{e:#}")),
        };
        all_passed &= mark != "FAIL";
        println!("[{mark}] {name}: {detail}");
    }
    all_passed
}
