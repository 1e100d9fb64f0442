//! Incremental detokenization of one generated sequence: each new token
//! costs the decode of a bounded window, not of the whole output.
//!
//! The window is the tokens turned into text last time (`context`, decoded
//! again for the tokenizer's leading-space rules) plus the new ones; only
//! what the new ones add to the context's text is appended (the
//! prefix-offset / read-offset scheme of HF's `DecodeStream` and vLLM).
//! `tokenizers`' own `DecodeStream` is not used: it borrows the tokenizer
//! (a choice outlives any borrow of the server state), fails where a
//! decoder rewrites the context instead of extending it, and lets the
//! window grow without bound while a model emits invalid UTF-8.

use super::{ChatError, TextTokenizer};

/// Tokens a sequence may go without forming complete UTF-8 before its text
/// is taken as it is (a character spans at most 4 byte tokens; a model
/// emitting invalid bytes must not make every later decode longer).
const MAX_PENDING_TOKENS: usize = 8;

#[derive(Debug, Default, Clone)]
pub struct Detokenizer {
    skip_special_tokens: bool,
    /// `ids[prefix_offset..read_offset]` were the last tokens turned into text.
    prefix_offset: usize,
    read_offset: usize,
    text: String,
    /// Bumped whenever `text` changed other than by appending (a decoder
    /// that rewrote the context, or the final whole decode differing), so
    /// that incremental readers of `text` know to start over.
    revision: u64,
}

impl Detokenizer {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self {
            skip_special_tokens,
            ..Self::default()
        }
    }

    /// The text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Cuts the text at byte `end` (a matched stop string).
    pub fn truncate(&mut self, end: usize) {
        if end < self.text.len() {
            self.text.truncate(end);
            self.revision += 1;
        }
    }

    /// Brings the text up to date with `ids` (the sequence's tokens, the
    /// newest last). A token that ends inside a UTF-8 character waits for
    /// the rest, unless `finished`: then the text becomes exactly the
    /// one-shot decode of `ids` (one whole decode per sequence).
    pub fn update(
        &mut self,
        tokenizer: &TextTokenizer,
        ids: &[u32],
        finished: bool,
    ) -> Result<(), ChatError> {
        let skip = self.skip_special_tokens;
        let context = tokenizer.decode(&ids[self.prefix_offset..self.read_offset], skip)?;
        let window = tokenizer.decode(&ids[self.prefix_offset..], skip)?;
        let pending = ids.len() - self.read_offset;
        if window.ends_with('\u{FFFD}') && !finished && pending < MAX_PENDING_TOKENS {
            return Ok(());
        }
        match window.strip_prefix(context.as_str()) {
            Some(added) => self.text.push_str(added),
            None => self.replace(tokenizer.decode(ids, skip)?),
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = ids.len();
        if finished {
            let whole = tokenizer.decode(ids, skip)?;
            if whole != self.text {
                self.replace(whole);
            }
        }
        Ok(())
    }

    fn replace(&mut self, text: String) {
        self.text = text;
        self.revision += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::make_model::tokenizer::train_tokenizer;
    use rand::{Rng, SeedableRng};

    fn tokenizer() -> (tempfile::TempDir, TextTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        train_tokenizer(1024).unwrap().save(&path, false).unwrap();
        let tokenizer = TextTokenizer::from_file(&path).unwrap();
        (dir, tokenizer)
    }

    /// Feeds `ids` one at a time; every step's text must be a prefix of the
    /// one-shot decode when the decode is valid UTF-8, and the end equal it.
    fn check(tokenizer: &TextTokenizer, ids: &[u32], skip: bool) {
        let whole = tokenizer.decode(ids, skip).unwrap();
        let mut d = Detokenizer::new(skip);
        for n in 1..=ids.len() {
            d.update(tokenizer, &ids[..n], n == ids.len()).unwrap();
            if !whole.contains('\u{FFFD}') {
                assert!(whole.starts_with(d.text()), "{:?} vs {whole:?}", d.text());
            }
        }
        assert_eq!(d.text(), whole, "ids {ids:?} (skip {skip})");
    }

    #[test]
    fn agrees_with_a_one_shot_decode() {
        let (_dir, tokenizer) = tokenizer();
        let texts = [
            "Hello, world! Zürich café naïve",
            "日本語のテキスト and emoji 🙂🚀 mixed",
            "<|im_start|>assistant\n<think>x</think> ok<|im_end|>",
            "  leading spaces\n\n\ttabs",
        ];
        for text in texts {
            let ids = tokenizer.encode(text, false).unwrap();
            for skip in [true, false] {
                check(&tokenizer, &ids, skip);
            }
        }
        // Random IDs: byte tokens that split characters, special tokens, and
        // byte sequences that never form valid UTF-8.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let len = rng.random_range(1..40);
            let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..1024)).collect();
            for skip in [true, false] {
                check(&tokenizer, &ids, skip);
            }
        }
    }

    #[test]
    fn invalid_utf8_does_not_grow_the_window() {
        let (_dir, tokenizer) = tokenizer();
        // Byte 0x80 (byte-level BPE writes it U+0122), a lone continuation
        // byte, repeated: never valid UTF-8.
        let byte = tokenizer.token_to_id("\u{0122}").expect("byte token 0x80");
        let ids = vec![byte; 100];
        let mut d = Detokenizer::new(true);
        for n in 1..=ids.len() {
            d.update(&tokenizer, &ids[..n], false).unwrap();
            assert!(n - d.prefix_offset <= 2 * MAX_PENDING_TOKENS);
        }
    }
}
