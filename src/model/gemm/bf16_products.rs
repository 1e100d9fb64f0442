//! Products in bf16 (`--compute-dtype bf16`): the activations rounded to
//! bf16 (to nearest, ties to even) at the start of each product, as
//! llama.cpp's BF16 path and bf16 trainers do, times bf16 weights, summed in
//! f32 by the CPU's BF16 dot products (AVX512-BF16's `vdpbf16ps`: two
//! products a lane per instruction, twice exact f32's multiply-adds).
//!
//! The reduction is fixed as in [`super`], over pairs of values:
//!
//! 1. 16 lane sums, lane `l` a chain over blocks `c` of 32 values, each
//!    step `s = fma(x[32c+2l+1], w[..], s)` then `s = fma(x[32c+2l], w[..],
//!    s)`: what one `vdpbf16ps` does to a lane (the odd product first; a
//!    test holds the instruction to this where the CPU has it). A product of
//!    two bf16 values is exact in f32, so each step rounds once;
//! 2. the fixed tree over the lanes of [`super::finish`];
//! 3. the last `k % 32` products fused onto that sum in order.
//!
//! The dot tiles (few rows) and the outer-product tiles (many, over values
//! packed in pairs: `super::outer`) both compute it, so a row's outputs are
//! the same bits whatever else is in the product, as in the exact default.
//! Without AVX512-BF16 the same reduction runs in plain Rust, too slowly to
//! serve with (the server refuses the mode there); the tests' reference.
//! (The instruction also treats subnormal inputs and results as zero; the
//! plain reduction does not, which real activations and weights never meet.)

// Tiles are indexed by row and column on purpose.
#![allow(clippy::needless_range_loop)]

use super::{dot_tasks, finish, padded_rows, weight_at, DotKernel, OutPtr, Tile, TileSums};
use super::{Weights, MAX_TILE_COLS, MAX_TILE_ROWS};
use half::bf16;
use std::mem::MaybeUninit;

/// Values a dot step takes from each row (one `vdpbf16ps`).
pub(crate) const BLOCK: usize = 32;

/// The kernels of bf16 products. A process runs one of them for every
/// product (their reductions differ), the best its CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AMX tile multiplies (`super::amx`; Intel Sapphire Rapids on).
    Amx,
    /// AVX512-BF16 `vdpbf16ps` dot and outer-product tiles (AMD Zen 4 on,
    /// Intel Cooper Lake on): the reduction above.
    DotProducts,
    /// The reduction above in plain Rust (tests; not served).
    Plain,
}

/// Every kernel this CPU can run, best first (the plain one last).
pub(crate) fn kernels() -> Vec<Kernel> {
    let mut all = Vec::new();
    #[cfg(target_arch = "x86_64")]
    if super::simd() == super::Simd::Avx512 {
        if super::amx::available() {
            all.push(Kernel::Amx);
        }
        if std::arch::is_x86_feature_detected!("avx512bf16") {
            all.push(Kernel::DotProducts);
        }
    }
    all.push(Kernel::Plain);
    all
}

/// Whether this CPU has a kernel the mode is for (and AVX-512 is not
/// capped off).
pub fn supported() -> bool {
    best() != Kernel::Plain
}

/// What the mode runs on here, for the load log.
pub fn kernel_name() -> &'static str {
    match best() {
        Kernel::Amx => "AMX tiles",
        Kernel::DotProducts => "AVX512-BF16 dot products",
        Kernel::Plain => "no BF16 instructions",
    }
}

fn best() -> Kernel {
    kernels()[0]
}

/// `out[i, j] = sum_k bf16(x[i, k]) * w[j, k]` on the best kernel (the
/// plain one where the CPU has none). `out` need not be initialized: all
/// of its first `m * n` values are written.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [MaybeUninit<f32>]) {
    matmul_t_with(best(), x, m, k, w, n, out)
}

pub(crate) fn matmul_t_with(
    kernel: Kernel,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let out_ptr = OutPtr(out.as_mut_ptr() as *mut f32);
    // The tile kernels read weight rows as 4-byte pairs; other shapes (no
    // real model's) take the plain reduction, whatever the row count.
    let pairs = k.is_multiple_of(2) && (w.as_ptr() as usize).is_multiple_of(4);
    let kernel = if pairs { kernel } else { Kernel::Plain };
    #[cfg(target_arch = "x86_64")]
    {
        use super::outer;
        if kernel == Kernel::Amx {
            let tiles = m.next_multiple_of(super::amx::TILE_ROWS);
            let x = rounded(x, m, k, tiles);
            // SAFETY: `x` holds `tiles` rows of k bf16 values (zeros past m);
            // the rest as checked above; `out` is ours alone.
            unsafe { super::amx::matmul_t(as_bf16(&x, tiles * k), m, k, w, n, out_ptr) };
            return;
        }
        if kernel == Kernel::DotProducts && m >= <outer::Avx512Bf16 as outer::Tiles>::MIN_ROWS {
            let x = rounded(x, m, k, m);
            // SAFETY: `w` is 4-byte aligned and holds n rows of k (even)
            // bf16 values: n * k / 2 pairs, read only as bits.
            let w = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const f32, n * k / 2) };
            // SAFETY: the CPU has AVX-512 and AVX512-BF16 (`kernels`);
            // rows of k / 2 pairs each; `out` is ours alone.
            unsafe {
                outer::matmul_t::<outer::Avx512Bf16>(&x, m, k / 2, Weights::F32(w), n, out_ptr)
            };
            return;
        }
    }
    let hardware = kernel == Kernel::DotProducts;
    let x = rounded(x, m, k, m);
    let (x, stride) = padded_rows(&x, m, k.div_ceil(2));
    let kernel = DotKernel {
        shape: if hardware { (4, 6) } else { (1, 1) },
        steps: k / BLOCK,
        run: &|t: &Tile, sums: &mut TileSums| {
            #[cfg(target_arch = "x86_64")]
            if hardware {
                // SAFETY: the CPU has AVX512-BF16 (`kernels`); the tile's
                // pointers start rows of `k` bf16 values.
                return unsafe { super::x86::tile_avx512_bf16(t, sums) };
            }
            // SAFETY: as above.
            unsafe { tile(t, sums) }
        },
    };
    dot_tasks(&kernel, (&x, stride), m, k, Weights::Bf16(w), n, out_ptr);
}

/// The first `len` bf16 values of a buffer from [`rounded`].
fn as_bf16(units: &[f32], len: usize) -> &[bf16] {
    assert!(len <= 2 * units.len());
    // SAFETY: the buffer's bytes hold at least `len` bf16 values, and f32's
    // alignment is more than bf16's.
    unsafe { std::slice::from_raw_parts(units.as_ptr() as *const bf16, len) }
}

/// `x`'s `m` rows rounded to bf16, then zero rows up to `rows`, two values
/// to each 4-byte unit (the first in the low half, as in memory),
/// `k.div_ceil(2)` units a row (an odd row's last unit padded with zero).
fn rounded(x: &[f32], m: usize, k: usize, rows: usize) -> Vec<f32> {
    let units = k.div_ceil(2);
    let mut out = vec![0f32; rows.max(m) * units];
    for (dst, src) in out.chunks_exact_mut(units).zip(x[..m * k].chunks_exact(k)) {
        // SAFETY: `dst` holds 2 * units >= k bf16 values (f32's alignment
        // is more than bf16's); rounding writes exactly `k` of them.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr() as *mut bf16, k) };
        round_row(src, dst);
    }
    out
}

/// `dst[i] = bf16(src[i])`, to nearest even.
fn round_row(src: &[f32], dst: &mut [bf16]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd() == super::Simd::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: the CPU has AVX512-BF16.
        return unsafe { super::x86::round_to_bf16(src, dst) };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(s);
    }
}

/// A tile by the reduction above in plain Rust, one output at a time.
///
/// # Safety
/// As for [`Tile`], the rows holding bf16 values (activations too).
pub(crate) unsafe fn tile(t: &Tile, sums: &mut TileSums) {
    debug_assert!(t.rows <= MAX_TILE_ROWS && t.cols <= MAX_TILE_COLS);
    let full = t.k / BLOCK * BLOCK;
    for i in 0..t.rows {
        for r in 0..t.cols {
            let (x, w) = (t.x[i] as *const u8, t.w[r]);
            let value = |row: *const u8, at: usize| weight_at(row, at, true);
            let mut lanes = [0f32; 16];
            for c in (0..full).step_by(BLOCK) {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let (odd, even) = (c + 2 * l + 1, c + 2 * l);
                    *lane = value(w, odd).mul_add(value(x, odd), *lane);
                    *lane = value(w, even).mul_add(value(x, even), *lane);
                }
            }
            let tail = (full..t.k).map(|kk| (value(w, kk), value(x, kk)));
            sums[i][r] = finish(&lanes, tail);
        }
    }
}
