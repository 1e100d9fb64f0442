//! [`ParamStore`]: every model parameter, keyed by its Hugging Face name.
//!
//! The store is the single owner of weights. The model borrows cheap handles
//! (candle tensors are reference counted) when it is built from a store, so a
//! weight update can validate a whole new store off to the side and swap it in
//! at once.

use super::spec::{param_specs, ParamSpec};
use super::WeightsError;
use crate::config::ModelConfig;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct ParamStore {
    tensors: HashMap<String, Tensor>,
    dtype: DType,
}

impl ParamStore {
    /// Builds a store from named tensors, checking them against the config's
    /// parameter list and converting each to `dtype` on `device`. Names the
    /// model does not read (e.g. `rotary_emb.inv_freq`, or a tied `lm_head`) are
    /// dropped.
    pub fn from_tensors(
        cfg: &ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, WeightsError> {
        let mut out = HashMap::new();
        for ParamSpec { name, shape, .. } in param_specs(cfg) {
            let tensor = tensors
                .remove(&name)
                .ok_or_else(|| WeightsError::MissingTensor(name.clone()))?;
            if tensor.dims() != shape.as_slice() {
                return Err(WeightsError::ShapeMismatch {
                    name,
                    expected: shape,
                    found: tensor.dims().to_vec(),
                });
            }
            let tensor = convert(&name, tensor, dtype, device)?;
            out.insert(name, tensor);
        }
        if !tensors.is_empty() {
            let mut ignored: Vec<_> = tensors.keys().cloned().collect();
            ignored.sort();
            tracing::debug!(?ignored, "checkpoint tensors the model does not use");
        }
        Ok(Self {
            tensors: out,
            dtype,
        })
    }

    /// A new store sharing every tensor of this one but those in `updates`.
    pub fn with_replacements(&self, updates: HashMap<String, Tensor>) -> Self {
        let mut tensors = self.tensors.clone();
        tensors.extend(updates);
        Self {
            tensors,
            dtype: self.dtype,
        }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor, WeightsError> {
        self.tensors
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor(name.to_string()))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Parameters sorted by name, for deterministic iteration.
    pub fn sorted(&self) -> Vec<(&str, &Tensor)> {
        let mut v: Vec<_> = self.tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }

    /// Total bytes held in the run dtype.
    pub fn size_in_bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// Floating-point checkpoints convert to the run dtype; anything else, and
/// NaN or infinite values, are refused by name rather than served.
fn convert(name: &str, t: Tensor, dtype: DType, device: &Device) -> Result<Tensor, WeightsError> {
    match t.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => {}
        other => {
            return Err(WeightsError::UnsupportedDtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    }
    let t = t.to_device(device)?.to_dtype(dtype)?;
    super::finite::check_tensor(name, &t)?;
    Ok(t)
}
