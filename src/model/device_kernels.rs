//! Where a step's KV writes and attention run on the engine's own GPU
//! kernels: CUDA tensors with f32/bf16 queries and cache and a head of at
//! most 256 go to `model::cuda`; everything else (CPU, Metal, an f16 cache)
//! takes the portable path. Without the `cuda` feature this always answers
//! "not here".

use super::kv_cache::KvPool;
use super::paged_attention::SeqSpan;
use super::paged_meta::DeviceMeta;
use candle_core::{DType, Result, Tensor};

/// Whether the CUDA kernels take tensors of these dtypes and head size.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn kernel_fits(q: &Tensor, pool: &KvPool, head_dim: usize) -> bool {
    let takes = |d: DType| matches!(d, DType::F32 | DType::BF16);
    q.device().is_cuda() && takes(q.dtype()) && takes(pool.dtype()) && head_dim <= 256
}

/// Writes this step's keys and values (`[n, kv_heads, hd]`) into `layer`
/// with the CUDA kernel; false when the portable write should run instead.
#[allow(unused_variables)]
pub fn write_kv(
    pool: &KvPool,
    layer: usize,
    slots: &[u32],
    meta: &DeviceMeta,
    k: &Tensor,
    v: &Tensor,
) -> Result<bool> {
    #[cfg(feature = "cuda")]
    {
        let head_dim = k.dims().last().copied().unwrap_or(0);
        if kernel_fits(k, pool, head_dim) && matches!(v.dtype(), DType::F32 | DType::BF16) {
            let pool_slots = pool.keys(layer).dims()[1];
            if let Some(&s) = slots.iter().find(|&&s| s as usize >= pool_slots) {
                candle_core::bail!("kv slot {s} is outside the pool ({pool_slots} slots)");
            }
            let slots = meta.slots(slots, k.device())?;
            let op = super::cuda::ops::WriteRowsOp { slots };
            pool.keys(layer).inplace_op2(&k.contiguous()?, &op)?;
            pool.values(layer).inplace_op2(&v.contiguous()?, &op)?;
            return Ok(true);
        }
    }
    Ok(false)
}

/// Attention of `q` (`[tokens, heads, hd]`) over `layer` of the pool with
/// the CUDA kernel, or None when the portable path should run.
#[allow(unused_variables, clippy::too_many_arguments)]
pub fn attend(
    q: &Tensor,
    pool: &KvPool,
    layer: usize,
    spans: &[SeqSpan<'_>],
    meta: &DeviceMeta,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if kernel_fits(q, pool, head_dim) {
            let keys = pool.keys(layer);
            let slots = keys.dims()[1];
            let bs = pool.block_size();
            let blocks = (slots / bs) as u32;
            for span in spans {
                let used = &span.block_table[..(span.offset + span.len).div_ceil(bs)];
                if let Some(&b) = used.iter().find(|&&b| b >= blocks) {
                    candle_core::bail!("block {b} is outside the pool ({blocks} blocks)");
                }
            }
            let op = super::cuda::ops::PagedAttentionOp {
                meta: meta.attention(spans, bs, q.device())?,
                rows: q.dims()[0],
                dims: super::paged_meta::Dims {
                    heads,
                    kv_heads,
                    head_dim,
                    block_size: bs,
                    slots,
                },
            };
            let out = q
                .contiguous()?
                .apply_op3_no_bwd(keys, pool.values(layer), &op)?;
            return Ok(Some(out));
        }
    }
    Ok(None)
}
