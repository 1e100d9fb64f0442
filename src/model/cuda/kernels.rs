//! Compiles `paged_attention.cu` once per process with NVRTC and loads its
//! functions into the device's context (candle caches loaded modules).

use candle_core::cuda_backend::cudarc::driver::CudaFunction;
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::CudaDevice;
use candle_core::Result;
use std::sync::OnceLock;

pub const SOURCE: &str = include_str!("paged_attention.cu");
const MODULE: &str = "gym_serve_paged_attention";

/// The PTX, or why NVRTC refused the source (kept: it will not change).
fn ptx() -> &'static std::result::Result<String, String> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        // No arch: NVRTC's default PTX target, which the driver compiles for
        // the GPU it runs on.
        compile_ptx_with_opts(SOURCE, CompileOptions::default())
            .map(|ptx| ptx.to_src())
            .map_err(|e| format!("NVRTC could not compile paged_attention.cu: {e}"))
    })
}

/// Kernel `name`, launched on the device's stream
/// (`device.cuda_stream().launch_builder(&f)`).
pub fn function(device: &CudaDevice, name: &str) -> Result<CudaFunction> {
    let ptx = ptx()
        .as_ref()
        .map_err(|e| candle_core::Error::Msg(e.clone()))?;
    Ok(device
        .get_or_load_custom_func(name, MODULE, ptx)?
        .into_cuda_function())
}

/// Compiles the kernels and loads one now, so a GPU machine without CUDA
/// 13's `libnvrtc.so.13` (or with a driver too old for its PTX) is refused
/// at start-up with the reason, instead of failing every step. cudarc
/// panics when it cannot open the library: that becomes the error.
pub fn preload(device: &CudaDevice) -> Result<()> {
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        function(device, "paged_attention_bf16_bf16").map(drop)
    }));
    match loaded {
        Ok(result) => result,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            candle_core::bail!(
                "the CUDA attention kernels need NVRTC from CUDA 13 (libnvrtc.so.13): {why}"
            )
        }
    }
}
