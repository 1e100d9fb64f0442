//! bf16 products on Intel's AMX tiles (`tdpbf16ps`: a 16 x 16 block of f32
//! sums from 16 rows x 32 bf16 values of each operand per instruction), the
//! fastest of `--compute-dtype bf16`'s kernels where the CPU has them
//! (Sapphire Rapids on): on these cores `vdpbf16ps` runs at a quarter of
//! the f32 multiply-adds' rate, while a tile multiply does 16 times their
//! work.
//!
//! Every product runs here, one row or thousands, so an output's reduction
//! is always the same: the tile unit's sum over each block of 32 values
//! (its internal order is the hardware's: not a plain chain of roundings,
//! but the same for a row whatever rows share its tile, which a test
//! holds), block after block in order, then the `k % 32` tail fused in
//! order. Activation rows are padded with zero rows to whole tiles; weight
//! rows are packed per task into the tiles' pair-interleaved layout, 32
//! outputs (two tiles) a strip.

// Tiles are indexed by row and column on purpose.
#![allow(clippy::needless_range_loop)]

use super::outer::transposed_block;
use super::{weight_at, OutPtr};
use half::bf16;
use rayon::prelude::*;
use std::arch::asm;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows of a tile (activation rows of an A tile, value pairs of a B tile).
pub(super) const TILE_ROWS: usize = 16;
/// bf16 values of one tile row (64 bytes).
const BLOCK: usize = 32;
/// Outputs per packed strip: two B tiles of 16.
const STRIP: usize = 32;

/// Whether the CPU has AMX-BF16 and the kernel lets this process use the
/// tile registers (Linux asks each process to request them).
pub(super) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let has = std::arch::is_x86_feature_detected!("avx512f") && {
            let id = __cpuid_count(7, 0);
            id.edx & (1 << 22) != 0 && id.edx & (1 << 24) != 0
        };
        has && request_tile_state()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: process-wide,
/// once; false where the kernel refuses (or predates AMX).
fn request_tile_state() -> bool {
    #[cfg(target_os = "linux")]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// `ldtilecfg`'s 64-byte operand: palette 1, eight tiles of 16 rows x 64
/// bytes (tmm0-3 sums, tmm4-5 activations, tmm6-7 weights).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
    reserved_end: [u8; 16],
}

const CONFIG: TileConfig = {
    let mut c = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row: [0; 16],
        rows: [0; 16],
        reserved_end: [0; 16],
    };
    let mut t = 0;
    while t < 8 {
        c.bytes_per_row[t] = 64;
        c.rows[t] = TILE_ROWS as u8;
        t += 1;
    }
    c
};

thread_local! {
    /// Each worker's packed strip, reused task to task.
    static STRIP_BUF: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Activation or weight rows (bf16, `k` a row), shared with the strip tasks.
#[derive(Clone, Copy)]
struct Rows(*const bf16);
// SAFETY: only read while the call that owns the buffer runs.
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}

impl Rows {
    fn bytes(self) -> *const u8 {
        self.0 as *const u8
    }
}

/// `out[i, j] = sum_k x[i, k] * w[j, k]` (bf16 values, f32 sums) for `m`
/// rows.
///
/// # Safety
/// [`available`] is true; `k` is even; `x` holds `m.next_multiple_of(16)`
/// rows of `k` values (the rows past `m` zeros); `w` holds `n` rows of `k`
/// values from a 4-byte aligned start; `out` has `m * n` writable values no
/// one else touches during the call.
pub(super) unsafe fn matmul_t(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, out: OutPtr) {
    debug_assert!(k.is_multiple_of(2) && x.len() >= m.next_multiple_of(TILE_ROWS) * k);
    if m <= FEW_ROWS {
        return few_rows(x, m, k, w, n, out);
    }
    let rows = Rows(x.as_ptr());
    let weights = Rows(w.as_ptr());
    (0..n.div_ceil(STRIP)).into_par_iter().for_each(|s| {
        let wp = weights.bytes();
        let (j0, cols) = (s * STRIP, STRIP.min(n - s * STRIP));
        STRIP_BUF.with_borrow_mut(|strip| {
            // SAFETY: as for this function; this task alone writes columns
            // j0..j0 + cols.
            unsafe {
                pack_strip(wp, k, j0, cols, strip);
                strip_product(rows, m, k, strip, (wp, j0, cols), out, n);
            }
        });
    });
}

/// Outputs per task of [`few_rows`]: two tiles of weight rows. (With four,
/// 64 rows streamed at once, more than the prefetchers follow: GEMM table,
/// bf16 products, two runs each, 1 row 15-16 -> 19-20 GFLOP/s, 8 rows
/// 125-136 -> 150-153, 16 rows 220-269 -> 283-297; one tile was level with
/// two.)
const FEW_ROWS_OUTPUTS: usize = 2 * TILE_ROWS;

/// Rows up to which [`matmul_t`] runs transposed ([`few_rows`]): decode
/// steps, whose few rows cannot pay for packing every weight. GEMM table,
/// bf16 products, two runs each: transposed 410 GFLOP/s at 32 rows (packed
/// strips 334), 533-542 at 64 (484-496), 724-744 at 128 (618); at 256 the
/// packed strips lead, 994-1026 against 890-910.
pub(super) const FEW_ROWS: usize = 128;

/// [`matmul_t`] for up to [`FEW_ROWS`] rows (decode): the product
/// transposed, `out^T = w x^T`, the weight rows read as they lie as A tiles
/// and the few activation rows packed once as B tiles, so no weights are
/// packed. The tile unit sums the same products in the same order either
/// way round (checked bit for bit by the tests, which compare row counts
/// across the two paths).
///
/// # Safety
/// As for [`matmul_t`], with `m <= FEW_ROWS`.
#[target_feature(enable = "avx2")]
unsafe fn few_rows(x: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, out: OutPtr) {
    let groups = k / BLOCK;
    let tile = TILE_ROWS * 16;
    let blocks = m.div_ceil(TILE_ROWS);
    // B tiles: for each block of 16 rows and each group c of values, pairs
    // 16c + l of the block's rows.
    let mut packed = vec![0u32; blocks * groups * tile];
    let dst = packed.as_mut_ptr();
    for half in (0..blocks * TILE_ROWS).step_by(8) {
        let live = m.saturating_sub(half).min(8);
        if live == 0 {
            continue;
        }
        let rows: [*const u8; 8] =
            std::array::from_fn(|i| x.as_ptr().add((half + i.min(live - 1)) * k) as *const u8);
        let (block, at) = (half / TILE_ROWS, half % TILE_ROWS);
        for c in 0..groups {
            for l0 in (0..TILE_ROWS).step_by(8) {
                let v = transposed_block(&rows, live, c * TILE_ROWS + l0, false);
                for d in 0..8 {
                    let to = dst.add((block * groups + c) * tile + (l0 + d) * 16 + at);
                    _mm256_storeu_ps(to as *mut f32, v[d]);
                }
            }
        }
    }
    let (xs, ws, packed) = (
        Rows(x.as_ptr()),
        Rows(w.as_ptr()),
        Rows(packed.as_ptr() as *const bf16),
    );
    (0..n.div_ceil(FEW_ROWS_OUTPUTS))
        .into_par_iter()
        .for_each(|t| {
            let j0 = t * FEW_ROWS_OUTPUTS;
            let cols = FEW_ROWS_OUTPUTS.min(n - j0);
            // SAFETY: as for this function; this task alone writes columns
            // j0..j0 + cols.
            unsafe { few_rows_block(xs, m, k, (ws, n), packed, (j0, cols), out) };
        });
}

/// One task of [`few_rows`]: outputs `j0..j0 + cols` of every row, two
/// blocks of 16 rows at a time (2 x 2 tiles of sums).
#[target_feature(enable = "avx2,fma")]
unsafe fn few_rows_block(
    x: Rows,
    m: usize,
    k: usize,
    (w, n): (Rows, usize),
    packed: Rows,
    (j0, cols): (usize, usize),
    out: OutPtr,
) {
    let groups = k / BLOCK;
    let row_bytes = k * 2;
    // A partial block's weight rows, copied beside zero rows (a tile reads
    // 16 rows whole).
    let mut padded = Vec::new();
    let a0 = if cols < FEW_ROWS_OUTPUTS {
        padded = vec![bf16::ZERO; FEW_ROWS_OUTPUTS * k];
        std::ptr::copy_nonoverlapping(w.0.add(j0 * k), padded.as_mut_ptr(), cols * k);
        padded.as_ptr() as *const u8
    } else {
        w.bytes().add(j0 * row_bytes)
    };
    let a1 = a0.add(TILE_ROWS * row_bytes);
    let tile_bytes = TILE_ROWS * 64;
    let blocks = m.div_ceil(TILE_ROWS);
    // 32 outputs x 32 rows of sums, 128 bytes an output.
    let mut sums = [0f32; FEW_ROWS_OUTPUTS * 2 * TILE_ROWS];
    let sp = sums.as_mut_ptr() as *mut u8;
    asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
    for b0 in (0..blocks).step_by(2) {
        let two = b0 + 1 < blocks;
        let b = packed.bytes().add(b0 * groups * tile_bytes);
        // (Past the buffer when there is no second block: not read then.)
        let b1 = b.wrapping_add(groups * tile_bytes);
        zero_sums();
        for c in 0..groups {
            let weights = [a0.add(c * 64), a1.add(c * 64)];
            let rows = [b.add(c * tile_bytes), b1.wrapping_add(c * tile_bytes)];
            if two {
                accumulate::<2, 2>(weights, row_bytes, rows, 64);
            } else {
                accumulate::<2, 1>(weights, row_bytes, rows, 64);
            }
        }
        // Output j's sums at j * 128 bytes: rows of the first block, then
        // of the second.
        store_sums(sp, 128);
        let r0 = b0 * TILE_ROWS;
        for i in 0..(2 * TILE_ROWS).min(m - r0) {
            let xr = x.bytes().add((r0 + i) * row_bytes);
            for j in 0..cols {
                let mut v = sums[j * 2 * TILE_ROWS + i];
                let wr = w.bytes().add((j0 + j) * row_bytes);
                for kk in groups * BLOCK..k {
                    v = weight_at(wr, kk, true).mul_add(weight_at(xr, kk, true), v);
                }
                out.write((r0 + i) * n + j0 + j, v);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
    drop(padded);
}

/// Weight rows `j0..j0 + cols` (zeros past them) as B tiles: for each block
/// `c` of 32 values and each half `h` of the strip, 16 rows (value pairs
/// `16c + l`) of 16 outputs' pairs, 1 KiB a tile, in that order.
#[target_feature(enable = "avx2")]
unsafe fn pack_strip(w: *const u8, k: usize, j0: usize, cols: usize, buf: &mut Vec<u32>) {
    let groups = k / BLOCK;
    let tile = TILE_ROWS * 16;
    if buf.len() != groups * 2 * tile {
        buf.clear();
        buf.resize(groups * 2 * tile, 0);
    }
    let dst = buf.as_mut_ptr();
    for jb in (0..STRIP).step_by(8) {
        let rows = cols.saturating_sub(jb).min(8);
        let (h, jh) = (jb / 16, jb % 16);
        if rows == 0 {
            for c in 0..groups {
                for l in 0..TILE_ROWS {
                    let at = dst.add((c * 2 + h) * tile + l * 16 + jh);
                    _mm256_storeu_si256(at as *mut __m256i, _mm256_setzero_si256());
                }
            }
            continue;
        }
        let src: [*const u8; 8] =
            std::array::from_fn(|j| w.add((j0 + jb + j.min(rows - 1)) * k * 2));
        for c in 0..groups {
            for l0 in (0..TILE_ROWS).step_by(8) {
                // Pairs 16c + l0 .. + 8 of eight outputs, transposed.
                let v = transposed_block(&src, rows, c * TILE_ROWS + l0, false);
                for d in 0..8 {
                    let at = dst.add((c * 2 + h) * tile + (l0 + d) * 16 + jh);
                    _mm256_storeu_ps(at as *mut f32, v[d]);
                }
            }
        }
    }
}

/// Every row block's sums for one packed strip, tails fused, written out.
#[target_feature(enable = "avx512f,fma")]
unsafe fn strip_product(
    rows: Rows,
    m: usize,
    k: usize,
    strip: &[u32],
    (w, j0, cols): (*const u8, usize, usize),
    out: OutPtr,
    n: usize,
) {
    let groups = k / BLOCK;
    let row_bytes = k * 2;
    let b = strip.as_ptr() as *const u8;
    let tile_bytes = TILE_ROWS * 64;
    // 32 rows x 32 outputs of sums, 128 bytes a row.
    let mut sums = [0f32; 2 * TILE_ROWS * STRIP];
    let sp = sums.as_mut_ptr() as *mut u8;
    asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
    for r0 in (0..m).step_by(2 * TILE_ROWS) {
        let a0 = rows.bytes().add(r0 * row_bytes);
        let two = r0 + TILE_ROWS < m;
        zero_sums();
        for c in 0..groups {
            let a = a0.add(c * 64);
            // (Past the rows when there is no second tile: not read then.)
            let rows = [a, a.wrapping_add(TILE_ROWS * row_bytes)];
            let bt = b.add(c * 2 * tile_bytes);
            let weights = [bt, bt.add(tile_bytes)];
            if two {
                accumulate::<2, 2>(rows, row_bytes, weights, 64);
            } else {
                accumulate::<1, 2>(rows, row_bytes, weights, 64);
            }
        }
        // Row i's sums at i * 128 bytes: outputs of the first B tile, then
        // of the second.
        store_sums(sp, 128);
        for i in 0..(2 * TILE_ROWS).min(m - r0) {
            let x = rows.bytes().add((r0 + i) * row_bytes);
            let row = &mut sums[i * STRIP..(i + 1) * STRIP];
            for kk in groups * BLOCK..k {
                let xv = weight_at(x, kk, true);
                for j in 0..cols {
                    row[j] = weight_at(w.add((j0 + j) * row_bytes), kk, true).mul_add(xv, row[j]);
                }
            }
            out.write_all((r0 + i) * n + j0, &row[..cols]);
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// Clears the four tiles of sums, tmm0-3.
#[inline(always)]
unsafe fn zero_sums() {
    asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem)
    );
}

/// Sums tile `2r + c` += A tile `r` x B tile `c`, for the first `RA` A
/// tiles (at `a`, rows `sa` bytes apart) and `CB` B tiles (at `b`, `sb`
/// apart), through tmm4-5 (A) and tmm6-7 (B).
#[inline(always)]
unsafe fn accumulate<const RA: usize, const CB: usize>(
    a: [*const u8; 2],
    sa: usize,
    b: [*const u8; 2],
    sb: usize,
) {
    const { assert!(matches!((RA, CB), (2, 2) | (2, 1) | (1, 2))) };
    match (RA, CB) {
        (2, 2) => asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a[0],
            a1 = in(reg) a[1],
            sa = in(reg) sa,
            b0 = in(reg) b[0],
            b1 = in(reg) b[1],
            sb = in(reg) sb,
            options(nostack, readonly)
        ),
        (2, 1) => asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm2, tmm5, tmm6",
            a0 = in(reg) a[0],
            a1 = in(reg) a[1],
            sa = in(reg) sa,
            b0 = in(reg) b[0],
            sb = in(reg) sb,
            options(nostack, readonly)
        ),
        (1, 2) => asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            a0 = in(reg) a[0],
            sa = in(reg) sa,
            b0 = in(reg) b[0],
            b1 = in(reg) b[1],
            sb = in(reg) sb,
            options(nostack, readonly)
        ),
        _ => {}
    }
}

/// Stores the sums tiles as one block of 32 x 32 f32 rows `stride` bytes
/// apart: tile `2r + c` at row `16r`, column `16c`.
#[inline(always)]
unsafe fn store_sums(at: *mut u8, stride: usize) {
    asm!(
        "tilestored [{s0} + {ss}*1], tmm0",
        "tilestored [{s1} + {ss}*1], tmm1",
        "tilestored [{s2} + {ss}*1], tmm2",
        "tilestored [{s3} + {ss}*1], tmm3",
        s0 = in(reg) at,
        s1 = in(reg) at.add(64),
        s2 = in(reg) at.add(TILE_ROWS * stride),
        s3 = in(reg) at.add(TILE_ROWS * stride + 64),
        ss = in(reg) stride,
        options(nostack)
    );
}
