//! The engine's own CUDA kernels (built with `--features cuda`): paged
//! attention straight from the block pool, KV-cache writes, and the device
//! memory query that sizes the pool. The kernels are CUDA C compiled by
//! NVRTC the first time a step needs them (`paged_attention.cu`).
//!
//! Not yet verified on a GPU: this compiles (`scripts/build-cuda.sh`), the
//! kernel source compiles under NVRTC (`scripts/nvrtc-check.py`), and its
//! algorithm is checked on the CPU (`model::paged_meta::reference`).

pub mod kernels;
pub mod memory;
pub mod ops;
