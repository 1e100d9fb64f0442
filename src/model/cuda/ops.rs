//! candle ops around the kernels of `paged_attention.cu`.

use super::kernels::function;
use crate::model::paged_meta::{Dims, WARPS};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Storage, Tensor,
};

/// The largest head the kernel holds in registers (`MAX_HEAD_DIM`).
pub const MAX_HEAD_DIM: usize = 256;

fn dtype_name(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("the CUDA attention kernels take f32 or bf16, not {other:?}"),
    }
}

fn view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("paged attention: {what} must be contiguous");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// Causal attention of a step's query rows over the pool, reading each
/// row's positions through its block table (`meta`, see `paged_meta`).
pub struct PagedAttentionOp<'a> {
    pub meta: &'a Tensor,
    pub rows: usize,
    pub dims: Dims,
}

impl PagedAttentionOp<'_> {
    fn launch<Q: CudaDType + DeviceRepr, KV: CudaDType + DeviceRepr>(
        &self,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
        name: &str,
    ) -> Result<CudaSlice<Q>> {
        let dev = qs.device();
        let d = self.dims;
        let q = view::<Q>(qs, ql, "queries")?;
        let k = view::<KV>(ks, kl, "keys")?;
        let v = view::<KV>(vs, vl, "values")?;
        let (meta_storage, meta_layout) = self.meta.storage_and_layout();
        let Storage::Cuda(meta_storage) = &*meta_storage else {
            candle_core::bail!("paged attention: the step's metadata is not on the GPU");
        };
        let meta = view::<u32>(meta_storage, meta_layout, "metadata")?;
        let func = function(dev, name)?;
        // SAFETY: the kernel writes every element (each row's every head).
        let out = unsafe { dev.alloc::<Q>(self.rows * d.heads * d.head_dim)? };
        let cfg = LaunchConfig {
            grid_dim: (self.rows as u32, d.heads as u32, 1),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, heads, kv_heads, head_dim, block_size) = (
            self.rows as i32,
            d.heads as i32,
            d.kv_heads as i32,
            d.head_dim as i32,
            d.block_size as i32,
        );
        let (slots, scale) = (d.slots as i64, 1.0f32 / (d.head_dim as f32).sqrt());
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&q).arg(&k).arg(&v).arg(&meta).arg(&out);
        b.arg(&rows).arg(&heads).arg(&kv_heads).arg(&head_dim);
        b.arg(&block_size).arg(&slots).arg(&scale);
        // SAFETY: the arguments match the kernel's signature; the metadata's
        // tables index only slots inside the pool (the engine's block tables).
        unsafe { b.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp3 for PagedAttentionOp<'_> {
    fn name(&self) -> &'static str {
        "paged-attention-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("paged-attention-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if ks.dtype() != vs.dtype() {
            candle_core::bail!("paged attention: keys and values differ in dtype");
        }
        let name = format!(
            "paged_attention_{}_{}",
            dtype_name(qs.dtype())?,
            dtype_name(ks.dtype())?
        );
        let (q, k, v) = ((qs, ql), (ks, kl), (vs, vl));
        let dev = qs.device().clone();
        let slice = match (qs.dtype(), ks.dtype()) {
            (DType::F32, DType::F32) => {
                CudaStorageSlice::F32(self.launch::<f32, f32>(q, k, v, &name)?)
            }
            (DType::F32, _) => {
                CudaStorageSlice::F32(self.launch::<f32, half::bf16>(q, k, v, &name)?)
            }
            (_, DType::F32) => {
                CudaStorageSlice::BF16(self.launch::<half::bf16, f32>(q, k, v, &name)?)
            }
            _ => CudaStorageSlice::BF16(self.launch::<half::bf16, half::bf16>(q, k, v, &name)?),
        };
        let shape = Shape::from((self.rows, self.dims.heads * self.dims.head_dim));
        Ok((CudaStorage { slice, device: dev }, shape))
    }
}

/// `pool[h, slots[i]] = rows[i, h]` (rows `[n, kv_heads, head_dim]`), in
/// place, converted to the pool's dtype.
pub struct WriteRowsOp<'a> {
    pub slots: &'a Tensor,
}

impl WriteRowsOp<'_> {
    fn launch<R: CudaDType + DeviceRepr, KV: CudaDType + DeviceRepr>(
        &self,
        pool: &mut CudaStorage,
        pl: &Layout,
        rs: &CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        let (kv_heads, slots, head_dim) = pl.shape().dims3()?;
        let (n, heads, dim) = rl.shape().dims3()?;
        if heads != kv_heads || dim != head_dim {
            candle_core::bail!("kv rows [{n}, {heads}, {dim}] do not fit the pool");
        }
        let name = format!(
            "write_rows_{}_{}",
            dtype_name(rs.dtype())?,
            dtype_name(pool.dtype())?
        );
        let dev = pool.device().clone();
        let func = function(&dev, &name)?;
        let rows = view::<R>(rs, rl, "kv rows")?;
        let (slot_storage, slot_layout) = self.slots.storage_and_layout();
        let Storage::Cuda(slot_storage) = &*slot_storage else {
            candle_core::bail!("kv write: the step's slots are not on the GPU");
        };
        let slot_of = view::<u32>(slot_storage, slot_layout, "slots")?;
        let Some((p0, p1)) = pl.contiguous_offsets() else {
            candle_core::bail!("kv write: the pool must be contiguous");
        };
        let mut pool = pool.as_cuda_slice_mut::<KV>()?.slice_mut(p0..p1);
        let total = (n * kv_heads * head_dim) as u32;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, kv_heads, head_dim, slots) =
            (n as i32, kv_heads as i32, head_dim as i32, slots as i64);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&rows).arg(&slot_of).arg(&mut pool);
        b.arg(&n).arg(&kv_heads).arg(&head_dim).arg(&slots);
        // SAFETY: the arguments match the kernel; slots come from the
        // engine's block tables, which stay inside the pool.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

impl InplaceOp2 for WriteRowsOp<'_> {
    fn name(&self) -> &'static str {
        "kv-write-rows-cuda"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        candle_core::bail!("kv-write-rows-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        pool: &mut CudaStorage,
        pl: &Layout,
        rows: &CudaStorage,
        rl: &Layout,
    ) -> Result<()> {
        match (rows.dtype(), pool.dtype()) {
            (DType::F32, DType::F32) => self.launch::<f32, f32>(pool, pl, rows, rl),
            (DType::F32, _) => self.launch::<f32, half::bf16>(pool, pl, rows, rl),
            (_, DType::F32) => self.launch::<half::bf16, f32>(pool, pl, rows, rl),
            _ => self.launch::<half::bf16, half::bf16>(pool, pl, rows, rl),
        }
    }
}
