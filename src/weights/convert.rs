//! Little-endian bf16/f16/f32 bytes to f32 values, checked for NaN and
//! infinities on the way. bf16 and f32 (what trainers push) convert and
//! check in fixed blocks of [`BLOCK`] values, so one vectorized loop does
//! both: a check folded into the plain conversion loop kept it from
//! vectorizing (5x slower in a microbenchmark), and a second pass over each
//! chunk cost about a quarter of the conversion; the blocks cost 0 to 15%.
//! f16 converts in software, slowly enough that a second pass is noise.

use super::finite::{bytes_finite, BF16_EXP, F32_EXP};
use candle_core::DType;

const BLOCK: usize = 8;

/// Converts `bytes` of `dtype` (bf16, f16 or f32) into `out`, which holds
/// exactly one value per source value; returns whether all are finite.
pub(crate) fn convert_slice(bytes: &[u8], dtype: DType, out: &mut [f32]) -> bool {
    match dtype {
        DType::BF16 => convert_bf16(bytes, out),
        DType::F16 => {
            for (d, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
            bytes_finite(bytes, dtype)
        }
        _ => convert_f32(bytes, out),
    }
}

fn convert_bf16(bytes: &[u8], out: &mut [f32]) -> bool {
    let mut bad = [0u16; BLOCK];
    let mut dst = out.chunks_exact_mut(BLOCK);
    let mut src = bytes.chunks_exact(2 * BLOCK);
    for (o, s) in (&mut dst).zip(&mut src) {
        for i in 0..BLOCK {
            let v = u16::from_le_bytes([s[2 * i], s[2 * i + 1]]);
            o[i] = f32::from_bits((v as u32) << 16);
            bad[i] |= ((v & BF16_EXP) == BF16_EXP) as u16;
        }
    }
    let tail = src.remainder();
    for (d, b) in dst.into_remainder().iter_mut().zip(tail.chunks_exact(2)) {
        *d = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
    }
    bad == [0; BLOCK] && bytes_finite(tail, DType::BF16)
}

fn convert_f32(bytes: &[u8], out: &mut [f32]) -> bool {
    let mut bad = [0u32; BLOCK];
    let mut dst = out.chunks_exact_mut(BLOCK);
    let mut src = bytes.chunks_exact(4 * BLOCK);
    for (o, s) in (&mut dst).zip(&mut src) {
        for i in 0..BLOCK {
            let v = u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
            o[i] = f32::from_bits(v);
            bad[i] |= ((v & F32_EXP) == F32_EXP) as u32;
        }
    }
    let tail = src.remainder();
    for (d, b) in dst.into_remainder().iter_mut().zip(tail.chunks_exact(4)) {
        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    bad == [0; BLOCK] && bytes_finite(tail, DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_exactly_and_finds_a_bad_value_anywhere() {
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.375 - 5.0).collect();
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        for (dtype, bytes, width) in [
            (DType::F32, f32_bytes, 4),
            (DType::BF16, bf16_bytes, 2),
            (DType::F16, f16_bytes, 2),
        ] {
            let mut out = vec![0f32; 37];
            assert!(convert_slice(&bytes, dtype, &mut out), "{dtype:?}");
            assert_eq!(out, values, "{dtype:?}");
            // Inside a block and in the tail past the last whole block.
            for at in [3, 36] {
                let mut poisoned = bytes.clone();
                // All-ones exponent (and a mantissa bit: NaN).
                poisoned[at * width + width - 1] = 0x7f;
                poisoned[at * width + width - 2] = 0xff;
                assert!(
                    !convert_slice(&poisoned, dtype, &mut out),
                    "{dtype:?} at {at}"
                );
            }
        }
    }
}
