//! Model parameters: their names ([`names`]), the names and shapes a config calls for ([`spec`]), the
//! store that holds them ([`store`]), safetensors I/O ([`checkpoint`],
//! [`header`]), and updates: checked by name, shape and dtype ([`check`]),
//! staged from a body as it streams in ([`stream`]) or from a checkpoint
//! directory on disk ([`disk`]), converted and checked value by value
//! ([`convert`], [`finite`]). The update transaction itself (locking,
//! swapping into the engine, staging for a later commit) is
//! [`crate::engine::refit`]'s.

pub mod check;
pub mod checkpoint;
mod convert;
mod device_convert;
pub mod disk;
pub mod finite;
pub mod header;
pub mod names;
pub mod spec;
pub mod store;
pub mod stream;

pub use check::UpdateMode;
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
    #[error("tensor {0} has NaN or infinite values")]
    NonFinite(String),
    #[error("the update has no tensors; a partial update must bring at least one")]
    NoTensors,
    #[error("{path} is {kind}, not a regular file")]
    NotRegularFile { path: String, kind: &'static str },
    #[error("{path} is {size} bytes; a checkpoint of this model takes at most {limit}")]
    TooLarge { path: String, size: u64, limit: u64 },
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
            path: shown(path),
            message: e.to_string(),
        }
    }
}

/// Longest client-given text echoed back in a message.
const SHOWN_MAX: usize = 256;

/// `text` for an error message: at most [`SHOWN_MAX`] bytes (cut at a
/// character boundary), so a client cannot make the server echo a 256 MB
/// path back.
pub fn clip(text: &str) -> String {
    if text.len() <= SHOWN_MAX {
        return text.to_string();
    }
    let mut end = SHOWN_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// A path for an error message, clipped like [`clip`].
pub fn shown(path: &Path) -> String {
    clip(&path.display().to_string())
}
