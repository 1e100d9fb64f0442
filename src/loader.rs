//! Loading a checkpoint directory into everything the engine and the text side
//! need: config, parameter store, model, tokenizer and chat template.

use crate::chat::{ChatError, ChatProcessor};
use crate::config::{ConfigError, ModelConfig};
use crate::model::{Model, ModelError};
use crate::weights::checkpoint::read_checkpoint;
use crate::weights::{ParamStore, WeightsError};
use candle_core::{DType, Device};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("device: {0}")]
    Device(String),
}

/// The run dtype for a device: f32 on CPU (candle has no fast bf16 matmul
/// there), bf16 on GPUs (logits and log-probs stay f32 either way).
pub fn run_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// What the weight matrices are held in: the run dtype on GPUs; on the CPU
/// `asked`, else bf16 for a bf16 checkpoint (our kernels widen it exactly in
/// registers) and f32 for anything else.
pub fn held_matrix_dtype(
    device: &Device,
    run: DType,
    stored: Option<DType>,
    asked: Option<DType>,
) -> DType {
    if !device.is_cpu() || run != DType::F32 {
        return run;
    }
    let held = asked.unwrap_or(if stored == Some(DType::BF16) {
        DType::BF16
    } else {
        DType::F32
    });
    let computed = if crate::model::linear::bf16_products_on() {
        "bf16 products (--compute-dtype bf16)"
    } else {
        "f32"
    };
    match (stored, held) {
        (Some(DType::BF16), DType::BF16) => {
            tracing::info!(
                computed,
                "weight matrices held as bf16 (as the checkpoint stores them)"
            )
        }
        (_, DType::BF16) => tracing::info!(
            checkpoint = ?stored,
            computed,
            "weight matrices rounded to bf16 (--weight-dtype bf16 or --compute-dtype bf16)"
        ),
        _ => tracing::info!(checkpoint = ?stored, "weight matrices held as f32"),
    }
    held
}

/// The device to run on: the first GPU when `gpu` is set and a GPU feature is
/// compiled in, else the CPU.
pub fn select_device(gpu: bool) -> Result<Device, LoadError> {
    if !gpu {
        return Ok(Device::Cpu);
    }
    if candle_core::utils::cuda_is_available() {
        // One CUDA stream for every thread. `Device::new_cuda` gives each
        // thread its own (CU_STREAM_PER_THREAD), unordered with the others:
        // a push converted on a worker, a model built on a blocking thread
        // or the KV pool zeroed where the engine is spawned could still be
        // in flight when the engine thread reads it, and memory is freed on
        // the stream of whichever thread drops it last (old weights after a
        // swap), possibly under kernels still reading it. On one stream all
        // of it runs in the order it was queued.
        let device =
            Device::new_cuda_with_stream(0).map_err(|e| LoadError::Device(e.to_string()))?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &device {
            crate::model::cuda::kernels::preload(cuda)
                .map_err(|e| LoadError::Device(e.to_string()))?;
        }
        return Ok(device);
    }
    if candle_core::utils::metal_is_available() {
        return Device::new_metal(0).map_err(|e| LoadError::Device(e.to_string()));
    }
    Err(LoadError::Device(
        "no GPU support compiled in (build with --features cuda or --features metal)".into(),
    ))
}

pub struct LoadedModel {
    pub config: ModelConfig,
    pub store: ParamStore,
    pub model: Model,
    pub chat: ChatProcessor,
}

impl LoadedModel {
    /// Loads the weights (converted to `dtype`, matrices as
    /// [`held_matrix_dtype`] picks by default) of the checkpoint in `dir`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, LoadError> {
        Self::load_holding(dir, device, dtype, None)
    }

    /// [`Self::load`] with the weight matrices held as `matrices` (on the
    /// CPU; `None`: the checkpoint's own bf16, else f32).
    pub fn load_holding(
        dir: &Path,
        device: &Device,
        dtype: DType,
        matrices: Option<DType>,
    ) -> Result<Self, LoadError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        tracing::info!(
            architecture = config.architecture.hf_class(),
            rope_theta = config.rope.theta,
            rope_scaling = ?config.rope.scaling,
            "config read"
        );
        if let Some(window) = config.attention.sliding_window {
            tracing::info!(
                sliding_window = window,
                max_context = config.max_context(),
                "sliding-window layers: the context is capped at the window, so no layer attends past it"
            );
        }
        let tensors = read_checkpoint(dir, device)?;
        let stored = tensors.get("model.embed_tokens.weight").map(|t| t.dtype());
        let matrices = held_matrix_dtype(device, dtype, stored, matrices);
        let store = ParamStore::from_tensors_holding(&config, tensors, dtype, matrices, device)?;
        let model = Model::new(&config, &store, device)?;
        let chat = ChatProcessor::load(dir, &config)?;
        Ok(Self {
            config,
            store,
            model,
            chat,
        })
    }
}
