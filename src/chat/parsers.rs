//! Splitting generated text into reasoning, content and tool calls.
//!
//! One function serves both response styles: a full response parses the final
//! text; a stream parses the text so far with `partial` set (holding back a
//! pending tool call or a half-written tag) and sends the growth since the
//! last parse.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReasoningParser {
    #[default]
    None,
    /// `<think>…</think>` before the answer (Qwen3, DeepSeek-R1 style).
    Qwen3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ToolCallParser {
    #[default]
    None,
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks.
    Hermes,
}

pub(super) const THINK_START: &str = "<think>";
pub(super) const THINK_END: &str = "</think>";
pub(super) const TOOL_START: &str = "<tool_call>";
const TOOL_END: &str = "</tool_call>";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParsedToolCall {
    pub name: String,
    /// The arguments as a JSON string, as OpenAI clients expect.
    pub arguments: String,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedOutput {
    pub reasoning: Option<String>,
    pub content: String,
    pub tool_calls: Vec<ParsedToolCall>,
}

/// Length of the longest suffix of `text` that could start one of `tags`.
pub(super) fn partial_tag_len(text: &str, tags: &[&str]) -> usize {
    tags.iter()
        .flat_map(|tag| (1..tag.len()).rev().map(move |n| &tag[..n]))
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0)
}

/// The tags a partial parse holds back a half-written copy of.
pub(super) fn partial_tags(reasoning: ReasoningParser, tools: ToolCallParser) -> Vec<&'static str> {
    let mut tags = Vec::new();
    if reasoning == ReasoningParser::Qwen3 {
        tags.extend([THINK_START, THINK_END]);
    }
    if tools == ToolCallParser::Hermes {
        tags.push(TOOL_START);
    }
    tags
}

pub fn parse_output(
    text: &str,
    reasoning: ReasoningParser,
    tools: ToolCallParser,
    partial: bool,
) -> ParsedOutput {
    let tags = partial_tags(reasoning, tools);
    let text = if partial {
        &text[..text.len() - partial_tag_len(text, &tags)]
    } else {
        text
    };
    let mut out = ParsedOutput::default();
    let mut rest = text;
    if reasoning == ReasoningParser::Qwen3 {
        if let Some(end) = rest.find(THINK_END) {
            let thought = rest[..end]
                .trim_start()
                .strip_prefix(THINK_START)
                .unwrap_or(&rest[..end]);
            out.reasoning = Some(thought.to_string());
            rest = &rest[end + THINK_END.len()..];
        } else if let Some(thought) = rest.trim_start().strip_prefix(THINK_START) {
            // Still thinking (or cut off while thinking).
            out.reasoning = Some(thought.to_string());
            rest = "";
        }
    }
    if tools == ToolCallParser::Hermes {
        if let Some(start) = rest.find(TOOL_START) {
            if partial {
                rest = &rest[..start];
            } else if let Some(calls) = parse_tool_calls(&rest[start..]) {
                out.tool_calls = calls;
                rest = &rest[..start];
            }
        }
    }
    out.content = rest.to_string();
    out
}

/// Parses every `<tool_call>` block; `None` if any is not valid JSON with a
/// name (the text is then left as content, as vLLM does).
fn parse_tool_calls(text: &str) -> Option<Vec<ParsedToolCall>> {
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(TOOL_START) {
        let body_start = start + TOOL_START.len();
        let (body, next) = match rest[body_start..].find(TOOL_END) {
            Some(end) => (
                &rest[body_start..body_start + end],
                &rest[body_start + end + TOOL_END.len()..],
            ),
            None => (&rest[body_start..], ""),
        };
        let value: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
        let name = value.get("name")?.as_str()?.to_string();
        let arguments = match value.get("arguments") {
            None | Some(serde_json::Value::Null) => "{}".to_string(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        };
        calls.push(ParsedToolCall { name, arguments });
        rest = next;
    }
    (!calls.is_empty()).then_some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_and_content() {
        let p = parse_output(
            "<think>\nhmm\n</think>\n\nHello",
            ReasoningParser::Qwen3,
            ToolCallParser::None,
            false,
        );
        assert_eq!(p.reasoning.as_deref(), Some("\nhmm\n"));
        assert_eq!(p.content, "\n\nHello");
        let p = parse_output("Hello", ReasoningParser::Qwen3, ToolCallParser::None, false);
        assert_eq!((p.reasoning, p.content.as_str()), (None, "Hello"));
        let p = parse_output(
            "<think>still",
            ReasoningParser::Qwen3,
            ToolCallParser::None,
            true,
        );
        assert_eq!(p.reasoning.as_deref(), Some("still"));
        let p = parse_output(
            "<think>a</thi",
            ReasoningParser::Qwen3,
            ToolCallParser::None,
            true,
        );
        assert_eq!(p.reasoning.as_deref(), Some("a"));
    }

    #[test]
    fn hermes_tool_calls() {
        let text = "Let me check.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>{\"name\": \"g\"}</tool_call>";
        let p = parse_output(text, ReasoningParser::None, ToolCallParser::Hermes, false);
        assert_eq!(p.content, "Let me check.\n");
        assert_eq!(p.tool_calls.len(), 2);
        assert_eq!(p.tool_calls[0].arguments, "{\"x\":1}");
        assert_eq!(p.tool_calls[1].arguments, "{}");
        let p = parse_output(
            "<tool_call>{not json</tool_call>",
            ReasoningParser::None,
            ToolCallParser::Hermes,
            false,
        );
        assert!(p.tool_calls.is_empty());
        assert_eq!(p.content, "<tool_call>{not json</tool_call>");
        let p = parse_output(
            "ok <tool_c",
            ReasoningParser::None,
            ToolCallParser::Hermes,
            true,
        );
        assert_eq!(p.content, "ok ");
    }
}
