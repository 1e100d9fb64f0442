//! Multi-turn rollouts stay on-policy: a later prompt begins with the exact
//! tokens of earlier turns even when their text re-tokenizes differently.

mod common;

use common::server::{ids, Server};
use serde_json::{json, Value};

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

/// One turn's prompt IDs, generated IDs, text and generation log-probs.
type Turn = (Vec<u32>, Vec<u32>, String, Value);

fn chat(server: &Server, messages: &Value, seed: u64) -> Turn {
    let resp = server.ok(
        "/v1/chat/completions",
        &json!({"messages": messages, "tools": tools(), "max_tokens": 12, "seed": seed, "return_token_ids": true,
                "chat_template_kwargs": {"enable_thinking": true}}),
    );
    let m = &resp["choices"][0]["message"];
    (
        ids(&m["prompt_token_ids"]),
        ids(&m["generation_token_ids"]),
        m["content"].as_str().unwrap_or("").to_string(),
        m["generation_log_probs"].clone(),
    )
}

fn plain_tokenize(server: &Server, messages: &Value) -> Vec<u32> {
    ids(&server.ok("/tokenize", &json!({"messages": messages, "tools": tools(), "chat_template_kwargs": {"enable_thinking": true}}))["tokens"])
}

/// Strips the token fields, as a client that does not keep IDs would send.
fn without_ids(messages: &Value) -> Value {
    let mut m = messages.clone();
    for msg in m.as_array_mut().unwrap() {
        let o = msg.as_object_mut().unwrap();
        o.remove("prompt_token_ids");
        o.remove("generation_token_ids");
        o.remove("generation_log_probs");
    }
    m
}

#[test]
fn three_turn_tool_calling_rollout_keeps_its_prefix_tokens() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        61,
    ));
    let server = Server::start(dir.path(), &[]);

    let mut messages = json!([
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "What is the weather in Paris?"}
    ]);
    // Turn 1: the assistant's tool-call turn. Pick a seed whose generated IDs
    // decode to text that re-tokenizes to different IDs (the drift case).
    let (p1, g1, lp1, seed) = (1..50u64)
        .find_map(|seed| {
            let (p, g, _, lp) = chat(&server, &messages, seed);
            let text = server.ok("/detokenize", &json!({"tokens": g}))["prompt"]
                .as_str()
                .unwrap()
                .to_string();
            let again = ids(&server.ok(
                "/tokenize",
                &json!({"prompt": text, "add_special_tokens": false}),
            )["tokens"]);
            (again != g).then_some((p, g, lp, seed))
        })
        .expect("a generation that re-tokenizes differently");
    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": null, "reasoning_content": "I need the weather tool.",
               "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}],
               "prompt_token_ids": p1, "generation_token_ids": g1, "generation_log_probs": lp1}),
        json!({"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}),
    ]);

    // Turn 2: the assistant's answer after the tool result.
    let (p2, g2, text2, lp2) = chat(&server, &messages, seed + 100);
    let expected: Vec<u32> = [p1.clone(), g1.clone()].concat();
    assert!(
        p2.starts_with(&expected),
        "turn 2 prompt must start with turn 1's prompt + generation"
    );
    assert_eq!(ids(&server.ok("/tokenize", &json!({"messages": messages, "tools": tools(), "chat_template_kwargs": {"enable_thinking": true}}))["tokens"]), p2,
        "/tokenize gives the same spliced prompt as the chat request");
    let plain = plain_tokenize(&server, &without_ids(&messages));
    assert_ne!(
        plain, p2,
        "without IDs the prompt is the plain re-tokenization"
    );
    assert!(!plain.starts_with(&expected));
    let resp = server.ok(
        "/v1/chat/completions",
        &json!({"messages": without_ids(&messages), "tools": tools(), "max_tokens": 1,
        "chat_template_kwargs": {"enable_thinking": true}}),
    );
    assert_eq!(
        ids(&resp["choices"][0]["message"]["prompt_token_ids"]),
        plain
    );
    // An explicit required prefix does the same as message-level IDs.
    let explicit = server.ok(
        "/tokenize",
        &json!({"messages": without_ids(&messages), "tools": tools(),
        "chat_template_kwargs": {"enable_thinking": true}, "required_prefix_token_ids": expected}),
    );
    assert_eq!(ids(&explicit["tokens"]), p2);

    // Turn 3: a follow-up question; the template now drops turn 1's reasoning,
    // and the splice (counting EOS tokens) still holds.
    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": text2, "prompt_token_ids": p2, "generation_token_ids": g2, "generation_log_probs": lp2}),
        json!({"role": "user", "content": "And tomorrow?"}),
    ]);
    let (p3, _, _, _) = chat(&server, &messages, seed + 200);
    let expected3: Vec<u32> = [p2.clone(), g2].concat();
    assert!(
        p3.starts_with(&expected3),
        "turn 3 prompt must start with turn 2's prompt + generation"
    );
    assert!(p3.starts_with(&expected), "and so with turn 1's");
}

/// Turn 1 of a conversation, generated greedily with at most `max_tokens`.
fn first_turn(server: &Server, messages: &Value, max_tokens: usize) -> Value {
    let resp = server.ok(
        "/v1/chat/completions",
        &json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0}),
    );
    resp["choices"][0]["message"].clone()
}

fn assistant_turn(prompt: &[u32], generation: &[u32], log_probs: Value) -> Value {
    json!({"role": "assistant", "content": "ignored: the IDs are the turn",
           "prompt_token_ids": prompt, "generation_token_ids": generation,
           "generation_log_probs": log_probs})
}

#[test]
fn the_stop_token_the_model_sampled_stays_in_the_next_prompt() {
    // generation_config.json lists two stop tokens, <|im_end|> then
    // <|endoftext|>, as Qwen3 ships them.
    let (dir, loaded) = common::tiny_qwen3(62);
    let eos = loaded.chat.eos_token_ids().to_vec();
    assert!(eos.len() >= 2, "the fixture has two stop tokens: {eos:?}");
    let (im_end, end_of_text) = (eos[0], eos[1]);
    let server = Server::start(dir.path(), &[]);
    let user = json!([{"role": "user", "content": "Say something."}]);
    let turn = first_turn(&server, &user, 6);
    let prompt = ids(&turn["prompt_token_ids"]);
    let generated = ids(&turn["generation_token_ids"]);
    let mut lp = turn["generation_log_probs"].as_array().unwrap().clone();

    // The turn as if it had ended on each stop token, or been cut by length.
    let body = generated[..generated.len().min(5)].to_vec();
    lp.truncate(body.len());
    let next = |generation: &[u32], lps: Vec<Value>| {
        let mut messages = user.as_array().unwrap().clone();
        messages.push(assistant_turn(&prompt, generation, json!(lps)));
        messages.push(json!({"role": "user", "content": "And then?"}));
        server.post(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 1}),
        )
    };
    for stop in [im_end, end_of_text] {
        let generation = [body.clone(), vec![stop]].concat();
        let lps = [lp.clone(), vec![json!(-0.25)]].concat();
        let (status, resp) = next(&generation, lps);
        assert_eq!(status, 200, "{resp}");
        let p2 = ids(&resp["choices"][0]["message"]["prompt_token_ids"]);
        let expected = [prompt.clone(), generation.clone()].concat();
        assert!(
            p2.starts_with(&expected),
            "a turn ending on stop token {stop} is spliced with it: {p2:?} vs {expected:?}"
        );
        // The template's own closing token is not added after the sampled one.
        assert!(!eos.contains(&p2[expected.len()]), "{p2:?}");
    }
    // Cut by length: the tokens stay, the template's closing token follows.
    let (status, resp) = next(&body, lp.clone());
    assert_eq!(status, 200, "{resp}");
    let p2 = ids(&resp["choices"][0]["message"]["prompt_token_ids"]);
    let expected = [prompt.clone(), body.clone(), vec![im_end]].concat();
    assert!(p2.starts_with(&expected), "{p2:?} vs {expected:?}");
}

#[test]
fn partial_token_fields_and_bad_tools_are_refused_by_name() {
    let (dir, _) = common::tiny_qwen3(63);
    let server = Server::start(dir.path(), &[]);
    let user = json!({"role": "user", "content": "Hi"});
    let partial = json!([user, {"role": "assistant", "content": "Hello", "prompt_token_ids": [1, 2], "generation_token_ids": [3]}, user]);
    let (status, resp) = server.post(
        "/v1/chat/completions",
        &json!({"messages": partial, "max_tokens": 1}),
    );
    assert_eq!(status, 400, "{resp}");
    let message = resp["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("messages[1]") && message.contains("generation_log_probs"),
        "{message}"
    );
    let (status, _) = server.post("/tokenize", &json!({"messages": partial}));
    assert_eq!(status, 400, "/tokenize applies the same rule");

    for (tools, param) in [
        (json!([{"type": "function"}]), "tools[0].function"),
        (json!({"a": 1}), "tools"),
        (
            json!([{"type": "function", "function": {"description": "no name"}}]),
            "tools[0].function.name",
        ),
    ] {
        let (status, resp) = server.post(
            "/v1/chat/completions",
            &json!({"messages": [user], "tools": tools, "max_tokens": 1}),
        );
        assert_eq!(status, 400, "{tools}: {resp}");
        assert_eq!(resp["error"]["param"], param, "{resp}");
    }
    let tools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    for choice in [
        json!("required"),
        json!({"type": "function", "function": {"name": "f"}}),
    ] {
        let (status, resp) = server.post(
            "/v1/chat/completions",
            &json!({"messages": [user], "tools": tools, "tool_choice": choice, "max_tokens": 1}),
        );
        assert_eq!(status, 400, "{resp}");
        assert_eq!(resp["error"]["param"], "tool_choice");
    }
    // The OpenAI developer role is a system message in the fixture template.
    let developer = json!([{"role": "developer", "content": "Be brief."}, user]);
    let system = json!([{"role": "system", "content": "Be brief."}, user]);
    let tokens = |m: &Value| ids(&server.ok("/tokenize", &json!({"messages": m}))["tokens"]);
    assert_eq!(tokens(&developer), tokens(&system));
    // Out-of-vocabulary prefix IDs are refused by /tokenize as by chat; an
    // empty prefix is no prefix.
    let (status, _) = server.post(
        "/tokenize",
        &json!({"messages": [user], "required_prefix_token_ids": [u32::MAX]}),
    );
    assert_eq!(status, 400);
    let with_empty = server.ok(
        "/tokenize",
        &json!({"messages": system, "required_prefix_token_ids": []}),
    );
    assert_eq!(ids(&with_empty["tokens"]), tokens(&system));
}
