//! Bytes to tensors, checked for NaN and infinities on the way.
//!
//! [`convert_slice`]: little-endian bf16/f16/f32 bytes to f32 values.
//! bf16 and f32 (what trainers push) convert and
//! check in fixed blocks of [`BLOCK`] values, so one vectorized loop does
//! both: a check folded into the plain conversion loop kept it from
//! vectorizing (5x slower in a microbenchmark), and a second pass over each
//! chunk cost about a quarter of the conversion; the blocks cost 0 to 15%.
//! f16 converts in software, slowly enough that a second pass is noise.

use super::finite::{bytes_finite, check_tensor, BF16_EXP, F32_EXP};
use super::WeightsError;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

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

/// Converts `bytes` of `dtype` (bf16, f16 or f32) into bf16 `out` (one
/// value per source value): bf16 is copied, f16 and f32 round to nearest
/// even as loading does (`Tensor::to_dtype`). Returns whether all are
/// finite after rounding (an f32 near its maximum rounds to infinity).
pub(crate) fn convert_slice_to_bf16(bytes: &[u8], dtype: DType, out: &mut [half::bf16]) -> bool {
    if dtype == DType::BF16 {
        let mut bad = 0u16;
        for (d, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let v = u16::from_le_bytes([b[0], b[1]]);
            *d = half::bf16::from_bits(v);
            bad |= ((v & BF16_EXP) == BF16_EXP) as u16;
        }
        return bad == 0;
    }
    // Through f32 a stack buffer at a time (f16 -> f32 is exact).
    const STEP: usize = 256;
    let width = f32_source_width(dtype).unwrap_or(4);
    let mut wide = [0f32; STEP];
    let mut finite = true;
    for (dst, src) in out.chunks_mut(STEP).zip(bytes.chunks(STEP * width)) {
        let wide = &mut wide[..dst.len()];
        finite &= convert_slice(src, dtype, wide);
        let mut bad = 0u16;
        for (d, w) in dst.iter_mut().zip(wide.iter()) {
            *d = half::bf16::from_f32(*w);
            bad |= ((d.to_bits() & BF16_EXP) == BF16_EXP) as u16;
        }
        finite &= bad == 0;
    }
    finite
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

/// Converts tensor `name`'s raw little-endian bytes to the run dtype on
/// `device`, refusing NaN and infinite values.
pub(crate) fn convert_bytes(
    name: &str,
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    run: DType,
    device: &Device,
) -> Result<Tensor, WeightsError> {
    if run == DType::F32 && f32_source_width(dtype).is_some() {
        // The common case (a bf16 push into an f32 engine): no intermediate
        // copy, and the check rides along the conversion.
        let (values, finite) = bytes_to_f32(bytes, dtype);
        if !finite {
            return Err(WeightsError::NonFinite(name.to_string()));
        }
        return Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?);
    }
    if !device.is_cpu() {
        return super::device_convert::convert_on_device(name, bytes, dtype, shape, run, device);
    }
    // Checked after the conversion, on the CPU: f64 values past f32's range
    // become infinite on the way.
    let tensor = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?.to_dtype(run)?;
    check_tensor(name, &tensor)?;
    Ok(tensor.to_device(device)?)
}

/// Little-endian bf16/f16/f32 bytes straight to f32 values, in one pass;
/// also whether every value is finite.
fn bytes_to_f32(bytes: &[u8], dtype: DType) -> (Vec<f32>, bool) {
    let width = f32_source_width(dtype).unwrap_or(4);
    let mut out = vec![0f32; bytes.len() / width];
    let finite = convert_into(bytes, dtype, &mut out);
    (out, finite)
}

/// Bytes per value of a dtype [`convert_into`] reads.
fn f32_source_width(dtype: DType) -> Option<usize> {
    match dtype {
        DType::BF16 | DType::F16 => Some(2),
        DType::F32 => Some(4),
        _ => None,
    }
}

/// Little-endian bf16/f16/f32 `bytes` into `out`, split across the calling
/// rayon pool (the conversion is memory-bound; one core does not saturate
/// memory). `out` holds exactly one value per source value. Returns
/// whether every value is finite.
fn convert_into(bytes: &[u8], dtype: DType, out: &mut [f32]) -> bool {
    let width = f32_source_width(dtype).unwrap_or(4);
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .map(|(dst, src)| convert_slice(src, dtype, dst))
        .reduce(|| true, |a, b| a && b)
}

/// Whether [`fill_part`] can write a tensor of `dtype` and `shape` into
/// `target`.
pub(crate) fn fits_in_place(target: &Tensor, dtype: DType, shape: &[usize]) -> bool {
    f32_source_width(dtype).is_some()
        && target.device().is_cpu()
        && matches!(target.dtype(), DType::F32 | DType::BF16)
        && target.dims() == shape
        && target.is_contiguous()
}

/// Converts `bytes` (whole values of `dtype`) into `target` from value
/// `offset` on, on the calling thread: a pushed tensor written into its
/// target piece by piece as the body arrives. `target` must fit
/// ([`fits_in_place`]) and be read by nothing else: a new tensor, or a
/// retired copy of the weights from before the last update (see
/// `crate::engine::refit`), whose memory is already mapped. A NaN or
/// infinite value refuses the tensor, named `name`.
pub(crate) fn fill_part(
    name: &str,
    target: &Tensor,
    bytes: &[u8],
    dtype: DType,
    offset: usize,
) -> Result<(), WeightsError> {
    let fill = FillFromBytes {
        bytes,
        dtype,
        offset,
        finite: std::cell::Cell::new(true),
    };
    target.inplace_op1(&fill)?;
    if fill.finite.get() {
        Ok(())
    } else {
        Err(WeightsError::NonFinite(name.to_string()))
    }
}

/// In-place fill of an f32 or bf16 CPU tensor, from value `offset` on,
/// with raw little-endian bytes; notes whether they were all finite.
struct FillFromBytes<'a> {
    bytes: &'a [u8],
    dtype: DType,
    offset: usize,
    finite: std::cell::Cell<bool>,
}

impl candle_core::InplaceOp1 for FillFromBytes<'_> {
    fn name(&self) -> &'static str {
        "fill-from-bytes"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fill-from-bytes: target is not contiguous");
        };
        let width = f32_source_width(self.dtype).unwrap_or(4);
        let range = self.offset..self.offset + self.bytes.len() / width;
        let finite = match storage {
            candle_core::CpuStorage::F32(data) => data[start..end]
                .get_mut(range)
                .map(|out| convert_slice(self.bytes, self.dtype, out)),
            candle_core::CpuStorage::BF16(data) => data[start..end]
                .get_mut(range)
                .map(|out| convert_slice_to_bf16(self.bytes, self.dtype, out)),
            _ => candle_core::bail!("fill-from-bytes: target is not f32 or bf16"),
        };
        let Some(finite) = finite else {
            candle_core::bail!("fill-from-bytes: more values than the target holds");
        };
        self.finite.set(finite);
        Ok(())
    }
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

    #[test]
    fn narrows_to_bf16_as_loading_does_and_refuses_what_overflows() {
        let values: Vec<f32> = (0..300).map(|i| (i as f32 - 150.0) * 0.0137).collect();
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let rounded: Vec<half::bf16> = values.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let bf16_bytes: Vec<u8> = rounded.iter().flat_map(|v| v.to_le_bytes()).collect();
        // What `Tensor::to_dtype` gives at load, from each source dtype.
        let loaded = |bytes: &[u8], dtype: DType| -> Vec<half::bf16> {
            Tensor::from_raw_buffer(bytes, dtype, &[300], &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::BF16))
                .and_then(|t| t.to_vec1())
                .unwrap()
        };
        for (dtype, bytes) in [
            (DType::F32, &f32_bytes),
            (DType::F16, &f16_bytes),
            (DType::BF16, &bf16_bytes),
        ] {
            let mut out = vec![half::bf16::ZERO; 300];
            assert!(convert_slice_to_bf16(bytes, dtype, &mut out), "{dtype:?}");
            assert_eq!(out, loaded(bytes, dtype), "{dtype:?}");
        }
        // Finite in f32, infinite once rounded to bf16.
        let mut out = vec![half::bf16::ZERO; 2];
        let near_max: Vec<u8> = [1.0f32, f32::MAX]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(!convert_slice_to_bf16(&near_max, DType::F32, &mut out));
        let mut nan = bf16_bytes.clone();
        nan[2 * 299 + 1] = 0x7f;
        nan[2 * 299] = 0xc1;
        let mut out = vec![half::bf16::ZERO; 300];
        assert!(!convert_slice_to_bf16(&nan, DType::BF16, &mut out));
    }
}
