//! Per-sequence key/value cache: one growable buffer per layer, laid out
//! `[positions, kv_heads, head_dim]` so appending a step is one contiguous write.
//!
//! Capacity doubles when full, so a sequence of length L costs O(L) copies in
//! total. (A shared block pool with prefix reuse replaces this in the
//! engine-throughput work; the model only needs `append` and `len`.)

use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Default)]
struct LayerKv {
    keys: Option<Tensor>,
    values: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

const INITIAL_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerKv::default(); num_layers],
            len: 0,
        }
    }

    /// Tokens already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `k`, `v` (`[new, kv_heads, head_dim]`) to `layer` and returns views
    /// of all cached keys and values including them. The sequence length moves
    /// forward once the last layer has been appended.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dims()[0];
        let start = self.len;
        let total = start + new;
        let entry = &mut self.layers[layer];
        let keys = grow(entry.keys.take(), k, start, total)?;
        let values = grow(entry.values.take(), v, start, total)?;
        keys.slice_set(&k.contiguous()?, 0, start)?;
        values.slice_set(&v.contiguous()?, 0, start)?;
        let out = (keys.narrow(0, 0, total)?, values.narrow(0, 0, total)?);
        entry.keys = Some(keys);
        entry.values = Some(values);
        if layer + 1 == self.layers.len() {
            self.len = total;
        }
        Ok(out)
    }
}

/// Returns a buffer with room for `needed` rows holding the first `used` rows of
/// `buf` (allocating, like `Vec`, at double the size when it is too small).
fn grow(buf: Option<Tensor>, like: &Tensor, used: usize, needed: usize) -> Result<Tensor> {
    if let Some(b) = &buf {
        if b.dims()[0] >= needed {
            return Ok(b.clone());
        }
    }
    let cap = needed.next_power_of_two().max(INITIAL_CAPACITY);
    let (_, heads, dim) = like.dims3()?;
    let fresh = Tensor::zeros((cap, heads, dim), like.dtype(), like.device())?;
    if let Some(old) = buf {
        if used > 0 {
            fresh.slice_set(&old.narrow(0, 0, used)?, 0, 0)?;
        }
    }
    Ok(fresh)
}
