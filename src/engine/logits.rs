//! A step's logits as rows of f32 on the host, for the sampler.
//!
//! On the CPU the rows are read where the forward pass wrote them: copying
//! them out (32 decode rows of a 150k vocabulary are 19 MB) cost a step
//! about 1% of its time, on the engine thread while the workers waited.
//! From a GPU (with `--sampling-transfer rows`) they are copied to the host
//! once; by default a GPU's rows stay there (`device_sampling`).

use candle_core::{DType, Result, Storage, StorageRef, Tensor};

pub struct HostLogits<'t> {
    data: Data<'t>,
    width: usize,
}

enum Data<'t> {
    /// The tensor's own CPU storage and the range of it the tensor covers.
    Borrowed(StorageRef<'t>, usize, usize),
    Copied(Vec<f32>),
}

impl<'t> HostLogits<'t> {
    /// `logits` is `[rows, vocab]`, f32.
    pub fn new(logits: &'t Tensor) -> Result<Self> {
        let (_, width) = logits.dims2()?;
        if logits.dtype() != DType::F32 {
            candle_core::bail!("logits must be f32, not {:?}", logits.dtype());
        }
        let (storage, layout) = logits.storage_and_layout();
        let data = match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(_), Some((start, end))) => Data::Borrowed(storage, start, end),
            _ => {
                drop(storage);
                Data::Copied(logits.flatten_all()?.to_vec1()?)
            }
        };
        Ok(Self { data, width })
    }

    /// Every row, in order.
    pub fn rows(&self) -> Result<std::slice::ChunksExact<'_, f32>> {
        let flat = match &self.data {
            Data::Borrowed(storage, start, end) => match &**storage {
                Storage::Cpu(cpu) => &cpu.as_slice::<f32>()?[*start..*end],
                _ => candle_core::bail!("borrowed logits are on the CPU"),
            },
            Data::Copied(values) => values.as_slice(),
        };
        // A zero-width chunk would panic; a vocabulary is never empty.
        Ok(flat.chunks_exact(self.width.max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rows_of_a_whole_tensor_and_of_a_view() {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((4, 3))
            .unwrap();
        let host = HostLogits::new(&t).unwrap();
        let rows: Vec<&[f32]> = host.rows().unwrap().collect();
        assert_eq!(
            rows,
            [
                &[0., 1., 2.][..],
                &[3., 4., 5.],
                &[6., 7., 8.],
                &[9., 10., 11.]
            ]
        );
        // Rows 1..3 of the same storage (an offset view).
        let view = t.narrow(0, 1, 2).unwrap();
        let host = HostLogits::new(&view).unwrap();
        let rows: Vec<&[f32]> = host.rows().unwrap().collect();
        assert_eq!(rows, [&[3., 4., 5.][..], &[6., 7., 8.]]);
        // A transposed view is not contiguous: copied.
        let t = t.t().unwrap();
        let host = HostLogits::new(&t).unwrap();
        assert_eq!(host.rows().unwrap().next().unwrap(), &[0., 3., 6., 9.]);
    }
}
