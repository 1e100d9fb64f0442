//! What the GPU paged-attention kernel reads besides the tensors: for every
//! query row of a step, where its sequence's block table starts and how many
//! positions it sees (the causal mask, as one number), then the block tables.
//! Built once per step on the host (a few KB) and uploaded once for all
//! layers; no mask and no gathered copy of the cache is made.
//!
//! [`reference`] is the kernel's algorithm (warp-strided positions, online
//! softmax, the warps' partial results merged) in plain Rust, so CPU tests
//! check the layout and the arithmetic the CUDA code performs.

use super::paged_attention::SeqSpan;
use candle_core::{Device, Result, Tensor};
use std::sync::OnceLock;

/// `[rows] table start, [rows] visible positions, block tables...` (u32).
pub fn attention_meta(spans: &[SeqSpan<'_>], block_size: usize) -> Vec<u32> {
    let rows: usize = spans.iter().map(|s| s.len).sum();
    let mut starts = Vec::with_capacity(rows);
    let mut visible = Vec::with_capacity(rows);
    let mut tables = Vec::new();
    for span in spans {
        let start = tables.len() as u32;
        let seen = span.offset + span.len;
        tables.extend_from_slice(&span.block_table[..seen.div_ceil(block_size)]);
        for i in 0..span.len {
            starts.push(start);
            visible.push((span.offset + i + 1) as u32);
        }
    }
    starts.extend(visible);
    starts.extend(tables);
    starts
}

/// A step's kernel inputs on the device, made on first use and shared by
/// every layer of the step.
#[derive(Default)]
pub struct DeviceMeta {
    attention: OnceLock<Tensor>,
    slots: OnceLock<Tensor>,
}

impl DeviceMeta {
    pub fn attention(
        &self,
        spans: &[SeqSpan<'_>],
        block_size: usize,
        device: &Device,
    ) -> Result<&Tensor> {
        if let Some(t) = self.attention.get() {
            return Ok(t);
        }
        let meta = attention_meta(spans, block_size);
        let n = meta.len();
        let _ = self.attention.set(Tensor::from_vec(meta, n, device)?);
        Ok(self.attention.get().expect("set above"))
    }

    pub fn slots(&self, slots: &[u32], device: &Device) -> Result<&Tensor> {
        if let Some(t) = self.slots.get() {
            return Ok(t);
        }
        let _ = self
            .slots
            .set(Tensor::from_slice(slots, slots.len(), device)?);
        Ok(self.slots.get().expect("set above"))
    }
}

/// Dimensions of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Slots of the pool (`[kv_heads, slots, head_dim]`).
    pub slots: usize,
}

/// Warps per thread block of the kernel (`WARPS` in paged_attention.rs).
pub const WARPS: usize = 4;

/// The kernel's computation on the host: `q` `[rows, heads, hd]`, pool
/// `[kv_heads, slots, hd]`, result `[rows, heads * hd]`, all f32.
pub fn reference(q: &[f32], keys: &[f32], values: &[f32], meta: &[u32], d: Dims) -> Vec<f32> {
    let hd = d.head_dim;
    let rows = q.len() / (d.heads * hd);
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0f32; rows * d.heads * hd];
    for row in 0..rows {
        let table = &meta[2 * rows + meta[row] as usize..];
        let visible = meta[rows + row] as usize;
        for head in 0..d.heads {
            let kv_head = head / (d.heads / d.kv_heads);
            let qv: Vec<f32> = q[(row * d.heads + head) * hd..][..hd]
                .iter()
                .map(|x| x * scale)
                .collect();
            // Per warp: running max, sum of exponentials, weighted values.
            let mut parts = vec![(f32::NEG_INFINITY, 0f32, vec![0f32; hd]); WARPS];
            for (warp, (m, l, acc)) in parts.iter_mut().enumerate() {
                for p in (warp..visible).step_by(WARPS) {
                    let slot = table[p / d.block_size] as usize * d.block_size + p % d.block_size;
                    let at = (kv_head * d.slots + slot) * hd;
                    let s: f32 = qv.iter().zip(&keys[at..at + hd]).map(|(a, b)| a * b).sum();
                    let m_new = m.max(s);
                    let (correction, weight) = ((*m - m_new).exp(), (s - m_new).exp());
                    *l = *l * correction + weight;
                    for (a, v) in acc.iter_mut().zip(&values[at..at + hd]) {
                        *a = *a * correction + weight * v;
                    }
                    *m = m_new;
                }
            }
            let max = parts.iter().map(|p| p.0).fold(f32::NEG_INFINITY, f32::max);
            let live = || parts.iter().filter(|p| p.1 > 0.0);
            let total: f32 = live().map(|(m, l, _)| l * (m - max).exp()).sum();
            let o = &mut out[(row * d.heads + head) * hd..][..hd];
            for (i, x) in o.iter_mut().enumerate() {
                let sum: f32 = live().map(|(m, _, acc)| acc[i] * (m - max).exp()).sum();
                *x = if total > 0.0 { sum / total } else { 0.0 };
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::paged_attention::{attend, PagedAttention};
    use rand::{Rng, SeedableRng};

    /// Two sequences (a prefill chunk after cached tokens, and a decode
    /// token) with scattered, out-of-order blocks; the reference must match
    /// the CPU kernel, whose own tests compare it with plain attention.
    #[test]
    fn reference_matches_the_cpu_kernel_on_scattered_blocks() {
        let (heads, kv_heads, hd, bs, blocks) = (4, 2, 8, 4, 12);
        let slots = blocks * bs;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut rand_vec =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect() };
        let keys = rand_vec(kv_heads * slots * hd);
        let values = rand_vec(kv_heads * slots * hd);
        let (table_a, table_b) = ([7u32, 2, 9, 0], [5u32, 11, 3]);
        let spans = [
            SeqSpan {
                start: 0,
                len: 5,
                offset: 6,
                block_table: &table_a,
            },
            SeqSpan {
                start: 5,
                len: 1,
                offset: 9,
                block_table: &table_b,
            },
        ];
        let rows = 6;
        let q = rand_vec(rows * heads * hd);
        let meta = attention_meta(&spans, bs);
        assert_eq!(&meta[..rows], &[0, 0, 0, 0, 0, 3]);
        assert_eq!(&meta[rows..2 * rows], &[7, 8, 9, 10, 11, 10]);
        assert_eq!(&meta[2 * rows..], &[7, 2, 9, 5, 11, 3]);
        let dims = Dims {
            heads,
            kv_heads,
            head_dim: hd,
            block_size: bs,
            slots,
        };
        let ours = reference(&q, &keys, &values, &meta, dims);

        let dev = Device::Cpu;
        let qt = Tensor::from_vec(q, (rows, heads, hd), &dev).unwrap();
        let kt = Tensor::from_vec(keys, (kv_heads, slots, hd), &dev).unwrap();
        let vt = Tensor::from_vec(values, (kv_heads, slots, hd), &dev).unwrap();
        let op = PagedAttention {
            spans: &spans,
            block_size: bs,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
        };
        let cpu: Vec<f32> = attend(&qt, &kt, &vt, &op)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ours.len(), cpu.len());
        for (i, (a, b)) in ours.iter().zip(&cpu).enumerate() {
            assert!((a - b).abs() < 1e-5, "element {i}: {a} vs {b}");
        }
    }

    #[test]
    fn a_row_sees_only_the_blocks_it_reaches() {
        let table = [3u32, 1, 4, 1, 5];
        let spans = [SeqSpan {
            start: 0,
            len: 1,
            offset: 4,
            block_table: &table,
        }];
        // Position 4 with blocks of 4: two blocks are read, not five.
        assert_eq!(attention_meta(&spans, 4), vec![0, 5, 3, 1]);
    }
}
