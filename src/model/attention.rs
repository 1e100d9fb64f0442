//! Causal grouped-query self-attention over a packed batch of sequences.
//!
//! Projections run once over all tokens of the step; new keys and values go
//! into the block pool; each sequence's queries then attend to its own cached
//! positions ([`super::paged_attention`]). Sequences of any lengths (prefill
//! chunks and single decode tokens) share a step with no padding.

use super::device_kernels;
use super::kv_cache::KvPool;
use super::linear::Linear;
use super::norm::RmsNorm;
use super::paged_attention::{attend, PagedAttention, SeqSpan};
use super::paged_meta::DeviceMeta;
use super::rope::RopeTables;
use crate::lora::StepAdapters;
use crate::weights::names::LayerModule;
use candle_core::{Result, Tensor};

#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q_proj: Linear,
    pub(crate) k_proj: Linear,
    pub(crate) v_proj: Linear,
    pub(crate) o_proj: Linear,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub(crate) qk_norm: Option<(RmsNorm, RmsNorm)>,
    pub(crate) num_heads: usize,
    pub(crate) num_kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// Where this step's tokens go and what they attend to.
pub struct StepLayout<'a> {
    /// RoPE rows of each packed token's position.
    pub rope: RopeTables,
    /// Pool slot of each packed token.
    pub slots: Vec<u32>,
    pub spans: Vec<SeqSpan<'a>>,
    /// The LoRA adapter of each packed token, if any.
    pub lora: StepAdapters<'a>,
    /// The GPU kernels' copy of `slots` and `spans`, uploaded once a step.
    pub device_meta: DeviceMeta,
}

impl Attention {
    /// `x` is `[tokens, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        step: &StepLayout<'_>,
        pool: &KvPool,
    ) -> Result<Tensor> {
        let tokens = x.dims()[0];
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let lora = step.lora.layer(layer);
        let mut q = lora
            .project(LayerModule::QProj, &self.q_proj, x)?
            .reshape((1, tokens, nh, hd))?;
        let mut k = lora
            .project(LayerModule::KProj, &self.k_proj, x)?
            .reshape((1, tokens, nkv, hd))?;
        let v = lora
            .project(LayerModule::VProj, &self.v_proj, x)?
            .reshape((tokens, nkv, hd))?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let q = step.rope.apply(&q)?.squeeze(0)?;
        let k = step.rope.apply(&k)?.squeeze(0)?;
        if !device_kernels::write_kv(pool, layer, &step.slots, &step.device_meta, &k, &v)? {
            pool.write(layer, &step.slots, &k, &v)?;
        }
        if let Some(out) =
            device_kernels::attend(&q, pool, layer, &step.spans, &step.device_meta, nh, nkv, hd)?
        {
            return lora.project(LayerModule::OProj, &self.o_proj, &out);
        }
        let op = PagedAttention {
            spans: &step.spans,
            block_size: pool.block_size(),
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
        };
        let out = attend(&q, pool.keys(layer), pool.values(layer), &op)?;
        lora.project(LayerModule::OProj, &self.o_proj, &out)
    }
}
