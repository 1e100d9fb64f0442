//! LoRA adapters in PEFT's format, served beside the base model: their
//! config ([`config`]), their factors ([`adapter`]), the set being served
//! ([`registry`]), and the low-rank update the forward pass adds for the
//! rows of each adapter ([`apply`]).

pub mod adapter;
pub mod apply;
pub mod config;
pub mod registry;
pub mod stream;

pub use adapter::{LoraAdapter, LoraWeights};
pub use apply::StepAdapters;
pub use config::AdapterConfig;
pub use registry::{LoraLimits, LoraRegistry};

/// Why an adapter was refused. Every variant names what was wrong; the
/// HTTP layer adds the adapter's name.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("adapter_config.json: {0}")]
    Config(String),
    #[error("adapter_config.json: `{field}` {why}")]
    Unsupported { field: String, why: String },
    #[error("unknown target module `{0}`: adapters may target q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj")]
    UnknownTargetModule(String),
    #[error("rank r={rank} is over this server's --max-lora-rank of {limit}")]
    RankTooLarge { rank: usize, limit: usize },
    #[error("{loaded} adapters are loaded, this server's --max-loras; unload one first")]
    TooManyAdapters { loaded: usize },
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("unknown tensor {0}: the adapter's config does not call for it")]
    UnknownTensor(String),
    #[error("tensor {tensor} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {tensor} has dtype {dtype}; adapters must be f32, bf16 or f16")]
    UnsupportedDtype { tensor: String, dtype: String },
    #[error("tensor {0} has NaN or infinite values")]
    NonFinite(String),
    #[error("invalid safetensors file: {0}")]
    Format(String),
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error("{path} is {size} bytes; an adapter of this config takes at most {limit}")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("no adapter of that name is loaded")]
    NotFound,
    #[error("an adapter of that name is already loaded (unload it first, or push to it)")]
    AlreadyLoaded,
    #[error("invalid adapter name: {0}")]
    InvalidName(String),
}
