//! Sliding-window attention as transformers configures it per family.
//!
//! The engine attends to every cached token, so a window is honoured by
//! capping the context at it: below the window's length a sliding layer sees
//! exactly what a full one sees. A request that would pass it is refused like
//! any over-long request, never answered with attention past the window.

use super::{Architecture, ConfigError};
use serde_json::{Map, Value};

pub const FULL: &str = "full_attention";
pub const SLIDING: &str = "sliding_attention";

/// Each layer's attention type, and the window of the sliding ones (if any
/// layer slides).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLayout {
    pub layer_types: Vec<&'static str>,
    pub sliding_window: Option<usize>,
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(message)
}

fn optional_usize(raw: &Map<String, Value>, key: &str) -> Result<Option<usize>, ConfigError> {
    match raw.get(key) {
        None => Ok(None),
        Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| invalid(format!("{key} must be a non-negative integer, found {v}"))),
    }
}

fn explicit_layer_types(
    raw: &Map<String, Value>,
    layers: usize,
) -> Result<Option<Vec<&'static str>>, ConfigError> {
    let list = match raw.get("layer_types") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(v) => return Err(invalid(format!("layer_types must be a list, found {v}"))),
    };
    if list.len() != layers {
        return Err(invalid(format!(
            "layer_types has {} entries for {layers} layers",
            list.len()
        )));
    }
    list.iter()
        .map(|t| match t.as_str() {
            Some(FULL) => Ok(FULL),
            Some(SLIDING) => Ok(SLIDING),
            _ => Err(invalid(format!(
                "layer_types entry {t} is not supported (only \"{FULL}\" and \"{SLIDING}\")"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Reads `sliding_window`, `use_sliding_window`, `max_window_layers` and
/// `layer_types` with transformers' per-family defaults and precedence.
pub fn read_layout(
    architecture: Architecture,
    raw: &Map<String, Value>,
    layers: usize,
) -> Result<AttentionLayout, ConfigError> {
    // transformers' class default when the key is absent; `null` turns it off.
    let window = if raw.contains_key("sliding_window") {
        optional_usize(raw, "sliding_window")?
    } else {
        Some(4096)
    };
    let layout = match architecture {
        // Llama has no sliding window; transformers ignores these keys there.
        Architecture::Llama => AttentionLayout {
            layer_types: vec![FULL; layers],
            sliding_window: None,
        },
        // Mistral slides in every layer whenever the window is set.
        Architecture::Mistral => AttentionLayout {
            layer_types: vec![if window.is_some() { SLIDING } else { FULL }; layers],
            sliding_window: window,
        },
        Architecture::Qwen2 | Architecture::Qwen3 => {
            let enabled = match raw.get("use_sliding_window") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(invalid(format!(
                        "use_sliding_window must be a boolean, found {v}"
                    )))
                }
            };
            let window = window.filter(|_| enabled);
            let max_window_layers = optional_usize(raw, "max_window_layers")?.unwrap_or(28);
            let layer_types = match explicit_layer_types(raw, layers)? {
                Some(types) => types,
                None => (0..layers)
                    .map(|i| {
                        if window.is_some() && i >= max_window_layers {
                            SLIDING
                        } else {
                            FULL
                        }
                    })
                    .collect(),
            };
            let slides = window.is_some() && layer_types.contains(&SLIDING);
            AttentionLayout {
                layer_types,
                sliding_window: window.filter(|_| slides),
            }
        }
    };
    if layout.sliding_window == Some(0) {
        return Err(invalid("sliding_window must be positive, found 0".into()));
    }
    Ok(layout)
}
