//! The text stage of one generated sequence: incremental detokenization,
//! stop strings, and (for streams) what may be sent so far and how it splits
//! into reasoning and content. Every step costs time bounded by what the new
//! token added, so a response's text work is linear in its length; the only
//! whole-text passes are one decode and one parse when the sequence ends.

use super::detokenizer::Detokenizer;
use super::parsers::{parse_output, ParsedOutput, ReasoningParser, ToolCallParser};
use super::partial_parse::PartialParse;
use super::stop::StopMatcher;
use super::{ChatError, TextTokenizer};
use std::sync::Arc;

/// How a sequence's tokens become its text.
#[derive(Debug, Clone, Default)]
pub struct TextOptions {
    pub stop: Option<Arc<StopMatcher>>,
    pub include_stop_str_in_output: bool,
    pub skip_special_tokens: bool,
}

#[derive(Debug, Clone, Default)]
pub struct TextOutput {
    detokenizer: Detokenizer,
    stop: Option<Arc<StopMatcher>>,
    include_stop_str_in_output: bool,
}

impl TextOutput {
    pub fn new(options: &TextOptions) -> Self {
        Self {
            detokenizer: Detokenizer::new(options.skip_special_tokens),
            stop: options.stop.clone(),
            include_stop_str_in_output: options.include_stop_str_in_output,
        }
    }

    /// The text so far (cut at a matched stop string).
    pub fn text(&self) -> &str {
        self.detokenizer.text()
    }

    /// Changes when the text changed other than by growing.
    pub fn revision(&self) -> u64 {
        self.detokenizer.revision()
    }

    /// Brings the text up to date with `ids` (the newest token last) and
    /// looks for a stop string in the part the new text could have completed;
    /// returns the stop string that ended the sequence, if one did.
    pub fn update(
        &mut self,
        tokenizer: &TextTokenizer,
        ids: &[u32],
        finished: bool,
    ) -> Result<Option<String>, ChatError> {
        let (searched, revision) = (self.text().len(), self.revision());
        self.detokenizer.update(tokenizer, ids, finished)?;
        let Some(stop) = &self.stop else {
            return Ok(None);
        };
        // A rewritten text is searched again in full.
        let from = if self.revision() == revision {
            searched
        } else {
            0
        };
        let text = self.detokenizer.text();
        let Some(hit) = stop.find_new(text, from.min(text.len())) else {
            return Ok(None);
        };
        let s = stop.stop(hit.index).to_string();
        let end = if self.include_stop_str_in_output {
            hit.at + s.len()
        } else {
            hit.at
        };
        self.detokenizer.truncate(end);
        Ok(Some(s))
    }

    /// What a stream may send now: the whole text once the sequence has
    /// finished; before, the text without its last bytes that a later token
    /// could still turn into a stop string (which would cut them).
    pub fn streamable(&self, finished: bool) -> &str {
        let text = self.text();
        let hold = match &self.stop {
            Some(stop) if !finished && !self.include_stop_str_in_output => stop.longest() - 1,
            _ => 0,
        };
        let mut end = text.len().saturating_sub(hold);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }
}

/// The text `now` adds beyond the `sent` bytes already streamed, if it only grew.
pub fn growth(now: &str, sent: &mut usize) -> Option<String> {
    if now.len() > *sent && now.is_char_boundary(*sent) {
        let delta = now[*sent..].to_string();
        *sent = now.len();
        Some(delta)
    } else {
        None
    }
}

/// What one step of a chat stream adds to a choice.
#[derive(Debug, Default)]
pub struct ChatDelta {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    /// The final split (tool calls included), on the sequence's last step.
    pub finished: Option<ParsedOutput>,
}

/// A chat stream's view of one choice: the reasoning and content it has
/// sent, and the incremental parse of its text.
#[derive(Debug, Clone)]
pub struct ChatStreamText {
    reasoning_parser: ReasoningParser,
    tool_parser: ToolCallParser,
    parse: PartialParse,
    revision: u64,
    sent_reasoning: usize,
    sent_content: usize,
}

impl ChatStreamText {
    pub fn new(reasoning: ReasoningParser, tools: ToolCallParser) -> Self {
        Self {
            reasoning_parser: reasoning,
            tool_parser: tools,
            parse: PartialParse::new(reasoning, tools),
            revision: 0,
            sent_reasoning: 0,
            sent_content: 0,
        }
    }

    /// The deltas `output` has for the stream now; once `finished`, from the
    /// final parse of the whole text.
    pub fn delta(&mut self, output: &TextOutput, finished: bool) -> ChatDelta {
        let text = output.streamable(finished);
        if finished {
            let parsed = parse_output(text, self.reasoning_parser, self.tool_parser, false);
            return ChatDelta {
                reasoning: parsed
                    .reasoning
                    .as_deref()
                    .and_then(|r| growth(r, &mut self.sent_reasoning)),
                content: growth(&parsed.content, &mut self.sent_content),
                finished: Some(parsed),
            };
        }
        if output.revision() != self.revision {
            self.revision = output.revision();
            self.parse.reset();
        }
        let spans = self.parse.update(text);
        ChatDelta {
            reasoning: spans
                .reasoning(text)
                .and_then(|r| growth(r, &mut self.sent_reasoning)),
            content: growth(spans.content(text), &mut self.sent_content),
            finished: None,
        }
    }
}
