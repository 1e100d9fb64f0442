//! Rotary position embeddings, Hugging Face's "rotate half" layout, with the
//! frequencies and cos/sin scale of the checkpoint's `rope_type`
//! ([`crate::config::RopeConfig`]).
//!
//! Tables are computed once in f32 (as transformers does) for every position up
//! to the context length; a batch gathers the rows of its tokens' positions, so
//! tokens of different sequences at different positions share one kernel call.

use crate::config::ModelConfig;
use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    pub fn new(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<Self> {
        let (inv, scale) = cfg
            .rope
            .inverse_frequencies(cfg.head_dim, cfg.max_position_embeddings);
        let half = inv.len();
        let max_pos = cfg.max_context();
        let mut angles = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            angles.extend(inv.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (max_pos, half), device)?;
        // transformers multiplies both tables by the attention factor (YaRN).
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let (cos, sin) = if scale == 1.0 {
            (cos, sin)
        } else {
            ((cos * scale as f64)?, (sin * scale as f64)?)
        };
        Ok(Self {
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
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
