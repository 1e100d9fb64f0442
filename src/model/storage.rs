//! Reading candle's CPU storage from our own kernels.

use candle_core::{CpuStorage, Layout, Result};

/// The elements of a contiguous CPU tensor, of type `T`.
pub(crate) fn contiguous<'s, T: candle_core::WithDType>(
    s: &'s CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'s [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}
