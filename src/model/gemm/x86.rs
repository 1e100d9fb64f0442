//! AVX-512 and AVX2 register tiles computing the reduction of [`super`]:
//! each output's lanes live in one register, sixteen (AVX-512) or eight
//! (AVX2), then fold in the fixed tree.

// Register tiles are indexed by row and column on purpose.
#![allow(clippy::needless_range_loop)]

use super::{weight_at, Tile, TileSums, MAX_TILE_COLS, MAX_TILE_ROWS};
use std::arch::x86_64::*;

/// How far ahead in each weight row the kernels prefetch into L1 (bytes):
/// a few cache lines. (From memory, the next chunk's weights come into L2
/// ahead of time by [`Tile::prefetch`].)
const PREFETCH_AHEAD: usize = 512;

/// A tile's walk over its share of [`Tile::prefetch`]: the same number of
/// L2 prefetches every step (lines `64 i` past the step's first byte), so
/// the loop over them is predicted; one whose count changed from step to
/// step (0 or 1 lines) cost a branch miss every few steps. Every line of
/// the share is asked for at least once.
struct L2Ahead {
    at: *const u8,
    per_step: usize,
    lines: usize,
}

impl L2Ahead {
    fn new((region, per_step): (*const u8, usize)) -> L2Ahead {
        L2Ahead {
            at: region,
            per_step,
            lines: per_step.div_ceil(64),
        }
    }

    /// The next step's prefetches (hints: the addresses may lie past the
    /// matrix, where nothing is read).
    #[inline(always)]
    unsafe fn step(&mut self) {
        for i in 0..self.lines {
            _mm_prefetch::<_MM_HINT_T1>(self.at.wrapping_add(64 * i) as *const i8);
        }
        self.at = self.at.wrapping_add(self.per_step);
    }
}

/// Sixteen weights of `row` from value `at`, widened to f32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<const BF16: bool>(row: *const u8, at: usize) -> __m512 {
    if BF16 {
        let half = _mm256_loadu_si256(row.add(2 * at) as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
    } else {
        _mm512_loadu_ps(row.add(4 * at) as *const f32)
    }
}

/// Eight weights of `row` from value `at`, widened to f32.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn load8<const BF16: bool>(row: *const u8, at: usize) -> __m256 {
    if BF16 {
        let half = _mm_loadu_si128(row.add(2 * at) as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)))
    } else {
        _mm256_loadu_ps(row.add(4 * at) as *const f32)
    }
}

/// Lanes `l[i] + l[i+4]`, `+2`, `+1` of eight lanes: AVX2's eight, or
/// sixteen already folded by `l[i] + l[i+8]` (see [`super::finish`]).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fold8(s8: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
    _mm_cvtss_f32(s1)
}

/// The tail of the reduction, fused onto each folded sum: the last `k %
/// L` products (from `full`), in order.
#[inline(never)]
#[target_feature(enable = "fma")]
unsafe fn tails(t: &Tile, sums: &mut TileSums, rows: usize, cols: usize, full: usize) {
    if full == t.k {
        return;
    }
    for i in 0..rows {
        for r in 0..cols {
            let mut s = sums[i][r];
            for kk in full..t.k {
                s = weight_at(t.w[r], kk, t.bf16).mul_add(*t.x[i].add(kk), s);
            }
            sums[i][r] = s;
        }
    }
}

#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512<const MR: usize, const BF16: bool>(t: &Tile, sums: &mut TileSums) {
    const NR: usize = 6;
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let full = t.k / 16 * 16;
    let esize = if BF16 { 2 } else { 4 };
    let mut ahead = L2Ahead::new(t.prefetch);
    let mut c = 0;
    while c < full {
        ahead.step();
        let mut xv = [_mm512_setzero_ps(); MR];
        for i in 0..MR {
            xv[i] = _mm512_loadu_ps(t.x[i].add(c));
        }
        for r in 0..NR {
            _mm_prefetch::<_MM_HINT_T0>(
                t.w[r].wrapping_add(c * esize + PREFETCH_AHEAD) as *const i8
            );
            let wv = load16::<BF16>(t.w[r], c);
            for i in 0..MR {
                acc[i][r] = _mm512_fmadd_ps(wv, xv[i], acc[i][r]);
            }
        }
        c += 16;
    }
    // The folds alone first, over constant indices: a loop that also ran
    // the tails would index `acc` at run time, and the compiler would then
    // keep it in memory, storing accumulators inside the loop above.
    for i in 0..MR {
        for r in 0..NR {
            let v = acc[i][r];
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            sums[i][r] = fold8(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
        }
    }
    tails(t, sums, MR, NR, full);
}

#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<const MR: usize, const BF16: bool>(t: &Tile, sums: &mut TileSums) {
    const NR: usize = 3;
    // acc[i][r]: the eight lanes of output (i, r).
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let full = t.k / 8 * 8;
    let esize = if BF16 { 2 } else { 4 };
    let mut ahead = L2Ahead::new(t.prefetch);
    let mut c = 0;
    while c < full {
        ahead.step();
        let mut wv = [_mm256_setzero_ps(); NR];
        for r in 0..NR {
            // A cache line of f32 holds 16 values: prefetch every other step.
            if c % 16 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(
                    t.w[r].wrapping_add(c * esize + PREFETCH_AHEAD) as *const i8
                );
            }
            wv[r] = load8::<BF16>(t.w[r], c);
        }
        for i in 0..MR {
            let xv = _mm256_loadu_ps(t.x[i].add(c));
            for r in 0..NR {
                acc[i][r] = _mm256_fmadd_ps(wv[r], xv, acc[i][r]);
            }
        }
        c += 8;
    }
    // Folds first, then tails (see `avx512`).
    for i in 0..MR {
        for r in 0..NR {
            sums[i][r] = fold8(acc[i][r]);
        }
    }
    tails(t, sums, MR, NR, full);
}

const _: () = assert!(MAX_TILE_ROWS >= 4 && MAX_TILE_COLS >= 6);

/// A 4 x 6 tile (fewer activation rows at the end of a matrix).
///
/// # Safety
/// As for [`Tile`]; the CPU has AVX-512F.
pub(super) unsafe fn tile_avx512(t: &Tile, sums: &mut TileSums) {
    match (t.rows, t.bf16) {
        (1, false) => avx512::<1, false>(t, sums),
        (2, false) => avx512::<2, false>(t, sums),
        (3, false) => avx512::<3, false>(t, sums),
        (_, false) => avx512::<4, false>(t, sums),
        (1, true) => avx512::<1, true>(t, sums),
        (2, true) => avx512::<2, true>(t, sums),
        (3, true) => avx512::<3, true>(t, sums),
        (_, true) => avx512::<4, true>(t, sums),
    }
}

/// A 4 x 3 tile (fewer activation rows at the end of a matrix).
///
/// # Safety
/// As for [`Tile`]; the CPU has AVX2 and FMA.
pub(super) unsafe fn tile_avx2(t: &Tile, sums: &mut TileSums) {
    match (t.rows, t.bf16) {
        (1, false) => avx2::<1, false>(t, sums),
        (2, false) => avx2::<2, false>(t, sums),
        (3, false) => avx2::<3, false>(t, sums),
        (_, false) => avx2::<4, false>(t, sums),
        (1, true) => avx2::<1, true>(t, sums),
        (2, true) => avx2::<2, true>(t, sums),
        (3, true) => avx2::<3, true>(t, sums),
        (_, true) => avx2::<4, true>(t, sums),
    }
}

/// A 4 x 6 tile of bf16 products (`super::bf16_products`): activation and weight
/// rows both bf16, 32 values a step, one `vdpbf16ps` per output; lanes fold
/// as in [`avx512`], the tail fused in order.
#[target_feature(enable = "avx512f,avx512bf16,avx2,fma")]
unsafe fn avx512_bf16<const MR: usize>(t: &Tile, sums: &mut TileSums) {
    const NR: usize = 6;
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let full = t.k / super::bf16_products::BLOCK * super::bf16_products::BLOCK;
    let mut ahead = L2Ahead::new(t.prefetch);
    let mut c = 0;
    while c < full {
        ahead.step();
        let mut xv = [_mm512_setzero_si512(); MR];
        for i in 0..MR {
            xv[i] = _mm512_loadu_si512((t.x[i] as *const u8).add(2 * c) as *const _);
        }
        for r in 0..NR {
            _mm_prefetch::<_MM_HINT_T0>(t.w[r].wrapping_add(2 * c + PREFETCH_AHEAD) as *const i8);
            let wv = _mm512_loadu_si512(t.w[r].add(2 * c) as *const _);
            for i in 0..MR {
                acc[i][r] = _mm512_dpbf16_ps(acc[i][r], as_bh(wv), as_bh(xv[i]));
            }
        }
        c += super::bf16_products::BLOCK;
    }
    for i in 0..MR {
        for r in 0..NR {
            let v = acc[i][r];
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            sums[i][r] = fold8(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
        }
    }
    if full < t.k {
        for i in 0..MR {
            for r in 0..NR {
                let mut s = sums[i][r];
                for kk in full..t.k {
                    s = weight_at(t.w[r], kk, true)
                        .mul_add(weight_at(t.x[i] as *const u8, kk, true), s);
                }
                sums[i][r] = s;
            }
        }
    }
}

/// 32 bf16 values as the BF16 instructions' operand type (the same bits).
#[inline(always)]
pub(super) unsafe fn as_bh(v: __m512i) -> __m512bh {
    std::mem::transmute(v)
}

/// A 4 x 6 tile of bf16 products (fewer activation rows at the end).
///
/// # Safety
/// As for [`Tile`], activation rows holding bf16 values; the CPU has
/// AVX-512F and AVX512-BF16.
pub(super) unsafe fn tile_avx512_bf16(t: &Tile, sums: &mut TileSums) {
    match t.rows {
        1 => avx512_bf16::<1>(t, sums),
        2 => avx512_bf16::<2>(t, sums),
        3 => avx512_bf16::<3>(t, sums),
        _ => avx512_bf16::<4>(t, sums),
    }
}

/// `dst[i] = bf16(src[i])`, to nearest even (`vcvtneps2bf16`, 16 at a time).
///
/// # Safety
/// The CPU has AVX-512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn round_to_bf16(src: &[f32], dst: &mut [half::bf16]) {
    let n = src.len().min(dst.len());
    let full = n / 16 * 16;
    for at in (0..full).step_by(16) {
        let v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(at)));
        _mm256_storeu_si256(
            dst.as_mut_ptr().add(at) as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(v),
        );
    }
    for at in full..n {
        dst[at] = half::bf16::from_f32(src[at]);
    }
}
