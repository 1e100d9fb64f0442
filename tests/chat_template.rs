//! The fixture's tokenizer and chat template as the engine renders them.

mod common;

use gym_serve::chat::ChatError;
use serde_json::{json, Map, Value};

fn kwargs(pairs: &[(&str, Value)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[test]
fn control_and_markup_tokens_are_single_ids() {
    let (_dir, loaded) = common::tiny_qwen3(41);
    let tok = &loaded.chat.tokenizer;
    for t in [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    ] {
        let id = tok.token_to_id(t).unwrap_or_else(|| panic!("{t} missing"));
        assert_eq!(
            tok.encode(t, false).unwrap(),
            vec![id],
            "{t} is not one token"
        );
    }
    let eos = loaded.chat.eos_token_ids();
    assert_eq!(
        eos,
        &[
            tok.token_to_id("<|im_end|>").unwrap(),
            tok.token_to_id("<|endoftext|>").unwrap()
        ]
    );
    let text = "Hello! <think>why</think> 42 Zürich\n";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    // Markup stays visible when special tokens are skipped; control tokens do not.
    let ids = tok.encode("<|im_start|><think>x</think>", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "<think>x</think>");
}

#[test]
fn tools_and_tool_calls_render_as_chatml_with_python_json() {
    let (_dir, loaded) = common::tiny_qwen3(42);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Lyon\"}"}}
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
    ]);
    let text = loaded
        .chat
        .render(&messages, Some(&tools), true, &Map::new())
        .unwrap();
    assert!(
        text.starts_with("<|im_start|>system\nBe brief.\n\n# Tools\n"),
        "{text}"
    );
    assert!(text.contains(r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}"#), "{text}");
    assert!(text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}\n</tool_call><|im_end|>\n"), "{text}");
    assert!(
        text.ends_with("<|im_start|>tool\n21C<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
}

#[test]
fn thinking_switch_and_reasoning_of_earlier_turns() {
    let (_dir, loaded) = common::tiny_qwen3(43);
    let messages = json!([
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "\nold thoughts\n"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "reasoning_content": "new thoughts"},
    ]);
    let text = loaded
        .chat
        .render(&messages, None, false, &Map::new())
        .unwrap();
    assert!(
        !text.contains("old thoughts"),
        "reasoning before the last user turn is dropped: {text}"
    );
    assert!(
        text.contains("<|im_start|>assistant\n<think>\nnew thoughts\n</think>\n\nd<|im_end|>"),
        "{text}"
    );

    let one = json!([{"role": "user", "content": "hi"}]);
    let on = loaded.chat.render(&one, None, true, &Map::new()).unwrap();
    assert!(on.ends_with("<|im_start|>assistant\n"));
    let off = loaded
        .chat
        .render(
            &one,
            None,
            true,
            &kwargs(&[("enable_thinking", json!(false))]),
        )
        .unwrap();
    assert!(
        off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{off}"
    );
    let ids = loaded
        .chat
        .encode_chat(&one, None, true, &Map::new())
        .unwrap();
    assert_eq!(loaded.chat.tokenizer.decode(&ids, false).unwrap(), on);
}

#[test]
fn template_errors_carry_the_template_message() {
    let (_dir, loaded) = common::tiny_qwen3(44);
    let messages = json!([{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]);
    match loaded.chat.render(&messages, None, true, &Map::new()) {
        Err(ChatError::Template(msg)) => {
            assert!(msg.contains("system message is only allowed"), "{msg}")
        }
        other => panic!("expected a template error, got {other:?}"),
    }
    let messages = json!([{"role": "narrator", "content": "a"}]);
    let err = loaded
        .chat
        .render(&messages, None, true, &Map::new())
        .unwrap_err();
    assert!(
        err.to_string().contains("Unknown message role: narrator"),
        "{err}"
    );
}
