//! The reduction of [`super`] in plain Rust, one output at a time: the
//! kernel of CPUs without AVX2 and the definition the vector kernels match
//! bit for bit, in 16 lanes or AVX2's 8 (`f32::mul_add` is the same
//! single-rounding fused multiply-add they issue).

// Register tiles are indexed by row and column on purpose.
#![allow(clippy::needless_range_loop)]

use super::{finish, weight_at, Tile, TileSums};

/// A tile by the `L`-lane reduction (16; 8 is AVX2's, for its tests).
///
/// # Safety
/// As for [`Tile`].
pub(crate) unsafe fn tile<const L: usize>(t: &Tile, sums: &mut TileSums) {
    const { assert!(L == 16 || L == 8) };
    let full = t.k / L * L;
    for i in 0..t.rows {
        for r in 0..t.cols {
            let (x, w) = (t.x[i], t.w[r]);
            let mut lanes = [0f32; L];
            for c in (0..full).step_by(L) {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    *lane = weight_at(w, c + l, t.bf16).mul_add(*x.add(c + l), *lane);
                }
            }
            let tail = (full..t.k).map(|kk| (weight_at(w, kk, t.bf16), *x.add(kk)));
            sums[i][r] = finish(&lanes, tail);
        }
    }
}
