//! Rotary position embeddings, Hugging Face's "rotate half" layout, with
//! optional Llama-3 frequency scaling.
//!
//! Tables are computed once in f32 (as transformers does) for every position up
//! to the context length; a batch gathers the rows of its tokens' positions, so
//! tokens of different sequences at different positions share one kernel call.

use crate::config::{Llama3RopeScaling, ModelConfig};
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

/// Inverse frequencies `1 / theta^(2i/d)`, adjusted by Llama-3 scaling when set.
fn inverse_frequencies(
    head_dim: usize,
    theta: f64,
    scaling: Option<&Llama3RopeScaling>,
) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let Some(s) = scaling else { return base };
    let old_len = s.original_max_position_embeddings as f64;
    let low_wavelen = old_len / s.low_freq_factor;
    let high_wavelen = old_len / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth = (old_len / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            };
            scaled as f32
        })
        .collect()
}

impl RotaryEmbedding {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        let half = inv.len();
        let max_pos = cfg.max_position_embeddings;
        let mut angles = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            angles.extend(inv.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (max_pos, half), device)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// The cos/sin rows of the given positions (a `u32` tensor), gathered once
    /// per step and shared by every layer.
    pub fn tables_for(&self, positions: &Tensor) -> Result<RopeTables> {
        Ok(RopeTables {
            cos: self.cos.index_select(positions, 0)?,
            sin: self.sin.index_select(positions, 0)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// Rotation tables for one step's tokens.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    /// Rotates `x` of shape `[1, tokens, heads, head_dim]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_thd(&x.contiguous()?, &self.cos, &self.sin)
    }
}
