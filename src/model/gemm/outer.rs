//! Products of many rows on AVX2 (prefill steps, and decode steps of many
//! sequences): outer-product register tiles over
//! packed copies of the activations and of 16 weight rows, computing
//! exactly the 8-lane reduction of [`super`] that the dot-product tiles
//! compute, so an output is the same bits whichever of the two its row
//! count picks.
//!
//! A dot-product tile keeps one register per output and sums its lanes at
//! the end; an outer-product tile keeps sixteen outputs in two registers
//! per row and needs no horizontal sums, but it multiplies one `k` at a
//! time. So lane `l` of every output (the chain over `k = 8c + l`) becomes
//! its own pass: pass `l` runs that chain, in order of `c`, for 6 rows x 16
//! outputs; the fixed tree adds the eight passes' sums; the tail (`k % 8`
//! products, in order) is fused on last, as in the dot tiles.
//!
//! Both operands are packed in pass order: a panel of activation rows once
//! per call ([`pack_panel`]; a long prefill has a few panels), a strip of
//! 16 weight rows once per task ([`pack_strip`]). Each pass's slice of the
//! strip (16 x k/8 values) then stays in L1 while every tile of the panel
//! goes by, reading that pass's activations as one stream. Packing the strip
//! costs about what a few dozen rows of multiply-adds do, so this path
//! takes products from [`MIN_ROWS`] rows on; fewer rows go to the dot
//! tiles.

// Register tiles are indexed by row and column on purpose.
#![allow(clippy::needless_range_loop)]

use super::x86::load8;
use super::{OutPtr, Weights};
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Activation rows from which a product runs here rather than in the dot
/// tiles. On the 2-core AVX2 EPYC, GFLOP/s over one layer's projections of
/// the 0.6B shape (four layers, weights from memory), the two alternating
/// in one process: the dot tiles were 1.1-1.6x faster at 8 and 16 rows,
/// level at 24 and 32; this was 1.08-1.3x faster at 48-96 rows and
/// 1.25-1.5x at 256-2,048, f32 and bf16 weights alike.
pub(super) const MIN_ROWS: usize = 48;

/// Weight rows (outputs) per packed strip: two registers.
const STRIP: usize = 16;
/// Activation rows per register tile: 12 accumulators, 2 weight registers
/// and a broadcast, 15 of AVX2's 16.
const TILE_ROWS: usize = 6;
/// Lanes of the AVX2 reduction.
const L: usize = 8;
/// A panel's packed activation rows take at most this many bytes (a pass
/// reads an eighth of them, from L2 or L3), but at least [`MIN_PANEL`]
/// rows: each strip is packed again for every panel.
const PANEL_BYTES: usize = 4 << 20;
const MIN_PANEL: usize = 16 * TILE_ROWS;
/// The passes in the order the tree adds them: 0 and 4 go into one sum,
/// then 1 and 5, 2 and 6, 3 and 7, so a tile keeps four sums, not eight.
const PASS_ORDER: [usize; L] = [0, 4, 1, 5, 2, 6, 3, 7];

/// A tile's accumulators: rows, then outputs 0..8 and 8..16.
type Acc = [[__m256; 2]; TILE_ROWS];

thread_local! {
    /// The calling thread's packed activation panel.
    static PANEL_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each worker's packed strip and its tiles' pass sums, reused task to task.
    static STRIP_BUF: RefCell<(Vec<f32>, Vec<Acc>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Activation rows, shared with the strip tasks (read only).
#[derive(Clone, Copy)]
struct Rows {
    x: *const f32,
    /// Values per row (`k`).
    len: usize,
    m: usize,
}
// SAFETY: only read while the call that owns the slice runs.
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    /// Row `i`, or the last row past the end (a padded tile's rows, whose
    /// outputs are dropped).
    fn row(self, i: usize) -> *const f32 {
        self.x.wrapping_add(i.min(self.m - 1) * self.len)
    }
}

/// `out[i, j] = sum_k x[i, k] * w[j, k]` for `m >= 1` rows, with the AVX2
/// dot tiles' reduction.
///
/// # Safety
/// The CPU has AVX2 and FMA; `x` holds `m` rows of `k` values, `w` holds
/// `n` rows of `k` values, and `out` has `m * n` writable values no one
/// else touches during the call.
pub(super) unsafe fn matmul_t(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    out: OutPtr,
) {
    let rows = Rows {
        x: x.as_ptr(),
        len: k,
        m,
    };
    let strips = n.div_ceil(STRIP);
    let panel_rows = (PANEL_BYTES / (4 * k.max(1)) / TILE_ROWS * TILE_ROWS).max(MIN_PANEL);
    // Taken, not borrowed: while this thread waits for the strips below it
    // may run another product's task (a LoRA group's, say), which then
    // packs into a buffer of its own.
    let mut panel = PANEL_BUF.take();
    for m0 in (0..m).step_by(panel_rows) {
        let m1 = (m0 + panel_rows).min(m);
        pack_panel(rows, m0, m1, k, &mut panel);
        let panel = &panel[..];
        (0..strips).into_par_iter().for_each(|s| {
            let (j0, cols) = (s * STRIP, STRIP.min(n - s * STRIP));
            // Held only by code that starts no parallel work.
            STRIP_BUF.with_borrow_mut(|(strip, sums)| {
                // SAFETY: as for this function; rows j0..j0 + cols exist;
                // this task alone writes rows m0..m1 of those columns.
                unsafe {
                    pack_strip(w, k, j0, cols, strip);
                    strip_product(rows, m0, m1, k, panel, strip, sums, out, n, j0, cols);
                }
            });
        });
    }
    PANEL_BUF.set(panel);
}

/// Rows `m0..m1` of `x` in pass order: for each pass `l`, each tile of 6
/// rows and `c` in `0..k / 8`, the 6 values `x[i][8c + l]` (rows past `m1`
/// repeat the last; their outputs are dropped).
fn pack_panel(rows: Rows, m0: usize, m1: usize, k: usize, buf: &mut Vec<f32>) {
    let c8 = k / L;
    let tiles = (m1 - m0).div_ceil(TILE_ROWS);
    let per_pass = tiles * c8 * TILE_ROWS;
    buf.resize(L * per_pass, 0.0);
    if per_pass == 0 {
        return;
    }
    // One pass per task: the other cores would wait otherwise.
    buf.par_chunks_mut(per_pass)
        .enumerate()
        .for_each(|(l, pass)| {
            for (t, tile) in pass.chunks_exact_mut(c8 * TILE_ROWS).enumerate() {
                let src: [*const f32; TILE_ROWS] =
                    std::array::from_fn(|i| rows.row((m0 + t * TILE_ROWS + i).min(m1 - 1)));
                for (c, values) in tile.chunks_exact_mut(TILE_ROWS).enumerate() {
                    for (v, x) in values.iter_mut().zip(src) {
                        // SAFETY: 8c + l < k, inside the row.
                        *v = unsafe { *x.add(c * L + l) };
                    }
                }
            }
        });
}

/// Columns `j0..j0 + cols` of rows `m0..m1`: every tile's passes over the
/// packed strip, pass by pass (a pass's 16 x k/8 weights stay in L1 while
/// the tiles go by), then each tile's tree and tail.
///
/// # Safety
/// The CPU has AVX2 and FMA; `panel` and `strip` were packed for these
/// rows, columns and `k`; `out` as for [`matmul_t`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn strip_product(
    rows: Rows,
    m0: usize,
    m1: usize,
    k: usize,
    panel: &[f32],
    strip: &[f32],
    sums: &mut Vec<Acc>,
    out: OutPtr,
    n: usize,
    j0: usize,
    cols: usize,
) {
    let c8 = k / L;
    let tiles = (m1 - m0).div_ceil(TILE_ROWS);
    sums.clear();
    sums.resize(tiles * 4, [[_mm256_setzero_ps(); 2]; TILE_ROWS]);
    let (xp, wp) = (panel.as_ptr(), strip.as_ptr());
    for (at, &l) in PASS_ORDER.iter().enumerate() {
        let w = wp.add(l * c8 * STRIP);
        for t in 0..tiles {
            let x = xp.add((l * tiles + t) * c8 * TILE_ROWS);
            let acc = pass(x, w, c8);
            let sum = &mut sums[t * 4 + at / 2];
            if at % 2 == 0 {
                *sum = acc;
            } else {
                // s4[l] = lanes[l] + lanes[l + 4].
                for i in 0..TILE_ROWS {
                    for h in 0..2 {
                        sum[i][h] = _mm256_add_ps(sum[i][h], acc[i][h]);
                    }
                }
            }
        }
    }
    let mut row = [0f32; STRIP];
    for t in 0..tiles {
        let s4 = &sums[t * 4..t * 4 + 4];
        let i0 = m0 + t * TILE_ROWS;
        for i in 0..TILE_ROWS.min(m1 - i0) {
            let x = rows.row(i0 + i);
            for h in 0..2 {
                // The rest of `super::finish`'s tree, then the tail in order.
                let s2 = [
                    _mm256_add_ps(s4[0][i][h], s4[2][i][h]),
                    _mm256_add_ps(s4[1][i][h], s4[3][i][h]),
                ];
                let mut s = _mm256_add_ps(s2[0], s2[1]);
                for kk in c8 * L..k {
                    let wt = _mm256_loadu_ps(wp.add(kk * STRIP + h * 8));
                    s = _mm256_fmadd_ps(wt, _mm256_broadcast_ss(&*x.add(kk)), s);
                }
                _mm256_storeu_ps(row.as_mut_ptr().add(h * 8), s);
            }
            for (r, &v) in row.iter().enumerate().take(cols) {
                out.write((i0 + i) * n + j0 + r, v);
            }
        }
    }
}

/// One pass: 6 rows x 16 outputs, the chain over `c` of one lane, from
/// packed activations `x` (6 per `c`) and weights `w` (16 per `c`).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pass(x: *const f32, w: *const f32, c8: usize) -> Acc {
    let mut acc = [[_mm256_setzero_ps(); 2]; TILE_ROWS];
    for c in 0..c8 {
        let w0 = _mm256_loadu_ps(w.add(c * STRIP));
        let w1 = _mm256_loadu_ps(w.add(c * STRIP + 8));
        for i in 0..TILE_ROWS {
            let xb = _mm256_broadcast_ss(&*x.add(c * TILE_ROWS + i));
            acc[i][0] = _mm256_fmadd_ps(w0, xb, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(w1, xb, acc[i][1]);
        }
    }
    acc
}

/// Packs weight rows `j0..j0 + cols` into `buf` in pass order: for `l` in
/// `0..8` and `c` in `0..k / 8`, `w[j0 + j][8c + l]` for `j` in `0..16`;
/// then the tail, `w[j0 + j][kk]` for each `kk` from `k / 8 * 8`. Rows past
/// `cols` are zeros (their outputs are dropped). Every value is written, so
/// a buffer of the right length is reused as it is.
///
/// # Safety
/// The CPU has AVX2; `w` has rows `j0..j0 + cols` of `k` values.
#[target_feature(enable = "avx2")]
unsafe fn pack_strip(w: Weights<'_>, k: usize, j0: usize, cols: usize, buf: &mut Vec<f32>) {
    let c8 = k / L;
    if buf.len() != STRIP * k {
        buf.clear();
        buf.resize(STRIP * k, 0.0);
    }
    let dst = buf.as_mut_ptr();
    for half in 0..STRIP / L {
        let rows = cols.saturating_sub(half * L).min(L);
        if rows == 0 {
            for at in 0..k {
                _mm256_storeu_ps(dst.add(at * STRIP + half * L), _mm256_setzero_ps());
            }
            continue;
        }
        let mut src = [std::ptr::null::<u8>(); L];
        for (j, row) in src.iter_mut().enumerate() {
            *row = w.row(j0 + half * L + j.min(rows - 1), k);
        }
        for c in 0..c8 {
            let mut v = [_mm256_setzero_ps(); L];
            for j in 0..rows {
                v[j] = if w.is_bf16() {
                    load8::<true>(src[j], c * L)
                } else {
                    load8::<false>(src[j], c * L)
                };
            }
            // v[l] now holds lane l's weight of each row: w[j][8c + l].
            transpose8(&mut v);
            for l in 0..L {
                _mm256_storeu_ps(dst.add((l * c8 + c) * STRIP + half * L), v[l]);
            }
        }
        for kk in c8 * L..k {
            for j in 0..L {
                *dst.add(kk * STRIP + half * L + j) = if j < rows {
                    super::weight_at(src[j], kk, w.is_bf16())
                } else {
                    0.0
                };
            }
        }
    }
}

/// Transposes an 8 x 8 block held as eight rows.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn transpose8(v: &mut [__m256; 8]) {
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    v[0] = _mm256_permute2f128_ps::<0x20>(s0, s4);
    v[1] = _mm256_permute2f128_ps::<0x20>(s1, s5);
    v[2] = _mm256_permute2f128_ps::<0x20>(s2, s6);
    v[3] = _mm256_permute2f128_ps::<0x20>(s3, s7);
    v[4] = _mm256_permute2f128_ps::<0x31>(s0, s4);
    v[5] = _mm256_permute2f128_ps::<0x31>(s1, s5);
    v[6] = _mm256_permute2f128_ps::<0x31>(s2, s6);
    v[7] = _mm256_permute2f128_ps::<0x31>(s3, s7);
}
