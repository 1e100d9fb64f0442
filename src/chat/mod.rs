//! Text side of the engine: the tokenizer, the chat template, turning a
//! conversation into prompt token IDs, and turning generated tokens back
//! into text (`text_output`: detokenizer, stop strings, output parsers).

pub mod detokenizer;
pub mod parsers;
pub mod partial_parse;
pub mod python_json;
pub mod splice;
pub mod stop;
pub mod template;
pub mod text_output;
pub mod tokenizer;

use crate::config::ModelConfig;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use std::path::Path;
pub use template::ChatTemplate;
pub use tokenizer::{SpecialToken, TextTokenizer};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Template(String),
    #[error("tokenizer config: {0}")]
    Config(String),
    #[error("this model has no chat template")]
    NoTemplate,
    #[error(transparent)]
    Splice(#[from] splice::SpliceError),
}

/// `chat_template` in tokenizer_config.json: one template or named variants.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Debug, Deserialize, Default)]
struct TokenizerConfig {
    chat_template: Option<TemplateField>,
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    pad_token: Option<SpecialToken>,
    unk_token: Option<SpecialToken>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
}

/// Tokenizer, chat template and EOS IDs of one checkpoint.
pub struct ChatProcessor {
    pub tokenizer: TextTokenizer,
    template: Option<ChatTemplate>,
    eos_token_ids: Vec<u32>,
}

impl ChatProcessor {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (template, special
    /// tokens), `chat_template.jinja` if present, and `generation_config.json`.
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<Self, ChatError> {
        let mut tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: TokenizerConfig = if tc_path.exists() {
            let text = std::fs::read_to_string(&tc_path)
                .map_err(|e| ChatError::Config(format!("{}: {e}", tc_path.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| ChatError::Config(format!("{}: {e}", tc_path.display())))?
        } else {
            TokenizerConfig::default()
        };
        let jinja_path = dir.join("chat_template.jinja");
        let source = if jinja_path.exists() {
            Some(
                std::fs::read_to_string(&jinja_path)
                    .map_err(|e| ChatError::Config(format!("{}: {e}", jinja_path.display())))?,
            )
        } else {
            match tc.chat_template {
                Some(TemplateField::One(s)) => Some(s),
                Some(TemplateField::Named(list)) => {
                    let default = list.iter().position(|t| t.name == "default").unwrap_or(0);
                    list.into_iter().nth(default).map(|t| t.template)
                }
                None => None,
            }
        };
        let mut special = Map::new();
        for (key, token) in [
            ("bos_token", &tc.bos_token),
            ("eos_token", &tc.eos_token),
            ("pad_token", &tc.pad_token),
            ("unk_token", &tc.unk_token),
        ] {
            if let Some(t) = token {
                special.insert(key.into(), Json::String(t.content().to_string()));
            }
        }
        tokenizer.apply_bos_eos_flags(&tokenizer::BosEosFlags {
            add_bos: tc.add_bos_token,
            add_eos: tc.add_eos_token,
            bos: tc.bos_token.as_ref().map(|t| t.content().to_string()),
            eos: tc.eos_token.as_ref().map(|t| t.content().to_string()),
        })?;
        let template = source.map(|s| ChatTemplate::new(s, special)).transpose()?;
        let eos = tc.eos_token.as_ref().map(|t| t.content().to_string());
        let eos_token_ids =
            tokenizer::eos_token_ids(dir, &config.eos_token_ids, &tokenizer, eos.as_deref())?;
        Ok(Self {
            tokenizer,
            template,
            eos_token_ids,
        })
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The prompt text for a conversation.
    pub fn render(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> Result<String, ChatError> {
        self.template.as_ref().ok_or(ChatError::NoTemplate)?.render(
            messages,
            tools,
            add_generation_prompt,
            kwargs,
        )
    }

    /// Prompt token IDs for a conversation, as `apply_chat_template(tokenize=True)`.
    pub fn encode_chat(
        &self,
        messages: &Json,
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
    ) -> Result<Vec<u32>, ChatError> {
        let text = self.render(messages, tools, add_generation_prompt, kwargs)?;
        self.tokenizer.encode(&text, false)
    }

    /// Prompt token IDs for a conversation, kept on-policy: when the request
    /// carries a model prefix (message-level IDs or `required_prefix`), the
    /// prompt starts with exactly those tokens.
    pub fn encode_chat_on_policy(
        &self,
        messages: &[Json],
        tools: Option<&Json>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Json>,
        required_prefix: Option<&[u32]>,
    ) -> Result<Vec<u32>, ChatError> {
        let all = Json::Array(messages.to_vec());
        let full = self.encode_chat(&all, tools, add_generation_prompt, kwargs)?;
        let eos = &self.eos_token_ids;
        let (prefix, k) = match splice::find_prefix(messages, required_prefix)? {
            None => return Ok(full),
            Some(splice::ModelPrefix::Message { index, tokens }) => {
                let upto = Json::Array(messages[..=index].to_vec());
                let upto = self.encode_chat(&upto, tools, false, kwargs)?;
                (tokens, splice::count_eos(&upto, eos))
            }
            Some(splice::ModelPrefix::Explicit(tokens)) => {
                let k = splice::count_eos(splice::without_trailing_eos(&tokens, eos), eos) + 1;
                (tokens, k)
            }
        };
        Ok(splice::splice(&full, &prefix, k, eos)?)
    }
}
