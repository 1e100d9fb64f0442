//! Stop strings, matched in time linear in the output: one Aho-Corasick
//! automaton per request, run only over the text a new token could have
//! completed a match in (the new bytes plus the longest stop string's
//! length before them). A naive scan of the whole text for every string
//! after every token cost seconds of CPU per request with many strings.

use aho_corasick::{AhoCorasick, MatchKind};

#[derive(Debug)]
pub struct StopMatcher {
    automaton: AhoCorasick,
    stops: Vec<String>,
    longest: usize,
}

/// Where a stop string was found: its byte offset in the text and which one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopHit {
    pub at: usize,
    pub index: usize,
}

impl StopMatcher {
    /// `None` when there is nothing to match. Strings must be non-empty.
    pub fn new(stops: Vec<String>) -> Option<Self> {
        if stops.is_empty() {
            return None;
        }
        // Leftmost-first: the earliest match wins, and among matches at the
        // same place the string listed first (what a scan in list order
        // picking the smallest offset gave).
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .build(&stops)
            .ok()?;
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        Some(Self {
            automaton,
            stops,
            longest,
        })
    }

    pub fn stop(&self, index: usize) -> &str {
        &self.stops[index]
    }

    /// Bytes of the longest stop string.
    pub fn longest(&self) -> usize {
        self.longest
    }

    /// The first stop string in `text` that ends after byte `old_len` (the
    /// text before was already searched and held none).
    pub fn find_new(&self, text: &str, old_len: usize) -> Option<StopHit> {
        let mut from = old_len.saturating_sub(self.longest.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        self.automaton.find(&text[from..]).map(|m| StopHit {
            at: from + m.start(),
            index: m.pattern().as_usize(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(stops.iter().map(|s| s.to_string()).collect()).unwrap()
    }

    #[test]
    fn finds_a_match_that_straddles_the_old_text() {
        let m = matcher(&["world", "lo w"]);
        let hit = m.find_new("hello world", 7).unwrap();
        assert_eq!((hit.at, m.stop(hit.index)), (3, "lo w"));
    }

    #[test]
    fn earliest_then_first_listed_wins() {
        let m = matcher(&["bc", "abc", "ab"]);
        let hit = m.find_new("xabcd", 0).unwrap();
        assert_eq!((hit.at, m.stop(hit.index)), (1, "abc"));
    }

    #[test]
    fn window_start_respects_char_boundaries() {
        let m = matcher(&["éé", "zz"]);
        assert_eq!(m.find_new("aéé", 3).map(|h| h.at), Some(1));
        assert_eq!(m.find_new("aé b", 4), None);
    }
}
