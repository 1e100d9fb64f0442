//! Products of many rows on AVX2 and AVX-512 (prefill steps, and decode
//! steps of many sequences): outer-product register tiles over packed
//! copies of the activations and of a strip of weight rows, computing
//! exactly the `L`-lane reduction of [`super`] that the dot-product tiles
//! of the same instruction set compute, so an output is the same bits
//! whichever of the two its row count picks.
//!
//! A dot-product tile keeps one register per output and sums its lanes at
//! the end; an outer-product tile keeps a register's worth of outputs per
//! register and needs no horizontal sums, but it multiplies one `k` at a
//! time. So lane `l` of every output (the chain over `k = Lc + l`) becomes
//! its own pass: pass `l` runs that chain, in order of `c`, for a tile of
//! [`Tiles::ROWS`] rows x [`Tiles::STRIP`] outputs; the fixed tree adds the
//! `L` passes' sums ([`Tree`]); the tail (`k % L` products, in order) is
//! fused on last, as in the dot tiles.
//!
//! Both operands are packed in pass order: a panel of activation rows once
//! per call ([`pack_panel`]; a long prefill has a few panels), a strip of
//! weight rows once per task ([`pack_strip`]). Each pass's slice of the
//! strip (`STRIP x k/L` values) then stays in L1 while every tile of the
//! panel goes by, reading that pass's activations as one stream. Packing
//! the strip costs about what a few dozen rows of multiply-adds do, so this
//! path takes products from [`Tiles::MIN_ROWS`] rows on
//! ([`Tiles::MIN_ROWS_BF16`] with bf16 weights); fewer rows go to the dot
//! tiles.

// Register tiles are indexed by row and column on purpose.
#![allow(clippy::needless_range_loop)]

use super::x86::load8;
use super::{OutPtr, Weights};
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// One instruction set's outer-product tile: [`Tiles::ROWS`] activation rows
/// by [`Tiles::STRIP`] outputs, one lane of its `L`-lane reduction a pass.
pub(super) trait Tiles {
    /// Lanes of the reduction (the dot tiles' register width).
    const L: usize;
    /// Weight rows (outputs) per packed strip, a multiple of 8.
    const STRIP: usize;
    /// Activation rows per register tile.
    const ROWS: usize;
    /// Activation rows from which a product runs here rather than in the
    /// dot tiles, f32 weights (measured: see each implementation).
    const MIN_ROWS: usize;
    /// The same for bf16 weights, which the dot tiles widen once per row
    /// group and the strips once per call (`MIN_ROWS` where not measured
    /// apart).
    const MIN_ROWS_BF16: usize = Self::MIN_ROWS;

    /// One pass: the chain over `c` in `0..groups` of one lane for the
    /// tile, from packed activations `x` (`ROWS` per `c`) and weights `w`
    /// (`STRIP` per `c`), starting from zero; then, in registers, the
    /// tile's partial sums in `slots` (`ROWS * STRIP` values each, row by
    /// row) at levels `0..join.joins` are added in, in that order, and the
    /// result stored at level `join.store` ([`Tree`]).
    ///
    /// # Safety
    /// The CPU has the instruction set; the pointers hold those values.
    unsafe fn pass(x: *const f32, w: *const f32, groups: usize, slots: *mut f32, join: Join);

    /// One value of the tail fused onto `sum` (`w` and `x` as packed).
    #[inline(always)]
    fn tail(sum: f32, w: f32, x: f32) -> f32 {
        w.mul_add(x, sum)
    }
}

/// AVX2: 6 rows x 16 outputs, 12 accumulators, 2 weight registers and a
/// broadcast (15 of 16 registers), 8 loads per 12 multiply-adds.
pub(super) struct Avx2;

impl Tiles for Avx2 {
    const L: usize = 8;
    const STRIP: usize = 16;
    const ROWS: usize = 6;
    /// On the 2-core AVX2 EPYC, GFLOP/s over one layer's projections of the
    /// 0.6B shape (four layers, weights from memory), the two alternating in
    /// one process: the dot tiles were 1.1-1.6x faster at 8 and 16 rows,
    /// level at 24 and 32; this was 1.08-1.3x faster at 48-96 rows and
    /// 1.25-1.5x at 256-2,048, f32 and bf16 weights alike.
    const MIN_ROWS: usize = 48;
    /// The same measure, in one process with the two paths alternating
    /// product by product (12 rounds, the median ratio), three runs: with
    /// bf16 weights this was 0.93-1.11x the dot tiles at 24 rows, 1.03-1.07x
    /// at 32, 1.10-1.19x at 40 (f32 weights: 0.95x at 32, 0.93x at 40).
    const MIN_ROWS_BF16: usize = 32;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn pass(x: *const f32, w: *const f32, groups: usize, slots: *mut f32, join: Join) {
        const R: usize = Avx2::ROWS;
        let mut a = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..groups {
            let w0 = _mm256_loadu_ps(w.add(c * 16));
            let w1 = _mm256_loadu_ps(w.add(c * 16 + 8));
            for i in 0..R {
                let xb = _mm256_broadcast_ss(&*x.add(c * R + i));
                a[i][0] = _mm256_fmadd_ps(w0, xb, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(w1, xb, a[i][1]);
            }
        }
        for level in 0..join.joins {
            let s = slots.add(level * R * 16);
            for i in 0..R {
                a[i][0] = _mm256_add_ps(a[i][0], _mm256_loadu_ps(s.add(i * 16)));
                a[i][1] = _mm256_add_ps(a[i][1], _mm256_loadu_ps(s.add(i * 16 + 8)));
            }
        }
        let d = slots.add(join.store * R * 16);
        for i in 0..R {
            _mm256_storeu_ps(d.add(i * 16), a[i][0]);
            _mm256_storeu_ps(d.add(i * 16 + 8), a[i][1]);
        }
    }
}

/// AVX-512: 8 rows x 48 outputs, 24 accumulators and 3 weight registers,
/// the activations broadcast from memory: 11 loads per 24 multiply-adds.
pub(super) struct Avx512;

impl Tiles for Avx512 {
    const L: usize = 16;
    const STRIP: usize = 48;
    const ROWS: usize = 8;
    /// On the 2-core AVX-512 EPYC (Zen 4), the same measure as for AVX2,
    /// with 12 x 32 tiles then: the dot tiles were 1.3x faster at 8 rows
    /// and level at 16; this was 1.4-1.6x faster at 24-40 rows and 2.2-2.5x
    /// at 48-1,024. On a 2-core AVX-512 Xeon, once the dot tiles prefetched
    /// the next task's weights, they were 1.15-1.2x faster at 20 rows and
    /// level at 24; this (8 x 48, 1.03-1.2x faster than 12 x 32 at 32-1,024
    /// rows there) was 1.2x faster at 32 rows and 1.5x at 64.
    const MIN_ROWS: usize = 24;

    unsafe fn pass(x: *const f32, w: *const f32, groups: usize, slots: *mut f32, join: Join) {
        avx512_pass::<{ Avx512::ROWS }, { Avx512::STRIP / 16 }>(x, w, groups, slots, join)
    }
}

/// An AVX-512 pass over a tile of `R` rows x `V` vectors of 16 outputs.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_pass<const R: usize, const V: usize>(
    x: *const f32,
    w: *const f32,
    groups: usize,
    slots: *mut f32,
    join: Join,
) {
    let s = 16 * V;
    let mut a = [[_mm512_setzero_ps(); V]; R];
    for c in 0..groups {
        let mut wv = [_mm512_setzero_ps(); V];
        for v in 0..V {
            wv[v] = _mm512_loadu_ps(w.add(c * s + 16 * v));
        }
        for i in 0..R {
            let xb = _mm512_set1_ps(*x.add(c * R + i));
            for v in 0..V {
                a[i][v] = _mm512_fmadd_ps(wv[v], xb, a[i][v]);
            }
        }
    }
    join_and_store(a, slots, join);
}

/// The end of an AVX-512 pass: the tile's finished partial sums at levels
/// `0..join.joins` added in, in order, then the result stored at level
/// `join.store` ([`Tree`]). Inlined into each pass, so `a` stays in
/// registers.
#[inline(always)]
unsafe fn join_and_store<const R: usize, const V: usize>(
    mut a: [[__m512; V]; R],
    slots: *mut f32,
    join: Join,
) {
    let s = 16 * V;
    for level in 0..join.joins {
        let from = slots.add(level * R * s);
        for i in 0..R {
            for v in 0..V {
                a[i][v] = _mm512_add_ps(a[i][v], _mm512_loadu_ps(from.add(i * s + 16 * v)));
            }
        }
    }
    let d = slots.add(join.store * R * s);
    for i in 0..R {
        for v in 0..V {
            _mm512_storeu_ps(d.add(i * s + 16 * v), a[i][v]);
        }
    }
}

/// AVX512-BF16 (`super::bf16_products`): the AVX-512 tile over values packed in
/// pairs, each 4-byte unit two bf16 values and each multiply-add a
/// `vdpbf16ps` of two products a lane; `k` counts pairs.
pub(super) struct Avx512Bf16;

impl Tiles for Avx512Bf16 {
    const L: usize = 16;
    const STRIP: usize = 48;
    const ROWS: usize = 8;
    /// Where the bf16 dot tiles give way (not measured apart yet: the f32
    /// tiles' crossover on AVX-512).
    const MIN_ROWS: usize = 24;

    unsafe fn pass(x: *const f32, w: *const f32, groups: usize, slots: *mut f32, join: Join) {
        avx512_bf16_pass::<{ Self::ROWS }, { Self::STRIP / 16 }>(x, w, groups, slots, join)
    }

    /// A pair: the first value, then the second, as the dot tiles' tails.
    #[inline(always)]
    fn tail(sum: f32, w: f32, x: f32) -> f32 {
        let (w, x) = (w.to_bits(), x.to_bits());
        let first = |v: u32| f32::from_bits(v << 16);
        let second = |v: u32| f32::from_bits(v & 0xFFFF_0000);
        second(w).mul_add(second(x), first(w).mul_add(first(x), sum))
    }
}

/// [`avx512_pass`] with BF16 dot products over pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx512_bf16_pass<const R: usize, const V: usize>(
    x: *const f32,
    w: *const f32,
    groups: usize,
    slots: *mut f32,
    join: Join,
) {
    use super::x86::as_bh;
    let s = 16 * V;
    let mut a = [[_mm512_setzero_ps(); V]; R];
    for c in 0..groups {
        let mut wv = [_mm512_setzero_si512(); V];
        for v in 0..V {
            wv[v] = _mm512_loadu_si512(w.add(c * s + 16 * v) as *const _);
        }
        for i in 0..R {
            let xb = _mm512_set1_epi32(*(x.add(c * R + i) as *const i32));
            for v in 0..V {
                a[i][v] = _mm512_dpbf16_ps(a[i][v], as_bh(wv[v]), as_bh(xb));
            }
        }
    }
    join_and_store(a, slots, join);
}

/// A panel's packed activation rows take at most this many bytes (a pass
/// reads `1/L` of them, from L2 or L3), but at least 16 tiles' rows: each
/// strip is packed again for every panel.
const PANEL_BYTES: usize = 4 << 20;

thread_local! {
    /// The calling thread's packed activation panel.
    static PANEL_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each worker's packed strip and its tiles' partial sums, reused task
    /// to task.
    static STRIP_BUF: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Whether a product of `m` rows runs here on `T` (see [`Tiles::MIN_ROWS`]).
pub(super) fn takes<T: Tiles>(m: usize, w: Weights<'_>) -> bool {
    m >= if w.is_bf16() {
        T::MIN_ROWS_BF16
    } else {
        T::MIN_ROWS
    }
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

/// `out[i, j] = sum_k x[i, k] * w[j, k]` for `m >= 1` rows, with `T`'s dot
/// tiles' reduction.
///
/// # Safety
/// The CPU has AVX2, FMA and `T`'s instruction set; `x` holds `m` rows of
/// `k` values, `w` holds `n` rows of `k` values, and `out` has `m * n`
/// writable values no one else touches during the call.
pub(super) unsafe fn matmul_t<T: Tiles>(
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
    let strips = n.div_ceil(T::STRIP);
    let weight_bytes = w.value_bytes();
    let panel_rows = (PANEL_BYTES / (4 * k.max(1)) / T::ROWS * T::ROWS).max(16 * T::ROWS);
    // Taken, not borrowed: while this thread waits for the strips below it
    // may run another product's task (a LoRA group's, say), which then
    // packs into a buffer of its own.
    let mut panel = PANEL_BUF.take();
    for m0 in (0..m).step_by(panel_rows) {
        let m1 = (m0 + panel_rows).min(m);
        pack_panel::<T>(rows, m0, m1, k, &mut panel);
        let panel = &panel[..];
        (0..strips).into_par_iter().for_each(|s| {
            let (j0, cols) = (s * T::STRIP, T::STRIP.min(n - s * T::STRIP));
            // Held only by code that starts no parallel work.
            STRIP_BUF.with_borrow_mut(|(strip, sums)| {
                // SAFETY: as for this function; rows j0..j0 + cols exist;
                // this task alone writes rows m0..m1 of those columns.
                unsafe {
                    pack_strip::<T>(w, k, j0, cols, strip);
                    let strip_bytes = T::STRIP * k * weight_bytes;
                    let next = (w.row(j0, k).wrapping_add(strip_bytes), strip_bytes);
                    strip_product::<T>(
                        rows,
                        (m0, m1),
                        k,
                        (panel, strip),
                        sums,
                        out,
                        n,
                        (j0, cols),
                        next,
                    );
                }
            });
        });
    }
    PANEL_BUF.set(panel);
}

/// Rows `m0..m1` of `x` in pass order: for each pass `l`, each tile of
/// `ROWS` rows and `c` in `0..k / L`, the values `x[i][Lc + l]` of the
/// tile's rows (rows past `m1` repeat the last; their outputs are dropped).
fn pack_panel<T: Tiles>(rows: Rows, m0: usize, m1: usize, k: usize, buf: &mut Vec<f32>) {
    let groups = k / T::L;
    let tiles = (m1 - m0).div_ceil(T::ROWS);
    let per_pass = tiles * groups * T::ROWS;
    buf.resize(T::L * per_pass, 0.0);
    if per_pass == 0 {
        return;
    }
    if T::ROWS == 6 || T::ROWS == 8 {
        // Blocks of 8 values of a tile's rows transposed in registers, a
        // task a tile (each writes its own tile's values of every pass).
        // (Gathered one value at a time, the AVX2 tiles' panels took ~3.5%
        // of a 2,048-token prefill.)
        let dst = OutPtr(buf.as_mut_ptr());
        (0..tiles).into_par_iter().for_each(|t| {
            // SAFETY: the CPU has AVX2 (this path runs on AVX2 and up); the
            // rows hold `k` values; tile `t`'s values are this task's alone.
            unsafe { pack_tile::<T>(rows, m0 + t * T::ROWS, m1, (groups, tiles, t), dst) }
        });
        return;
    }
    // One pass per task: the other cores would wait otherwise.
    buf.par_chunks_mut(per_pass)
        .enumerate()
        .for_each(|(l, pass)| {
            for (t, tile) in pass.chunks_exact_mut(groups * T::ROWS).enumerate() {
                let i0 = m0 + t * T::ROWS;
                for (c, values) in tile.chunks_exact_mut(T::ROWS).enumerate() {
                    for (i, v) in values.iter_mut().enumerate() {
                        let x = rows.row((i0 + i).min(m1 - 1));
                        // SAFETY: Lc + l < k, inside the row.
                        *v = unsafe { *x.add(c * T::L + l) };
                    }
                }
            }
        });
}

/// [`pack_panel`]'s values of the tile of `ROWS` (6 or 8) rows from `i0`.
///
/// # Safety
/// The CPU has AVX2; `rows` hold `groups * L` values or more; `dst` is the
/// panel buffer of `tiles` tiles, tile `t`'s part written by no one else.
#[target_feature(enable = "avx2")]
unsafe fn pack_tile<T: Tiles>(
    rows: Rows,
    i0: usize,
    m1: usize,
    (groups, tiles, t): (usize, usize, usize),
    dst: OutPtr,
) {
    let r = T::ROWS;
    debug_assert!(r == 6 || r == 8);
    let src: [*const u8; 8] =
        std::array::from_fn(|i| rows.row((i0 + i.min(r - 1)).min(m1 - 1)) as *const u8);
    for c in 0..groups {
        for l0 in (0..T::L).step_by(8) {
            let v = transposed_block(&src, r, c * T::L + l0, false);
            for d in 0..8 {
                let at = dst.0.add(((l0 + d) * tiles + t) * groups * r + c * r);
                if r == 8 || c + 1 < groups {
                    // With 6 rows this writes 2 values past them: the
                    // start of this pass's slot for `c + 1`, stored next.
                    _mm256_storeu_ps(at, v[d]);
                } else {
                    _mm_storeu_ps(at, _mm256_castps256_ps128(v[d]));
                    let high = _mm256_extractf128_ps::<1>(v[d]);
                    _mm_store_sd(at.add(4) as *mut f64, _mm_castps_pd(high));
                }
            }
        }
    }
}

/// The fixed tree over the passes' sums (`super::finish`: lanes `l` and
/// `l + L/2` first, then `L/4` apart, ...), built as the passes finish.
/// Run in bit-reversed lane order, the tree's leaves come in left to right,
/// so each new sum joins its finished neighbours like a binary counter and
/// a tile keeps `log2 L` partial sums, not `L`.
struct Tree {
    depth: usize,
}

impl Tree {
    fn new(lanes: usize) -> Tree {
        debug_assert!(lanes.is_power_of_two());
        Tree {
            depth: lanes.trailing_zeros() as usize,
        }
    }

    /// The lane of pass `p`: `p`'s bits reversed.
    fn lane(&self, p: usize) -> usize {
        p.reverse_bits() >> (usize::BITS as usize - self.depth)
    }

    /// How pass `p`'s sums join the tree: they take in the partial sums of
    /// the levels below its trailing ones (the finished subtrees to its
    /// left), then wait at the next level (the root, after the last pass,
    /// at level 0).
    fn join(&self, p: usize) -> Join {
        let joins = p.trailing_ones() as usize;
        Join {
            joins,
            store: joins % self.depth,
        }
    }

    /// [`Tree::join`] on plain values: adds pass `p`'s sums (`acc`) into the
    /// tree kept in `slots` (`depth` slots of `acc.len()`), as a pass does
    /// in registers.
    #[cfg(test)]
    fn push(&self, p: usize, acc: &mut [f32], slots: &mut [f32]) {
        let len = acc.len();
        let join = self.join(p);
        for level in 0..join.joins {
            for (a, s) in acc.iter_mut().zip(&slots[level * len..(level + 1) * len]) {
                *a += *s;
            }
        }
        slots[join.store * len..(join.store + 1) * len].copy_from_slice(acc);
    }
}

/// Where a pass's sums go in its tile's [`Tree`]: levels `0..joins` are
/// added in, the result stored at level `store`.
#[derive(Clone, Copy)]
pub(super) struct Join {
    joins: usize,
    store: usize,
}

/// Columns `j0..j0 + cols` of rows `m0..m1`: every tile's passes over the
/// packed strip, pass by pass (a pass's `STRIP x k/L` weights stay in L1
/// while the tiles go by), then each tile's tail.
///
/// Meanwhile the `next.1` bytes at `next.0` (the next strip's weights,
/// mostly this thread's next task) are prefetched into L2, spread over the
/// passes, so that packing them does not wait on memory. At 32 rows (a
/// 32-sequence decode step) packing took a quarter of the product's time
/// (perf, bf16 weights: pack_strip 32% of strip_product -> 22%); in one
/// process, alternating, 30 rounds, bf16 weights from memory, the median
/// ratio was 1.10-1.12x at 32 x 1024 x 2048-3072, 1.00-1.02x at 32 x 3072
/// x 1024, 1.03-1.10x at 128 rows, 0.97-1.01x at 512 and 2,048.
///
/// # Safety
/// The CPU has AVX2, FMA and `T`'s set; `panel` and `strip` were packed for
/// these rows, columns and `k`; `out` as for [`matmul_t`]. `next` is only a
/// hint (it may point past the matrix, where nothing is read).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn strip_product<T: Tiles>(
    rows: Rows,
    (m0, m1): (usize, usize),
    k: usize,
    (panel, strip): (&[f32], &[f32]),
    sums: &mut Vec<f32>,
    out: OutPtr,
    n: usize,
    (j0, cols): (usize, usize),
    next: (*const u8, usize),
) {
    let (groups, s) = (k / T::L, T::STRIP);
    let tiles = (m1 - m0).div_ceil(T::ROWS);
    let tile = T::ROWS * s;
    let tree = Tree::new(T::L);
    let per_tile = tree.depth * tile;
    // The tiles' partial sums. Each slot is stored before it is read
    // ([`Tree::join`]), so a buffer kept from a bigger product is used as
    // it is (cleared, it was ~1% of a prefill's time).
    if sums.len() < tiles * per_tile {
        sums.resize(tiles * per_tile, 0.0);
    }
    let slots = sums.as_mut_ptr();
    let (xp, wp) = (panel.as_ptr(), strip.as_ptr());
    let share = next.1.div_ceil(T::L * tiles).next_multiple_of(64);
    let mut ahead = next.0;
    for p in 0..T::L {
        let (l, join) = (tree.lane(p), tree.join(p));
        let w = wp.add(l * groups * s);
        for t in 0..tiles {
            let x = xp.add((l * tiles + t) * groups * T::ROWS);
            T::pass(x, w, groups, slots.add(t * per_tile), join);
            for line in (0..share).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(ahead.wrapping_add(line) as *const i8);
            }
            ahead = ahead.wrapping_add(share);
        }
    }
    let slots = &sums[..];
    // A whole strip with no tail: each row's outputs are its root's values
    // as they are, copied in vectors. (Stored one by one, to output lines
    // not yet in cache, they left too few lines in flight: ~10% of a
    // 2,048-row product's time on the AVX2 EPYC.)
    let whole = cols == s && groups * T::L == k;
    for t in 0..tiles {
        let root = &slots[t * per_tile..t * per_tile + tile];
        let i0 = m0 + t * T::ROWS;
        for i in 0..T::ROWS.min(m1 - i0) {
            if whole {
                out.write_all((i0 + i) * n + j0, &root[i * s..(i + 1) * s]);
                continue;
            }
            let x = rows.row(i0 + i);
            for j in 0..cols {
                // The tail, in order, as the dot tiles fuse it.
                let mut v = root[i * s + j];
                for kk in groups * T::L..k {
                    v = T::tail(v, strip[kk * s + j], *x.add(kk));
                }
                out.write((i0 + i) * n + j0 + j, v);
            }
        }
    }
}

/// Packs weight rows `j0..j0 + cols` into `buf` in pass order: for `l` in
/// `0..L` and `c` in `0..k / L`, `w[j0 + j][Lc + l]` for `j` in
/// `0..STRIP`; then the tail, `w[j0 + j][kk]` for each `kk` from
/// `k / L * L`. Rows past `cols` are zeros (their outputs are dropped).
/// Every value is written, so a buffer of the right length is reused as it
/// is.
///
/// # Safety
/// The CPU has AVX2; `w` has rows `j0..j0 + cols` of `k` values.
#[target_feature(enable = "avx2")]
unsafe fn pack_strip<T: Tiles>(
    w: Weights<'_>,
    k: usize,
    j0: usize,
    cols: usize,
    buf: &mut Vec<f32>,
) {
    let (groups, s) = (k / T::L, T::STRIP);
    if buf.len() != s * k {
        buf.clear();
        buf.resize(s * k, 0.0);
    }
    let dst = buf.as_mut_ptr();
    // Blocks of 8 weight rows by 8 values, each transposed in registers.
    for jb in (0..s).step_by(8) {
        let rows = cols.saturating_sub(jb).min(8);
        if rows == 0 {
            for at in 0..k {
                _mm256_storeu_ps(dst.add(at * s + jb), _mm256_setzero_ps());
            }
            continue;
        }
        let mut src = [std::ptr::null::<u8>(); 8];
        for (j, row) in src.iter_mut().enumerate() {
            *row = w.row(j0 + jb + j.min(rows - 1), k);
        }
        for c in 0..groups {
            for l0 in (0..T::L).step_by(8) {
                let v = transposed_block(&src, rows, c * T::L + l0, w.is_bf16());
                for d in 0..8 {
                    _mm256_storeu_ps(dst.add(((l0 + d) * groups + c) * s + jb), v[d]);
                }
            }
        }
        for kk in groups * T::L..k {
            for j in 0..8 {
                *dst.add(kk * s + jb + j) = if j < rows {
                    super::weight_at(src[j], kk, w.is_bf16())
                } else {
                    0.0
                };
            }
        }
    }
}

/// Eight values from value `at` of rows `src[..rows]` (f32, or bf16
/// widened), transposed: `v[d]` holds value `at + d` of each row, zero
/// past `rows`. Both packers' blocks.
///
/// # Safety
/// The CPU has AVX2; each of the first `rows` rows holds `at + 8` values.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn transposed_block(
    src: &[*const u8; 8],
    rows: usize,
    at: usize,
    bf16: bool,
) -> [__m256; 8] {
    let mut v = [_mm256_setzero_ps(); 8];
    for j in 0..rows {
        v[j] = if bf16 {
            load8::<true>(src[j], at)
        } else {
            load8::<false>(src[j], at)
        };
    }
    transpose8(&mut v);
    v
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

#[cfg(test)]
mod tests {
    use super::super::{finish, tests::values};
    use super::Tree;

    /// Pushing lane sums in pass order builds `finish`'s tree: checked on
    /// sums of mixed magnitudes, where another order of additions would
    /// round differently.
    fn builds_finish_tree<const L: usize>() {
        let tree = Tree::new(L);
        let mut slots = vec![0f32; tree.depth];
        for trial in 0..2000u64 {
            let lanes: [f32; L] = {
                let v = values(trial, 2 * L);
                std::array::from_fn(|l| v[l] * f32::powi(2.0, (v[L + l] * 40.0) as i32))
            };
            for p in 0..L {
                tree.push(p, &mut [lanes[tree.lane(p)]], &mut slots);
            }
            let want = finish::<L>(&lanes, std::iter::empty());
            assert_eq!(
                slots[0].to_bits(),
                want.to_bits(),
                "{L} lanes, trial {trial}"
            );
        }
    }

    #[test]
    fn passes_join_in_the_tree_of_the_dot_tiles() {
        builds_finish_tree::<8>();
        builds_finish_tree::<16>();
    }
}
