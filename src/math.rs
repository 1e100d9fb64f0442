//! Elementwise math written so the compiler vectorizes it.
//!
//! libm's `expf` is a call per element; attention's softmax and the sampler's
//! normalizer over a 150k-token vocabulary run it millions of times a step.
//! [`exp`] is branch-free (range reduction to `2^n * e^r`, a degree-6
//! polynomial for `e^r`), within 2 ulp of the exact value, so loops over it
//! become SIMD code.

/// `e^x` for f32, within 2 ulp; 0 below the smallest normal result, +inf
/// above 88 (just short of f32's largest, which keeps `2^n` a normal
/// number), NaN for NaN. Callers pass `v - max`, so always <= 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so `x - n ln2` is exact for the n that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const HIGH: f32 = 88.0;
    const LOW: f32 = -87.336_55;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer
    // without a call to `roundf` (baseline x86-64 has no rounding
    // instruction); plain multiply-adds for the same reason (`mul_add` is a
    // libm call without FMA), so every step vectorizes on any target.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(LOW, HIGH);
    let shifted = clamped * LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // Taylor-like coefficients of e^r on |r| <= ln2/2 (Cephes' expf polynomial).
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    // `shifted`'s low mantissa bits hold n (|n| <= 127 is far below 2^22):
    // reading them is an integer add where `n as i32` (saturating) would
    // be a scalar conversion per element and keep the loop from vectorizing.
    let scale = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(127)
            << 23,
    );
    let y = e_r * scale;
    if x < LOW {
        0.0
    } else if x > HIGH {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// `sum(exp(v - shift))` over `values`, accumulated in f64 lanes so that
/// 150k terms lose nothing a log-prob could show. Runs an AVX-512 or AVX2
/// build of the loop where the CPU has one.
pub fn sum_exp(values: &[f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { sum_exp_avx512(values, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { sum_exp_avx2(values, shift) };
        }
    }
    sum_exp_lanes(values, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn sum_exp_avx512(values: &[f32], shift: f32) -> f64 {
    sum_exp_lanes(values, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_exp_avx2(values: &[f32], shift: f32) -> f64 {
    sum_exp_lanes(values, shift)
}

#[inline(always)]
fn sum_exp_lanes(values: &[f32], shift: f32) -> f64 {
    const LANES: usize = 16;
    // Each f32 lane sums this many terms before it is added into f64:
    // rounding error ~1e-7 relative, and the inner loop stays in f32 (a
    // per-term f64 add kept it from vectorizing).
    const TERMS: usize = 16;
    let mut acc = [0f64; LANES];
    let mut total = 0f64;
    for block in values.chunks(LANES * TERMS) {
        let mut part = [0f32; LANES];
        let chunks = block.chunks_exact(LANES);
        for &v in chunks.remainder() {
            total += exp(v - shift) as f64;
        }
        for c in chunks {
            for l in 0..LANES {
                part[l] += exp(c[l] - shift);
            }
        }
        for l in 0..LANES {
            acc[l] += part[l] as f64;
        }
    }
    total + acc.iter().sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (want as f32).to_bits().abs_diff((got as f32).to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, want {want} ({ulp} ulp)");
            x += 0.0137;
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn sum_exp_matches_f64() {
        let values: Vec<f32> = (0..151_937)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.02 - 10.0)
            .collect();
        let want: f64 = values.iter().map(|&v| ((v - 3.0) as f64).exp()).sum();
        let got = sum_exp(&values, 3.0);
        assert!(((got - want) / want).abs() < 1e-6, "{got} vs {want}");
    }
}
