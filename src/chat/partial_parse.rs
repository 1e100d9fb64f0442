//! `parse_output(text, .., partial = true)` kept up to date while a stream's
//! text grows, looking only at the bytes added since the last call: the
//! places that decide the split (the end of leading whitespace, the first
//! `</think>`, the first `<tool_call>` after it) stay where they were found
//! as the text grows, so each is searched for once over each byte. Parsing
//! the whole text after every token made a long streamed answer quadratic.

use super::parsers::{
    partial_tag_len, partial_tags, ReasoningParser, ToolCallParser, THINK_END, THINK_START,
    TOOL_START,
};
use std::ops::Range;

/// Where the reasoning and the content lie in the parsed text (byte ranges).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spans {
    pub reasoning: Option<Range<usize>>,
    pub content: Range<usize>,
}

impl Spans {
    pub fn reasoning<'a>(&self, text: &'a str) -> Option<&'a str> {
        self.reasoning.clone().map(|r| &text[r])
    }

    pub fn content<'a>(&self, text: &'a str) -> &'a str {
        &text[self.content.clone()]
    }
}

/// The first `needle` in `text[base..]`, searched for from `scanned` on (with
/// the overlap a match straddling `scanned` needs); `scanned` moves to the end.
fn find_from(text: &str, base: usize, scanned: &mut usize, needle: &str) -> Option<usize> {
    let mut from = scanned.saturating_sub(needle.len() - 1).max(base);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    *scanned = text.len();
    text[from..].find(needle).map(|at| from + at)
}

#[derive(Debug, Clone)]
pub struct PartialParse {
    reasoning: ReasoningParser,
    tools: ToolCallParser,
    tags: Vec<&'static str>,
    /// Length of the (held-back) text of the last call.
    seen: usize,
    /// Bytes of leading whitespace; `lead_done` once a non-space follows.
    lead: usize,
    lead_done: bool,
    think_end: Option<usize>,
    think_scanned: usize,
    /// Where the tool-call search began (the content's start) and its state.
    tool_base: usize,
    tool_start: Option<usize>,
    tool_scanned: usize,
}

impl PartialParse {
    pub fn new(reasoning: ReasoningParser, tools: ToolCallParser) -> Self {
        Self {
            reasoning,
            tools,
            tags: partial_tags(reasoning, tools),
            seen: 0,
            lead: 0,
            lead_done: false,
            think_end: None,
            think_scanned: 0,
            tool_base: 0,
            tool_start: None,
            tool_scanned: 0,
        }
    }

    /// Forgets what was parsed (the text changed other than by growing).
    pub fn reset(&mut self) {
        *self = Self::new(self.reasoning, self.tools);
    }

    /// The split of `text`, which must extend the text of the previous call
    /// (else call [`reset`](Self::reset) first), as `parse_output` with
    /// `partial` would give it.
    pub fn update(&mut self, text: &str) -> Spans {
        let text = &text[..text.len() - partial_tag_len(text, &self.tags)];
        if text.len() < self.seen {
            self.reset(); // cannot happen for a growing text; stay right anyway
        }
        self.seen = text.len();
        if !self.lead_done {
            match text[self.lead..].find(|c: char| !c.is_whitespace()) {
                Some(at) => {
                    self.lead += at;
                    self.lead_done = true;
                }
                None => self.lead = text.len(),
            }
        }
        let mut spans = Spans {
            reasoning: None,
            content: 0..text.len(),
        };
        if self.reasoning == ReasoningParser::Qwen3 {
            if self.think_end.is_none() {
                self.think_end = find_from(text, 0, &mut self.think_scanned, THINK_END);
            }
            if let Some(end) = self.think_end {
                // `end` is a non-space, so the leading whitespace ends before it.
                let opened = text[self.lead..end].starts_with(THINK_START);
                let start = if opened {
                    self.lead + THINK_START.len()
                } else {
                    0
                };
                spans.reasoning = Some(start..end);
                spans.content = end + THINK_END.len()..text.len();
            } else if text[self.lead..].starts_with(THINK_START) {
                // Still thinking: no content yet.
                spans.reasoning = Some(self.lead + THINK_START.len()..text.len());
                spans.content = text.len()..text.len();
                return spans;
            }
        }
        if self.tools == ToolCallParser::Hermes {
            let base = spans.content.start;
            if self.tool_base != base {
                self.tool_base = base;
                self.tool_start = None;
                self.tool_scanned = base;
            }
            if self.tool_start.is_none() {
                self.tool_start = find_from(text, base, &mut self.tool_scanned, TOOL_START);
            }
            if let Some(start) = self.tool_start {
                spans.content.end = start;
            }
        }
        spans
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::parsers::parse_output;
    use rand::{Rng, SeedableRng};

    /// Grows `text` in random steps and checks every step against a full parse.
    fn check_growth(text: &str, rng: &mut rand_chacha::ChaCha8Rng) {
        for (reasoning, tools) in [
            (ReasoningParser::Qwen3, ToolCallParser::Hermes),
            (ReasoningParser::Qwen3, ToolCallParser::None),
            (ReasoningParser::None, ToolCallParser::Hermes),
            (ReasoningParser::None, ToolCallParser::None),
        ] {
            let mut parse = PartialParse::new(reasoning, tools);
            let mut end = 0;
            while end < text.len() {
                end = (end + rng.random_range(1..4)).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                let now = &text[..end];
                let spans = parse.update(now);
                let full = parse_output(now, reasoning, tools, true);
                assert_eq!(
                    spans.reasoning(now),
                    full.reasoning.as_deref(),
                    "reasoning of {now:?} ({reasoning:?}, {tools:?})"
                );
                assert_eq!(spans.content(now), full.content, "content of {now:?}");
            }
        }
    }

    #[test]
    fn agrees_with_a_full_parse_at_every_step() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let cases = [
            "<think>\nhmm, Zürich?\n</think>\n\nHello <tool_call>{\"name\": \"f\"}</tool_call>",
            "  \n<think>a</think>b",
            "no think here </think> after <tool_call>x",
            "plain text with <thi and <tool_c partial tags < <",
            "<think>still thinking <tool_call> inside",
            "   ",
            "\u{3000}<think>wide space</think>ok",
            "é</think><think></think>again</think>",
            "text <tool_call>{}</tool_call> and </think> late",
        ];
        for case in cases {
            check_growth(case, &mut rng);
        }
        // Random strings over the tags' pieces.
        let pieces = [
            "<think>",
            "</think>",
            "<tool_call>",
            "<",
            "/",
            "think",
            ">",
            " ",
            "\n",
            "a",
            "é",
            "日本",
            "<tool",
            "_call>",
            "</",
            "th",
        ];
        for _ in 0..300 {
            let len = rng.random_range(0..24);
            let text: String = (0..len)
                .map(|_| pieces[rng.random_range(0..pieces.len())])
                .collect();
            check_growth(&text, &mut rng);
        }
    }
}
