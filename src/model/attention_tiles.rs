//! Register tiles for the CPU paged-attention kernel ([`super::paged_attention`]).
//!
//! A tile computes several results side by side so each row loaded from the
//! cache serves many multiply-adds, but each result is computed exactly as
//! the one-at-a-time definitions do, so a tile's shape can never change a
//! bit:
//! - a score is [`dot`]: `L` lane chains of fused multiply-adds over
//!   `k = L c + l`, the lanes summed in order, then the tail;
//! - an output value is [`axpy`]'s chain of multiply-adds over the
//!   positions in order, starting from what is already there.
//!
//! `L` is 16 on AVX-512, 8 on AVX2 and the portable path; without FMA the
//! portable path runs the definitions themselves.

use super::paged_attention::{axpy, dot, KvElement, Prefetch};

/// Most query rows of a score tile ([`score_rows`]).
pub(super) const MAX_SCORE_ROWS: usize = 4;
/// Keys per score tile: four divide the usual block sizes.
const SCORE_COLS: usize = 4;

/// Query rows per score tile: rows x 4 keys accumulators fill the
/// registers (12 of AVX2's 16, 16 of AVX-512's 32) beside a query and the
/// keys' vectors.
pub(super) const fn score_rows<const L: usize>() -> usize {
    if L >= 16 {
        4
    } else {
        3
    }
}

/// Query rows per value tile, each `4 L` output dimensions wide: 12 of
/// AVX2's registers, 20 of AVX-512's.
pub(super) const fn value_rows<const L: usize>() -> usize {
    if L >= 16 {
        5
    } else {
        3
    }
}

/// Largest [`value_rows`].
pub(super) const MAX_VALUE_ROWS: usize = 5;

/// Output dimensions a value tile covers.
pub(super) const fn value_dims<const L: usize>() -> usize {
    4 * L
}

/// Scores of `q.len()` query rows (at most [`score_rows`]) against the
/// run of keys `keys` (rows of `hd`): the [`dot`] of row `i` and key `c`
/// goes to `out[i * stride + c]`.
#[inline(always)]
pub(super) fn scores<const L: usize, const FMA: bool, E: KvElement>(
    q: &[&[f32]],
    keys: &[E],
    hd: usize,
    out: &mut [f32],
    stride: usize,
    prefetch: Option<&Prefetch<'_, E>>,
) {
    let n = keys.len() / hd.max(1);
    assert!(q.len() <= score_rows::<L>() && q.iter().all(|r| r.len() == hd));
    assert!(q.is_empty() || out.len() >= (q.len() - 1) * stride + n);
    let tiled = if FMA && cfg!(target_arch = "x86_64") {
        n / SCORE_COLS * SCORE_COLS
    } else {
        0
    };
    #[cfg(target_arch = "x86_64")]
    if tiled > 0 {
        // SAFETY: the `L`-lane kernels only run inside code compiled for
        // their features (see `PagedAttention::run`); every read is inside
        // `q` and `keys`, every write inside `out` (checked above).
        unsafe {
            if L == 16 {
                x86::scores_avx512::<E>(q, &keys[..tiled * hd], hd, out, stride, prefetch);
            } else {
                x86::scores_avx2::<E>(q, &keys[..tiled * hd], hd, out, stride, prefetch);
            }
        }
    }
    for c in tiled..n {
        let key = &keys[c * hd..][..hd];
        if let Some(p) = prefetch {
            p.row(c);
        }
        for (i, row) in q.iter().enumerate() {
            out[i * stride + c] = dot::<L, FMA, E>(row, key);
        }
    }
}

/// Adds to rows `i` of `out` (`hd` apart, `probs.len()` of them, at most
/// [`value_rows`]) at dimensions `..tiled` (a multiple of
/// [`value_dims`]) the rows of `values` (`hd` each) weighted by `probs[i]`
/// (one weight per row), in row order.
#[inline(always)]
pub(super) fn values<const L: usize, const FMA: bool, E: KvElement>(
    values: &[E],
    hd: usize,
    tiled: usize,
    probs: &[&[f32]],
    out: &mut [f32],
    prefetch: Option<&Prefetch<'_, E>>,
) {
    let n = values.len() / hd.max(1);
    assert!(probs.len() <= value_rows::<L>() && tiled <= hd);
    assert!(tiled.is_multiple_of(value_dims::<L>()));
    assert!(probs.iter().all(|p| p.len() == n) && out.len() >= probs.len() * hd);
    #[cfg(target_arch = "x86_64")]
    if FMA {
        // SAFETY: as in `scores`.
        unsafe {
            if L == 16 {
                return x86::values_avx512::<E>(values, hd, tiled, probs, out, prefetch);
            }
            if L == 8 {
                return x86::values_avx2::<E>(values, hd, tiled, probs, out, prefetch);
            }
        }
    }
    for (j, row) in values.chunks_exact(hd).enumerate() {
        if let Some(p) = prefetch {
            p.row(j);
        }
        for (i, p) in probs.iter().enumerate() {
            axpy::<FMA, E>(p[j], &row[..tiled], &mut out[i * hd..][..tiled]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    // Register tiles are indexed by row and column on purpose.
    #![allow(clippy::needless_range_loop)]

    use super::{KvElement, Prefetch, SCORE_COLS};
    use std::arch::x86_64::*;

    /// Eight cached values from `at`, widened to f32.
    #[inline(always)]
    unsafe fn load8<E: KvElement>(at: *const E) -> __m256 {
        if E::BF16 {
            let half = _mm_loadu_si128(at as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(half)))
        } else {
            _mm256_loadu_ps(at as *const f32)
        }
    }

    /// Sixteen cached values from `at`, widened to f32.
    #[inline(always)]
    unsafe fn load16<E: KvElement>(at: *const E) -> __m512 {
        if E::BF16 {
            let half = _mm256_loadu_si256(at as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(half)))
        } else {
            _mm512_loadu_ps(at as *const f32)
        }
    }

    /// What `[f32]::iter().sum()` starts from (the lanes of [`super::dot`]
    /// are summed that way).
    #[inline(always)]
    fn sum_start() -> f32 {
        std::iter::empty::<&f32>().sum()
    }

    /// The lanes of four accumulators (four keys' scores), each summed in
    /// order as [`super::dot`] sums them, side by side: a 4 x 8 transpose,
    /// then eight adds of four sums, where one score at a time takes eight
    /// scalar adds.
    #[inline(always)]
    unsafe fn lane_sums8(acc: &[__m256; 4]) -> [f32; 4] {
        let t0 = _mm256_unpacklo_ps(acc[0], acc[1]);
        let t1 = _mm256_unpackhi_ps(acc[0], acc[1]);
        let t2 = _mm256_unpacklo_ps(acc[2], acc[3]);
        let t3 = _mm256_unpackhi_ps(acc[2], acc[3]);
        // Lane l of the four keys: low halves l = 0..4, high halves l + 4.
        let lanes = [
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xEE>(t0, t2),
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xEE>(t1, t3),
        ];
        let mut s = _mm_set1_ps(sum_start());
        for l in lanes {
            s = _mm_add_ps(s, _mm256_castps256_ps128(l));
        }
        for l in lanes {
            s = _mm_add_ps(s, _mm256_extractf128_ps::<1>(l));
        }
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), s);
        out
    }

    /// [`lane_sums8`] for sixteen lanes, one score at a time.
    #[inline(always)]
    unsafe fn lane_sums16(acc: &[__m512; 4]) -> [f32; 4] {
        let mut out = [0f32; 4];
        for (o, a) in out.iter_mut().zip(acc) {
            let mut lanes = [0f32; 16];
            _mm512_storeu_ps(lanes.as_mut_ptr(), *a);
            *o = lanes.iter().sum();
        }
        out
    }

    macro_rules! score_kernel {
        ($dispatch:ident, $name:ident, [$($rows:literal)*], $lanes:literal, $zero:ident,
         $loadq:ident, $load:ident, $fma:ident, $sums:ident, $feature:literal) => {
            /// # Safety
            /// The CPU has the kernel's features; as [`super::scores`]
            /// checks, with whole 4-key tiles.
            #[inline]
            pub(super) unsafe fn $dispatch<E: KvElement>(
                q: &[&[f32]],
                keys: &[E],
                hd: usize,
                out: &mut [f32],
                stride: usize,
                prefetch: Option<&Prefetch<'_, E>>,
            ) {
                match q.len() {
                    $($rows => $name::<$rows, E>(q, keys, hd, out, stride, prefetch),)*
                    _ => {}
                }
            }

            /// [`super::scores`] over a run of whole 4-key tiles.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn $name<const R: usize, E: KvElement>(
                q: &[&[f32]],
                keys: &[E],
                hd: usize,
                out: &mut [f32],
                stride: usize,
                prefetch: Option<&Prefetch<'_, E>>,
            ) {
                const C: usize = SCORE_COLS;
                let n = keys.len() / hd;
                let mut qp = [std::ptr::null::<f32>(); R];
                for i in 0..R {
                    qp[i] = q[i].as_ptr();
                }
                let o = out.as_mut_ptr();
                let mut c0 = 0;
                while c0 + C <= n {
                    let mut kp = [std::ptr::null::<E>(); C];
                    for c in 0..C {
                        if let Some(p) = prefetch {
                            p.row(c0 + c);
                        }
                        kp[c] = keys.as_ptr().add((c0 + c) * hd);
                    }
                    let mut acc = [[$zero(); C]; R];
                    let mut at = 0;
                    while at + $lanes <= hd {
                        // R query vectors and one key's: AVX2's 16 registers
                        // hold them beside 12 accumulators.
                        let mut qv = [$zero(); R];
                        for i in 0..R {
                            qv[i] = $loadq(qp[i].add(at));
                        }
                        for c in 0..C {
                            let kv = $load::<E>(kp[c].add(at));
                            for i in 0..R {
                                acc[i][c] = $fma(qv[i], kv, acc[i][c]);
                            }
                        }
                        at += $lanes;
                    }
                    let full = hd / $lanes * $lanes;
                    for i in 0..R {
                        let sums = $sums(&acc[i]);
                        for c in 0..C {
                            // Then the tail, in order, as `dot` ends.
                            let mut s = sums[c];
                            for x in full..hd {
                                s += *qp[i].add(x) * (*kp[c].add(x)).widen();
                            }
                            *o.add(i * stride + c0 + c) = s;
                        }
                    }
                    c0 += C;
                }
            }
        };
    }

    score_kernel!(
        scores_avx2,
        scores8,
        [1 2 3],
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        load8,
        _mm256_fmadd_ps,
        lane_sums8,
        "avx2,fma"
    );
    score_kernel!(
        scores_avx512,
        scores16,
        [1 2 3 4],
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        load16,
        _mm512_fmadd_ps,
        lane_sums16,
        "avx512f,avx2,fma"
    );

    macro_rules! value_kernel {
        ($dispatch:ident, $name:ident, [$($rows:literal)*], $lanes:literal, $zero:ident,
         $set1:ident, $loado:ident, $load:ident, $fma:ident, $store:ident,
         $feature:literal) => {
            /// # Safety
            /// The CPU has the kernel's features; as [`super::values`]
            /// checks.
            #[inline]
            pub(super) unsafe fn $dispatch<E: KvElement>(
                values: &[E],
                hd: usize,
                tiled: usize,
                probs: &[&[f32]],
                out: &mut [f32],
                prefetch: Option<&Prefetch<'_, E>>,
            ) {
                match probs.len() {
                    $($rows => $name::<$rows, E>(values, hd, tiled, probs, out, prefetch),)*
                    _ => {}
                }
            }

            /// [`super::values`] for `R` rows.
            #[inline]
            #[target_feature(enable = $feature)]
            unsafe fn $name<const R: usize, E: KvElement>(
                values: &[E],
                hd: usize,
                tiled: usize,
                probs: &[&[f32]],
                out: &mut [f32],
                prefetch: Option<&Prefetch<'_, E>>,
            ) {
                let n = values.len() / hd;
                let mut pp = [std::ptr::null::<f32>(); R];
                for i in 0..R {
                    pp[i] = probs[i].as_ptr();
                }
                let mut d = 0;
                while d < tiled {
                    let o = out.as_mut_ptr().add(d);
                    let mut acc = [[$zero(); 4]; R];
                    for i in 0..R {
                        for x in 0..4 {
                            acc[i][x] = $loado(o.add(i * hd + x * $lanes));
                        }
                    }
                    let mut row = values.as_ptr().add(d);
                    for j in 0..n {
                        if let (Some(p), 0) = (prefetch, d) {
                            p.row(j);
                        }
                        // R weights and one value vector at a time, as
                        // in the scores.
                        let mut w = [$zero(); R];
                        for i in 0..R {
                            w[i] = $set1(*pp[i].add(j));
                        }
                        for x in 0..4 {
                            let v = $load::<E>(row.add(x * $lanes));
                            for i in 0..R {
                                acc[i][x] = $fma(w[i], v, acc[i][x]);
                            }
                        }
                        row = row.add(hd);
                    }
                    for i in 0..R {
                        for x in 0..4 {
                            $store(o.add(i * hd + x * $lanes), acc[i][x]);
                        }
                    }
                    d += 4 * $lanes;
                }
            }
        };
    }

    value_kernel!(
        values_avx2,
        values8,
        [1 2 3],
        8,
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        load8,
        _mm256_fmadd_ps,
        _mm256_storeu_ps,
        "avx2,fma"
    );
    value_kernel!(
        values_avx512,
        values16,
        [1 2 3 4 5],
        16,
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        load16,
        _mm512_fmadd_ps,
        _mm512_storeu_ps,
        "avx512f,avx2,fma"
    );
}
