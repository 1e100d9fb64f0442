//! A dense projection `y = x W^T (+ b)` over a packed `[tokens, in]` activation.
//!
//! Kept as our own type (not `candle_nn::Linear`) so the CPU path can later call
//! a tuned BLAS without touching the model code.

use candle_core::{Result, Tensor};

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
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
