//! The decoder shared by Llama, Mistral, Qwen2 and Qwen3, written once against
//! candle tensors so it runs on CPU, CUDA and Metal.
//!
//! A forward step takes a packed batch of [`Segment`]s: each is some new tokens
//! of one sequence, where they start, and that sequence's block table in the
//! [`KvPool`]. Prefill chunks and decode tokens of different sequences run in
//! the same step without padding.

pub mod attention;
mod attention_tiles;
pub mod cpu_threads;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device_kernels;
pub mod gemm;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod paged_attention;
pub mod paged_meta;
pub mod rope;
pub mod simd;
mod storage;

use crate::config::ModelConfig;
use crate::lora::{LoraAdapter, StepAdapters};
use crate::weights::names::{self, layer_param, LayerModule, Part};
use crate::weights::{ParamStore, WeightsError};
use attention::{Attention, StepLayout};
use candle_core::{DType, Device, Result, Tensor};
pub use kv_cache::KvPool;
use linear::Linear;
use mlp::Mlp;
use norm::RmsNorm;
use paged_attention::SeqSpan;
use rope::RotaryEmbedding;

/// Most prompt tokens one scoring pass prefills before the scored range
/// (the engine's default step budget).
const PREFIX_CHUNK: usize = 2048;

/// Which positions of a segment need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// None (a prefill chunk that does not end the prompt).
    Nothing,
    /// The last new token (generation).
    Last,
    /// New tokens `from..to` (teacher-forced scoring).
    Range { from: usize, to: usize },
}

/// New tokens of one sequence for this step.
pub struct Segment<'a> {
    pub tokens: &'a [u32],
    /// Position of the first new token (tokens of the sequence already cached).
    pub offset: usize,
    /// Pool blocks of the sequence, covering `offset + tokens.len()` positions.
    pub block_table: &'a [u32],
    pub logits: LogitsFor,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: RmsNorm,
    attention: Attention,
    post_attention_norm: RmsNorm,
    mlp: Mlp,
}

#[derive(Debug, Clone)]
pub struct Model {
    /// Shared: a model is moved through channels on every weight swap.
    config: std::sync::Arc<ModelConfig>,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    device: Device,
    /// What activations are computed in (weight matrices may be held
    /// narrower, see [`ParamStore::matrix_dtype`]).
    dtype: DType,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

impl Model {
    /// Builds the model from a validated parameter store (tensors are shared, not copied).
    pub fn new(
        config: &ModelConfig,
        store: &ParamStore,
        device: &Device,
    ) -> std::result::Result<Self, ModelError> {
        let get = |name: &str| store.get(name).cloned();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let weight = |module| get(&layer_param(i, module, Part::Weight));
            let norm = |module| -> std::result::Result<RmsNorm, WeightsError> {
                Ok(RmsNorm::new(weight(module)?, config.rms_norm_eps))
            };
            let proj = |module, has_bias: bool| -> std::result::Result<Linear, WeightsError> {
                let bias = if has_bias {
                    Some(get(&layer_param(i, module, Part::Bias))?)
                } else {
                    None
                };
                Ok(Linear::new(weight(module)?, bias))
            };
            let qk_norm = if config.qk_norm {
                Some((norm(LayerModule::QNorm)?, norm(LayerModule::KNorm)?))
            } else {
                None
            };
            layers.push(DecoderLayer {
                input_norm: norm(LayerModule::InputNorm)?,
                attention: Attention {
                    q_proj: proj(LayerModule::QProj, config.qkv_bias)?,
                    k_proj: proj(LayerModule::KProj, config.qkv_bias)?,
                    v_proj: proj(LayerModule::VProj, config.qkv_bias)?,
                    o_proj: proj(LayerModule::OProj, config.o_bias)?,
                    qk_norm,
                    num_heads: config.num_attention_heads,
                    num_kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                post_attention_norm: norm(LayerModule::PostAttentionNorm)?,
                mlp: Mlp {
                    gate: proj(LayerModule::GateProj, config.mlp_bias)?,
                    up: proj(LayerModule::UpProj, config.mlp_bias)?,
                    down: proj(LayerModule::DownProj, config.mlp_bias)?,
                },
            });
        }
        let embed_tokens = get(names::EMBED_TOKENS)?;
        let lm_head = if config.tie_word_embeddings {
            Linear::new(embed_tokens.clone(), None)
        } else {
            Linear::new(get(names::LM_HEAD)?, None)
        };
        Ok(Self {
            config: std::sync::Arc::new(config.clone()),
            embed_tokens,
            layers,
            norm: RmsNorm::new(get(names::FINAL_NORM)?, config.rms_norm_eps),
            lm_head,
            rope: RotaryEmbedding::new(config, store.dtype(), device)?,
            device: device.clone(),
            dtype: store.dtype(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Longest sequence the position tables cover.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// The dtype the activations are computed in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A key/value pool of `num_blocks` blocks of `block_size` tokens,
    /// storing keys and values as `dtype`.
    pub fn new_pool(&self, num_blocks: usize, block_size: usize, dtype: DType) -> Result<KvPool> {
        KvPool::new(
            self.config.num_hidden_layers,
            num_blocks,
            block_size,
            self.config.num_key_value_heads,
            self.config.head_dim,
            dtype,
            &self.device,
        )
    }

    /// Bytes of pool one token takes (keys and values of every layer) when
    /// the pool stores `dtype`.
    pub fn kv_bytes_per_token(&self, dtype: DType) -> usize {
        let c = &self.config;
        2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype.size_in_bytes()
    }

    /// Runs one step over `segments`, writing their keys and values into
    /// `pool`, and returns fp32 logits `[rows, vocab]`: the rows each segment
    /// asked for, in segment order.
    pub fn forward(&self, segments: &[Segment<'_>], pool: &KvPool) -> Result<Tensor> {
        self.forward_with_adapters(segments, &[], pool)
    }

    /// [`Model::forward`] with a LoRA adapter per segment (`adapters` is
    /// empty or has one entry per segment; `None` is the base model).
    pub fn forward_with_adapters(
        &self,
        segments: &[Segment<'_>],
        adapters: &[Option<&LoraAdapter>],
        pool: &KvPool,
    ) -> Result<Tensor> {
        if !adapters.is_empty() && adapters.len() != segments.len() {
            candle_core::bail!(
                "{} adapters for {} segments",
                adapters.len(),
                segments.len()
            );
        }
        let mut row_adapters = Vec::new();
        let bs = pool.block_size();
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut spans = Vec::with_capacity(segments.len());
        let mut rows = Vec::new();
        for seg in segments {
            let start = ids.len();
            let end_pos = seg.offset + seg.tokens.len();
            if end_pos > self.max_positions() {
                candle_core::bail!(
                    "sequence of {end_pos} tokens exceeds the {} positions the model supports",
                    self.max_positions()
                );
            }
            if seg.block_table.len() * bs < end_pos {
                candle_core::bail!(
                    "block table covers {} positions, step needs {end_pos}",
                    seg.block_table.len() * bs
                );
            }
            ids.extend_from_slice(seg.tokens);
            if let Some(a) = adapters.get(spans.len()) {
                row_adapters.extend(std::iter::repeat_n(*a, seg.tokens.len()));
            }
            for p in seg.offset..end_pos {
                positions.push(p as u32);
                slots.push(kv_cache::slot(seg.block_table, bs, p));
            }
            spans.push(SeqSpan {
                start,
                len: seg.tokens.len(),
                offset: seg.offset,
                block_table: seg.block_table,
            });
            let start = start as u32;
            match seg.logits {
                LogitsFor::Nothing => {}
                LogitsFor::Last => rows.push(start + seg.tokens.len() as u32 - 1),
                LogitsFor::Range { from, to } => rows.extend((from..to).map(|i| start + i as u32)),
            }
        }
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &self.device)?;
        let step = StepLayout {
            rope: self
                .rope
                .tables_for(&Tensor::from_vec(positions, n, &self.device)?)?,
            slots,
            spans,
            lora: StepAdapters::new(row_adapters),
            device_meta: Default::default(),
        };
        let mut x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_norm.forward(&x)?;
            let h = layer.attention.forward(&h, i, &step, pool)?;
            x = (x + h)?;
            let h = layer.post_attention_norm.forward(&x)?;
            x = (&x + layer.mlp.forward(&h, step.lora.layer(i))?)?;
        }
        let rows_len = rows.len();
        if rows_len == 0 {
            // On the host: a zero-sized CUDA allocation is an error, and a
            // step of prefill chunks only samples nothing.
            return Tensor::zeros((0, self.config.vocab_size), DType::F32, &Device::Cpu);
        }
        let rows = Tensor::from_vec(rows, rows_len, &self.device)?;
        let x = self.norm.forward(&x.index_select(&rows, 0)?)?;
        self.lm_head.forward(&x)?.to_dtype(DType::F32)
    }

    /// Logits for every position of `tokens` from a fresh pool of their own
    /// (no reuse, keys and values in the model's dtype): row i predicts token
    /// i+1. Used by tests.
    pub fn full_logits(&self, tokens: &[u32]) -> Result<Tensor> {
        self.logits_range(tokens, 0, tokens.len(), self.dtype())
    }

    /// Logits of positions `from..to` of `tokens`, computed from scratch with
    /// keys and values stored as `kv_dtype` (as the engine's pool stores
    /// them, so scores match what generation computed).
    /// Logits of positions `from..to` of `tokens`, handed to `each` (with
    /// the first position of the chunk) at most `rows` positions at a time,
    /// so scoring a long prompt never holds more than `rows x vocab` floats
    /// (all at once, 4,000 positions of a 150k vocabulary were 2.4 GB, and
    /// as much again when copied out). Ranges of up to `rows` positions run
    /// as one pass, exactly as [`Model::logits_range`].
    #[allow(clippy::too_many_arguments)]
    pub fn logits_in_chunks(
        &self,
        tokens: &[u32],
        from: usize,
        to: usize,
        kv_dtype: DType,
        rows: usize,
        adapter: Option<&LoraAdapter>,
        mut each: impl FnMut(usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        let rows = rows.max(1);
        if to - from <= rows && to <= PREFIX_CHUNK {
            return each(
                from,
                self.logits_range_with(tokens, from, to, kv_dtype, adapter)?,
            );
        }
        const BLOCK: usize = 16;
        let blocks = tokens.len().div_ceil(BLOCK).max(1);
        let pool = self.new_pool(blocks, BLOCK, kv_dtype)?;
        let table: Vec<u32> = (0..blocks as u32).collect();
        let pass = |done: usize, end: usize, logits: LogitsFor| {
            self.forward_with_adapters(
                &[Segment {
                    tokens: &tokens[done..end],
                    offset: done,
                    block_table: &table,
                    logits,
                }],
                &[adapter],
                &pool,
            )
        };
        // Positions before `done` are in the pool. The prefix goes in passes
        // of at most PREFIX_CHUNK tokens, as the engine's chunked prefill
        // does, so a long prompt scored near its end never runs as one huge
        // step; then each pass computes `rows` scored positions.
        let mut done = 0;
        while done < from {
            let end = (done + PREFIX_CHUNK).min(from);
            pass(done, end, LogitsFor::Nothing)?;
            done = end;
        }
        while done < to {
            let end = (done + rows).min(to);
            let logits = pass(
                done,
                end,
                LogitsFor::Range {
                    from: 0,
                    to: end - done,
                },
            )?;
            each(done, logits)?;
            done = end;
        }
        Ok(())
    }

    pub fn logits_range(
        &self,
        tokens: &[u32],
        from: usize,
        to: usize,
        kv_dtype: DType,
    ) -> Result<Tensor> {
        self.logits_range_with(tokens, from, to, kv_dtype, None)
    }

    /// [`Model::logits_range`] under a LoRA adapter (`None`: the base model).
    pub fn logits_range_with(
        &self,
        tokens: &[u32],
        from: usize,
        to: usize,
        kv_dtype: DType,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        const BLOCK: usize = 16;
        let blocks = tokens.len().div_ceil(BLOCK).max(1);
        let pool = self.new_pool(blocks, BLOCK, kv_dtype)?;
        let table: Vec<u32> = (0..blocks as u32).collect();
        self.forward_with_adapters(
            &[Segment {
                tokens,
                offset: 0,
                block_table: &table,
                logits: LogitsFor::Range { from, to },
            }],
            &[adapter],
            &pool,
        )
    }
}
