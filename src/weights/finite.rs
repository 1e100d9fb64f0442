//! Refusing NaN and infinite weights. One such value makes every logit NaN
//! and every log-prob the sampler's floor, silently, so updates and loads
//! check each tensor by name. A value is non-finite exactly when its
//! exponent bits are all ones; the checks compare and OR those bits, which
//! vectorizes even on baseline x86-64 (SSE2 has no unsigned max). Pushed
//! bytes are checked while they convert ([`super::convert`]).

use super::WeightsError;
use candle_core::{CpuStorage, DType, Storage, Tensor};

pub(crate) const F32_EXP: u32 = 0x7f80_0000;
pub(crate) const BF16_EXP: u16 = 0x7f80;
const F16_EXP: u16 = 0x7c00;
const F64_EXP: u64 = 0x7ff0_0000_0000_0000;

fn finite_u16(bits: impl Iterator<Item = u16>, exp: u16) -> bool {
    bits.fold(0u16, |bad, b| bad | ((b & exp) == exp) as u16) == 0
}

fn finite_u32(bits: impl Iterator<Item = u32>) -> bool {
    bits.fold(0u32, |bad, b| bad | ((b & F32_EXP) == F32_EXP) as u32) == 0
}

fn finite_u64(bits: impl Iterator<Item = u64>) -> bool {
    bits.fold(0u64, |bad, b| bad | ((b & F64_EXP) == F64_EXP) as u64) == 0
}

/// Whether little-endian `bytes` of `dtype` hold only finite values.
pub fn bytes_finite(bytes: &[u8], dtype: DType) -> bool {
    let u16s = || {
        bytes
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    match dtype {
        DType::BF16 => finite_u16(u16s(), BF16_EXP),
        DType::F16 => finite_u16(u16s(), F16_EXP),
        DType::F32 => finite_u32(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        DType::F64 => finite_u64(
            bytes
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
        ),
        // Integer dtypes are refused before conversion; nothing to check.
        _ => true,
    }
}

/// Refuses `tensor` (named `name`) if any value is NaN or infinite.
pub fn check_tensor(name: &str, tensor: &Tensor) -> Result<(), WeightsError> {
    let finite = match cpu_finite(tensor) {
        Some(finite) => finite,
        None => device_finite(tensor)?,
    };
    if finite {
        Ok(())
    } else {
        Err(WeightsError::NonFinite(name.to_string()))
    }
}

/// Scans a contiguous CPU tensor in place; `None` for anything else.
fn cpu_finite(tensor: &Tensor) -> Option<bool> {
    let (storage, layout) = tensor.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    Some(match cpu {
        CpuStorage::F32(v) => finite_u32(v[start..end].iter().map(|x| x.to_bits())),
        CpuStorage::BF16(v) => finite_u16(v[start..end].iter().map(|x| x.to_bits()), BF16_EXP),
        CpuStorage::F16(v) => finite_u16(v[start..end].iter().map(|x| x.to_bits()), F16_EXP),
        CpuStorage::F64(v) => finite_u64(v[start..end].iter().map(|x| x.to_bits())),
        _ => return None,
    })
}

/// On a GPU: `x - x` is 0 for every finite value and NaN otherwise, and a
/// sum keeps a NaN, so one reduction answers without copying to the host.
/// Summed in the tensor's own dtype (a sum of zeros is exact in any), so
/// no f32 copy of a large bf16 tensor is made.
fn device_finite(tensor: &Tensor) -> Result<bool, WeightsError> {
    let total = tensor
        .sub(tensor)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(total.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn every_dtype_finds_nan_and_inf_anywhere() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 17, 99] {
                let mut v = vec![1.5f32; 100];
                v[at] = bad;
                let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
                for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
                    let t = t.to_dtype(dtype).unwrap();
                    let bytes: Vec<u8> = match dtype {
                        DType::F32 => t
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                        DType::BF16 => t
                            .to_vec1::<half::bf16>()
                            .unwrap()
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                        DType::F16 => t
                            .to_vec1::<half::f16>()
                            .unwrap()
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                        _ => t
                            .to_vec1::<f64>()
                            .unwrap()
                            .iter()
                            .flat_map(|x| x.to_le_bytes())
                            .collect(),
                    };
                    assert!(!bytes_finite(&bytes, dtype), "{dtype:?}");
                    let e = check_tensor("w", &t).unwrap_err().to_string();
                    assert!(e.contains("w"), "{e}");
                    assert!(device_finite(&t).is_ok_and(|f| !f), "{dtype:?}");
                }
            }
        }
        let t = Tensor::new(&[f32::MAX, f32::MIN, 0.0, -0.0], &Device::Cpu).unwrap();
        check_tensor("w", &t).unwrap();
        assert!(device_finite(&t.to_dtype(DType::F64).unwrap()).unwrap());
    }
}
