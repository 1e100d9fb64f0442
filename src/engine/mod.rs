//! The generation engine: one thread owns the model and runs the step loop;
//! [`EngineHandle`] is the cheap, cloneable way in from any other thread or task.
//!
//! Requests are validated on the caller's side of the channel, so a bad request
//! is answered at once and never reaches the engine thread.

mod block_pool;
pub mod core;
pub mod device_sampling;
pub mod events;
mod jobs;
pub mod kv_budget;
mod kv_manager;
pub mod logits;
pub mod params;
mod pause;
pub mod refit;
pub mod sampler;
mod scheduler;
mod sequence;
pub mod stats;
mod stream;

use self::core::{EngineCore, GenerationJob, PendingSwap, SchedulerConfig, ScoreJob};
pub use self::core::{PauseMode, ScoreOutput, SwapReport};
use crate::lora::{LoraAdapter, LoraRegistry};
use crate::model::Model;
pub use device_sampling::SamplingTransfer;
pub use events::{EngineEvent, EventReceiver, FinishReason, TokenEvent};
pub use params::{DistributionParams, LogprobsMode, ParamError, SamplingParams, MAX_N};
pub use stats::EngineStats;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
pub use stream::{ChoiceOutput, GenerationStream};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    InvalidParam(#[from] ParamError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} is out of the vocabulary (size {vocab_size})")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("This model's maximum context length is {max} tokens{}. However, your request has {requested} tokens. Please reduce the length of the input.", window_note(*.sliding_window))]
    ContextLength {
        requested: usize,
        max: usize,
        /// Set when the context ends at the model's sliding window.
        sliding_window: Option<usize>,
    },
    #[error("start must be in [1, {len}] (the first token has no prefix to score it against), got {start}")]
    InvalidStart { start: usize, len: usize },
    #[error("the engine has stopped")]
    Stopped,
    #[error("engine failure: {0}")]
    Failed(String),
}

fn window_note(window: Option<usize>) -> String {
    window
        .map(|w| format!(" (its sliding_window of {w} tokens: no layer may attend past it)"))
        .unwrap_or_default()
}

/// Limits every request is validated against.
#[derive(Debug, Clone)]
pub struct EngineLimits {
    pub vocab_size: usize,
    pub max_model_len: usize,
    /// The model's sliding window, when that is what ends the context.
    pub sliding_window: Option<usize>,
    pub eos_token_ids: Vec<u32>,
    /// Bytes of the KV pool (the default request-memory budget derives from it).
    pub kv_pool_bytes: usize,
}

enum Command {
    Generate(GenerationJob),
    Score(ScoreJob, oneshot::Sender<Result<ScoreOutput, EngineError>>),
    /// Stop a request's sequences (one choice, or all) and free their caches.
    Cancel {
        request_id: u64,
        choice: Option<usize>,
    },
    SetWeights(PendingSwap, PauseMode),
    Pause(PauseMode, oneshot::Sender<()>),
    Resume(oneshot::Sender<()>),
    ResetPrefixCache(oneshot::Sender<()>),
    /// A LoRA adapter changed in the registry (see `EngineCore::swap_adapter`).
    SwapAdapter(String, PauseMode, oneshot::Sender<SwapReport>),
    /// Work to run on the engine thread between steps (see [`EngineHandle::between_steps`]).
    Background(BackgroundJob),
}

/// A job for [`EngineHandle::between_steps`].
pub type BackgroundJob = Box<dyn FnOnce() + Send>;

/// Background work between two steps runs for at most this long, or as long
/// as the step before it took if that was longer: it delays the next token by
/// at most that, and keeps at least half of the machine when steps are long
/// (a prefill chunk on a CPU can take seconds).
const BACKGROUND_SLICE: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    limits: Arc<EngineLimits>,
    next_request_id: Arc<AtomicU64>,
    stats: Arc<EngineStats>,
}

/// Options for starting the engine thread.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    /// Longest prompt + generation; clamped to the model's position tables
    /// and to the KV pool.
    pub max_model_len: Option<usize>,
    /// Label of the weights the engine starts with (default "0").
    pub weight_version: Option<String>,
    /// Tokens the KV pool holds (default: a fifth of system memory, at most 131072).
    pub kv_cache_tokens: Option<usize>,
    /// What the KV pool stores (default: the model's dtype).
    pub kv_cache_dtype: Option<candle_core::DType>,
    /// Tokens per KV block (default 16).
    pub block_size: Option<usize>,
    /// Token budget of one engine step (default 2048).
    pub max_num_batched_tokens: Option<usize>,
    /// Most sequences running at once (default 256).
    pub max_num_seqs: Option<usize>,
    /// The LoRA adapters requests may select (default: none).
    pub adapters: Option<Arc<LoraRegistry>>,
    /// On a GPU, the share of its memory this process may use; the KV pool
    /// gets what the weights, a step and a weight push leave (default 0.9).
    pub gpu_memory_utilization: Option<f64>,
    /// Bytes of the loaded weights (a full push stages a second copy).
    pub weights_bytes: Option<usize>,
    /// How sampled rows reach the sampler (default: a summary from a GPU).
    pub sampling_transfer: SamplingTransfer,
}

/// Share of system memory the KV pool takes by default.
const DEFAULT_KV_MEMORY_FRACTION: f64 = 0.2;
const MAX_DEFAULT_KV_TOKENS: usize = 131_072;

pub(crate) fn total_memory_bytes() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

fn default_kv_tokens(bytes_per_token: usize) -> usize {
    let budget = total_memory_bytes() as f64 * DEFAULT_KV_MEMORY_FRACTION;
    ((budget / bytes_per_token.max(1) as f64) as usize).clamp(1024, MAX_DEFAULT_KV_TOKENS)
}

impl EngineHandle {
    /// Starts the engine thread. `max_model_len` is clamped to what the model's
    /// position tables cover.
    pub fn spawn(
        model: Model,
        eos_token_ids: Vec<u32>,
        options: EngineOptions,
    ) -> Result<Self, EngineError> {
        let block_size = options.block_size.unwrap_or(16).max(1);
        let kv_dtype = options.kv_cache_dtype.unwrap_or(model.dtype());
        let kv_bytes_per_token = model.kv_bytes_per_token(kv_dtype);
        let kv_tokens = match options.kv_cache_tokens {
            Some(tokens) => tokens,
            None => {
                match kv_budget::gpu_pool_tokens(&model, &options, kv_bytes_per_token, block_size) {
                    Some(sized) => sized.map_err(|e| EngineError::Failed(e.to_string()))?,
                    None => default_kv_tokens(kv_bytes_per_token),
                }
            }
        };
        let num_blocks = kv_tokens.div_ceil(block_size).max(1);
        let max_len = model.max_positions().min(num_blocks * block_size);
        let max_model_len = options.max_model_len.map_or(max_len, |m| m.min(max_len));
        let limits = Arc::new(EngineLimits {
            vocab_size: model.config().vocab_size,
            max_model_len,
            sliding_window: model
                .config()
                .attention
                .sliding_window
                .filter(|&w| w == max_model_len),
            eos_token_ids: eos_token_ids.clone(),
            kv_pool_bytes: num_blocks * block_size * kv_bytes_per_token,
        });
        let config = SchedulerConfig {
            block_size,
            num_blocks,
            max_num_batched_tokens: options.max_num_batched_tokens.unwrap_or(2048).max(1),
            max_num_seqs: options.max_num_seqs.unwrap_or(256).max(1),
            kv_dtype: Some(kv_dtype),
        };
        tracing::info!(
            kv_blocks = num_blocks,
            block_size,
            kv_megabytes = (num_blocks * block_size * kv_bytes_per_token) as f64 / 1e6,
            ?kv_dtype,
            max_model_len = limits.max_model_len,
            "KV pool"
        );
        let version = options.weight_version.unwrap_or_else(|| "0".to_string());
        let mut core = EngineCore::new(model, eos_token_ids, &version, config)
            .map_err(|e| EngineError::Failed(format!("allocating the KV pool: {e}")))?;
        if let Some(adapters) = options.adapters {
            core.set_adapters(adapters);
        }
        core.set_sampling_transfer(options.sampling_transfer);
        let stats = core.stats().clone();
        let (tx, rx) = mpsc::channel::<Command>();
        std::thread::Builder::new()
            .name("gym-serve-engine".into())
            .spawn(move || run_loop(core, rx))
            .map_err(|e| EngineError::Failed(format!("starting the engine thread: {e}")))?;
        Ok(Self {
            commands: tx,
            limits,
            next_request_id: Arc::new(AtomicU64::new(1)),
            stats,
        })
    }

    /// Sends a command that answers on a oneshot channel, and waits for it.
    async fn request<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Runs `job` on the engine thread between steps, where it may use the
    /// whole compute pool (rayon) without competing with a step for the
    /// cores. Jobs run in order, each gap between steps running jobs for up
    /// to [`BACKGROUND_SLICE`] or the last step's duration (at least one).
    /// Converting a weight push this way gets the machine's full bandwidth
    /// in slices instead of a starved thread racing the engine's workers;
    /// generation goes on, slower, between slices. Dropped if the engine has
    /// stopped.
    pub fn between_steps(&self, job: BackgroundJob) {
        let _ = self.commands.send(Command::Background(job));
    }

    /// Swaps `model` in between engine steps, labelled `version`; returns
    /// once it serves.
    pub async fn set_weights(
        &self,
        model: Model,
        version: String,
        mode: PauseMode,
    ) -> Result<SwapReport, EngineError> {
        self.request(|reply| {
            Command::SetWeights(
                PendingSwap {
                    model,
                    version,
                    reply,
                },
                mode,
            )
        })
        .await
    }

    /// Tells the engine adapter `name` changed in the registry; its running
    /// sequences go on under `mode`. Returns once the new version serves.
    pub async fn swap_adapter(
        &self,
        name: String,
        mode: PauseMode,
    ) -> Result<SwapReport, EngineError> {
        self.request(|reply| Command::SwapAdapter(name, mode, reply))
            .await
    }

    /// Pauses generation; returns once the pause is in effect.
    pub async fn pause(&self, mode: PauseMode) -> Result<(), EngineError> {
        self.request(|reply| Command::Pause(mode, reply)).await
    }

    pub async fn resume(&self) -> Result<(), EngineError> {
        self.request(Command::Resume).await
    }

    /// Forgets every cached prefix.
    pub async fn reset_prefix_cache(&self) -> Result<(), EngineError> {
        self.request(Command::ResetPrefixCache).await
    }

    /// The engine's counters, shared (for collectors that outlive a borrow).
    pub fn shared_stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn limits(&self) -> &EngineLimits {
        &self.limits
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        self.check_vocab(tokens)
    }

    /// Every ID is in the model's vocabulary (the check generation applies,
    /// for endpoints that only tokenize).
    pub fn check_vocab(&self, tokens: &[u32]) -> Result<(), EngineError> {
        if let Some(&token) = tokens
            .iter()
            .find(|&&t| t as usize >= self.limits.vocab_size)
        {
            return Err(EngineError::TokenOutOfVocab {
                token,
                vocab_size: self.limits.vocab_size,
            });
        }
        Ok(())
    }

    /// Queues a generation; events for all `n` choices arrive on the stream.
    pub fn generate(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<GenerationStream, EngineError> {
        self.generate_with_adapter(prompt, params, None)
    }

    /// [`EngineHandle::generate`] under a LoRA adapter (`None`: the base model).
    pub fn generate_with_adapter(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<GenerationStream, EngineError> {
        params.validate()?;
        self.check_tokens(&prompt)?;
        let max = self.limits.max_model_len;
        if prompt.len() >= max {
            return Err(EngineError::ContextLength {
                requested: prompt.len(),
                max,
                sliding_window: self.limits.sliding_window,
            });
        }
        // max_tokens beyond the context is clamped to what fits.
        let budget = params.max_tokens.min(max - prompt.len());
        let seed = params.seed.unwrap_or_else(rand::random);
        let n = params.n;
        let request_id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (events, receiver) = tokio_mpsc::unbounded_channel();
        let job = GenerationJob {
            request_id,
            prompt,
            params: Arc::new(params),
            seed,
            budget,
            events,
            adapter,
        };
        self.commands
            .send(Command::Generate(job))
            .map_err(|_| EngineError::Stopped)?;
        Ok(GenerationStream::new(
            receiver,
            n,
            request_id,
            self.commands.clone(),
        ))
    }

    fn score_job(
        &self,
        token_ids: Vec<u32>,
        start: usize,
        distribution: DistributionParams,
        mode: LogprobsMode,
        top_logprobs: usize,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<oneshot::Receiver<Result<ScoreOutput, EngineError>>, EngineError> {
        distribution.validate()?;
        self.check_tokens(&token_ids)?;
        if start == 0 || start > token_ids.len() {
            return Err(EngineError::InvalidStart {
                start,
                len: token_ids.len(),
            });
        }
        if token_ids.len() > self.limits.max_model_len {
            return Err(EngineError::ContextLength {
                requested: token_ids.len(),
                max: self.limits.max_model_len,
                sliding_window: self.limits.sliding_window,
            });
        }
        let (reply, rx) = oneshot::channel();
        let job = ScoreJob {
            token_ids,
            start,
            distribution,
            mode,
            top_logprobs,
            adapter,
        };
        self.commands
            .send(Command::Score(job, reply))
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    /// Teacher-forced log-probs of `token_ids[start..]` (blocking).
    pub fn score_blocking(
        &self,
        token_ids: Vec<u32>,
        start: usize,
        distribution: DistributionParams,
        mode: LogprobsMode,
    ) -> Result<Vec<f32>, EngineError> {
        let out = self
            .score_job(token_ids, start, distribution, mode, 0, None)?
            .blocking_recv()
            .map_err(|_| EngineError::Stopped)??;
        Ok(out.token_logprobs)
    }

    /// Teacher-forced log-probs of `token_ids[start..]`, with `top_logprobs`
    /// alternatives per position.
    pub async fn score(
        &self,
        token_ids: Vec<u32>,
        start: usize,
        distribution: DistributionParams,
        mode: LogprobsMode,
        top_logprobs: usize,
    ) -> Result<ScoreOutput, EngineError> {
        self.score_with_adapter(token_ids, start, distribution, mode, top_logprobs, None)
            .await
    }

    /// [`EngineHandle::score`] under a LoRA adapter (`None`: the base model).
    pub async fn score_with_adapter(
        &self,
        token_ids: Vec<u32>,
        start: usize,
        distribution: DistributionParams,
        mode: LogprobsMode,
        top_logprobs: usize,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<ScoreOutput, EngineError> {
        self.score_job(token_ids, start, distribution, mode, top_logprobs, adapter)?
            .await
            .map_err(|_| EngineError::Stopped)?
    }
}

fn run_loop(mut core: EngineCore, commands: mpsc::Receiver<Command>) {
    let mut background: VecDeque<BackgroundJob> = VecDeque::new();
    let mut last_step = std::time::Duration::ZERO;
    let apply = |core: &mut EngineCore, background: &mut VecDeque<BackgroundJob>, cmd| match cmd {
        Command::Generate(job) => core.add(job),
        Command::Score(job, reply) => {
            let result = core
                .score(&job)
                .map_err(|e| EngineError::Failed(e.to_string()));
            let _ = reply.send(result);
        }
        Command::Cancel { request_id, choice } => core.cancel(request_id, choice),
        Command::SetWeights(swap, mode) => core.request_swap(swap, mode),
        Command::Pause(mode, reply) => core.pause(mode, reply),
        Command::Resume(reply) => {
            core.resume();
            let _ = reply.send(());
        }
        Command::ResetPrefixCache(reply) => {
            core.reset_prefix_cache();
            let _ = reply.send(());
        }
        Command::Background(job) => background.push_back(job),
        Command::SwapAdapter(name, mode, reply) => {
            let _ = reply.send(core.swap_adapter(&name, mode));
        }
    };
    loop {
        while let Ok(cmd) = commands.try_recv() {
            apply(&mut core, &mut background, cmd);
        }
        run_background(&mut background, last_step.max(BACKGROUND_SLICE));
        core.settle();
        if core.can_step() {
            let started = std::time::Instant::now();
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| core.step()));
            last_step = started.elapsed();
            if let Err(panic) = stepped {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                tracing::error!(%message, "engine step panicked; failing running requests and resetting the KV pool");
                core.recover(&format!("internal engine error: {message}"));
            }
            continue;
        }
        if !background.is_empty() {
            continue; // idle: the rest of the background work, slice by slice
        }
        // Nothing to run: sleep until a command arrives; every handle dropped
        // ends the loop.
        match commands.recv() {
            Ok(cmd) => apply(&mut core, &mut background, cmd),
            Err(_) => return,
        }
    }
}

/// Runs queued background jobs for up to `slice` (at least one). A panicking
/// job is logged and dropped; the engine goes on.
fn run_background(jobs: &mut VecDeque<BackgroundJob>, slice: std::time::Duration) {
    let started = std::time::Instant::now();
    while let Some(job) = jobs.pop_front() {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::error!("a background job panicked");
        }
        if started.elapsed() >= slice {
            break;
        }
    }
}
