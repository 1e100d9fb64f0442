//! Causal grouped-query self-attention over a packed batch of sequences.
//!
//! Projections run once over all tokens of the step; the attention itself runs
//! per sequence against that sequence's own cache, so sequences of any lengths
//! (prefill chunks and single decode tokens) share a step with no padding.

use super::kv_cache::KvCache;
use super::linear::Linear;
use super::norm::RmsNorm;
use super::rope::RotaryEmbedding;
use candle_core::{DType, Result, Tensor};

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

/// Where one sequence's tokens sit in the packed batch.
pub struct SegmentView<'a> {
    pub start: usize,
    pub len: usize,
    pub cache: &'a mut KvCache,
}

impl Attention {
    /// `x` is `[tokens, hidden]`; `positions` the absolute position of each token.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &Tensor,
        rope: &RotaryEmbedding,
        layer: usize,
        segments: &mut [SegmentView<'_>],
    ) -> Result<Tensor> {
        let tokens = x.dims()[0];
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut q = self.q_proj.forward(x)?.reshape((1, tokens, nh, hd))?;
        let mut k = self.k_proj.forward(x)?.reshape((1, tokens, nkv, hd))?;
        let v = self.v_proj.forward(x)?.reshape((tokens, nkv, hd))?;
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let q = rope.apply(&q, positions)?.squeeze(0)?;
        let k = rope.apply(&k, positions)?.squeeze(0)?;

        let mut outputs = Vec::with_capacity(segments.len());
        for seg in segments.iter_mut() {
            let offset = seg.cache.len();
            let k_new = k.narrow(0, seg.start, seg.len)?;
            let v_new = v.narrow(0, seg.start, seg.len)?;
            let (keys, values) = seg.cache.append(layer, &k_new, &v_new)?;
            let q_seg = q.narrow(0, seg.start, seg.len)?;
            outputs.push(self.attend(&q_seg, &keys, &values, offset)?);
        }
        let attn = Tensor::cat(&outputs, 0)?;
        self.o_proj.forward(&attn)
    }

    /// Attention of `q` (`[n, heads, hd]`, positions `offset..offset+n`) over
    /// `keys`/`values` (`[offset+n, kv_heads, hd]`). Returns `[n, heads*hd]`.
    fn attend(&self, q: &Tensor, keys: &Tensor, values: &Tensor, offset: usize) -> Result<Tensor> {
        let (n, nh, hd) = q.dims3()?;
        let nkv = self.num_kv_heads;
        let group = nh / nkv;
        let total = keys.dims()[0];
        // Query heads h*group..(h+1)*group share kv head h: fold them into rows.
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((nkv, group * n, hd))?;
        let k = keys.transpose(0, 1)?.contiguous()?;
        let v = values.transpose(0, 1)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
        let scores = if n > 1 {
            let mask = causal_mask(n, offset, total, q.device())?;
            scores
                .reshape((nkv, group, n, total))?
                .broadcast_add(&mask)?
                .reshape((nkv, group * n, total))?
        } else {
            scores
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?; // [nkv, group*n, hd]
        out.reshape((nh, n, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, nh * hd))
    }
}

/// `[n, total]` additive mask: query i (position offset+i) sees keys 0..=offset+i.
fn causal_mask(
    n: usize,
    offset: usize,
    total: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, total), device)
}
