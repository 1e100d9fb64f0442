//! The low-rank update in the forward pass. The base projection runs once
//! over every row of the step; then each row whose sequence has an adapter
//! gets `y += (x·Aᵀ)·Bᵀ·scale`, in fp32. The rows of one adapter are
//! gathered and both products run on the engine's GEMM
//! ([`crate::model::gemm::matmul_t`]), whose every output is one fixed
//! reduction whatever the number of rows: a row's result is the same
//! whatever else is in the batch (other adapters, the base model, any batch
//! size), and each adapter's factors are read once per step, not once per
//! row. On a GPU the same update runs on the device (`add_on_device`).

use super::adapter::{LoraAdapter, LoraWeights};
use crate::model::gemm::{matmul_t, Weights};
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
        let groups = group_rows(&per_row);
        if !y.device().is_cpu() {
            return add_on_device(y, x, &groups);
        }
        let x_host = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let updates: Vec<Vec<f32>> = groups
            .par_iter()
            .map(|g| group_delta(&x_host, in_dim, &g.rows, g.weights, g.scale))
            .collect();
        let mut delta = vec![0f32; rows * out_dim];
        for (g, update) in groups.iter().zip(&updates) {
            for (&row, values) in g.rows.iter().zip(update.chunks_exact(out_dim)) {
                delta[row * out_dim..(row + 1) * out_dim].copy_from_slice(values);
            }
        }
        let delta = Tensor::from_vec(delta, (rows, out_dim), y.device())?.to_dtype(y.dtype())?;
        // Base rows add exact zeros: their values are unchanged.
        y + delta
    }
}

/// On a GPU: each group's update by the device's matmuls, added into its
/// rows of `y` there, so a step does not copy activations to the host and
/// back for every adapted projection (the CPU path's fixed-order GEMM is
/// for batch invariance, which the GPU does not promise).
fn add_on_device(mut y: Tensor, x: &Tensor, groups: &[Group<'_>]) -> Result<Tensor> {
    let device = y.device().clone();
    let x = x.to_dtype(DType::F32)?;
    for g in groups {
        let rows: Vec<u32> = g.rows.iter().map(|&r| r as u32).collect();
        let rows = Tensor::new(rows.as_slice(), &device)?;
        let (a, b) = g.weights.on(&device)?;
        let delta = x
            .index_select(&rows, 0)?
            .matmul(&a.t()?)?
            .matmul(&b.t()?)?
            .affine(f64::from(g.scale), 0.0)?;
        // The groups' rows are disjoint: each row gets one exact add.
        y = y.index_add(&rows, &delta.to_dtype(y.dtype())?, 0)?;
    }
    Ok(y)
}

/// The rows of a step that share one adapter's factors.
struct Group<'a> {
    weights: &'a LoraWeights,
    scale: f32,
    rows: Vec<usize>,
}

/// Rows gathered by the factors they use (by identity), in row order.
fn group_rows<'a>(per_row: &[Option<(&'a LoraWeights, f32)>]) -> Vec<Group<'a>> {
    let mut groups: Vec<Group<'a>> = Vec::new();
    for (row, w) in per_row.iter().enumerate() {
        let Some((weights, scale)) = *w else {
            continue;
        };
        let same = |g: &&mut Group<'a>| {
            std::ptr::eq(g.weights, weights) && g.scale.to_bits() == scale.to_bits()
        };
        match groups.iter_mut().find(same) {
            Some(g) => g.rows.push(row),
            None => groups.push(Group {
                weights,
                scale,
                rows: vec![row],
            }),
        }
    }
    groups
}

/// `x [m, k] · w[n, k]ᵀ` on the engine's GEMM (one fixed reduction per
/// output, whatever `m`).
fn matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * n);
    matmul_t(
        x,
        m,
        k,
        Weights::F32(w),
        n,
        &mut out.spare_capacity_mut()[..m * n],
    );
    // SAFETY: matmul_t wrote all m * n values.
    unsafe { out.set_len(m * n) };
    out
}

/// The update of rows `rows` of `x` (`in_dim` values each), all under `w`:
/// `((x·Aᵀ)·Bᵀ) * scale`, as PEFT orders it, `[rows.len(), out_dim]`.
fn group_delta(x: &[f32], in_dim: usize, rows: &[usize], w: &LoraWeights, scale: f32) -> Vec<f32> {
    let m = rows.len();
    let mut gathered = Vec::with_capacity(m * in_dim);
    for &row in rows {
        gathered.extend_from_slice(&x[row * in_dim..(row + 1) * in_dim]);
    }
    let t = matmul(&gathered, m, in_dim, &w.a, w.rank);
    let mut out = matmul(&t, m, w.rank, &w.b, w.out_dim);
    for v in &mut out {
        *v *= scale;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> LoraWeights {
        // A = [[1, 2, 3], [0, 1, 0]] (r=2, in=3), B = [[1, 0], [2, 1], [0, 3], [1, 1]] (out=4)
        LoraWeights {
            a: vec![1., 2., 3., 0., 1., 0.],
            b: vec![1., 0., 2., 1., 0., 3., 1., 1.],
            rank: 2,
            in_dim: 3,
            out_dim: 4,
            on_device: Default::default(),
        }
    }

    #[test]
    fn group_delta_is_the_low_rank_product() {
        let w = example();
        // Row 1 is [1, -1, 2]: x·Aᵀ = [1 - 2 + 6, -1] = [5, -1]; ·Bᵀ = [5, 9, -3, 4]; * 0.5
        let x = [9., 9., 9., 1., -1., 2.];
        assert_eq!(group_delta(&x, 3, &[1], &w, 0.5), [2.5, 4.5, -1.5, 2.0]);
    }

    use crate::model::gemm::tests::values;

    #[test]
    fn a_rows_update_does_not_depend_on_its_group() {
        // Off every tile and lane size: in 1031, out 53, rank 16.
        let (in_dim, out_dim, rank) = (1031, 53, 16);
        let w = LoraWeights {
            a: values(1, rank * in_dim),
            b: values(2, out_dim * rank),
            rank,
            in_dim,
            out_dim,
            on_device: Default::default(),
        };
        let rows = 37;
        let x = values(3, rows * in_dim);
        let all: Vec<usize> = (0..rows).collect();
        let together = group_delta(&x, in_dim, &all, &w, 2.0);
        for row in [0, 5, 17, 36] {
            let alone = group_delta(&x, in_dim, &[row], &w, 2.0);
            let got = &together[row * out_dim..(row + 1) * out_dim];
            assert!(
                got.iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {row}"
            );
            let pair = group_delta(&x, in_dim, &[rows - 1 - row, row], &w, 2.0);
            assert!(
                pair[out_dim..]
                    .iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {row} in a pair"
            );
        }
    }

    /// The GPU's way (candle matmuls, `index_add`), run on the CPU: the same
    /// updates as the GEMM path to f32 rounding, only on adapted rows.
    #[test]
    fn device_updates_match_the_host_updates() {
        let (in_dim, out_dim, rank, rows) = (67, 29, 4, 6);
        let factors = |seed| LoraWeights {
            a: values(seed, rank * in_dim),
            b: values(seed + 1, out_dim * rank),
            rank,
            in_dim,
            out_dim,
            on_device: Default::default(),
        };
        let (w1, w2) = (factors(10), factors(20));
        let per_row = [
            Some((&w1, 0.5)),
            None,
            Some((&w2, 2.0)),
            Some((&w1, 0.5)),
            None,
            Some((&w2, 2.0)),
        ];
        let groups = group_rows(&per_row);
        let x_host = values(30, rows * in_dim);
        let y_host = values(40, rows * out_dim);
        let device = candle_core::Device::Cpu;
        let x = Tensor::from_slice(&x_host, (rows, in_dim), &device).unwrap();
        let y = Tensor::from_slice(&y_host, (rows, out_dim), &device).unwrap();
        let got = add_on_device(y, &x, &groups)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut want: Vec<Vec<f32>> = y_host.chunks(out_dim).map(<[f32]>::to_vec).collect();
        for g in &groups {
            let delta = group_delta(&x_host, in_dim, &g.rows, g.weights, g.scale);
            for (&row, d) in g.rows.iter().zip(delta.chunks(out_dim)) {
                for (w, d) in want[row].iter_mut().zip(d) {
                    *w += d;
                }
            }
        }
        for (row, (g, w)) in got.iter().zip(&want).enumerate() {
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "row {row}: {a} vs {b}"
                );
            }
            if per_row[row].is_none() {
                assert_eq!(
                    g,
                    &y_host[row * out_dim..(row + 1) * out_dim],
                    "base row {row}"
                );
            }
        }
        // The factors stay uploaded for the next step.
        assert!(w1.on_device.get().is_some() && w2.on_device.get().is_some());
    }

    #[test]
    fn rows_group_by_their_factors() {
        let (w1, w2) = (example(), example());
        let per_row = [
            Some((&w1, 1.0)),
            None,
            Some((&w2, 1.0)),
            Some((&w1, 1.0)),
            Some((&w1, 2.0)),
        ];
        let groups = group_rows(&per_row);
        let rows: Vec<Vec<usize>> = groups.iter().map(|g| g.rows.clone()).collect();
        assert_eq!(rows, [vec![0, 3], vec![2], vec![4]]);
    }
}
