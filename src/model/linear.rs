//! A dense projection `y = x W^T (+ b)` over a packed `[tokens, in]` activation.
//!
//! On the CPU, f32 activations against f32 or bf16 weights run our GEMM
//! ([`super::gemm`]) for every number of tokens, so a row's result never
//! depends on what else is in the step; elsewhere, candle's matmul.
//! Keeping our own type lets that choice live in one place. With
//! `--compute-dtype bf16`, bf16 weights take bf16-rounded activations
//! instead ([`gemm::bf16_products`]).

use super::gemm::{self, bf16_products, Weights};
use super::storage::contiguous;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static FAST_NONDETERMINISTIC: AtomicBool = AtomicBool::new(false);
static BF16_PRODUCTS: AtomicBool = AtomicBool::new(false);

/// Steps of more than this many rows go to candle's matmul in the
/// `--fast-nondeterministic` mode.
pub const FAST_MODE_MIN_ROWS: usize = 65;

/// `--fast-nondeterministic`, process-wide: CPU steps of
/// [`FAST_MODE_MIN_ROWS`] rows or more (prefill) run candle's blocked
/// matmul, whose summation order depends on the shape, so a position's
/// results then depend on how its prompt was split into steps (cache hits,
/// chunking, batch company). Off by default.
pub fn set_fast_nondeterministic(on: bool) {
    FAST_NONDETERMINISTIC.store(on, Ordering::Relaxed);
}

pub fn fast_nondeterministic() -> bool {
    FAST_NONDETERMINISTIC.load(Ordering::Relaxed)
}

/// `--compute-dtype bf16`, process-wide: CPU projections with bf16 weights
/// round their activations to bf16 and multiply with the CPU's BF16 dot
/// products ([`bf16_products`]); still one fixed reduction per output, so
/// results stay batch-invariant, but they are no longer those of exact f32
/// arithmetic. Off (exact f32) by default; callers check
/// [`bf16_products::supported`] first.
pub fn set_bf16_products(on: bool) {
    BF16_PRODUCTS.store(on, Ordering::Relaxed);
}

pub fn bf16_products_on() -> bool {
    BF16_PRODUCTS.load(Ordering::Relaxed)
}

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
        let cpu = x.device().is_cpu() && self.weight.device().is_cpu();
        let ours = cpu
            && x.dtype() == DType::F32
            && x.rank() == 2
            && matches!(self.weight.dtype(), DType::F32 | DType::BF16);
        let rows = x.dims().first().copied().unwrap_or(0);
        let bf16_products = bf16_products_on() && self.weight.dtype() == DType::BF16;
        // bf16 products outrun candle's f32 matmul at every size.
        let fast = fast_nondeterministic() && rows >= FAST_MODE_MIN_ROWS && !bf16_products;
        let y = if ours && !fast {
            x.contiguous()?
                .apply_op2_no_bwd(&self.weight, &CpuMatmulTransposed { bf16_products })?
        } else {
            x.matmul(&self.weight.to_dtype(x.dtype())?.t()?)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

/// `x @ w^T` for row-major f32 `x: [m, k]` and f32 or bf16 `w: [n, k]` on
/// the CPU, exactly or (bf16 weights only) in bf16 products.
struct CpuMatmulTransposed {
    bf16_products: bool,
}

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
        let w = match s2 {
            CpuStorage::BF16(_) => Weights::Bf16(contiguous(s2, l2, "weight")?),
            _ => Weights::F32(contiguous(s2, l2, "weight")?),
        };
        let mut out = Vec::with_capacity(m * n);
        let dst = &mut out.spare_capacity_mut()[..m * n];
        match w {
            Weights::Bf16(w) if self.bf16_products => bf16_products::matmul_t(x, m, k, w, n, dst),
            _ => gemm::matmul_t(x, m, k, w, n, dst),
        }
        // SAFETY: matmul_t wrote all m * n values.
        unsafe { out.set_len(m * n) };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}
