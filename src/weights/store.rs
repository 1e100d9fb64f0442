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
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, WeightsError> {
        Self::from_tensors_holding(cfg, tensors, dtype, dtype, device)
    }

    /// [`Self::from_tensors`] with the weight matrices (every parameter of
    /// two or more dimensions) held as `matrices` and the rest (norms,
    /// biases) as the run dtype `dtype`.
    pub fn from_tensors_holding(
        cfg: &ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        dtype: DType,
        matrices: DType,
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
            let held = if tensor.rank() >= 2 { matrices } else { dtype };
            let tensor = convert(&name, tensor, held, device)?;
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

    /// A new store sharing every tensor of this one but those in `updates`,
    /// each converted into the dtype the tensor it replaces is held in.
    pub fn with_replacements(
        &self,
        updates: HashMap<String, Tensor>,
    ) -> Result<Self, WeightsError> {
        let mut tensors = self.tensors.clone();
        for (name, tensor) in updates {
            let held = self.tensors.get(&name).map_or(self.dtype, |t| t.dtype());
            // Rounding to bf16 can overflow an f32 near its maximum.
            let tensor = if tensor.dtype() == held {
                tensor
            } else {
                let narrowed = tensor.to_dtype(held)?;
                super::finite::check_tensor(&name, &narrowed)?;
                narrowed
            };
            tensors.insert(name, tensor);
        }
        Ok(Self {
            tensors,
            dtype: self.dtype,
        })
    }

    /// What the weight matrices are held in (the embedding's dtype).
    pub fn matrix_dtype(&self) -> DType {
        self.tensors
            .get(super::names::EMBED_TOKENS)
            .map_or(self.dtype, |t| t.dtype())
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

    /// Number of parameter values.
    pub fn elem_count(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count()).sum()
    }

    /// Total bytes held.
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
