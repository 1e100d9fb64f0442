//! Refusing NaN and infinite weights. One such value makes every logit NaN
//! and every log-prob the sampler's floor, silently, so updates and loads
//! check each tensor by name. The checks look at exponent bits only (all
//! ones is exactly inf or NaN) and reduce with an integer max, which the
//! compiler vectorizes; [`F32Exponents`] folds the check into a conversion
//! loop that is already touching every value.

use super::WeightsError;
use candle_core::{CpuStorage, DType, Storage, Tensor};

const F32_EXP: u32 = 0x7f80_0000;
const BF16_EXP: u16 = 0x7f80;
const F16_EXP: u16 = 0x7c00;
const F64_EXP: u64 = 0x7ff0_0000_0000_0000;

/// The running max of f32 exponent fields, for conversion loops.
#[derive(Debug, Default, Clone, Copy)]
pub struct F32Exponents(u32);

impl F32Exponents {
    #[inline(always)]
    pub fn see(&mut self, v: f32) {
        self.0 = self.0.max(v.to_bits() & F32_EXP);
    }

    pub fn all_finite(self) -> bool {
        self.0 != F32_EXP
    }
}

fn finite_f32(values: &[f32]) -> bool {
    values.iter().fold(0, |m, v| m.max(v.to_bits() & F32_EXP)) != F32_EXP
}

fn finite_u16(bits: impl Iterator<Item = u16>, exp: u16) -> bool {
    bits.fold(0, |m, b| m.max(b & exp)) != exp
}

fn finite_f64(values: &[f64]) -> bool {
    values.iter().fold(0, |m, v| m.max(v.to_bits() & F64_EXP)) != F64_EXP
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
        CpuStorage::F32(v) => finite_f32(&v[start..end]),
        CpuStorage::BF16(v) => finite_u16(v[start..end].iter().map(|x| x.to_bits()), BF16_EXP),
        CpuStorage::F16(v) => finite_u16(v[start..end].iter().map(|x| x.to_bits()), F16_EXP),
        CpuStorage::F64(v) => finite_f64(&v[start..end]),
        _ => return None,
    })
}

/// On a GPU: `x - x` is 0 for every finite value and NaN otherwise, and a
/// sum keeps a NaN, so one reduction answers without copying to the host.
fn device_finite(tensor: &Tensor) -> Result<bool, WeightsError> {
    let total = tensor
        .sub(tensor)?
        .to_dtype(DType::F32)?
        .sum_all()?
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
