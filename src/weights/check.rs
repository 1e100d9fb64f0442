//! What an update may bring, checked before any of its data is converted:
//! names the config calls for, their shapes, floating-point dtypes, and in
//! `full` mode every parameter. Pushes and disk updates check their headers
//! here, so both refuse the same things with the same words.

use super::header::HeaderEntry;
use super::spec::param_specs;
use super::WeightsError;
use crate::config::ModelConfig;
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Whether an update must bring every parameter (`full`, the default) or
/// may bring any non-empty subset (`partial`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateMode {
    #[default]
    Full,
    Partial,
}

/// Checks a safetensors header's names, shapes, dtypes and (in `full`
/// mode) completeness. A tied model's spare `lm_head.weight` is skipped.
pub(crate) fn check_header(
    cfg: &ModelConfig,
    entries: &[HeaderEntry],
    mode: UpdateMode,
) -> Result<(), WeightsError> {
    let incoming: Vec<&HeaderEntry> = entries
        .iter()
        .filter(|e| !is_tied_alias(cfg, &e.name))
        .collect();
    if incoming.is_empty() {
        return Err(WeightsError::NoTensors);
    }
    let specs: HashMap<String, Vec<usize>> = param_specs(cfg)
        .into_iter()
        .map(|s| (s.name, s.shape))
        .collect();
    for t in &incoming {
        let Some(expected) = specs.get(&t.name) else {
            return Err(WeightsError::UnknownTensor(t.name.clone()));
        };
        if &t.shape != expected {
            return Err(WeightsError::ShapeMismatch {
                name: t.name.clone(),
                expected: expected.clone(),
                found: t.shape.clone(),
            });
        }
        if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(WeightsError::UnsupportedDtype {
                name: t.name.clone(),
                dtype: format!("{:?}", t.dtype),
            });
        }
    }
    if mode == UpdateMode::Full {
        let mut names: Vec<&String> = specs.keys().collect();
        names.sort();
        if let Some(missing) = names
            .into_iter()
            .find(|n| !incoming.iter().any(|t| &t.name == *n))
        {
            return Err(WeightsError::MissingTensor(missing.clone()));
        }
    }
    Ok(())
}

/// A tied model's checkpoint may still carry `lm_head.weight` (PyTorch state
/// dicts do); it is the embedding, so it is skipped rather than refused.
pub(crate) fn is_tied_alias(cfg: &ModelConfig, name: &str) -> bool {
    cfg.tie_word_embeddings && name == "lm_head.weight"
}
