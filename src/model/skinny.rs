//! f32 `x @ w^T` for a few rows of `x` (decode steps), reading every weight
//! once, straight from its Hugging Face `[out, in]` layout.
//!
//! With a few dozen activation rows a decode step is bound by streaming the
//! weights from memory. BLAS first copies ("packs") each weight panel and
//! only then multiplies, so the memory read and the arithmetic do not
//! overlap; on the engine's decode shapes that copy took as long as the
//! multiplication itself. Here the activations are transposed once per call
//! (`[k, m]`, small enough to stay in cache) and each weight value, as it
//! streams in, is broadcast against a whole column of them: a tile of `NR`
//! weight rows times `16 * MV` activation rows lives in registers for the
//! whole inner dimension. Up to `DOT_MAX_ROWS` rows, where a tile would be
//! mostly padding, each output is instead a dot product of whole vectors.
//!
//! x86-64 with AVX-512F or AVX2+FMA only (chosen at run time); elsewhere
//! [`matmul_t`] returns `false` and the caller uses BLAS or candle.

use super::simd::{simd, Simd};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Activation rows up to which this kernel beats BLAS (measured by
/// `cargo bench --bench engine`, "weights from memory" table).
pub const MAX_ROWS: usize = 64;

static DISABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Switches the kernel off (true) or back on, process-wide, so the benchmark
/// can measure BLAS on the same shapes in one run.
pub fn set_disabled(disabled: bool) {
    DISABLED.store(disabled, std::sync::atomic::Ordering::Relaxed);
}

/// `GYM_SERVE_SKINNY=off` leaves every CPU matmul to BLAS.
fn switched_off_by_env() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("GYM_SERVE_SKINNY").as_deref() == Ok("off"))
}

fn isa() -> Option<Simd> {
    if DISABLED.load(std::sync::atomic::Ordering::Relaxed) || switched_off_by_env() {
        return None;
    }
    match simd() {
        Simd::Baseline => None,
        isa => Some(isa),
    }
}

/// Whether [`matmul_t`] runs on this CPU.
pub fn available() -> bool {
    isa().is_some()
}

/// Output pointer shared by the tasks; each writes a disjoint set of columns.
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
}

/// `out[m, n] = sum_k x[m, k] * w[n, k]` (row-major). `out` need not be
/// initialized: when this returns `true`, every one of its first `m * n`
/// values has been written, which spares the caller zeroing an output it is
/// about to overwrite (a decode step's logits are 150k floats a row).
/// Returns `false` (and does nothing) if this CPU has no kernel.
pub fn matmul_t(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [MaybeUninit<f32>],
) -> bool {
    isa().is_some_and(|isa| matmul_t_with(isa, x, m, k, w, n, out))
}

/// Most weight rows in one register tile.
const TILE_MAX_ROWS: usize = 12;

/// Column width (activation rows per pass) and tile height (weight rows) of
/// the kernel for `isa` and `m` rows; `None` without one.
fn tile_shape(isa: Simd, m: usize) -> Option<(usize, usize)> {
    match isa {
        Simd::Avx512 if m <= 16 => Some((16, 12)),
        Simd::Avx512 if m <= 32 => Some((32, 10)),
        // Every row in one pass over the weights: two passes of 32 made
        // 48 rows slower than 32 (217 vs 278 GFLOP/s cold, now ~300).
        Simd::Avx512 if m <= 48 => Some((48, 8)),
        Simd::Avx512 => Some((64, 6)),
        Simd::Avx2 => Some((16, 6)),
        Simd::Baseline => None,
    }
}

fn matmul_t_with(
    isa: Simd,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [MaybeUninit<f32>],
) -> bool {
    let Some((width, rows)) = tile_shape(isa, m) else {
        return false;
    };
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return true;
    }
    if m <= DOT_MAX_ROWS {
        matmul_t_dot(isa, x, m, k, w, n, out);
        return true;
    }
    if k == 0 {
        out[..m * n].iter_mut().for_each(|o| {
            o.write(0.0);
        });
        return true;
    }
    let mpad = m.div_ceil(width) * width;
    let xt = transpose_padded(x, m, k, mpad);
    let tiles = n.div_ceil(rows);
    let out_ptr = OutPtr(out.as_mut_ptr() as *mut f32);
    let xt = &xt;
    (0..tiles).into_par_iter().with_min_len(4).for_each(|t| {
        let n0 = t * rows;
        let live = rows.min(n - n0);
        // Rows past the end repeat the last one; their results are dropped.
        let row_ptrs: [*const f32; TILE_MAX_ROWS] =
            std::array::from_fn(|r| w[(n0 + r.min(live - 1)) * k..].as_ptr());
        let mut tile = [0f32; 16 * 32];
        for c in (0..m).step_by(width) {
            // SAFETY: the CPU has the features `isa` names; `xt` holds
            // k * mpad values and `c + width <= mpad`; every row pointer
            // starts a weight row of k values; `tile` holds rows * width.
            unsafe {
                run_tile(
                    isa,
                    width,
                    xt.as_ptr().add(c),
                    mpad,
                    &row_ptrs,
                    k,
                    &mut tile,
                )
            };
            for j in 0..width.min(m - c) {
                for r in 0..live {
                    // SAFETY: (c + j) < m and n0 + r < n; this task alone
                    // writes columns n0..n0 + live.
                    unsafe { out_ptr.write((c + j) * n + n0 + r, tile[r * width + j]) };
                }
            }
        }
    });
    true
}

/// `x` (`[m, k]`) as `[k, mpad]`, columns past `m` zero. Blocked over `k`
/// so the lines being written stay in L1 while every row passes through
/// (row by row, each write touched a new line).
fn transpose_padded(x: &[f32], m: usize, k: usize, mpad: usize) -> Vec<f32> {
    const BLOCK: usize = 16;
    let mut xt = vec![0f32; k * mpad];
    for k0 in (0..k).step_by(BLOCK) {
        let k1 = (k0 + BLOCK).min(k);
        for (j, row) in x.chunks_exact(k).take(m).enumerate() {
            for (kk, &v) in (k0..k1).zip(&row[k0..k1]) {
                xt[kk * mpad + j] = v;
            }
        }
    }
    xt
}

/// Activation rows up to which each output is computed as a dot product of
/// whole vectors (a weight row against an activation row): with so few rows
/// the broadcast tile wastes most of each vector on padding and issues one
/// load per weight, where a dot product loads sixteen weights at a time.
/// Measured ("weights from memory" table of the engine bench): twice the
/// tile's speed at 1 to 8 rows, no clear winner at 16.
const DOT_MAX_ROWS: usize = 8;

/// Activation rows one dot-product kernel call takes; more rows take more
/// calls over the same weight rows, which the second time come from cache.
const DOT_PASS_ROWS: usize = 4;

/// Weight rows one dot-product task streams side by side.
const DOT_WEIGHT_ROWS: usize = 4;

/// `out = x @ w^T` for `m <= DOT_MAX_ROWS` rows, as dot products.
fn matmul_t_dot(
    isa: Simd,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [MaybeUninit<f32>],
) {
    // Activation rows `k` floats apart share L1 sets whenever 4 KiB divides
    // the row length (every shape of ours); one cache line of padding per
    // row spreads them over distinct sets.
    let stride = k + 16;
    let mut padded = vec![0f32; m * stride];
    for (dst, src) in padded.chunks_exact_mut(stride).zip(x.chunks_exact(k)) {
        dst[..k].copy_from_slice(src);
    }
    let x = &padded;
    let out_ptr = OutPtr(out.as_mut_ptr() as *mut f32);
    (0..n.div_ceil(DOT_WEIGHT_ROWS))
        .into_par_iter()
        .with_min_len(16)
        .for_each(|g| {
            let n0 = g * DOT_WEIGHT_ROWS;
            let live = DOT_WEIGHT_ROWS.min(n - n0);
            // Rows past the end repeat the last one; their sums are dropped.
            let rows: [*const f32; DOT_WEIGHT_ROWS] =
                std::array::from_fn(|r| w[(n0 + r.min(live - 1)) * k..].as_ptr());
            for j0 in (0..m).step_by(DOT_PASS_ROWS) {
                let pass = DOT_PASS_ROWS.min(m - j0);
                let mut sums = [[0f32; DOT_PASS_ROWS]; DOT_WEIGHT_ROWS];
                // SAFETY: the CPU has `isa`; x holds rows j0..j0 + pass of k
                // values, `stride` apart; every row pointer starts k weights.
                unsafe {
                    run_dots(
                        isa,
                        x[j0 * stride..].as_ptr(),
                        stride,
                        pass,
                        k,
                        &rows,
                        &mut sums,
                    )
                };
                for (r, row_sums) in sums.iter().enumerate().take(live) {
                    for (j, &sum) in row_sums.iter().enumerate().take(pass) {
                        // SAFETY: j0 + j < m and n0 + r < n; this task alone
                        // writes columns n0..n0 + live.
                        unsafe { out_ptr.write((j0 + j) * n + n0 + r, sum) };
                    }
                }
            }
        });
}

/// Dot products of every weight row in `rows` with each of the `m` rows of `x`.
///
/// # Safety
/// The CPU has `isa`; `x` points at `m <= DOT_PASS_ROWS` rows of `k` values,
/// `stride` apart; each of `rows` starts `k` readable values.
#[cfg(target_arch = "x86_64")]
unsafe fn run_dots(
    isa: Simd,
    x: *const f32,
    stride: usize,
    m: usize,
    k: usize,
    rows: &[*const f32; DOT_WEIGHT_ROWS],
    sums: &mut [[f32; DOT_PASS_ROWS]; DOT_WEIGHT_ROWS],
) {
    macro_rules! by_rows {
        ($kernel:ident) => {
            match m {
                1 => x86::$kernel::<1>(x, stride, k, rows, sums),
                2 => x86::$kernel::<2>(x, stride, k, rows, sums),
                3 => x86::$kernel::<3>(x, stride, k, rows, sums),
                _ => x86::$kernel::<4>(x, stride, k, rows, sums),
            }
        };
    }
    match isa {
        Simd::Avx512 => by_rows!(dots_avx512),
        Simd::Avx2 => by_rows!(dots_avx2),
        Simd::Baseline => {}
    }
}

/// Never called: [`tile_shape`] offers no kernel off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_dots(
    _: Simd,
    _: *const f32,
    _: usize,
    _: usize,
    _: usize,
    _: &[*const f32; DOT_WEIGHT_ROWS],
    _: &mut [[f32; DOT_PASS_ROWS]; DOT_WEIGHT_ROWS],
) {
}

/// One register tile with the kernel [`tile_shape`] chose.
///
/// # Safety
/// The CPU has `isa`; `xt` points at `k` rows of `stride >= width` values;
/// each of `rows` starts `k` readable values.
#[cfg(target_arch = "x86_64")]
unsafe fn run_tile(
    isa: Simd,
    width: usize,
    xt: *const f32,
    stride: usize,
    rows: &[*const f32; TILE_MAX_ROWS],
    k: usize,
    tile: &mut [f32; 16 * 32],
) {
    match (isa, width) {
        (Simd::Avx512, 16) => x86::tile_avx512::<1, 12>(xt, stride, rows, k, tile),
        (Simd::Avx512, 32) => x86::tile_avx512::<2, 10>(xt, stride, rows, k, tile),
        (Simd::Avx512, 48) => x86::tile_avx512::<3, 8>(xt, stride, rows, k, tile),
        (Simd::Avx512, _) => x86::tile_avx512::<4, 6>(xt, stride, rows, k, tile),
        (Simd::Avx2, _) => x86::tile_avx2::<2, 6>(xt, stride, rows, k, tile),
        (Simd::Baseline, _) => {}
    }
}

/// Never called: [`tile_shape`] offers no kernel off x86-64.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn run_tile(
    _: Simd,
    _: usize,
    _: *const f32,
    _: usize,
    _: &[*const f32; TILE_MAX_ROWS],
    _: usize,
    _: &mut [f32; 16 * 32],
) {
}

// Register tiles read best as index loops.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{DOT_PASS_ROWS, DOT_WEIGHT_ROWS, TILE_MAX_ROWS};
    use std::arch::x86_64::*;

    /// `sums[r][j] = sum_kk rows[r][kk] * x[j * stride + kk]` for `j < M`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dots_avx512<const M: usize>(
        x: *const f32,
        stride: usize,
        k: usize,
        rows: &[*const f32; DOT_WEIGHT_ROWS],
        sums: &mut [[f32; DOT_PASS_ROWS]; DOT_WEIGHT_ROWS],
    ) {
        let mut acc = [[_mm512_setzero_ps(); M]; DOT_WEIGHT_ROWS];
        let full = k / 16 * 16;
        for kk in (0..full).step_by(16) {
            let mut xv = [_mm512_setzero_ps(); M];
            for j in 0..M {
                xv[j] = _mm512_loadu_ps(x.add(j * stride + kk));
            }
            for r in 0..DOT_WEIGHT_ROWS {
                _mm_prefetch::<_MM_HINT_T0>(rows[r].wrapping_add(kk + PREFETCH_AHEAD) as *const i8);
                let wv = _mm512_loadu_ps(rows[r].add(kk));
                for j in 0..M {
                    acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
                }
            }
        }
        for r in 0..DOT_WEIGHT_ROWS {
            for j in 0..M {
                let mut sum = _mm512_reduce_add_ps(acc[r][j]);
                for kk in full..k {
                    sum += *rows[r].add(kk) * *x.add(j * stride + kk);
                }
                sums[r][j] = sum;
            }
        }
    }

    /// [`dots_avx512`] with 8-lane vectors.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots_avx2<const M: usize>(
        x: *const f32,
        stride: usize,
        k: usize,
        rows: &[*const f32; DOT_WEIGHT_ROWS],
        sums: &mut [[f32; DOT_PASS_ROWS]; DOT_WEIGHT_ROWS],
    ) {
        let mut acc = [[_mm256_setzero_ps(); M]; DOT_WEIGHT_ROWS];
        let full = k / 8 * 8;
        for kk in (0..full).step_by(8) {
            let mut xv = [_mm256_setzero_ps(); M];
            for j in 0..M {
                xv[j] = _mm256_loadu_ps(x.add(j * stride + kk));
            }
            for r in 0..DOT_WEIGHT_ROWS {
                if kk % 16 == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(
                        rows[r].wrapping_add(kk + PREFETCH_AHEAD) as *const i8
                    );
                }
                let wv = _mm256_loadu_ps(rows[r].add(kk));
                for j in 0..M {
                    acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);
                }
            }
        }
        for r in 0..DOT_WEIGHT_ROWS {
            for j in 0..M {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][j]);
                let mut sum = lanes.iter().sum::<f32>();
                for kk in full..k {
                    sum += *rows[r].add(kk) * *x.add(j * stride + kk);
                }
                sums[r][j] = sum;
            }
        }
    }

    /// How far ahead in each weight row the dot-product kernel prefetches
    /// (floats): a few cache lines, so its row streams keep the bus busy.
    const PREFETCH_AHEAD: usize = 128;

    /// One tile: `tile[r * 16MV + j] = sum_kk rows[r][kk] * xt[kk * stride + j]`.
    /// No software prefetch: a tile's rows are one contiguous run of memory
    /// that the hardware prefetcher follows; prefetching one or more lines
    /// ahead measured the same or slower (32 rows cold: 307 GFLOP/s without,
    /// 287-300 with).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512<const MV: usize, const NR: usize>(
        xt: *const f32,
        stride: usize,
        rows: &[*const f32; TILE_MAX_ROWS],
        k: usize,
        tile: &mut [f32; 16 * 32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); MV]; NR];
        for kk in 0..k {
            let xp = xt.add(kk * stride);
            let mut xv = [_mm512_setzero_ps(); MV];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(xp.add(16 * v));
            }
            for r in 0..NR {
                let b = _mm512_set1_ps(*rows[r].add(kk));
                for v in 0..MV {
                    acc[r][v] = _mm512_fmadd_ps(b, xv[v], acc[r][v]);
                }
            }
        }
        for r in 0..NR {
            for v in 0..MV {
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * 16 * MV + 16 * v), acc[r][v]);
            }
        }
    }

    /// [`tile_avx512`] with 8-lane vectors.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2<const MV: usize, const NR: usize>(
        xt: *const f32,
        stride: usize,
        rows: &[*const f32; TILE_MAX_ROWS],
        k: usize,
        tile: &mut [f32; 16 * 32],
    ) {
        let mut acc = [[_mm256_setzero_ps(); MV]; NR];
        for kk in 0..k {
            let xp = xt.add(kk * stride);
            let mut xv = [_mm256_setzero_ps(); MV];
            for (v, x) in xv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(xp.add(8 * v));
            }
            for r in 0..NR {
                let b = _mm256_set1_ps(*rows[r].add(kk));
                for v in 0..MV {
                    acc[r][v] = _mm256_fmadd_ps(b, xv[v], acc[r][v]);
                }
            }
        }
        for r in 0..NR {
            for v in 0..MV {
                _mm256_storeu_ps(tile.as_mut_ptr().add(r * 8 * MV + 8 * v), acc[r][v]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|kk| x[i * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// Every kernel this CPU can run (an AVX-512 machine also checks AVX2).
    fn kernels() -> Vec<Simd> {
        [Simd::Avx512, Simd::Avx2]
            .into_iter()
            .filter(|&isa| simd() >= isa)
            .collect()
    }

    #[test]
    fn matches_a_reference_for_ragged_shapes() {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        let shapes = [
            (1, 7, 5),
            (1, 1024, 6),
            (2, 37, 9),
            (3, 64, 13),
            (4, 130, 7),
            (5, 48, 21),
            (8, 100, 11),
            (9, 40, 10),
            (16, 33, 40),
            (17, 100, 25),
            (32, 64, 25),
            (33, 128, 37),
            (48, 20, 17),
            (49, 70, 13),
            (64, 96, 50),
        ];
        for isa in kernels() {
            for &(m, k, n) in &shapes {
                let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
                let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
                let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
                assert!(matmul_t_with(isa, &x, m, k, &w, n, &mut out));
                // SAFETY: the kernel wrote every value (NaN before).
                let out: Vec<f32> = out.iter().map(|o| unsafe { o.assume_init() }).collect();
                let want = reference(&x, m, k, &w, n);
                for (a, b) in out.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (k as f32),
                        "{isa:?} {m}x{k}x{n}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
