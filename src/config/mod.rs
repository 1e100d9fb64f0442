//! `config.json` of a Hugging Face checkpoint, read into [`ModelConfig`] the
//! way transformers reads it, in the transformers 4 and 5 layouts.
//!
//! The rule: a key present in the file that changes the math is implemented,
//! or the load fails with a message naming the key and its value. Absent keys
//! take the defaults of the family's transformers config class.

pub mod rope;
pub mod window;

pub use rope::{Llama3Scaling, RopeConfig, RopeScaling, YarnScaling};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;
pub use window::AttentionLayout;

/// The decoder families gym-serve implements. They share one model code path and
/// differ only in the flags below (attention bias, q/k norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    /// The name transformers writes in `config.json`'s `architectures` list.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `model_type` transformers expects beside that class.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    pub fn from_hf_class(name: &str) -> Option<Self> {
        [Self::Llama, Self::Mistral, Self::Qwen2, Self::Qwen3]
            .into_iter()
            .find(|a| a.hf_class() == name)
    }
}

/// Everything the model code needs to know about a checkpoint's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    /// Each layer's attention type and the sliding window, if any layer slides.
    pub attention: AttentionLayout,
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections (Qwen2 always; Llama/Mistral with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` covers it too).
    pub o_bias: bool,
    /// RMSNorm on each head of q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Bias on gate/up/down (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// `eos_token_id` from config.json (an int or a list there).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported architecture {0:?}; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM")]
    UnsupportedArchitecture(String),
    #[error("config.json: {0}")]
    Invalid(String),
}

/// `eos_token_id` may be an int, a list of ints or null in HF files.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(untagged)]
pub enum TokenIdOrList {
    One(u32),
    Many(Vec<u32>),
    #[default]
    None,
}

impl TokenIdOrList {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIdOrList::One(id) => vec![*id],
            TokenIdOrList::Many(ids) => ids.clone(),
            TokenIdOrList::None => Vec::new(),
        }
    }
}

/// Keys whose effect the engine does not implement: refused unless absent or
/// at their neutral value (null, or the value given here).
const REFUSED_KEYS: [(&str, Option<f64>); 6] = [
    ("partial_rotary_factor", Some(1.0)),
    ("quantization_config", None),
    ("attn_logit_softcapping", None),
    ("final_logit_softcapping", None),
    ("logits_scaling", Some(1.0)),
    ("embedding_multiplier", Some(1.0)),
];

/// Typed reads of one `config.json` object; every error names the key.
struct Raw<'a>(&'a Map<String, Value>);

impl Raw<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize, ConfigError> {
        match self.get(key) {
            None => default.ok_or_else(|| ConfigError::Invalid(format!("`{key}` is missing"))),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| {
                    ConfigError::Invalid(format!("{key} must be a non-negative integer, found {v}"))
                }),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| ConfigError::Invalid(format!("{key} must be a number, found {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| ConfigError::Invalid(format!("{key} must be a boolean, found {v}"))),
        }
    }
}

/// transformers' class defaults that differ between the four families.
fn default_head_dim(architecture: Architecture, hidden: usize, heads: usize) -> usize {
    match architecture {
        Architecture::Qwen3 => 128,
        _ => hidden / heads,
    }
}

fn default_max_positions(architecture: Architecture) -> usize {
    match architecture {
        Architecture::Llama => 2048,
        Architecture::Mistral => 4096 * 32,
        Architecture::Qwen2 | Architecture::Qwen3 => 32_768,
    }
}

fn refuse_unimplemented(raw: &Raw) -> Result<(), ConfigError> {
    for (key, neutral) in REFUSED_KEYS {
        let Some(value) = raw.get(key) else { continue };
        if neutral.is_some() && value.as_f64() == neutral {
            continue;
        }
        return Err(ConfigError::Invalid(format!(
            "{key} = {value} is not supported"
        )));
    }
    if let Some(act) = raw.get("hidden_act") {
        // transformers' ACT2FN maps both names to SiLU.
        if !matches!(act.as_str(), Some("silu") | Some("swish")) {
            return Err(ConfigError::Invalid(format!(
                "hidden_act = {act} is not supported (only \"silu\")"
            )));
        }
    }
    Ok(())
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let map: Map<String, Value> = serde_json::from_str(text)?;
        let raw = Raw(&map);
        let class = raw
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .ok_or_else(|| ConfigError::Invalid("`architectures` is missing or empty".into()))?;
        let architecture = Architecture::from_hf_class(class)
            .ok_or_else(|| ConfigError::UnsupportedArchitecture(class.to_string()))?;
        refuse_unimplemented(&raw)?;
        let hidden_size = raw.usize_or("hidden_size", None)?;
        let num_attention_heads = raw.usize_or("num_attention_heads", None)?;
        let num_hidden_layers = raw.usize_or("num_hidden_layers", None)?;
        if num_attention_heads == 0 || hidden_size == 0 || num_hidden_layers == 0 {
            return Err(ConfigError::Invalid(
                "hidden_size, num_attention_heads and num_hidden_layers must be positive".into(),
            ));
        }
        let num_key_value_heads = raw.usize_or("num_key_value_heads", Some(num_attention_heads))?;
        if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(ConfigError::Invalid(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = raw.usize_or(
            "head_dim",
            Some(default_head_dim(
                architecture,
                hidden_size,
                num_attention_heads,
            )),
        )?;
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ConfigError::Invalid(format!(
                "head_dim {head_dim} must be even and positive"
            )));
        }
        let max_position_embeddings = raw.usize_or(
            "max_position_embeddings",
            Some(default_max_positions(architecture)),
        )?;
        let attention = window::read_layout(architecture, &map, num_hidden_layers)?;
        let mut used_types: Vec<&str> = attention.layer_types.clone();
        used_types.dedup();
        used_types.sort_unstable();
        used_types.dedup();
        let rope = rope::read_rope(&map, &used_types, max_position_embeddings)?;
        // Which projections carry a bias, per family, as transformers builds them.
        let attention_bias = raw.bool_or("attention_bias", false)?;
        let (qkv_bias, o_bias, qk_norm, mlp_bias) = match architecture {
            Architecture::Qwen2 => (true, false, false, false),
            Architecture::Qwen3 => (attention_bias, attention_bias, true, false),
            Architecture::Llama => (
                attention_bias,
                attention_bias,
                false,
                raw.bool_or("mlp_bias", false)?,
            ),
            Architecture::Mistral => (false, false, false, false),
        };
        let eos: TokenIdOrList = match raw.get("eos_token_id") {
            None => TokenIdOrList::None,
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                ConfigError::Invalid(format!(
                    "eos_token_id must be an integer or a list, found {v}"
                ))
            })?,
        };
        let rms_norm_eps = raw.f64_or("rms_norm_eps", 1e-6)?;
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(ConfigError::Invalid(format!(
                "rms_norm_eps must be a non-negative number, found {rms_norm_eps}"
            )));
        }
        Ok(ModelConfig {
            architecture,
            vocab_size: raw.usize_or("vocab_size", None)?,
            hidden_size,
            intermediate_size: raw.usize_or("intermediate_size", None)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope,
            max_position_embeddings,
            attention,
            tie_word_embeddings: raw.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            qk_norm,
            mlp_bias,
            eos_token_ids: eos.to_vec(),
        })
    }

    /// The longest sequence the engine serves exactly as transformers would:
    /// the position tables' length, or the sliding window if it is shorter.
    pub fn max_context(&self) -> usize {
        match self.attention.sliding_window {
            Some(w) => self.max_position_embeddings.min(w),
            None => self.max_position_embeddings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_has_qkv_bias_and_computed_head_dim() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
            "num_key_value_heads":1,"eos_token_id":[3,4]}"#,
        )
        .unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias && !cfg.qk_norm);
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.eos_token_ids, vec![3, 4]);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = ModelConfig::from_json(
            r#"{"architectures":["GPT2LMHeadModel"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn llama3_rope_scaling_is_parsed() {
        let cfg = ModelConfig::from_json(
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
            "rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        match cfg.rope.scaling {
            RopeScaling::Llama3(s) => assert_eq!(s.factor, 32.0),
            other => panic!("{other:?}"),
        }
    }

    fn config(arch: &str, extra: &str) -> Result<ModelConfig, ConfigError> {
        ModelConfig::from_json(&format!(
            r#"{{"architectures":["{arch}"],"vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":4,"num_attention_heads":2{extra}}}"#
        ))
    }

    #[test]
    fn transformers_class_defaults_fill_absent_keys() {
        let qwen3 = config("Qwen3ForCausalLM", "").unwrap();
        assert_eq!(qwen3.head_dim, 128);
        assert_eq!(qwen3.max_position_embeddings, 32_768);
        let llama = config("LlamaForCausalLM", "").unwrap();
        assert_eq!((llama.head_dim, llama.max_position_embeddings), (4, 2048));
        assert_eq!(llama.rope.theta, 10_000.0);
        // Mistral's class default window is 4096; null turns it off.
        let mistral = config("MistralForCausalLM", "").unwrap();
        assert_eq!(mistral.attention.sliding_window, Some(4096));
        assert_eq!(mistral.max_context(), 4096);
        let mistral = config("MistralForCausalLM", r#","sliding_window":null"#).unwrap();
        assert_eq!(mistral.max_context(), 4096 * 32);
    }

    #[test]
    fn sliding_windows_cap_the_context() {
        let on = config(
            "Qwen2ForCausalLM",
            r#","use_sliding_window":true,"sliding_window":1024,"max_window_layers":2"#,
        )
        .unwrap();
        assert_eq!(
            on.attention.layer_types[..3],
            ["full_attention", "full_attention", "sliding_attention"]
        );
        assert_eq!(on.max_context(), 1024);
        // All layers below max_window_layers: nothing slides.
        let none = config(
            "Qwen3ForCausalLM",
            r#","use_sliding_window":true,"sliding_window":1024,"max_window_layers":4"#,
        )
        .unwrap();
        assert_eq!(none.max_context(), 32_768);
        let off = config(
            "Qwen3ForCausalLM",
            r#","use_sliding_window":false,"sliding_window":1024"#,
        )
        .unwrap();
        assert_eq!(off.attention.sliding_window, None);
        let listed = config(
            "Qwen3ForCausalLM",
            r#","use_sliding_window":true,"sliding_window":512,"layer_types":["sliding_attention","full_attention","full_attention","full_attention"]"#,
        )
        .unwrap();
        assert_eq!(listed.max_context(), 512);
        let err = config(
            "Qwen3ForCausalLM",
            r#","layer_types":["chunked_attention"]"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("layer_types"), "{err}");
    }

    #[test]
    fn biases_follow_each_family() {
        let llama = config(
            "LlamaForCausalLM",
            r#","attention_bias":true,"mlp_bias":true"#,
        )
        .unwrap();
        assert!(llama.qkv_bias && llama.o_bias && llama.mlp_bias);
        // transformers builds Mistral without biases whatever the file says.
        let mistral = config(
            "MistralForCausalLM",
            r#","attention_bias":true,"mlp_bias":true"#,
        )
        .unwrap();
        assert!(!mistral.qkv_bias && !mistral.mlp_bias);
        let qwen3 = config("Qwen3ForCausalLM", r#","attention_bias":true"#).unwrap();
        assert!(qwen3.qkv_bias && qwen3.o_bias && !qwen3.mlp_bias);
    }

    #[test]
    fn keys_that_change_the_math_are_refused_by_name() {
        for (extra, named) in [
            (r#","partial_rotary_factor":0.5"#, "partial_rotary_factor"),
            (r#","hidden_act":"gelu""#, "hidden_act"),
            (
                r#","quantization_config":{"quant_method":"gptq"}"#,
                "quantization_config",
            ),
            (
                r#","final_logit_softcapping":30.0"#,
                "final_logit_softcapping",
            ),
            (r#","head_dim":"x""#, "head_dim"),
            (
                r#","rope_parameters":{"rope_type":"su","rope_theta":1e4}"#,
                "rope_parameters.rope_type",
            ),
        ] {
            let err = config("LlamaForCausalLM", extra).unwrap_err().to_string();
            assert!(err.contains(named), "{extra}: {err}");
        }
        assert!(config(
            "LlamaForCausalLM",
            r#","partial_rotary_factor":1.0,"hidden_act":"swish""#
        )
        .is_ok());
    }
}
