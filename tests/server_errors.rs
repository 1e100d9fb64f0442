//! Bad input gets a clear OpenAI error with the right status, and the server
//! keeps answering afterwards.

mod common;

use common::server::{ids, Server};
use serde_json::{json, Value};

fn assert_error(resp: (u16, Value), status: u16, needle: &str) -> Value {
    let (code, body) = resp;
    assert_eq!(code, status, "{body}");
    let err = &body["error"];
    for field in ["message", "type", "param", "code"] {
        assert!(err.get(field).is_some(), "error body lacks {field}: {body}");
    }
    let msg = err["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
    body
}

fn chat(messages_text: &str, extra: Value) -> Value {
    let mut body =
        json!({"messages": [{"role": "user", "content": messages_text}], "max_tokens": 4});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn every_error_case_has_its_status_and_message() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        71,
    ));
    let server = Server::start(dir.path(), &["--max-model-len", "64"]);
    let url = server.url("/v1/chat/completions");

    // Malformed JSON and wrong types.
    let resp = server
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("JSON"));
    assert_error(
        server.post(
            "/v1/chat/completions",
            &chat("hi", json!({"temperature": "hot"})),
        ),
        400,
        "temperature",
    );
    assert_error(
        server.post("/v1/chat/completions", &json!({"messages": "hi"})),
        400,
        "messages",
    );
    assert_error(
        server.post("/v1/chat/completions", &json!({"messages": []})),
        400,
        "messages",
    );

    // Unknown model.
    let body = assert_error(
        server.post(
            "/v1/chat/completions",
            &chat("hi", json!({"model": "gpt-5"})),
        ),
        404,
        "gpt-5",
    );
    assert_eq!(body["error"]["param"], "model");

    // Explicit null top_logprobs with logprobs: true.
    let body = assert_error(
        server.post(
            "/v1/chat/completions",
            &chat("hi", json!({"logprobs": true, "top_logprobs": null})),
        ),
        400,
        "top_logprobs",
    );
    assert_eq!(body["error"]["param"], "top_logprobs");
    assert_error(
        server.post(
            "/v1/chat/completions",
            &chat("hi", json!({"logprobs": true, "top_logprobs": 21})),
        ),
        400,
        "top_logprobs",
    );

    // Out-of-range sampling parameters name the parameter.
    assert_error(
        server.post("/v1/chat/completions", &chat("hi", json!({"top_p": 1.5}))),
        400,
        "top_p",
    );
    assert_error(
        server.post(
            "/v1/chat/completions",
            &chat("hi", json!({"temperature": -1.0})),
        ),
        400,
        "temperature",
    );
    assert_error(
        server.post("/v1/chat/completions", &chat("hi", json!({"n": 0}))),
        400,
        "n",
    );
    assert_error(
        server.post("/v1/chat/completions", &chat("hi", json!({"top_k": -5}))),
        400,
        "top_k",
    );

    // Context overflow: 400 with the words Gym looks for.
    let long = "word ".repeat(200);
    assert_error(
        server.post("/v1/chat/completions", &chat(&long, json!({}))),
        400,
        "maximum context length",
    );
    assert_error(
        server.post("/v1/completions", &json!({"prompt": long})),
        400,
        "maximum context length",
    );
    assert_error(
        server.post("/tokenize", &json!({"prompt": "x", "model": "nope"})),
        404,
        "nope",
    );

    // max_tokens beyond the context is clamped to what fits.
    let resp = server.ok(
        "/v1/chat/completions",
        &chat(
            "hi",
            json!({"max_tokens": 100000, "ignore_eos": true, "seed": 1}),
        ),
    );
    let prompt = ids(&resp["choices"][0]["message"]["prompt_token_ids"]).len();
    let gen = ids(&resp["choices"][0]["message"]["generation_token_ids"]).len();
    assert_eq!(prompt + gen, 64);
    assert_eq!(resp["choices"][0]["finish_reason"], "length");

    // Token IDs outside the vocabulary.
    assert_error(
        server.post("/v1/completions", &json!({"prompt": [1, 2, 99999]})),
        400,
        "99999",
    );
    assert_error(
        server.post(
            "/v1/logprobs",
            &json!({"token_ids": [1, 99999], "start": 1}),
        ),
        400,
        "99999",
    );
    assert_error(
        server.post("/detokenize", &json!({"tokens": [99999]})),
        400,
        "99999",
    );
    assert_error(
        server.post("/v1/logprobs", &json!({"token_ids": [1, 2], "start": 0})),
        400,
        "start",
    );
    assert_error(
        server.post(
            "/v1/chat/completions",
            &chat("hi", json!({"required_prefix_token_ids": [1, 99999]})),
        ),
        400,
        "99999",
    );
    // A prefix the rendered conversation cannot be cut for: said, not papered over.
    let im_end = ids(&server.ok(
        "/tokenize",
        &json!({"prompt": "<|im_end|>", "add_special_tokens": false}),
    )["tokens"])[0];
    assert_error(
        server.post(
            "/v1/chat/completions",
            &chat("hi", json!({"required_prefix_token_ids": vec![im_end; 9]})),
        ),
        400,
        "cannot splice",
    );
    // Template errors (a role the template refuses) are the client's to fix.
    assert_error(
        server.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "narrator", "content": "x"}]}),
        ),
        400,
        "narrator",
    );
    assert_error(
        server.post("/v1/completions", &json!({"max_tokens": 3})),
        400,
        "prompt",
    );
    let (status, _) = server.get("/v1/nothing-here");
    assert_eq!(status, 404);

    // Still serving.
    assert_eq!(server.get("/health").0, 200);
    server.ok("/v1/chat/completions", &chat("hi", json!({})));
}

#[test]
fn api_key_is_required_when_configured() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        72,
    ));
    let server = Server::start(dir.path(), &["--api-key", "sekret"]);
    let body = chat("hi", json!({}));
    assert_error(server.post("/v1/chat/completions", &body), 401, "API key");
    let resp = server
        .http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let resp = server
        .http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth("sekret")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        server
            .http
            .get(server.url("/v1/models"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    assert_eq!(server.get("/health").0, 200, "health stays open for probes");
}

/// Admin endpoints are never less protected than inference ones: with only
/// `--api-key`, they take it; with no key at all, a non-loopback bind needs
/// `--allow-open-admin`.
#[test]
fn admin_endpoints_take_the_api_key_without_their_own() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        73,
    ));
    let server = Server::start(dir.path(), &["--api-key", "sekret"]);
    let call = |method: &str, path: &str, key: Option<&str>| {
        let url = server.url(path);
        let mut req = match method {
            "GET" => server.http.get(url),
            _ => server
                .http
                .post(url)
                .header("content-type", "application/json"),
        };
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.body("{}").send().unwrap().status().as_u16()
    };
    for (method, path) in [
        ("POST", "/pause?mode=keep"),
        ("POST", "/resume"),
        ("POST", "/v1/weights"),
        ("POST", "/update_weights_from_disk"),
        ("POST", "/reset_prefix_cache"),
        ("GET", "/get_weight_version"),
        ("GET", "/is_paused"),
    ] {
        assert_eq!(call(method, path, None), 401, "{path} without a key");
        assert_eq!(
            call(method, path, Some("wrong")),
            401,
            "{path} with a wrong key"
        );
    }
    assert_eq!(call("POST", "/pause?mode=keep", Some("sekret")), 200);
    assert_eq!(call("POST", "/resume", Some("sekret")), 200);
    assert_eq!(call("POST", "/reset_prefix_cache", Some("sekret")), 200);
    assert_eq!(server.get("/health").0, 200);

    // No key at all on a public address: refused at start, naming the way out.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gym-serve"))
        .arg("--model")
        .arg(dir.path())
        .args(["--host", "0.0.0.0", "--port", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--allow-open-admin"), "{stderr}");
    // With the flag it serves (and warns).
    let open = Server::start(dir.path(), &["--host", "0.0.0.0", "--allow-open-admin"]);
    assert_eq!(open.get("/health").0, 200);
}
