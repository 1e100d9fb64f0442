//! The checkpoint's tokenizer (`tokenizer.json`) and its end-of-sequence IDs.

use super::ChatError;
use crate::config::TokenIdOrList;
use serde::Deserialize;
use std::path::Path;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self, ChatError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ChatError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Applies `add_bos_token` / `add_eos_token` the way transformers 5 does:
    /// when `tokenizer_config.json` sets either, or `tokenizer.json` has no
    /// post-processor, the post-processor becomes `[bos] $A [eos]` with each
    /// part only if its flag is set (unset flags count as false). This decides
    /// what `add_special_tokens` adds to text prompts.
    pub fn apply_bos_eos_flags(&mut self, flags: &BosEosFlags) -> Result<(), ChatError> {
        let explicit = flags.add_bos.is_some() || flags.add_eos.is_some();
        if !explicit && self.inner.get_post_processor().is_some() {
            return Ok(());
        }
        let mut special = Vec::new();
        let mut pieces = Vec::new();
        let named =
            |token: &Option<String>, what: &str| -> Result<Option<(String, u32)>, ChatError> {
                let Some(token) = token else { return Ok(None) };
                let id = self.inner.token_to_id(token).ok_or_else(|| {
                    ChatError::Config(format!("{what} {token:?} is not in the vocabulary"))
                })?;
                Ok(Some((token.clone(), id)))
            };
        // transformers turns a flag off when its token is not set.
        let bos = named(&flags.bos, "bos_token")?.filter(|_| flags.add_bos == Some(true));
        let eos = named(&flags.eos, "eos_token")?.filter(|_| flags.add_eos == Some(true));
        if let Some((token, _)) = &bos {
            pieces.push(format!("{token}:0"));
        }
        pieces.push("$A:0".into());
        if let Some((token, _)) = &eos {
            pieces.push(format!("{token}:0"));
        }
        let single = pieces.join(" ");
        let mut pair = single.clone();
        if let Some((token, _)) = &bos {
            pair.push_str(&format!(" {token}:1"));
        }
        pair.push_str(" $B:1");
        if let Some((token, _)) = &eos {
            pair.push_str(&format!(" {token}:1"));
        }
        special.extend(bos);
        special.extend(eos);
        let template = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(single.as_str())
            .and_then(|b| b.try_pair(pair.as_str()))
            .map_err(|e| ChatError::Config(format!("post-processor: {e}")))?
            .special_tokens(special)
            .build()
            .map_err(|e| ChatError::Config(format!("post-processor: {e}")))?;
        self.inner.with_post_processor(Some(template));
        Ok(())
    }

    /// Token IDs of `text`. Chat prompts are encoded without added special
    /// tokens (the template already wrote them), as transformers does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ChatError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| ChatError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ChatError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ChatError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The raw bytes a token stands for. Byte-level BPE tokens map their
    /// characters back to bytes (so a token holding half of a UTF-8 character
    /// gives that half); other tokens give their text's UTF-8.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let is_byte_level = matches!(
            self.inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        match self.inner.id_to_token(id) {
            Some(piece) if is_byte_level => {
                let bytes: Option<Vec<u8>> = piece.chars().map(byte_level_char_to_byte).collect();
                bytes.unwrap_or_else(|| piece.into_bytes())
            }
            Some(piece) => piece.into_bytes(),
            None => Vec::new(),
        }
    }
}

/// Inverse of GPT-2's byte-to-character table: printable bytes stand for
/// themselves, the other 68 are shifted to U+0100.. in byte order.
fn byte_level_char_to_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if printable(code) {
        return Some(code as u8);
    }
    let shifted = code.checked_sub(256)?;
    (0u32..=255)
        .filter(|b| !printable(*b))
        .nth(shifted as usize)
        .map(|b| b as u8)
}

/// `tokenizer_config.json`'s `add_bos_token` / `add_eos_token` (absent: None)
/// and the special tokens they refer to.
#[derive(Debug, Clone, Default)]
pub struct BosEosFlags {
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    pub bos: Option<String>,
    pub eos: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum SpecialToken {
    Text(String),
    Object { content: String },
}

impl SpecialToken {
    pub fn content(&self) -> &str {
        match self {
            SpecialToken::Text(s) => s,
            SpecialToken::Object { content } => content,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
struct GenerationConfig {
    #[serde(default)]
    eos_token_id: TokenIdOrList,
}

/// EOS IDs in priority order, without duplicates: `generation_config.json`,
/// then `config.json`, then the tokenizer's `eos_token`.
pub fn eos_token_ids(
    dir: &Path,
    config_eos: &[u32],
    tokenizer: &TextTokenizer,
    eos_token: Option<&str>,
) -> Result<Vec<u32>, ChatError> {
    let mut ids = Vec::new();
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let text = std::fs::read_to_string(&gen_path)
            .map_err(|e| ChatError::Config(format!("{}: {e}", gen_path.display())))?;
        let gen: GenerationConfig = serde_json::from_str(&text)
            .map_err(|e| ChatError::Config(format!("{}: {e}", gen_path.display())))?;
        ids.extend(gen.eos_token_id.to_vec());
    }
    ids.extend_from_slice(config_eos);
    if let Some(id) = eos_token.and_then(|t| tokenizer.token_to_id(t)) {
        ids.push(id);
    }
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    Ok(ids)
}
