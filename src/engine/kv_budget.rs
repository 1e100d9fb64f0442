//! How many tokens the KV pool holds on a GPU: what `--gpu-memory-utilization`
//! (vLLM's name and meaning: the share of the GPU's memory this process may
//! use in all) leaves after what is already in use (the weights, other
//! processes), a reserve for a step's activations, and room for the second
//! copy of the weights a full push stages before it swaps.

/// Default share of GPU memory, as vLLM's.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// Parses `--gpu-memory-utilization`: a share in (0, 1].
pub fn parse_utilization(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{s:?} is not a share of GPU memory in (0, 1]")),
    }
}

/// What sizes a GPU pool.
#[derive(Debug, Clone, Copy)]
pub struct GpuBudget {
    /// Free and total bytes of the device, measured after the weights loaded.
    pub free: usize,
    pub total: usize,
    pub utilization: f64,
    /// Bytes the weights take (a full push stages a second copy).
    pub weights: usize,
    /// Peak bytes of one step's activations and logits.
    pub activations: usize,
    pub bytes_per_token: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error(
    "--gpu-memory-utilization {utilization} leaves no room for the KV pool: {allowed} bytes allowed, \
     {used} in use, {reserved} reserved for a weight push and a step's activations \
     (raise it, lower --max-num-batched-tokens, or set --kv-cache-tokens)"
)]
pub struct NoRoom {
    pub utilization: f64,
    pub allowed: usize,
    pub used: usize,
    pub reserved: usize,
}

impl GpuBudget {
    /// Tokens of pool that fit, rounded down to whole blocks of `block_size`.
    pub fn tokens(&self, block_size: usize) -> Result<usize, NoRoom> {
        let allowed = (self.total as f64 * self.utilization) as usize;
        let used = self.total.saturating_sub(self.free);
        let reserved = self.weights + self.activations;
        let room = allowed.saturating_sub(used).saturating_sub(reserved);
        let block_bytes = self.bytes_per_token.max(1) * block_size.max(1);
        let blocks = room / block_bytes;
        if blocks == 0 {
            return Err(NoRoom {
                utilization: self.utilization,
                allowed,
                used,
                reserved,
            });
        }
        Ok(blocks * block_size.max(1))
    }
}

/// Peak bytes of one step: f32 activations of `batched_tokens` rows through
/// the widest layer (the MLP's gate and up projections and their product,
/// the attention's q/k/v, the residual stream, with 2x slack for what the
/// allocator holds), plus f32 logits for up to `max_rows` sampled rows
/// (five times: the matmul output, its f32 copy and the summary sampler's
/// temporaries, `device_sampling`).
pub fn activation_bytes(
    batched_tokens: usize,
    max_rows: usize,
    hidden: usize,
    intermediate: usize,
    qkv_width: usize,
    vocab: usize,
) -> usize {
    let per_token = 4 * (4 * hidden + 3 * intermediate + qkv_width);
    2 * batched_tokens * per_token + 5 * max_rows.min(batched_tokens).max(1) * vocab * 4
}

/// The GPU pool's size for `model` when it runs on a GPU whose memory the
/// driver reports (CUDA), else None (the CPU rule applies).
pub fn gpu_pool_tokens(
    model: &crate::model::Model,
    options: &super::EngineOptions,
    bytes_per_token: usize,
    block_size: usize,
) -> Option<Result<usize, NoRoom>> {
    let (free, total) = device_memory(model.device())?;
    let c = model.config();
    let batched = options.max_num_batched_tokens.unwrap_or(2048).max(1);
    let budget = GpuBudget {
        free,
        total,
        utilization: options
            .gpu_memory_utilization
            .unwrap_or(DEFAULT_GPU_MEMORY_UTILIZATION),
        weights: options.weights_bytes.unwrap_or(0),
        activations: activation_bytes(
            batched,
            options.max_num_seqs.unwrap_or(256).max(1),
            c.hidden_size,
            c.intermediate_size,
            (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim,
            c.vocab_size,
        ),
        bytes_per_token,
    };
    let tokens = budget.tokens(block_size);
    if let Ok(tokens) = tokens {
        tracing::info!(
            free_mib = free >> 20,
            total_mib = total >> 20,
            utilization = budget.utilization,
            kv_tokens = tokens,
            "KV pool sized from free GPU memory"
        );
    }
    Some(tokens)
}

#[cfg(feature = "cuda")]
fn device_memory(device: &candle_core::Device) -> Option<(usize, usize)> {
    crate::model::cuda::memory::free_and_total(device)
}

#[cfg(not(feature = "cuda"))]
fn device_memory(_: &candle_core::Device) -> Option<(usize, usize)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utilization_must_be_a_share() {
        assert_eq!(parse_utilization("0.9"), Ok(0.9));
        assert_eq!(parse_utilization("1"), Ok(1.0));
        for bad in ["0", "-0.5", "1.01", "nan", "inf", "", "half"] {
            assert!(parse_utilization(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_pool_gets_what_the_share_leaves() {
        const GIB: usize = 1 << 30;
        // An 80 GiB GPU with 2 GiB of weights loaded (78 free), 1 GiB of
        // activations: 0.9 * 80 = 72 allowed, 2 used, 2 + 1 reserved: 67 GiB.
        let b = GpuBudget {
            free: 78 * GIB,
            total: 80 * GIB,
            utilization: 0.9,
            weights: 2 * GIB,
            activations: GIB,
            bytes_per_token: 114_688, // Qwen3-0.6B in bf16: 28 layers x 8 heads x 128 x 2 x 2
        };
        let tokens = b.tokens(16).unwrap();
        assert_eq!(tokens % 16, 0);
        let bytes = tokens * 114_688;
        assert!(bytes <= 67 * GIB && bytes > 67 * GIB - 16 * 114_688);
        // Another process holding memory shrinks it.
        let crowded = GpuBudget {
            free: 40 * GIB,
            ..b
        };
        assert!(crowded.tokens(16).unwrap() * 114_688 <= 29 * GIB);
    }

    #[test]
    fn no_room_is_an_error_naming_the_flag() {
        let b = GpuBudget {
            free: 1 << 30,
            total: 8 << 30,
            utilization: 0.5,
            weights: 1 << 30,
            activations: 1 << 20,
            bytes_per_token: 1024,
        };
        let err = b.tokens(16).unwrap_err();
        assert!(err.to_string().contains("--gpu-memory-utilization 0.5"));
    }

    #[test]
    fn activations_grow_with_the_step_budget() {
        let small = activation_bytes(256, 256, 1024, 3072, 4096, 151_936);
        let large = activation_bytes(2048, 256, 1024, 3072, 4096, 151_936);
        assert!(large > small);
        // 2048 tokens of Qwen3-0.6B: well under a GiB.
        assert!(large < 1 << 30, "{large}");
    }
}
