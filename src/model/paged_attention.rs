//! Causal attention of a packed batch of sequences straight from the block
//! pool ("paged" attention), one sequence's queries against its own cache.
//!
//! On the CPU in f32 this is one kernel that walks each sequence's block table
//! ([`PagedAttention`]); elsewhere the cached rows are gathered with
//! `index_select` and attended with matmuls.

use super::attention_tiles::{self as tiles, MAX_SCORE_ROWS, MAX_VALUE_ROWS};
use super::kv_cache::slot;
use super::simd::{simd, Simd};
use super::storage::contiguous;
use crate::math;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static CPU_KERNEL_DISABLED: AtomicBool = AtomicBool::new(false);

/// Switches the CPU kernel off (true), so tests can check it against the
/// portable gather path that GPUs run.
pub fn set_cpu_kernel_disabled(disabled: bool) {
    CPU_KERNEL_DISABLED.store(disabled, Ordering::Relaxed);
}

/// One sequence's place in the batch and in the pool.
#[derive(Debug, Clone)]
pub struct SeqSpan<'a> {
    /// First row of its queries in the packed batch.
    pub start: usize,
    /// Number of queries (new tokens) this step.
    pub len: usize,
    /// Position of the first query (tokens already cached before this step).
    pub offset: usize,
    pub block_table: &'a [u32],
}

pub struct PagedAttention<'a> {
    pub spans: &'a [SeqSpan<'a>],
    pub block_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// What a cached key or value is stored as: f32, or bf16 (half the memory
/// and half the bytes a decode step reads; widening is a shift, so it
/// vectorizes on any CPU).
pub trait KvElement: candle_core::WithDType + Copy + Send + Sync {
    /// Whether it is bf16 (the vector kernels widen it with a shift).
    const BF16: bool;
    fn widen(self) -> f32;
}

impl KvElement for f32 {
    const BF16: bool = false;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl KvElement for half::bf16 {
    const BF16: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// `sum(a[i] * b[i])` with `L` accumulators, so it vectorizes to `L`-lane
/// registers; with `FMA` the multiply-adds are fused (only inside code
/// compiled with that feature: elsewhere `mul_add` is a libm call).
#[inline(always)]
pub(super) fn dot<const L: usize, const FMA: bool, E: KvElement>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0f32; L];
    let chunks = a.len() / L * L;
    for (x, y) in a[..chunks].chunks_exact(L).zip(b[..chunks].chunks_exact(L)) {
        for l in 0..L {
            acc[l] = if FMA {
                x[l].mul_add(y[l].widen(), acc[l])
            } else {
                acc[l] + x[l] * y[l].widen()
            };
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks..a.len() {
        s += a[i] * b[i].widen();
    }
    s
}

#[derive(Clone, Copy)]
enum CacheLevel {
    L1,
    L2,
}

/// Asks the CPU to start loading `data` into cache (the next block of a
/// head's run; blocks of one sequence need not be adjacent in the pool).
#[inline(always)]
fn prefetch<E>(data: &[E], level: CacheLevel) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(64 / std::mem::size_of::<E>()) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let at = line.as_ptr() as *const i8;
        // SAFETY: prefetching is a hint; the address is inside `data`.
        unsafe {
            match level {
                CacheLevel::L1 => _mm_prefetch::<_MM_HINT_T0>(at),
                CacheLevel::L2 => _mm_prefetch::<_MM_HINT_T1>(at),
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, level);
}

/// `sum(a)` with `L` accumulators (vectorizes).
#[inline(always)]
fn sum<const L: usize>(a: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let chunks = a.chunks_exact(L);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..L {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// `y += alpha * x`.
#[inline(always)]
pub(super) fn axpy<const FMA: bool, E: KvElement>(alpha: f32, x: &[E], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = if FMA {
            alpha.mul_add(xi.widen(), *yi)
        } else {
            *yi + alpha * xi.widen()
        };
    }
}

/// Prefetches, a row at a time, the rows of the next two blocks of a run
/// that the row being read now corresponds to: the next block into L1,
/// the one after into L2, which keeps more requests in flight (f32 cache
/// 23-24 -> 25 GB/s). A whole block at once overflows the core's line-fill
/// buffers and stalls until memory delivers it.
pub(super) struct Prefetch<'a, E> {
    data: &'a [E],
    ahead: Option<usize>,
    further: Option<usize>,
    hd: usize,
}

impl<'a, E> Prefetch<'a, E> {
    /// `ahead` and `further`: the pool rows where those blocks start.
    fn new(data: &'a [E], ahead: Option<usize>, further: Option<usize>, hd: usize) -> Self {
        Self {
            data,
            ahead,
            further,
            hd,
        }
    }

    #[inline(always)]
    pub(super) fn row(&self, j: usize) {
        let at = |start: Option<usize>| {
            start.and_then(|s| self.data.get((s + j) * self.hd..(s + j + 1) * self.hd))
        };
        if let Some(row) = at(self.ahead) {
            prefetch(row, CacheLevel::L1);
        }
        if let Some(row) = at(self.further) {
            prefetch(row, CacheLevel::L2);
        }
    }
}

/// Most scores a thread keeps between items (4 MiB; 8 queries x 16 heads
/// at 8,192 positions): a longer context allocates its own each time.
const KEPT_SCORES: usize = 1 << 20;

thread_local! {
    /// [`PagedAttention::group_rows`]' scores, kept between items.
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Queries of one sequence attended together (prefill): each key and value
/// row read from the cache serves all of them, where one query at a time
/// read the whole context once per query. Each query's arithmetic is the
/// same as alone (see [`PagedAttention::group_rows`]), so the tile size
/// cannot change a result.
const QUERY_TILE: usize = 8;

/// One work item: queries `first..first + count` of span `span`, against
/// KV head `kv_head`.
#[derive(Clone, Copy)]
struct Item {
    span: usize,
    first: usize,
    count: usize,
    kv_head: usize,
}

/// The attention output, written by many items at once: each writes its
/// own queries' columns of its own KV head, which no other item touches.
#[derive(Clone, Copy)]
struct OutRows(*mut f32, usize);
// SAFETY: items write disjoint elements (see the type's docs).
unsafe impl Send for OutRows {}
unsafe impl Sync for OutRows {}

impl OutRows {
    /// # Safety
    /// `at + src.len()` is inside the output and no other item writes there.
    unsafe fn write(self, at: usize, src: &[f32]) {
        debug_assert!(at + src.len() <= self.1);
        std::ptr::copy_nonoverlapping(src.as_ptr(), self.0.add(at), src.len());
    }
}

impl PagedAttention<'_> {
    /// Attention of `count` consecutive query tokens (from `first`) of one
    /// sequence against one KV head's cached positions, for the `group`
    /// query heads that share that KV head; returns their outputs,
    /// `[count, group * hd]`. Each key and value row is read once for the
    /// whole tile, a block's run at a time, which keeps decode close to the
    /// memory bandwidth the cache needs and prefill from re-reading the
    /// context per query.
    ///
    /// Every query's result is computed exactly as if it were alone: its
    /// scores are the same dot products ([`dot`]), its softmax runs over its
    /// own visible positions, and each output value is one chain of
    /// multiply-adds over the positions in order. Register tiles
    /// ([`tiles::scores`], [`tiles::values`]) only decide which of those are
    /// computed side by side: several queries against several keys, or
    /// several queries' outputs over one value row, so each row loaded
    /// serves a dozen multiply-adds instead of one or two.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn group_rows<const L: usize, const FMA: bool, E: KvElement>(
        &self,
        q: &[f32],
        k: &[E],
        v: &[E],
        span: &SeqSpan<'_>,
        first: usize,
        count: usize,
        kvh: usize,
    ) -> Vec<f32> {
        let (nh, hd, bs) = (self.num_heads, self.head_dim, self.block_size);
        let group = nh / self.num_kv_heads;
        let width = group * hd;
        // This head's part of the pool: `[slots, hd]`.
        let head_len = k.len() / self.num_kv_heads;
        let (k, v) = (
            &k[kvh * head_len..][..head_len],
            &v[kvh * head_len..][..head_len],
        );
        // Query `t` of the tile sees positions `..base + t + 1`.
        let base = span.offset + first;
        let visible = base + count;
        let scale = 1.0 / (hd as f32).sqrt();
        // Row `t * group + g` ("pair"): query `t`, head `g`.
        let pairs = count * group;
        let mut q_scaled = Vec::with_capacity(pairs * hd);
        for t in 0..count {
            let row = &q[(span.start + first + t) * nh * hd + kvh * width..][..width];
            q_scaled.extend(row.iter().map(|x| x * scale));
        }
        // Positions pair `r` sees.
        let sees = |r: usize| base + r / group + 1;
        // Runs of consecutive positions: (first position, pool row, length).
        let runs: Vec<(usize, usize, usize)> = (0..visible.div_ceil(bs))
            .map(|b| {
                let first = b * bs;
                (
                    first,
                    span.block_table[b] as usize * bs,
                    bs.min(visible - first),
                )
            })
            .collect();
        // The pool row `ahead` blocks on from block `b`, if still visible.
        let block_after = |b: usize, ahead: usize| -> Option<usize> {
            let next = *span.block_table.get(b + ahead)? as usize;
            ((b + ahead) * bs < visible).then_some(next * bs)
        };
        // One score per position a pair sees, in a buffer the thread keeps
        // (a long context's scores are too big to allocate per item).
        let mut scores = SCORES.with(|buf| buf.take());
        scores.clear();
        scores.resize(pairs * visible, 0.0);
        let score_rows = tiles::score_rows::<L>();
        // Pairs of a tile all see the positions its first pair sees.
        let common = |r: usize, tile: usize| sees(r / tile * tile);
        for (b, &(first, row, len)) in runs.iter().enumerate() {
            let ahead = Prefetch::new(k, block_after(b, 1), block_after(b, 2), hd);
            let keys = &k[row * hd..][..len * hd];
            let mut r = 0;
            while r < pairs {
                let rows = score_rows.min(pairs - r);
                let n = len.min(common(r, score_rows).saturating_sub(first));
                let mut q_rows: [&[f32]; MAX_SCORE_ROWS] = [&[]; MAX_SCORE_ROWS];
                for (i, q) in q_rows.iter_mut().enumerate().take(rows) {
                    *q = &q_scaled[(r + i) * hd..][..hd];
                }
                tiles::scores::<L, FMA, E>(
                    &q_rows[..rows],
                    &keys[..n * hd],
                    hd,
                    &mut scores[r * visible + first..],
                    visible,
                    (r == 0).then_some(&ahead),
                );
                r += rows;
            }
            // The diagonal: each pair's positions past its tile's.
            for pair in 0..pairs {
                let q = &q_scaled[pair * hd..][..hd];
                for p in first.max(common(pair, score_rows))..(first + len).min(sees(pair)) {
                    let key = &keys[(p - first) * hd..][..hd];
                    scores[pair * visible + p] = dot::<L, FMA, E>(q, key);
                }
            }
        }
        for r in 0..pairs {
            let row = &mut scores[r * visible..][..sees(r)];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            // Separate passes: a running sum would keep the exps scalar.
            row.iter_mut().for_each(|x| *x = math::exp(*x - max));
            let inv = 1.0 / sum::<L>(row);
            row.iter_mut().for_each(|x| *x *= inv);
        }
        let mut out = vec![0f32; pairs * hd];
        let value_rows = tiles::value_rows::<L>();
        let dims = tiles::value_dims::<L>();
        // Output dimensions the value tiles cover; the rest (head sizes
        // not a multiple of `dims`) go one pair at a time.
        let tiled_dims = hd / dims * dims;
        for (b, &(first, row, len)) in runs.iter().enumerate() {
            let ahead = Prefetch::new(v, block_after(b, 1), block_after(b, 2), hd);
            let values = &v[row * hd..][..len * hd];
            let mut r = 0;
            while r < pairs {
                let rows = value_rows.min(pairs - r);
                let n = len.min(common(r, value_rows).saturating_sub(first));
                let mut probs: [&[f32]; MAX_VALUE_ROWS] = [&[]; MAX_VALUE_ROWS];
                for (i, p) in probs.iter_mut().enumerate().take(rows) {
                    *p = &scores[(r + i) * visible + first..][..n];
                }
                tiles::values::<L, FMA, E>(
                    &values[..n * hd],
                    hd,
                    tiled_dims,
                    &probs[..rows],
                    &mut out[r * hd..][..rows * hd],
                    (r == 0).then_some(&ahead),
                );
                r += rows;
            }
            // What the tiles left: each pair's positions past its tile's
            // common ones, and the untiled dimensions; each output value's
            // chain still runs over positions in order.
            for pair in 0..pairs {
                let o = &mut out[pair * hd..][..hd];
                let skip = if tiled_dims < hd {
                    0
                } else {
                    common(pair, value_rows)
                };
                for p in first.max(skip)..(first + len).min(sees(pair)) {
                    let from = if p < common(pair, value_rows) {
                        tiled_dims
                    } else {
                        0
                    };
                    let value = &values[(p - first) * hd..][..hd];
                    let weight = scores[pair * visible + p];
                    axpy::<FMA, E>(weight, &value[from..], &mut o[from..]);
                }
            }
        }
        if scores.capacity() <= KEPT_SCORES {
            SCORES.with(|buf| buf.replace(scores));
        }
        out
    }

    fn run<E: KvElement>(&self, q: &[f32], k: &[E], v: &[E], out: &mut [f32]) {
        let nkv = self.num_kv_heads;
        let width = self.num_heads / nkv * self.head_dim;
        let row = self.num_heads * self.head_dim;
        let simd = simd();
        let items: Vec<Item> = self
            .spans
            .iter()
            .enumerate()
            .flat_map(|(si, s)| {
                (0..s.len).step_by(QUERY_TILE).flat_map(move |first| {
                    (0..nkv).map(move |kv_head| Item {
                        span: si,
                        first,
                        count: QUERY_TILE.min(s.len - first),
                        kv_head,
                    })
                })
            })
            .collect();
        let out_rows = OutRows(out.as_mut_ptr(), out.len());
        items.par_iter().for_each(|it| {
            let span = &self.spans[it.span];
            let (f, c, h) = (it.first, it.count, it.kv_head);
            let tile = match simd {
                // SAFETY: the CPU has the features (checked by `simd`).
                #[cfg(target_arch = "x86_64")]
                Simd::Avx512 => unsafe { self.group_rows_avx512(q, k, v, span, f, c, h) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Simd::Avx2 => unsafe { self.group_rows_avx2(q, k, v, span, f, c, h) },
                _ => self.group_rows::<8, false, E>(q, k, v, span, f, c, h),
            };
            for (t, src) in tile.chunks_exact(width).enumerate() {
                let at = (span.start + f + t) * row + h * width;
                // SAFETY: token `span.start + f + t` is inside the batch,
                // and only this item writes its KV head's columns of it.
                unsafe { out_rows.write(at, src) };
            }
        });
    }

    /// [`Self::group_rows`] compiled for AVX2 + FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group_rows_avx2<E: KvElement>(
        &self,
        q: &[f32],
        k: &[E],
        v: &[E],
        span: &SeqSpan<'_>,
        first: usize,
        count: usize,
        kvh: usize,
    ) -> Vec<f32> {
        self.group_rows::<8, true, E>(q, k, v, span, first, count, kvh)
    }

    /// [`Self::group_rows`] compiled for AVX-512 (16-lane accumulators).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn group_rows_avx512<E: KvElement>(
        &self,
        q: &[f32],
        k: &[E],
        v: &[E],
        span: &SeqSpan<'_>,
        first: usize,
        count: usize,
        kvh: usize,
    ) -> Vec<f32> {
        self.group_rows::<16, true, E>(q, k, v, span, first, count, kvh)
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous::<f32>(qs, ql, "queries")?;
        let tokens: usize = self.spans.iter().map(|s| s.len).sum();
        let row = self.num_heads * self.head_dim;
        let mut out = vec![0f32; tokens * row];
        // Items write their spans' rows of `out` in parallel: spans must
        // be inside the batch and apart.
        let apart = self
            .spans
            .windows(2)
            .all(|w| w[0].start + w[0].len <= w[1].start);
        if q.len() < tokens * row || !apart || self.spans.iter().any(|s| s.start + s.len > tokens) {
            candle_core::bail!(
                "paged attention: spans overlap or lie outside the {tokens} queries"
            );
        }
        match (ks, vs) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => self.run(
                q,
                contiguous::<f32>(ks, kl, "keys")?,
                contiguous::<f32>(vs, vl, "values")?,
                &mut out,
            ),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => self.run(
                q,
                contiguous::<half::bf16>(ks, kl, "keys")?,
                contiguous::<half::bf16>(vs, vl, "values")?,
                &mut out,
            ),
            _ => candle_core::bail!("paged attention: keys and values must both be f32 or bf16"),
        }
        Ok((CpuStorage::F32(out), Shape::from((tokens, row))))
    }
}

/// Attention for every span: `q` is `[tokens, heads, hd]` (after RoPE), the
/// pool tensors `[kv_heads, slots, hd]` already hold this step's keys/values.
/// Returns `[tokens, heads * hd]`.
pub fn attend(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    op: &PagedAttention<'_>,
) -> Result<Tensor> {
    if q.device().is_cpu()
        && q.dtype() == DType::F32
        && matches!(keys.dtype(), DType::F32 | DType::BF16)
        && !CPU_KERNEL_DISABLED.load(Ordering::Relaxed)
    {
        return q.contiguous()?.apply_op3_no_bwd(keys, values, op);
    }
    let mut outputs = Vec::with_capacity(op.spans.len());
    for span in op.spans {
        let visible = span.offset + span.len;
        let slots: Vec<u32> = (0..visible)
            .map(|p| slot(span.block_table, op.block_size, p))
            .collect();
        let idx = Tensor::from_vec(slots, visible, q.device())?;
        // A cache stored narrower than the model computes is widened here.
        let k = keys.index_select(&idx, 1)?.to_dtype(q.dtype())?;
        let v = values.index_select(&idx, 1)?.to_dtype(q.dtype())?;
        let qs = q.narrow(0, span.start, span.len)?;
        outputs.push(gathered(&qs, &k, &v, span.offset)?);
    }
    Tensor::cat(&outputs, 0)
}

/// Attention of `q` (`[n, heads, hd]`, positions `offset..offset+n`) over
/// gathered `k`/`v` (`[kv_heads, offset+n, hd]`). Returns `[n, heads*hd]`.
fn gathered(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> Result<Tensor> {
    let (n, nh, hd) = q.dims3()?;
    let (nkv, total, _) = k.dims3()?;
    let group = nh / nkv;
    // Query heads h*group..(h+1)*group share kv head h: fold them into rows.
    let q = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((nkv, group * n, hd))?;
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let scale = 1.0 / (hd as f64).sqrt();
    let scores = (q.matmul(&k.t()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = if n > 1 {
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
        let mask = Tensor::from_vec(mask, (n, total), q.device())?;
        scores
            .reshape((nkv, group, n, total))?
            .broadcast_add(&mask)?
            .reshape((nkv, group * n, total))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs
        .matmul(&v)?
        .reshape((nh, n, hd))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n, nh * hd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The kernel before register tiles: one score, and one value row into
    /// one pair's output, at a time. The tiles must give its bits.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn reference<const L: usize, const FMA: bool, E: KvElement>(
        op: &PagedAttention<'_>,
        q: &[f32],
        k: &[E],
        v: &[E],
        span: &SeqSpan<'_>,
        first: usize,
        count: usize,
        kvh: usize,
    ) -> Vec<f32> {
        let (nh, hd, bs) = (op.num_heads, op.head_dim, op.block_size);
        let group = nh / op.num_kv_heads;
        let width = group * hd;
        // This head's part of the pool: `[slots, hd]`.
        let head_len = k.len() / op.num_kv_heads;
        let (k, v) = (
            &k[kvh * head_len..][..head_len],
            &v[kvh * head_len..][..head_len],
        );
        // Query `t` of the tile sees positions `..base + t + 1`.
        let base = span.offset + first;
        let visible = base + count;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut q_scaled = Vec::with_capacity(count * width);
        for t in 0..count {
            let row = &q[(span.start + first + t) * nh * hd + kvh * width..][..width];
            q_scaled.extend(row.iter().map(|x| x * scale));
        }
        // The tile's queries that see position `p`.
        let seeing = |p: usize| p.saturating_sub(base)..count;
        // Runs of consecutive positions: (first position, pool row, length).
        let runs = (0..visible.div_ceil(bs)).map(|b| {
            let first = b * bs;
            (
                first,
                span.block_table[b] as usize * bs,
                bs.min(visible - first),
            )
        });
        // Row `t * group + g`: query `t`, head `g`, one score per position.
        let mut scores = vec![0f32; count * group * visible];
        // The block `ahead` blocks on in the run, so each row read here can
        // prefetch the same row there: a row's worth of prefetches at a time,
        // because a whole block at once overflows the core's line-fill
        // buffers and stalls until memory delivers it. The next block goes
        // to L1; the one after to L2, which keeps more requests in flight
        // (f32 cache 23-24 -> 25 GB/s).
        let block_after = |b: usize, ahead: usize| -> Option<usize> {
            let next = *span.block_table.get(b + ahead)? as usize;
            ((b + ahead) * bs < visible).then_some(next * bs * hd)
        };
        for (b, (first, row, len)) in runs.clone().enumerate() {
            let ahead = block_after(b, 1).map(|at| &k[at..][..bs * hd]);
            let further = block_after(b, 2).map(|at| &k[at..][..bs * hd]);
            let keys = &k[row * hd..][..len * hd];
            for (j, key) in keys.chunks_exact(hd).enumerate() {
                if let Some(ahead) = ahead {
                    prefetch(&ahead[j * hd..][..hd], CacheLevel::L1);
                }
                if let Some(further) = further {
                    prefetch(&further[j * hd..][..hd], CacheLevel::L2);
                }
                let p = first + j;
                for t in seeing(p) {
                    for g in 0..group {
                        let at = (t * group + g) * hd;
                        scores[(t * group + g) * visible + p] =
                            dot::<L, FMA, E>(&q_scaled[at..at + hd], key);
                    }
                }
            }
        }
        for t in 0..count {
            let sees = base + t + 1;
            for g in 0..group {
                let row = &mut scores[(t * group + g) * visible..][..sees];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // Separate passes: a running sum would keep the exps scalar.
                row.iter_mut().for_each(|x| *x = math::exp(*x - max));
                let inv = 1.0 / sum::<L>(row);
                row.iter_mut().for_each(|x| *x *= inv);
            }
        }
        let mut out = vec![0f32; count * width];
        for (b, (first, row, len)) in runs.enumerate() {
            let ahead = block_after(b, 1).map(|at| &v[at..][..bs * hd]);
            let further = block_after(b, 2).map(|at| &v[at..][..bs * hd]);
            let values = &v[row * hd..][..len * hd];
            for (j, value) in values.chunks_exact(hd).enumerate() {
                if let Some(ahead) = ahead {
                    prefetch(&ahead[j * hd..][..hd], CacheLevel::L1);
                }
                if let Some(further) = further {
                    prefetch(&further[j * hd..][..hd], CacheLevel::L2);
                }
                let p = first + j;
                for t in seeing(p) {
                    for g in 0..group {
                        let at = (t * group + g) * hd;
                        axpy::<FMA, E>(
                            scores[(t * group + g) * visible + p],
                            value,
                            &mut out[at..at + hd],
                        );
                    }
                }
            }
        }
        out
    }

    fn random(n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// Every item of every span, tiled vs the reference, for one lane
    /// width and cache element type; the cache rows scattered over blocks.
    fn check<const L: usize, const FMA: bool, E: KvElement>(
        to_e: impl Fn(f32) -> E,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) {
        for &(heads, kv_heads) in &[(2, 1), (4, 2), (14, 2), (8, 8), (16, 8), (12, 2)] {
            for &hd in &[64, 80, 128, 24, 36] {
                for &bs in &[1, 4, 16] {
                    let (offset, len): (usize, usize) =
                        (rng.random_range(0..40), rng.random_range(1..20));
                    let visible = offset + len;
                    let blocks = visible.div_ceil(bs);
                    let pool_blocks = blocks + 3;
                    let mut table: Vec<u32> = (0..pool_blocks as u32).collect();
                    for i in (1..table.len()).rev() {
                        table.swap(i, rng.random_range(0..=i));
                    }
                    table.truncate(blocks);
                    let slots = pool_blocks * bs;
                    let k: Vec<E> = random(kv_heads * slots * hd, rng)
                        .into_iter()
                        .map(&to_e)
                        .collect();
                    let v: Vec<E> = random(kv_heads * slots * hd, rng)
                        .into_iter()
                        .map(&to_e)
                        .collect();
                    let q = random(len * heads * hd, rng);
                    let spans = [SeqSpan {
                        start: 0,
                        len,
                        offset,
                        block_table: &table,
                    }];
                    let op = PagedAttention {
                        spans: &spans,
                        block_size: bs,
                        num_heads: heads,
                        num_kv_heads: kv_heads,
                        head_dim: hd,
                    };
                    for first in (0..len).step_by(QUERY_TILE) {
                        let count = QUERY_TILE.min(len - first);
                        for kvh in 0..kv_heads {
                            let got = op
                                .group_rows::<L, FMA, E>(&q, &k, &v, &spans[0], first, count, kvh);
                            let want = reference::<L, FMA, E>(
                                &op, &q, &k, &v, &spans[0], first, count, kvh,
                            );
                            let bits =
                                |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&got),
                                bits(&want),
                                "L {L} fma {FMA} heads {heads}/{kv_heads} hd {hd} bs {bs} \
                                 offset {offset} len {len} first {first} kv head {kvh}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn register_tiles_give_the_bits_of_one_score_and_one_row_at_a_time() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let bf16 = half::bf16::from_f32;
        check::<8, false, f32>(|x| x, &mut rng);
        check::<8, false, half::bf16>(bf16, &mut rng);
        // The FMA lanes run the vector tiles of their width: only where
        // the CPU has them (CI's machines have AVX-512).
        if simd() >= Simd::Avx2 {
            check::<8, true, f32>(|x| x, &mut rng);
            check::<8, true, half::bf16>(bf16, &mut rng);
        }
        if simd() >= Simd::Avx512 {
            check::<16, true, f32>(|x| x, &mut rng);
            check::<16, true, half::bf16>(bf16, &mut rng);
        } else {
            eprintln!("no AVX-512 here: its attention tiles were not checked");
        }
    }
}
