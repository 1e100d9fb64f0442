//! The low-rank update in the forward pass. The base projection runs once
//! over every row of the step; then each row whose sequence has an adapter
//! gets `y += (x·Aᵀ)·Bᵀ·scale`, in fp32, by a per-row kernel whose
//! summation order is fixed: a row's result is the same whatever else is in
//! the batch (other adapters, the base model, any batch size).

use super::adapter::{LoraAdapter, LoraWeights};
use crate::model::linear::Linear;
use crate::weights::names::LayerModule;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Which adapter each packed row of a step uses (`None`: the base model).
#[derive(Debug, Default)]
pub struct StepAdapters<'a> {
    rows: Vec<Option<&'a LoraAdapter>>,
}

impl<'a> StepAdapters<'a> {
    /// `rows[i]` is the adapter of packed row i; all `None` costs nothing.
    pub fn new(rows: Vec<Option<&'a LoraAdapter>>) -> Self {
        if rows.iter().all(Option::is_none) {
            return Self::default();
        }
        Self { rows }
    }

    /// The view one decoder layer uses.
    pub fn layer(&self, layer: usize) -> LayerAdapters<'_> {
        LayerAdapters { step: self, layer }
    }
}

/// [`StepAdapters`] at one layer.
#[derive(Clone, Copy)]
pub struct LayerAdapters<'a> {
    step: &'a StepAdapters<'a>,
    layer: usize,
}

impl LayerAdapters<'_> {
    /// `linear(x)` plus each adapted row's low-rank update for `module`.
    pub fn project(&self, module: LayerModule, linear: &Linear, x: &Tensor) -> Result<Tensor> {
        let y = linear.forward(x)?;
        let per_row: Vec<Option<(&LoraWeights, f32)>> = self
            .step
            .rows
            .iter()
            .map(|a| a.and_then(|a| Some((a.weights(self.layer, module)?, a.scale))))
            .collect();
        if per_row.iter().all(Option::is_none) {
            return Ok(y);
        }
        let (rows, out_dim) = y.dims2()?;
        let in_dim = x.dims2()?.1;
        if rows != per_row.len() {
            candle_core::bail!("adapter rows {} != step rows {rows}", per_row.len());
        }
        let x_host = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut delta = vec![0f32; rows * out_dim];
        delta
            .par_chunks_mut(out_dim)
            .zip(x_host.par_chunks(in_dim))
            .zip(per_row.par_iter())
            .for_each(|((out, x), w)| {
                if let Some((w, scale)) = w {
                    row_delta(x, w, *scale, out);
                }
            });
        let delta = Tensor::from_vec(delta, (rows, out_dim), y.device())?.to_dtype(y.dtype())?;
        // Base rows add exact zeros: their values are unchanged.
        y + delta
    }
}

/// Lanes of the fixed-order dot product (vectorizes to one register).
const LANES: usize = 8;

/// `sum(a[i] * b[i])` in a fixed order: eight running sums over the
/// aligned part, then the tail, then the lanes left to right.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ta.iter().zip(tb) {
        tail += x * y;
    }
    acc.iter().sum::<f32>() + tail
}

/// One row's update: `out = ((x·Aᵀ)·Bᵀ) * scale`, as PEFT orders it.
fn row_delta(x: &[f32], w: &LoraWeights, scale: f32, out: &mut [f32]) {
    let t: Vec<f32> = w.a.chunks_exact(w.in_dim).map(|a| dot(x, a)).collect();
    for (o, b) in out.iter_mut().zip(w.b.chunks_exact(w.rank)) {
        *o = dot(&t, b) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_delta_is_the_low_rank_product() {
        // A = [[1, 2, 3], [0, 1, 0]] (r=2, in=3), B = [[1, 0], [2, 1], [0, 3], [1, 1]] (out=4)
        let w = LoraWeights {
            a: vec![1., 2., 3., 0., 1., 0.],
            b: vec![1., 0., 2., 1., 0., 3., 1., 1.],
            rank: 2,
            in_dim: 3,
            out_dim: 4,
        };
        let x = [1., -1., 2.];
        // x·Aᵀ = [1 - 2 + 6, -1] = [5, -1]; ·Bᵀ = [5, 9, -3, 4]; * 0.5
        let mut out = [0f32; 4];
        row_delta(&x, &w, 0.5, &mut out);
        assert_eq!(out, [2.5, 4.5, -1.5, 2.0]);
    }

    #[test]
    fn dot_covers_lanes_and_tail() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b = vec![1f32; 19];
        assert_eq!(dot(&a, &b), (0..19).sum::<i32>() as f32);
    }
}
