//! The key/value pool: for every layer, one tensor of `[kv_heads, slots,
//! head_dim]` keys and one of values, carved into fixed-size blocks.
//!
//! A sequence owns a list of block IDs (its block table); its position `p`
//! lives in slot `table[p / block_size] * block_size + p % block_size`. The
//! pool is allocated once, so it is the only memory that grows with tokens.
//! Head-major so that one head's keys for a block are one contiguous run:
//! attention reads a head's cache block by block, and the memory prefetcher
//! follows runs, not rows scattered a page apart.
//! Which blocks are free or shared is the engine's bookkeeping
//! (`engine::block_pool`); this type only stores and reads rows.

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor};

pub struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: usize,
}

impl KvPool {
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let slots = num_blocks * block_size;
        let alloc = || Tensor::zeros((kv_heads, slots, head_dim), dtype, device);
        Ok(Self {
            keys: (0..num_layers).map(|_| alloc()).collect::<Result<_>>()?,
            values: (0..num_layers).map(|_| alloc()).collect::<Result<_>>()?,
            block_size,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// What keys and values are stored as.
    pub fn dtype(&self) -> DType {
        self.keys.first().map_or(DType::F32, |t| t.dtype())
    }

    pub fn keys(&self, layer: usize) -> &Tensor {
        &self.keys[layer]
    }

    pub fn values(&self, layer: usize) -> &Tensor {
        &self.values[layer]
    }

    /// Bytes the pool holds.
    pub fn size_in_bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Copies the first `rows` positions of block `src` into block `dst`, in
    /// every layer (the copy-on-write of a shared, partly filled block).
    pub fn copy_block(&self, src: u32, dst: u32, rows: usize) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        let (src, dst) = (
            src as usize * self.block_size,
            dst as usize * self.block_size,
        );
        for t in self.keys.iter().chain(&self.values) {
            // A real copy: a narrowed view shares the pool's storage.
            let part = t.narrow(1, src, rows)?.force_contiguous()?;
            t.slice_set(&part, 1, dst)?;
        }
        Ok(())
    }

    /// Writes rows `k[i]`, `v[i]` (`[n, kv_heads, head_dim]`) into `slots[i]`
    /// of `layer`, rounded to the pool's dtype.
    pub fn write(&self, layer: usize, slots: &[u32], k: &Tensor, v: &Tensor) -> Result<()> {
        for (pool, rows) in [(&self.keys[layer], k), (&self.values[layer], v)] {
            let rows = &rows.to_dtype(pool.dtype())?;
            if pool.device().is_cpu() {
                pool.inplace_op2(&rows.contiguous()?, &WriteRows { slots })?;
            } else {
                let (n, heads, dim) = rows.dims3()?;
                let idx = Tensor::from_slice(slots, n, pool.device())?
                    .reshape((1, n, 1))?
                    .broadcast_as((heads, n, dim))?
                    .contiguous()?;
                pool.scatter_set(&idx, &rows.transpose(0, 1)?.contiguous()?, 1)?;
            }
        }
        Ok(())
    }
}

/// Slot of position `pos` for a sequence with `table`.
pub fn slot(table: &[u32], block_size: usize, pos: usize) -> u32 {
    table[pos / block_size] * block_size as u32 + (pos % block_size) as u32
}

/// CPU in-place row copy: `pool[h, slots[i]] = rows[i, h]` for every head `h`.
struct WriteRows<'a> {
    slots: &'a [u32],
}

impl InplaceOp2 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pl: &Layout,
        rows: &CpuStorage,
        rl: &Layout,
    ) -> Result<()> {
        let (heads, pool_slots, dim) = pl.shape().dims3()?;
        let (Some((p0, _)), Some((r0, r1))) = (pl.contiguous_offsets(), rl.contiguous_offsets())
        else {
            candle_core::bail!("kv pool and rows must be contiguous");
        };
        if r1 - r0 != self.slots.len() * heads * dim {
            candle_core::bail!("kv rows do not match {} slots", self.slots.len());
        }
        if let Some(&s) = self.slots.iter().find(|&&s| s as usize >= pool_slots) {
            candle_core::bail!("kv slot {s} is outside the pool ({pool_slots} slots)");
        }
        macro_rules! copy_rows {
            ($dst:expr, $src:expr) => {{
                let src = &$src[r0..r1];
                for (i, &s) in self.slots.iter().enumerate() {
                    for h in 0..heads {
                        let at = p0 + (h * pool_slots + s as usize) * dim;
                        let from = (i * heads + h) * dim;
                        $dst[at..at + dim].copy_from_slice(&src[from..from + dim]);
                    }
                }
            }};
        }
        match (pool, rows) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => copy_rows!(d, s),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => copy_rows!(d, s),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => copy_rows!(d, s),
            _ => candle_core::bail!("kv pool and rows differ in dtype"),
        }
        Ok(())
    }
}
