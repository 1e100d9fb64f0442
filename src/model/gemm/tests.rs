use super::*;
use half::bf16;

/// Deterministic values in [-0.5, 0.5) with full 24-bit mantissas (other
/// kernels' tests use them too).
pub(crate) fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn run(isa: Simd, x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize) -> Vec<f32> {
    let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
    matmul_t_with(isa, x, m, k, w, n, &mut out);
    // SAFETY: f32 has no invalid bit patterns (and every value was NaN before).
    out.iter().map(|o| unsafe { o.assume_init() }).collect()
}

/// Every kernel this CPU can run, the portable one included.
fn kernels() -> Vec<Simd> {
    [Simd::Avx512, Simd::Avx2, Simd::Baseline]
        .into_iter()
        .filter(|&isa| simd() >= isa)
        .collect()
}

/// Shapes of every class: 1..64 rows and more, `k` and `n` off every
/// tile and chunk size (16 lanes, 4 x 6 and 4 x 3 tiles, 48-column chunks;
/// the outer-product tiles, 6 x 16 on AVX2 from 48 rows (32 with bf16
/// weights, so 40 rows compare the two paths) and 8 x 48 on
/// AVX-512 from 24, with `k` under a group of lanes, half-empty strips,
/// padded rows (`k` = 1024) and two activation panels).
const SHAPES: [(usize, usize, usize); 17] = [
    (1, 7, 5),
    (1, 1024, 53),
    (2, 37, 9),
    (3, 100, 13),
    (5, 48, 50),
    (8, 1031, 7),
    (13, 33, 97),
    (31, 64, 25),
    (40, 1031, 35),
    (64, 129, 49),
    (100, 160, 70),
    (65, 17, 11),
    (130, 6, 33),
    (140, 1024, 20),
    (300, 131, 61),
    (1100, 1031, 40),
    (8192, 19, 7),
];

#[test]
fn matches_an_f64_reference_within_f32_rounding() {
    for isa in kernels() {
        for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
            let x = values(2 * s as u64, m * k);
            let w = values(2 * s as u64 + 1, n * k);
            let out = run(isa, &x, m, k, Weights::F32(&w), n);
            // A chain of at most k roundings: |error| <= k u sum |x w|.
            let bound = (k + 8) as f64 * f64::powi(2.0, -24);
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut magnitude) = (0f64, 0f64);
                    for kk in 0..k {
                        let p = x[i * k + kk] as f64 * w[j * k + kk] as f64;
                        exact += p;
                        magnitude += p.abs();
                    }
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound * magnitude,
                        "{isa:?} {m}x{k}x{n} [{i},{j}]: {got} vs {exact}"
                    );
                }
            }
        }
    }
}

#[test]
fn a_row_is_bit_identical_whatever_else_is_in_the_product() {
    for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
        let x = values(7 + s as u64, m * k);
        let w = values(99 + s as u64, n * k);
        for isa in kernels() {
            let reference = reference(isa, &x, m, k, Weights::F32(&w), n);
            let all = run(isa, &x, m, k, Weights::F32(&w), n);
            assert_eq!(bits(&all), bits(&reference), "{isa:?} {m}x{k}x{n}");
            // Each row alone, and the rows from `i` on (other tile phases).
            for i in [0, m / 2, m - 1] {
                let row = run(isa, &x[i * k..(i + 1) * k], 1, k, Weights::F32(&w), n);
                assert_eq!(
                    bits(&row),
                    bits(&all[i * n..(i + 1) * n]),
                    "{isa:?} row {i}"
                );
                let rest = run(isa, &x[i * k..], m - i, k, Weights::F32(&w), n);
                assert_eq!(bits(&rest), bits(&all[i * n..]), "{isa:?} rows {i}..");
            }
        }
    }
}

#[test]
fn bf16_weights_give_the_f32_results_of_the_same_values() {
    for (s, &(m, k, n)) in SHAPES.iter().enumerate().filter(|(_, s)| s.0 < 2000) {
        let x = values(3 * s as u64, m * k);
        let w16: Vec<bf16> = values(5 * s as u64, n * k)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        for isa in kernels() {
            let narrow = run(isa, &x, m, k, Weights::Bf16(&w16), n);
            let wide = run(isa, &x, m, k, Weights::F32(&w32), n);
            assert_eq!(bits(&narrow), bits(&wide), "{isa:?} {m}x{k}x{n}");
        }
    }
}

/// Products started from inside parallel tasks (as LoRA groups do), many
/// at once, so a thread waiting on one product's tasks may run another's:
/// each still gives the bits it gives alone.
#[test]
fn products_nested_in_parallel_tasks_give_their_bits_alone() {
    use rayon::prelude::*;
    let (m, k, n) = (150, 300, 70);
    let w = values(11, n * k);
    for isa in kernels() {
        let alone: Vec<Vec<f32>> = (0..16)
            .map(|s| run(isa, &values(100 + s, m * k), m, k, Weights::F32(&w), n))
            .collect();
        let nested: Vec<Vec<f32>> = (0..16)
            .into_par_iter()
            .map(|s| run(isa, &values(100 + s, m * k), m, k, Weights::F32(&w), n))
            .collect();
        for (a, b) in alone.iter().zip(&nested) {
            assert_eq!(bits(a), bits(b), "{isa:?}");
        }
    }
}

/// The portable reduction of `isa`'s width, one output at a time.
fn reference(isa: Simd, x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let tile = Tile {
                x: [x[i * k..].as_ptr(); MAX_TILE_ROWS],
                rows: 1,
                w: [w.row(j, k); MAX_TILE_COLS],
                cols: 1,
                k,
                bf16: w.is_bf16(),
                prefetch: (std::ptr::null(), 0),
            };
            let mut sums: TileSums = [[f32::NAN; MAX_TILE_COLS]; MAX_TILE_ROWS];
            // SAFETY: the pointers start rows of `k` values of their kind.
            unsafe {
                match lanes(isa) {
                    8 => portable::tile::<8>(&tile, &mut sums),
                    _ => portable::tile::<16>(&tile, &mut sums),
                }
            }
            out.push(sums[0][0]);
        }
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn run_bf16(
    kernel: bf16_products::Kernel,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
) -> Vec<f32> {
    let mut out = vec![MaybeUninit::new(f32::NAN); m * n];
    bf16_products::matmul_t_with(kernel, x, m, k, w, n, &mut out);
    // SAFETY: as in `run`.
    out.iter().map(|o| unsafe { o.assume_init() }).collect()
}

fn bf16_values(seed: u64, len: usize) -> Vec<bf16> {
    values(seed, len).into_iter().map(bf16::from_f32).collect()
}

/// Every bf16-products kernel against an f64 sum of the rounded values:
/// whatever order a kernel sums in, within a chain of `k` roundings.
#[test]
fn bf16_products_match_an_f64_reference_of_the_rounded_values() {
    for kernel in bf16_products::kernels() {
        for (s, &(m, k, n)) in SHAPES.iter().enumerate().filter(|(_, s)| s.0 < 2000) {
            let x = values(21 + s as u64, m * k);
            let w = bf16_values(22 + s as u64, n * k);
            let out = run_bf16(kernel, &x, m, k, &w, n);
            let bound = (k + 8) as f64 * f64::powi(2.0, -24);
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut magnitude) = (0f64, 0f64);
                    for kk in 0..k {
                        let xr = bf16::from_f32(x[i * k + kk]).to_f64();
                        let p = xr * w[j * k + kk].to_f64();
                        exact += p;
                        magnitude += p.abs();
                    }
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - exact).abs() <= bound * magnitude,
                        "{kernel:?} {m}x{k}x{n} [{i},{j}]: {got} vs {exact}"
                    );
                }
            }
        }
    }
}

/// On every kernel, row `i` of an `m`-row product is the one-row product of
/// row `i` (the AMX tiles with other rows or zeros beside it; the
/// `vdpbf16ps` dot tiles below 24 rows, its outer tiles from there where
/// `k` is even). And on the Intel cores it was checked on, `vdpbf16ps`
/// gives the plain reduction's bits (the odd product first); elsewhere
/// the two are held to the rounding bound of the test above.
#[test]
fn bf16_products_are_bit_identical_across_row_counts() {
    use bf16_products::Kernel;
    for kernel in bf16_products::kernels() {
        for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
            let x = values(31 + s as u64, m * k);
            let w = bf16_values(32 + s as u64, n * k);
            let all = run_bf16(kernel, &x, m, k, &w, n);
            for i in [0, m / 2, m - 1] {
                let row = run_bf16(kernel, &x[i * k..(i + 1) * k], 1, k, &w, n);
                let at = format!("{kernel:?} {m}x{k}x{n} row {i}");
                assert_eq!(bits(&row), bits(&all[i * n..(i + 1) * n]), "{at}");
                let rest = run_bf16(kernel, &x[i * k..], m - i, k, &w, n);
                assert_eq!(bits(&rest), bits(&all[i * n..]), "{at}..");
            }
            let intel = !crate::model::simd::amd();
            if kernel == Kernel::DotProducts && intel && m * n * k < 1 << 22 {
                let plain = run_bf16(Kernel::Plain, &x, m, k, &w, n);
                assert_eq!(
                    bits(&all),
                    bits(&plain),
                    "{m}x{k}x{n}: instruction vs plain"
                );
            }
        }
    }
}
