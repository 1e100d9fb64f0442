//! Random LoRA adapters for the benchmarks: PEFT safetensors of rank `r` on
//! all seven projections of every layer (what `POST /v1/weights?adapter=`
//! takes), and the [`LoraAdapter`] the engine builds from them.

use gym_serve::config::ModelConfig;
use gym_serve::lora::{AdapterConfig, LoraAdapter};
use gym_serve::weights::names::{layer_param, lora_param, LayerModule, LoraFactor, Part};
use gym_serve::weights::param_specs;
use std::collections::HashMap;

/// `adapter_config.json` of a rank-`rank` adapter on every projection.
pub fn config_json(rank: usize) -> String {
    serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": "all-linear",
        "bias": "none",
    })
    .to_string()
}

/// Small values in [-0.05, 0.05) from a fixed generator (reproducible, and
/// far cheaper than candle's randn for tens of millions of values), as
/// little-endian f32 or bf16.
fn values(n: usize, seed: u64, bf16: bool) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(4 * n);
    for _ in 0..n {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let v = ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
        if bf16 {
            out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
        } else {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// The adapter state dict as f32 safetensors (PEFT's names), `A` and `B`
/// both random (a trained adapter's, not PEFT's zero-initialized `B`).
#[allow(dead_code)] // the refit benchmark picks the dtype
pub fn safetensors_bytes(cfg: &ModelConfig, rank: usize, seed: u64) -> Vec<u8> {
    safetensors_bytes_as(cfg, rank, seed, false)
}

/// [`safetensors_bytes`], in bf16 when `bf16`.
pub fn safetensors_bytes_as(cfg: &ModelConfig, rank: usize, seed: u64, bf16: bool) -> Vec<u8> {
    let specs = param_specs(cfg);
    let dims: HashMap<LayerModule, (usize, usize)> = LayerModule::PROJECTIONS
        .iter()
        .map(|&m| {
            let name = layer_param(0, m, Part::Weight);
            let s = specs.iter().find(|s| s.name == name).unwrap();
            (m, (s.shape[0], s.shape[1]))
        })
        .collect();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..cfg.num_hidden_layers {
        for (i, &m) in LayerModule::PROJECTIONS.iter().enumerate() {
            let (out_dim, in_dim) = dims[&m];
            let s = seed * 1_000_003 + (layer * 7 + i) as u64 * 2;
            tensors.push((
                lora_param(layer, m, LoraFactor::A),
                vec![rank, in_dim],
                values(rank * in_dim, s, bf16),
            ));
            tensors.push((
                lora_param(layer, m, LoraFactor::B),
                vec![out_dim, rank],
                values(out_dim * rank, s + 1, bf16),
            ));
        }
    }
    let dtype = if bf16 {
        safetensors::Dtype::BF16
    } else {
        safetensors::Dtype::F32
    };
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), data).unwrap();
            (n.clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// A loaded adapter named `name`, as a push or a PEFT directory builds it.
#[allow(dead_code)] // the refit benchmark pushes bytes only
pub fn adapter(cfg: &ModelConfig, name: &str, rank: usize, seed: u64) -> LoraAdapter {
    let config = AdapterConfig::from_json(&config_json(rank)).unwrap();
    let bytes = safetensors_bytes(cfg, rank, seed);
    LoraAdapter::from_safetensors(name, "1", config, &bytes, cfg).unwrap()
}
