//! Multi-turn rollouts stay on-policy: a later prompt begins with the exact
//! tokens of earlier turns even when their text re-tokenizes differently.

mod common;

use common::server::{ids, Server};
use serde_json::{json, Value};

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

fn strip_eos(mut t: Vec<u32>, eos: &[u32]) -> Vec<u32> {
    if t.last().is_some_and(|l| eos.contains(l)) {
        t.pop();
    }
    t
}

fn chat(server: &Server, messages: &Value, seed: u64) -> (Vec<u32>, Vec<u32>, String) {
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
    }
    m
}

#[test]
fn three_turn_tool_calling_rollout_keeps_its_prefix_tokens() {
    let dir = common::write_model(&common::tiny_options(
        gym_serve::config::Architecture::Qwen3,
        61,
    ));
    let loaded = common::load(dir.path());
    let eos = loaded.chat.eos_token_ids().to_vec();
    let server = Server::start(dir.path(), &[]);

    let mut messages = json!([
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "What is the weather in Paris?"}
    ]);
    // Turn 1: the assistant's tool-call turn. Pick a seed whose generated IDs
    // decode to text that re-tokenizes to different IDs (the drift case).
    let (p1, g1, seed) = (1..50u64)
        .find_map(|seed| {
            let (p, g, _) = chat(&server, &messages, seed);
            let text = server.ok("/detokenize", &json!({"tokens": g}))["prompt"]
                .as_str()
                .unwrap()
                .to_string();
            let again = ids(&server.ok(
                "/tokenize",
                &json!({"prompt": text, "add_special_tokens": false}),
            )["tokens"]);
            (again != g).then_some((p, g, seed))
        })
        .expect("a generation that re-tokenizes differently");
    messages.as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": null, "reasoning_content": "I need the weather tool.",
               "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}],
               "prompt_token_ids": p1, "generation_token_ids": g1}),
        json!({"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"}),
    ]);

    // Turn 2: the assistant's answer after the tool result.
    let (p2, g2, text2) = chat(&server, &messages, seed + 100);
    let expected: Vec<u32> = [p1.clone(), strip_eos(g1.clone(), &eos)].concat();
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
        json!({"role": "assistant", "content": text2, "prompt_token_ids": p2, "generation_token_ids": g2}),
        json!({"role": "user", "content": "And tomorrow?"}),
    ]);
    let (p3, _, _) = chat(&server, &messages, seed + 200);
    let expected3: Vec<u32> = [p2.clone(), strip_eos(g2, &eos)].concat();
    assert!(
        p3.starts_with(&expected3),
        "turn 3 prompt must start with turn 2's prompt + generation"
    );
    assert!(p3.starts_with(&expected), "and so with turn 1's");
}
