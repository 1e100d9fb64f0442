//! A dense projection `y = x W^T (+ b)` over a packed `[tokens, in]` activation.
//!
//! On the CPU in f32, steps of a few rows (decode) run the skinny kernel
//! ([`super::skinny`]) and larger ones BLAS ([`super::blas`]); elsewhere,
//! candle's matmul. Keeping our own type lets that choice live in one place.

use super::blas::{blas, contiguous};
use super::skinny;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` is `[out, in]` as in Hugging Face checkpoints.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2;
        let rows = x.dims().first().copied().unwrap_or(0);
        let skinny = rows <= skinny::MAX_ROWS && skinny::available();
        let y = if cpu_f32 && (skinny || blas().is_some()) {
            x.contiguous()?
                .apply_op2_no_bwd(&self.weight, &CpuMatmulTransposed)?
        } else {
            x.matmul(&self.weight.t()?)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `x @ w^T` for row-major f32 `x: [m, k]` and `w: [n, k]` on the CPU.
struct CpuMatmulTransposed;

impl CustomOp2 for CpuMatmulTransposed {
    fn name(&self) -> &'static str {
        "cpu-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("matmul: inner dims differ ({m}x{k} @ ({n}x{k2})^T)");
        }
        let x = contiguous::<f32>(s1, l1, "input")?;
        let w = contiguous::<f32>(s2, l2, "weight")?;
        let mut out = Vec::with_capacity(m * n);
        if m <= skinny::MAX_ROWS
            && skinny::matmul_t(x, m, k, w, n, &mut out.spare_capacity_mut()[..m * n])
        {
            // SAFETY: the kernel returned true, so it wrote all m * n values.
            unsafe { out.set_len(m * n) };
        } else {
            out.resize(m * n, 0f32);
            match blas() {
                Some(b) => b.matmul_t(x, m, k, w, n, &mut out),
                None => candle_core::bail!("no CPU matmul kernel for {m}x{k} @ ({n}x{k})^T"),
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}
