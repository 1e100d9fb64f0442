//! A dense projection `y = x W^T (+ b)` over a packed `[tokens, in]` activation.
//!
//! On the CPU in f32 it calls BLAS ([`super::blas`]); elsewhere, candle's
//! matmul. Keeping our own type lets that choice live in one place.

use super::blas::{blas, MatmulTransposed};
use candle_core::{DType, Result, Tensor};

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
        let y = match blas() {
            Some(b) if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2 => x
                .contiguous()?
                .apply_op2_no_bwd(&self.weight, &MatmulTransposed(b))?,
            _ => x.matmul(&self.weight.t()?)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
