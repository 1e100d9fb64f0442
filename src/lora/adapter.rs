//! One loaded LoRA adapter: per layer and projection, the factors
//! `A [r, in]` and `B [out, r]` as fp32 host values, and the scale. An
//! adapter is immutable; a new version is a new [`LoraAdapter`] with a new
//! `instance`, which is what the prefix cache keys blocks by.

use super::config::AdapterConfig;
use super::LoraError;
use crate::config::ModelConfig;
use crate::weights::convert::convert_slice;
use crate::weights::names::{layer_param, lora_param, LayerModule, LoraFactor, Part};
use crate::weights::param_specs;
use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The factors of one adapted projection, fp32, row-major.
#[derive(Debug, Clone)]
pub struct LoraWeights {
    /// `[rank, in_dim]`
    pub a: Vec<f32>,
    /// `[out_dim, rank]`
    pub b: Vec<f32>,
    pub rank: usize,
    pub in_dim: usize,
    pub out_dim: usize,
    /// `a` and `b` as tensors on a GPU, uploaded at first use there (the
    /// CPU reads the vectors above).
    pub on_device: OnceLock<(Tensor, Tensor)>,
}

impl LoraWeights {
    /// `(a [rank, in], b [out, rank])` on `device`, f32.
    pub fn on(&self, device: &Device) -> candle_core::Result<&(Tensor, Tensor)> {
        if let Some(pair) = self.on_device.get() {
            return Ok(pair);
        }
        let a = Tensor::from_slice(&self.a, (self.rank, self.in_dim), device)?;
        let b = Tensor::from_slice(&self.b, (self.out_dim, self.rank), device)?;
        Ok(self.on_device.get_or_init(|| (a, b)))
    }
}

#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    /// The label responses of this adapter carry as `weight_version`.
    pub version: Arc<str>,
    /// Unique per loaded version, in this process: never reused, so KV
    /// computed under one version can never be served to another.
    pub instance: u64,
    pub config: AdapterConfig,
    /// Where it came from (its directory, or `pushed`), for `/v1/models`.
    pub source: String,
    /// `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), as the fp32 the
    /// update is multiplied by.
    pub scale: f32,
    /// `[layer][index in LayerModule::PROJECTIONS]`
    layers: Vec<[Option<LoraWeights>; 7]>,
}

static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

fn projection_index(module: LayerModule) -> Option<usize> {
    LayerModule::PROJECTIONS.iter().position(|&m| m == module)
}

fn st_dtype(name: &str, dtype: safetensors::Dtype) -> Result<DType, LoraError> {
    match dtype {
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::F16 => Ok(DType::F16),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        other => Err(LoraError::UnsupportedDtype {
            tensor: name.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// One factor an adapter's config calls for: its tensor's name, where it
/// goes, and the shape it must have.
pub(super) struct ExpectedFactor {
    pub name: String,
    pub layer: usize,
    pub slot: usize,
    pub shape: [usize; 2],
}

impl ExpectedFactor {
    pub(super) fn check_shape(&self, shape: &[usize]) -> Result<(), LoraError> {
        if shape != self.shape {
            return Err(LoraError::ShapeMismatch {
                tensor: self.name.clone(),
                expected: self.shape.to_vec(),
                found: shape.to_vec(),
            });
        }
        Ok(())
    }

    /// The dtype to convert from: f32, bf16 or f16.
    pub(super) fn check_dtype(&self, dtype: DType) -> Result<DType, LoraError> {
        match dtype {
            DType::F32 | DType::F16 | DType::BF16 => Ok(dtype),
            other => Err(LoraError::UnsupportedDtype {
                tensor: self.name.clone(),
                dtype: format!("{other:?}"),
            }),
        }
    }
}

/// Every factor `config` calls for on `model`, in the order layers and
/// projections come: each projection's `A [r, in]`, then its `B [out, r]`.
pub(super) fn expected_factors(
    config: &AdapterConfig,
    model: &ModelConfig,
) -> Result<Vec<ExpectedFactor>, LoraError> {
    let dims = projection_dims(model);
    let r = config.rank;
    let mut expected = Vec::new();
    for (layer, module) in config.targeted(model.num_hidden_layers)? {
        let (out_dim, in_dim) = dims[&module];
        let slot = projection_index(module).expect("targets are projections");
        for (factor, shape) in [(LoraFactor::A, [r, in_dim]), (LoraFactor::B, [out_dim, r])] {
            expected.push(ExpectedFactor {
                name: lora_param(layer, module, factor),
                layer,
                slot,
                shape,
            });
        }
    }
    Ok(expected)
}

/// Why a tensor the adapter does not call for is there, as precisely as
/// its name tells.
pub(super) fn unexpected_tensor(name: &str) -> LoraError {
    let why = if name.contains("lora_embedding_") {
        Some(("target_modules", "embedding adapters are not supported"))
    } else if name.contains("lora_magnitude_vector") {
        Some(("use_dora", "DoRA is not supported"))
    } else {
        None
    };
    match why {
        Some((field, why)) => LoraError::Unsupported {
            field: field.to_string(),
            why: format!("{why} (tensor {})", crate::weights::clip(name)),
        },
        None => LoraError::UnknownTensor(crate::weights::clip(name)),
    }
}

impl LoraAdapter {
    /// Most bytes a valid adapter file of `config` on `model` can take
    /// (fp32 factors plus a generous header), to bound what is read.
    pub fn max_file_bytes(config: &AdapterConfig, model: &ModelConfig) -> usize {
        let dims = projection_dims(model);
        let values: usize = dims.values().map(|&(o, i)| config.rank * (o + i)).sum();
        values * model.num_hidden_layers * 4 + (1 << 20)
    }

    /// Builds an adapter from a PEFT safetensors file: exactly the factors
    /// `config` targets, each of its shape, finite.
    pub fn from_safetensors(
        name: &str,
        version: &str,
        config: AdapterConfig,
        bytes: &[u8],
        model: &ModelConfig,
    ) -> Result<Self, LoraError> {
        let file = SafeTensors::deserialize(bytes).map_err(|e| LoraError::Format(e.to_string()))?;
        let expected = expected_factors(&config, model)?;
        let mut tensors: HashMap<String, safetensors::tensor::TensorView<'_>> =
            file.tensors().into_iter().collect();
        let mut values = Vec::with_capacity(expected.len());
        for e in &expected {
            let view = tensors
                .remove(&e.name)
                .ok_or_else(|| LoraError::MissingTensor(e.name.clone()))?;
            e.check_shape(view.shape())?;
            let dtype = st_dtype(&e.name, view.dtype())?;
            let mut out = vec![0f32; e.shape[0] * e.shape[1]];
            if !convert_slice(view.data(), dtype, &mut out) {
                return Err(LoraError::NonFinite(e.name.clone()));
            }
            values.push(out);
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(unexpected_tensor(extra));
        }
        Ok(Self::assemble(
            name, version, config, model, &expected, values,
        ))
    }

    /// The adapter of `values`, one per factor of `expected` (as
    /// [`expected_factors`] lists them: each projection's A, then its B).
    pub(super) fn assemble(
        name: &str,
        version: &str,
        config: AdapterConfig,
        model: &ModelConfig,
        expected: &[ExpectedFactor],
        values: Vec<Vec<f32>>,
    ) -> Self {
        let mut layers: Vec<[Option<LoraWeights>; 7]> = (0..model.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        let mut values = values.into_iter();
        for pair in expected.chunks_exact(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let (Some(a_values), Some(b_values)) = (values.next(), values.next()) else {
                break;
            };
            layers[a.layer][a.slot] = Some(LoraWeights {
                a: a_values,
                b: b_values,
                rank: a.shape[0],
                in_dim: a.shape[1],
                out_dim: b.shape[0],
                on_device: OnceLock::new(),
            });
        }
        Self {
            name: name.to_string(),
            version: Arc::from(version),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            scale: config.scale() as f32,
            config,
            source: String::new(),
            layers,
        }
    }

    /// The factors of `module` in `layer`, when the adapter targets it.
    pub fn weights(&self, layer: usize, module: LayerModule) -> Option<&LoraWeights> {
        let slot = projection_index(module)?;
        self.layers.get(layer)?[slot].as_ref()
    }

    pub fn rank(&self) -> usize {
        self.config.rank
    }

    /// Bytes the factors take.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .map(|w| 4 * (w.a.len() + w.b.len()))
            .sum()
    }

    /// Projections adapted (layers times modules).
    pub fn num_adapted(&self) -> usize {
        self.layers.iter().flatten().flatten().count()
    }
}

/// `(out, in)` of each projection, from the one parameter list.
fn projection_dims(model: &ModelConfig) -> HashMap<LayerModule, (usize, usize)> {
    let specs = param_specs(model);
    LayerModule::PROJECTIONS
        .iter()
        .filter_map(|&m| {
            let name = layer_param(0, m, Part::Weight);
            let s = specs.iter().find(|s| s.name == name)?;
            Some((m, (s.shape[0], s.shape[1])))
        })
        .collect()
}
