//! A pushed tensor for an engine on a GPU: its bytes are checked where they
//! are (a scan of the exponent bits, no conversion), uploaded as they came (a
//! bf16 push crosses the bus at 2 bytes a value), and converted to the run
//! dtype on the device. The host never makes a converted copy.

use super::finite::{bytes_finite, check_tensor};
use super::WeightsError;
use candle_core::{DType, Device, Tensor};

/// Whether converting `from` to `to` can turn a finite value infinite
/// (f64 past f32's range, f32 past f16's, f32 rounding up past bf16's).
fn can_overflow(from: DType, to: DType) -> bool {
    from.size_in_bytes() > to.size_in_bytes() || (from == DType::F32 && to == DType::F16)
}

pub(crate) fn convert_on_device(
    name: &str,
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    run: DType,
    device: &Device,
) -> Result<Tensor, WeightsError> {
    if !bytes_finite(bytes, dtype) {
        return Err(WeightsError::NonFinite(name.to_string()));
    }
    let tensor = Tensor::from_raw_buffer(bytes, dtype, shape, device)?.to_dtype(run)?;
    if can_overflow(dtype, run) {
        check_tensor(name, &tensor)?;
    }
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::convert::convert_bytes;

    fn bytes_of(t: &Tensor) -> Vec<u8> {
        let n = t.elem_count() * t.dtype().size_in_bytes();
        let mut out = Vec::with_capacity(n);
        match t.dtype() {
            DType::F32 => t
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .for_each(|v| out.extend(v.to_le_bytes())),
            DType::BF16 => t
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .for_each(|v| out.extend(v.to_le_bytes())),
            d => panic!("{d:?}"),
        }
        out
    }

    /// On the CPU the device path must give what the host path gives, bit
    /// for bit, for what trainers push (bf16 and f32) into f32 and bf16 engines.
    #[test]
    fn matches_the_host_conversion() {
        let values: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.37).collect();
        let source = Tensor::from_vec(values, 1000, &Device::Cpu).unwrap();
        for from in [DType::F32, DType::BF16] {
            let bytes = bytes_of(&source.to_dtype(from).unwrap());
            for run in [DType::F32, DType::BF16] {
                let ours =
                    convert_on_device("w", &bytes, from, &[1000], run, &Device::Cpu).unwrap();
                let host = convert_bytes("w", &bytes, from, &[1000], run, &Device::Cpu).unwrap();
                assert_eq!(ours.dtype(), run);
                assert_eq!(
                    bytes_of(&ours.to_dtype(DType::F32).unwrap()),
                    bytes_of(&host.to_dtype(DType::F32).unwrap()),
                    "{from:?} -> {run:?}"
                );
            }
        }
    }

    #[test]
    fn refuses_nan_and_values_that_overflow_on_the_way() {
        let nan = f32::NAN.to_le_bytes();
        let err = convert_on_device("w", &nan, DType::F32, &[1], DType::BF16, &Device::Cpu);
        assert!(matches!(err, Err(WeightsError::NonFinite(n)) if n == "w"));
        // Finite in f32, infinite once rounded to bf16.
        let big = f32::MAX.to_le_bytes();
        let err = convert_on_device("big", &big, DType::F32, &[1], DType::BF16, &Device::Cpu);
        assert!(matches!(err, Err(WeightsError::NonFinite(n)) if n == "big"));
        // Widening never overflows, and is not re-checked.
        let one = half::bf16::from_f32(1.0).to_le_bytes();
        let t =
            convert_on_device("one", &one, DType::BF16, &[1], DType::F32, &Device::Cpu).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), [1.0]);
    }
}
