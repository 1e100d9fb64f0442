//! Token transport over HTTP: the three token sources NeMo Gym reads agree,
//! `/tokenize` matches the prompt, generation log-probs match `/v1/logprobs`,
//! and streams carry every token.

mod common;

use common::server::{floats, ids, Server};
use serde_json::{json, Value};

fn gym_request(extra: Value) -> Value {
    let mut body = json!({
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "logprobs": true,
        "top_logprobs": 0,
        "return_tokens_as_token_ids": true,
        "return_token_ids": true,
        "max_tokens": 24,
        "temperature": 1.0,
        "seed": 17,
        "n": 2,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn gym_style_request_returns_three_agreeing_token_sources() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        51,
    ));
    let server = Server::start(dir.path(), &[]);
    let body = gym_request(json!({}));
    let resp = server.ok("/v1/chat/completions", &body);
    assert_eq!(resp["weight_version"], "0");
    let tokenized = server.ok(
        "/tokenize",
        &json!({"model": "tiny", "messages": body["messages"]}),
    );
    let top_prompt = ids(&resp["prompt_token_ids"]);
    assert_eq!(
        ids(&tokenized["tokens"]),
        top_prompt,
        "/tokenize == prompt_token_ids"
    );
    assert_eq!(tokenized["count"], top_prompt.len());
    let choices = resp["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for c in choices {
        let m = &c["message"];
        let gen = ids(&m["generation_token_ids"]);
        let lps = floats(&m["generation_log_probs"]);
        assert!(!gen.is_empty());
        assert_eq!(ids(&m["prompt_token_ids"]), top_prompt);
        assert_eq!(ids(&c["token_ids"]), gen, "message fields == token_ids");
        let content = c["logprobs"]["content"].as_array().unwrap();
        let from_logprobs: Vec<u32> = content
            .iter()
            .map(|e| {
                e["token"]
                    .as_str()
                    .unwrap()
                    .strip_prefix("token_id:")
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            from_logprobs, gen,
            "token_id:N entries == generation_token_ids"
        );
        let entry_lps: Vec<f64> = content
            .iter()
            .map(|e| e["logprob"].as_f64().unwrap())
            .collect();
        assert_eq!(entry_lps, lps);
        assert!(content
            .iter()
            .all(|e| e["top_logprobs"].as_array().unwrap().is_empty()));
        assert!(lps.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
    assert_ne!(
        choices[0]["message"]["generation_token_ids"],
        choices[1]["message"]["generation_token_ids"]
    );
    // Same seed, same answer.
    let again = server.ok("/v1/chat/completions", &body);
    let (a, b) = (
        &again["choices"][0]["message"],
        &resp["choices"][0]["message"],
    );
    assert_eq!(a["generation_token_ids"], b["generation_token_ids"]);
    // The repeat hits the prefix cache: log-probs agree to float rounding.
    for (x, y) in floats(&a["generation_log_probs"])
        .iter()
        .zip(floats(&b["generation_log_probs"]))
    {
        assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
    }
}

/// Generation and teacher-forced scoring run the same kernels, whose
/// per-row results do not depend on the step's other rows: the log-probs
/// a rollout reports are the bits `/v1/logprobs` and `prompt_logprobs`
/// give for the same tokens (token_mult_prob_error exactly 1), with `n`
/// forks, sampling filters and a prefix served from the cache.
#[test]
fn generation_log_probs_equal_teacher_forced_scoring_bit_for_bit() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        52,
    ));
    let server = Server::start(dir.path(), &[]);
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["deterministic"], true);
    let mut compared = 0usize;
    for (mode, temperature, top_p, top_k) in [
        ("processed", 0.7, 0.9, -1),
        ("raw", 1.0, 1.0, -1),
        ("raw", 0.7, 1.0, 20),
        ("processed", 1.0, 1.0, 20),
        // Same request again: its prompt now comes from the prefix cache.
        ("processed", 1.0, 1.0, 20),
    ] {
        let body = gym_request(json!({
            "logprobs_mode": mode, "temperature": temperature, "top_p": top_p,
            "top_k": top_k, "n": 3,
        }));
        let resp = server.ok("/v1/chat/completions", &body);
        for c in resp["choices"].as_array().unwrap() {
            let prompt = ids(&c["message"]["prompt_token_ids"]);
            let gen = ids(&c["message"]["generation_token_ids"]);
            let lps = floats(&c["message"]["generation_log_probs"]);
            let mut all = prompt.clone();
            all.extend(&gen);
            let scored = server.ok(
                "/v1/logprobs",
                &json!({"token_ids": all, "start": prompt.len(), "temperature": temperature,
                        "top_p": top_p, "top_k": top_k, "logprobs_mode": mode}),
            );
            assert_eq!(scored["weight_version"], resp["weight_version"]);
            let teacher = floats(&scored["token_logprobs"]);
            assert_eq!(teacher.len(), lps.len());
            let bits = |v: &[f64]| v.iter().map(|x| (*x as f32).to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&lps),
                bits(&teacher),
                "{mode} t={temperature} p={top_p} k={top_k}"
            );
            compared += lps.len();
            if mode != "raw" {
                continue;
            }
            // `prompt_logprobs` (the raw distribution) over the whole
            // rollout: the same bits again.
            let echoed = server.ok(
                "/v1/completions",
                &json!({"prompt": all, "max_tokens": 1, "prompt_logprobs": 0}),
            );
            let plp = echoed["choices"][0]["prompt_logprobs"].as_array().unwrap();
            let from_prompt: Vec<f64> = plp[prompt.len()..]
                .iter()
                .zip(&gen)
                .map(|(entry, id)| entry[id.to_string()]["logprob"].as_f64().unwrap())
                .collect();
            assert_eq!(bits(&from_prompt), bits(&lps), "prompt_logprobs, {mode}");
        }
    }
    assert!(compared >= 5 * 3 * 10, "compared {compared} log-probs");
}

#[test]
fn streaming_chunks_carry_each_token_and_final_fields() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        53,
    ));
    let server = Server::start(dir.path(), &[]);
    let body = gym_request(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let chunks = server.stream("/v1/chat/completions", &body);
    let full = server.ok("/v1/chat/completions", &gym_request(json!({})));
    for choice in 0..2u64 {
        let mine: Vec<&Value> = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap())
            .filter(|c| c["index"] == choice)
            .collect();
        let streamed_ids: Vec<u32> = mine
            .iter()
            .filter(|c| c.get("token_ids").is_some())
            .flat_map(|c| ids(&c["token_ids"]))
            .collect();
        let last = mine.last().unwrap();
        assert!(last["finish_reason"].is_string());
        let final_ids = ids(&last["delta"]["generation_token_ids"]);
        assert_eq!(
            streamed_ids, final_ids,
            "chunks add up to the final generation_token_ids"
        );
        // Streaming and non-streaming give the same tokens for the same seed.
        assert_eq!(
            final_ids,
            ids(&full["choices"][choice as usize]["message"]["generation_token_ids"])
        );
        assert_eq!(
            ids(&last["delta"]["prompt_token_ids"]),
            ids(&full["prompt_token_ids"])
        );
        let lps: Vec<f64> = mine
            .iter()
            .filter(|c| !c["logprobs"].is_null())
            .flat_map(|c| {
                c["logprobs"]["content"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["logprob"].as_f64().unwrap())
            })
            .collect();
        assert_eq!(lps, floats(&last["delta"]["generation_log_probs"]));
    }
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        usage["prompt_tokens"].as_u64().unwrap() as usize,
        ids(&full["prompt_token_ids"]).len()
    );
}

#[test]
fn completions_accept_text_ids_and_batches() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        54,
    ));
    let server = Server::start(dir.path(), &[]);
    let text = server.ok(
        "/v1/completions",
        &json!({"prompt": "The cat sat", "max_tokens": 5, "seed": 1, "echo": true, "logprobs": 2}),
    );
    let c = &text["choices"][0];
    assert!(c["text"].as_str().unwrap().starts_with("The cat sat"));
    let prompt = ids(&c["prompt_token_ids"]);
    let tok = server.ok("/tokenize", &json!({"prompt": "The cat sat"}));
    assert_eq!(ids(&tok["tokens"]), prompt);
    // Echoed logprobs: the prompt's tokens (first has none) then the generated ones.
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompt.len() + 5);
    assert!(lp["token_logprobs"][0].is_null());

    let by_ids = server.ok(
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 5, "seed": 1, "prompt_logprobs": 1}),
    );
    assert_eq!(
        by_ids["choices"][0]["generation_token_ids"], c["generation_token_ids"],
        "ids or text: same prompt, same output"
    );
    let plp = by_ids["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(plp.len(), prompt.len());
    assert!(plp[0].is_null());
    assert!(plp[1].get(prompt[1].to_string()).is_some());

    let batch = server.ok(
        "/v1/completions",
        &json!({"prompt": ["a b", "c d e"], "max_tokens": 3, "n": 2, "seed": 3}),
    );
    let indices: Vec<u64> = batch["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, vec![0, 1, 2, 3]);
    let detok = server.ok("/detokenize", &json!({"tokens": prompt}));
    assert_eq!(detok["prompt"], "The cat sat");
}

#[test]
fn stop_strings_cut_the_text_and_keep_the_tokens_that_made_it() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        55,
    ));
    let server = Server::start(dir.path(), &[]);
    let body = json!({"prompt": "Numbers: one two three", "max_tokens": 40, "seed": 8, "ignore_eos": true});
    let plain = server.ok("/v1/completions", &body);
    let text = plain["choices"][0]["text"].as_str().unwrap().to_string();
    let all_ids = ids(&plain["choices"][0]["generation_token_ids"]);
    // A stop string from the middle of what the model writes anyway.
    let mid = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| i >= text.len() / 2)
        .unwrap();
    let stop: String = text[mid..].chars().take(3).collect();
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop]);
    let cut = server.ok("/v1/completions", &with_stop);
    let c = &cut["choices"][0];
    assert_eq!(c["finish_reason"], "stop");
    assert_eq!(c["stop_reason"], json!(stop));
    let cut_text = c["text"].as_str().unwrap();
    assert_eq!(cut_text, &text[..text.find(&stop).unwrap()]);
    let cut_ids = ids(&c["generation_token_ids"]);
    assert!(all_ids.starts_with(&cut_ids) && cut_ids.len() < all_ids.len());
    assert_eq!(floats(&c["generation_log_probs"]).len(), cut_ids.len());
    // A stream holds back what could still become the stop string: its
    // text adds up to the cut text, never to more.
    with_stop["stream"] = json!(true);
    let chunks = server.stream("/v1/completions", &with_stop);
    assert_eq!(streamed_text(&chunks, "text"), cut_text);
}

/// The concatenated `field` of every choice-0 event (`text`, or a chat
/// delta's `content` / `reasoning_content`).
fn streamed_text(chunks: &[Value], field: &str) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .filter(|c| c["index"] == 0)
        .filter_map(|c| c.get(field).or_else(|| c["delta"].get(field)))
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

/// A 4,000-token answer: its text, streamed or not, is the one-shot decode
/// of its tokens (the text stage decodes a bounded window per token), and a
/// chat stream's reasoning and content deltas add up to the parsed message.
#[test]
fn long_generations_decode_like_a_one_shot_decode() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        57,
    ));
    let server = Server::start(
        dir.path(),
        &[
            "--reasoning-parser",
            "qwen3",
            "--tool-call-parser",
            "hermes",
        ],
    )
    .with_timeout(1200);
    // Shorter runs for a quick local check; CI runs the full length.
    let n: usize = std::env::var("GYM_SERVE_TEST_LONG_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let text_body = json!({"prompt": "Once", "max_tokens": n, "seed": 3, "ignore_eos": true,
                           "skip_special_tokens": false});
    // The chat half checks that streamed deltas add up to the parsed message.
    // That holds only while the parse grows monotonically: over thousands of
    // random tokens a late `</think>` with no opening `<think>` turns earlier
    // text into reasoning in the one-shot parse, which a stream cannot take
    // back (vLLM's streams behave alike), so the chat half runs 300 tokens.
    let chat_n = n.min(300);
    let chat_body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": chat_n,
                           "seed": 4, "ignore_eos": true, "temperature": 1.0,
                           "chat_template_kwargs": {"enable_thinking": true}});
    let streamed = |mut b: Value| {
        b["stream"] = json!(true);
        b
    };
    // Run together, so the engine batches them.
    let (full, stream, chat, chat_stream) = std::thread::scope(|s| {
        let full = s.spawn(|| server.ok("/v1/completions", &text_body));
        let stream = s.spawn(|| server.stream("/v1/completions", &streamed(text_body.clone())));
        let chat = s.spawn(|| server.ok("/v1/chat/completions", &chat_body));
        let chat_stream =
            s.spawn(|| server.stream("/v1/chat/completions", &streamed(chat_body.clone())));
        (
            full.join().unwrap(),
            stream.join().unwrap(),
            chat.join().unwrap(),
            chat_stream.join().unwrap(),
        )
    });
    let choice = &full["choices"][0];
    let tokens = ids(&choice["generation_token_ids"]);
    assert_eq!(tokens.len(), n);
    let one_shot = server.ok("/detokenize", &json!({"tokens": tokens}))["prompt"].clone();
    assert_eq!(choice["text"], one_shot);
    assert_eq!(json!(streamed_text(&stream, "text")), one_shot);

    let message = &chat["choices"][0]["message"];
    assert_eq!(ids(&message["generation_token_ids"]).len(), chat_n);
    let last = chat_stream
        .iter()
        .rev()
        .find(|c| !c["choices"].as_array().unwrap().is_empty())
        .unwrap();
    assert_eq!(
        last["choices"][0]["delta"]["generation_token_ids"],
        message["generation_token_ids"]
    );
    let content = message["content"].as_str().unwrap_or("");
    assert_eq!(streamed_text(&chat_stream[1..], "content"), content);
    let reasoning = message["reasoning_content"].as_str().unwrap_or("");
    assert_eq!(
        streamed_text(&chat_stream[1..], "reasoning_content"),
        reasoning
    );
}
