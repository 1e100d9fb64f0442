//! `out = x @ w^T` on the CPU for every shape, decode and prefill alike:
//! f32 activations `x: [m, k]` against weights `w: [n, k]` (the Hugging Face
//! `[out, in]` layout, used in place) held as f32 or bf16.
//!
//! **One fixed reduction per output.** Every output `out[i][j]` is computed
//! the same way whatever `m` is and whichever register tile or thread it
//! lands in, by a reduction of `L` lanes fixed by the instruction set
//! ([`lanes`]: 16 on AVX-512 and the portable path, 8 on AVX2):
//!
//! 1. `L` lane sums, lane `l` a chain of fused multiply-adds over
//!    `k = Lc + l` for `c = 0, 1, ...` in order, starting from `0.0`;
//! 2. a fixed tree over the lanes: `l[i] + l[i+8]` (16 lanes only), then
//!    `+4`, `+2`, `+1`;
//! 3. the last `k % L` products fused onto that sum in order.
//!
//! So row `i` of an `m`-row product is bit-identical to the one-row product
//! of row `i` (what makes a request's results independent of the batch it
//! ran in), and bf16 weights, widened exactly in registers, give exactly the
//! f32 results of the same values stored as f32. Kernels of the same width
//! agree bit for bit; AVX2's 8 lanes (one register per output, which lets a
//! tile hold 4 x 3 outputs instead of 2 x 3) differ from 16 lanes only in
//! rounding.
//!
//! Work splits into tasks of up to [`PANEL_ROWS`] activation rows by up to
//! [`CHUNK_COLS`] weight rows (output columns), as many as fit L2 for the
//! row length (`task_shape`); within a task each register
//! tile takes a few activation rows and a few weight rows whole. A task's
//! weight rows stay in L2 while its activation rows pass them, and tasks of
//! one column chunk run back to back, so a prefill streams the weights once
//! per chunk and the activations from L3 rather than memory. The blocking
//! only decides where an output is computed, never how: each output is one
//! tile's fixed reduction over all of `k`.
//!
//! On AVX2 and AVX-512, products of many rows (prefill, decode of many
//! sequences) run outer-product tiles over packed operands instead
//! (`outer`), which compute the same 8- or 16-lane reduction one lane per
//! pass: the same bits, faster where packing pays.
//! Dispatch is by [`Simd`] at run time; a new backend adds a tile kernel
//! with the same reduction.

#[cfg(target_arch = "x86_64")]
mod amx;
pub mod bf16_products;
#[cfg(target_arch = "x86_64")]
mod outer;
mod portable;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::simd::{simd, Simd};
use half::bf16;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Weights `[n, k]`, row-major, as stored in memory.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    /// Widened to f32 in registers (exact: a bf16 is the top half of an f32).
    Bf16(&'a [bf16]),
}

impl Weights<'_> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }

    /// Start of weight row `r` (of `k` values), as bytes.
    fn row(&self, r: usize, k: usize) -> *const u8 {
        match self {
            Weights::F32(w) => w[r * k..].as_ptr() as *const u8,
            Weights::Bf16(w) => w[r * k..].as_ptr() as *const u8,
        }
    }

    fn is_bf16(&self) -> bool {
        matches!(self, Weights::Bf16(_))
    }

    /// Bytes of one weight value.
    fn value_bytes(&self) -> usize {
        if self.is_bf16() {
            2
        } else {
            4
        }
    }
}

/// Most activation rows in one register tile (any kernel).
pub(crate) const MAX_TILE_ROWS: usize = 4;
/// Most weight rows in one register tile (any kernel).
pub(crate) const MAX_TILE_COLS: usize = 6;

/// Pointers one register tile reads: `rows` activation rows of `k` values
/// and `cols` weight rows of `k` values (f32 or bf16 as `bf16` says).
pub(crate) struct Tile {
    pub x: [*const f32; MAX_TILE_ROWS],
    pub rows: usize,
    pub w: [*const u8; MAX_TILE_COLS],
    pub cols: usize,
    pub k: usize,
    pub bf16: bool,
    /// Weights a later task reads, prefetched into L2 as this tile runs,
    /// `prefetch.1` bytes a step from `prefetch.0` (a hint: it may point
    /// past the matrix, where nothing is read).
    pub prefetch: (*const u8, usize),
}

/// `sums[i][r]`: the output of activation row `i` and weight row `r`.
pub(crate) type TileSums = [[f32; MAX_TILE_COLS]; MAX_TILE_ROWS];

/// Most weight rows (output columns) per parallel task.
pub const CHUNK_COLS: usize = 48;

/// Most activation rows per parallel task: a decode step's rows are one
/// panel; a prefill's are many.
pub const PANEL_ROWS: usize = 64;

/// A task's weight rows stay in L2 (256 KiB or more on the x86 cores we
/// target) while its activation rows pass them...
const CHUNK_BYTES: usize = 128 << 10;
/// ...and its activation rows come from L2 too, at most this much.
const PANEL_BYTES: usize = 192 << 10;

/// `(weight rows, activation rows)` per task for rows of `k` values: as
/// many as fit the budgets above, whole tiles, within the maxima. Only
/// where outputs are computed depends on this, never how.
fn task_shape(
    k: usize,
    weight_bytes: usize,
    (tile_rows, tile_cols): (usize, usize),
) -> (usize, usize) {
    let fit = |budget: usize, row_bytes: usize, tile: usize, most: usize| {
        (budget / row_bytes.max(1) / tile * tile).clamp(tile, most)
    };
    (
        fit(CHUNK_BYTES, k * weight_bytes, tile_cols, CHUNK_COLS),
        fit(PANEL_BYTES, k * 4, tile_rows, PANEL_ROWS),
    )
}

/// The tile shape (activation rows, weight rows) each kernel runs.
fn tile_shape(isa: Simd) -> (usize, usize) {
    match isa {
        // 24 accumulators, 4 activation vectors and a weight vector of 32.
        Simd::Avx512 => (4, 6),
        // 12 one-register accumulators, 3 weight vectors and an activation
        // vector: all 16 registers, 7 loads per 12 multiply-adds.
        Simd::Avx2 => (4, 3),
        Simd::Baseline => (1, 1),
    }
}

/// Lanes of the reduction `isa`'s kernel computes (module docs; the tests'
/// reference picks its width by it).
pub(crate) fn lanes(isa: Simd) -> usize {
    match isa {
        Simd::Avx2 => 8,
        Simd::Avx512 | Simd::Baseline => 16,
    }
}

/// Output pointer shared by the tasks; each writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (their own output columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `at` is inside the output and no other task writes it.
    unsafe fn write(self, at: usize, value: f32) {
        *self.0.add(at) = value;
    }

    /// # Safety
    /// As for [`OutPtr::write`], for each of `values.len()` elements from `at`.
    unsafe fn write_all(self, at: usize, values: &[f32]) {
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(at), values.len());
    }
}

/// `out[i, j] = sum_k x[i, k] * w[j, k]` (row-major), with the fixed
/// reduction of the module docs, on the best kernel this CPU has. `out` need
/// not be initialized: all of its first `m * n` values are written (a
/// decode step's logits are 150k floats a row, not worth zeroing first).
pub fn matmul_t(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    out: &mut [MaybeUninit<f32>],
) {
    matmul_t_with(simd(), x, m, k, w, n, out)
}

pub(crate) fn matmul_t_with(
    isa: Simd,
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let out_ptr = OutPtr(out.as_mut_ptr() as *mut f32);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (both): the CPU has `isa` (at most what it has), and AVX2
        // and FMA with it; the sizes were checked above and `out` is ours
        // alone. (They pack the rows themselves: no padding needed.)
        match isa {
            Simd::Avx512 if outer::takes::<outer::Avx512>(m, w) => {
                unsafe { outer::matmul_t::<outer::Avx512>(x, m, k, w, n, out_ptr) };
                return;
            }
            Simd::Avx2 if outer::takes::<outer::Avx2>(m, w) => {
                unsafe { outer::matmul_t::<outer::Avx2>(x, m, k, w, n, out_ptr) };
                return;
            }
            _ => {}
        }
    }
    let (x, stride) = padded_rows(x, m, k);
    let kernel = DotKernel {
        shape: tile_shape(isa),
        steps: k / lanes(isa),
        // SAFETY: (the caller's) `isa` is one this CPU has.
        run: &|t: &Tile, sums: &mut TileSums| unsafe { run_tile(isa, t, sums) },
    };
    dot_tasks(&kernel, (&x, stride), m, k, w, n, out_ptr);
}

/// A dot-product register tile and how [`dot_tasks`] paces it.
struct DotKernel<'a> {
    /// (activation rows, weight rows) of a tile.
    shape: (usize, usize),
    /// The tile's steps over `k` (the L2 prefetch is spread over them).
    steps: usize,
    /// Runs one tile: a kernel the CPU has, over pointers [`Tile`] describes.
    run: &'a (dyn Fn(&Tile, &mut TileSums) + Sync),
}

/// `out = x @ w^T` by `kernel`'s dot-product tiles, `x`'s rows `stride`
/// 4-byte units apart (f32 values, or bf16 pairs for [`bf16_products`]).
fn dot_tasks(
    kernel: &DotKernel<'_>,
    (x, stride): (&[f32], usize),
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    out_ptr: OutPtr,
) {
    let (tile_rows, tile_cols) = kernel.shape;
    let weight_bytes = w.value_bytes();
    let (chunk_cols, panel_rows) = task_shape(k, weight_bytes, (tile_rows, tile_cols));
    let panels = m.div_ceil(panel_rows);
    // Chunk-major: consecutive tasks share their weight rows.
    (0..n.div_ceil(chunk_cols) * panels)
        .into_par_iter()
        .for_each(|task| {
            let (c, p) = (task / panels, task % panels);
            let (n0, n1) = (c * chunk_cols, ((c + 1) * chunk_cols).min(n));
            let (m0, m1) = (p * panel_rows, ((p + 1) * panel_rows).min(m));
            let mut sums: TileSums = [[0.0; MAX_TILE_COLS]; MAX_TILE_ROWS];
            // While its tiles run, a task prefetches into L2 the weights of
            // the next chunk (the next task's, mostly this thread's), shared
            // out over its tiles and their steps: the stream from memory then
            // overlaps the multiply-adds instead of following them. Worth it
            // where a task's tiles reuse their weights (more rows than one
            // tile), and on AMD cores for one row group too ([`prefetch_one_group`]).
            let chunk_bytes = (n1 - n0) * k * weight_bytes;
            let next = w.row(n0, k).wrapping_add(chunk_bytes);
            let tiles = (m1 - m0).div_ceil(tile_rows) * (n1 - n0).div_ceil(tile_cols);
            let share = chunk_bytes.div_ceil(tiles).next_multiple_of(64);
            let per_step = if m1 - m0 > tile_rows || prefetch_one_group() {
                share.div_ceil(kernel.steps.max(1))
            } else {
                0
            };
            let mut q = 0;
            for i0 in (m0..m1).step_by(tile_rows) {
                let rows = tile_rows.min(m1 - i0);
                for j0 in (n0..n1).step_by(tile_cols) {
                    let cols = tile_cols.min(n1 - j0);
                    let prefetch = (next.wrapping_add(q * share), per_step);
                    q += 1;
                    // Past the last row or column the tile repeats it; those
                    // sums are dropped.
                    let tile = Tile {
                        x: std::array::from_fn(|i| x[(i0 + i.min(rows - 1)) * stride..].as_ptr()),
                        rows,
                        w: std::array::from_fn(|r| w.row(j0 + r.min(cols - 1), k)),
                        cols,
                        k,
                        bf16: w.is_bf16(),
                        prefetch,
                    };
                    (kernel.run)(&tile, &mut sums);
                    for (i, row) in sums.iter().enumerate().take(rows) {
                        for (r, &v) in row.iter().enumerate().take(cols) {
                            // SAFETY: i0 + i < m1 <= m, j0 + r < n1 <= n; this
                            // task alone writes rows m0..m1 of columns n0..n1.
                            unsafe { out_ptr.write((i0 + i) * n + j0 + r, v) };
                        }
                    }
                }
            }
        });
}

/// Whether a product of one row group (decode of up to 4 sequences) also
/// prefetches the next chunk's weights. One row group's tiles read each
/// weight once, so the prefetch only moves the stream earlier. On the 2-core
/// Intel Xeon that cost ~5% at one row; on the 2-core AVX2 EPYC (Zen 3),
/// whose own prefetchers keep fewer lines in flight, it sped the GEMM table's
/// bf16 rows up 1.3x at 1 row and 1.4-1.5x at 2 and 4 (two rounds, alternating),
/// and a 1-sequence bf16 decode 8.3 / 8.9 -> 11.7 / 11.2 tok/s.
fn prefetch_one_group() -> bool {
    crate::model::simd::amd()
}

/// `x`'s rows `k + 16` floats apart when `k` is a multiple of 1024: rows
/// exactly 4 KiB apart all map to the same L1 sets, and a tile reads
/// several at once (padding cannot change a result, only where rows live).
fn padded_rows(x: &[f32], m: usize, k: usize) -> (std::borrow::Cow<'_, [f32]>, usize) {
    if m == 1 || !k.is_multiple_of(1024) {
        return (std::borrow::Cow::Borrowed(x), k);
    }
    let stride = k + 16;
    let mut padded = vec![0f32; m * stride];
    for (dst, src) in padded.chunks_exact_mut(stride).zip(x.chunks_exact(k)) {
        dst[..k].copy_from_slice(src);
    }
    (std::borrow::Cow::Owned(padded), stride)
}

/// One register tile on `isa`'s kernel.
///
/// # Safety
/// As for [`Tile`]; the CPU has `isa`.
unsafe fn run_tile(isa: Simd, t: &Tile, sums: &mut TileSums) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => x86::tile_avx512(t, sums),
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => x86::tile_avx2(t, sums),
        _ => portable::tile::<16>(t, sums),
    }
}

/// Step 2 and 3 of the reduction (module docs) over plain lane sums (16
/// or 8): the definition the vector kernels reproduce.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(crate) fn finish<const L: usize>(
    lanes: &[f32; L],
    tail: impl Iterator<Item = (f32, f32)>,
) -> f32 {
    let mut s8 = [0f32; 8];
    for i in 0..8 {
        s8[i] = if L == 16 {
            lanes[i] + lanes[i + 8]
        } else {
            lanes[i]
        };
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    let mut s = s2[0] + s2[1];
    for (w, x) in tail {
        s = w.mul_add(x, s);
    }
    s
}

/// A weight value as f32 (bf16 widened exactly).
///
/// # Safety
/// `row` starts at least `at + 1` values of the kind `bf16` says.
#[inline(always)]
pub(crate) unsafe fn weight_at(row: *const u8, at: usize, bf16: bool) -> f32 {
    if bf16 {
        f32::from_bits((*(row as *const u16).add(at) as u32) << 16)
    } else {
        *(row as *const f32).add(at)
    }
}
