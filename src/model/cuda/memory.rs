//! Free and total memory of the GPU a tensor lives on.

use candle_core::Device;

/// `(free, total)` bytes, or None off CUDA (or if the driver will not say).
pub fn free_and_total(device: &Device) -> Option<(usize, usize)> {
    match device {
        Device::Cuda(cuda) => cuda.cuda_stream().context().mem_get_info().ok(),
        _ => None,
    }
}
