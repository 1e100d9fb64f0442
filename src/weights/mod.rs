//! Model parameters: the names and shapes a config calls for ([`spec`]), the
//! store that holds them ([`store`]) and safetensors I/O ([`checkpoint`]).

pub mod checkpoint;
pub mod spec;
pub mod store;
pub mod stream;
pub mod update;

pub use spec::{param_specs, ParamKind, ParamSpec};
pub use store::ParamStore;

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("missing tensor {0}")]
    MissingTensor(String),
    #[error("unknown tensor {0}: the model has no parameter of that name")]
    UnknownTensor(String),
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor {name} has dtype {dtype}, which cannot be converted to a floating-point run dtype"
    )]
    UnsupportedDtype { name: String, dtype: String },
    #[error("cannot read {path}: {message}")]
    Io { path: String, message: String },
    #[error("invalid safetensors checkpoint: {0}")]
    Format(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl WeightsError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
