//! Command-line interface. Every flag can also be set as a `GYM_SERVE_*`
//! environment variable.

use crate::chat::parsers::{ReasoningParser, ToolCallParser};
use crate::config::Architecture;
use crate::engine::{LogprobsMode, PauseMode};
use crate::make_model::Preset;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "gym-serve",
    version,
    about = "Inference engine for RL rollouts: exact token IDs, log-probs, hot weight reloads"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// With no subcommand, gym-serve serves.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Hugging Face checkpoint directory to serve.
    #[arg(long, env = "GYM_SERVE_MODEL")]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1", env = "GYM_SERVE_HOST")]
    pub host: String,
    /// 0 picks a free port (the address is printed on stdout).
    #[arg(long, default_value_t = 8000, env = "GYM_SERVE_PORT")]
    pub port: u16,
    /// Name clients use in `model` (default: the checkpoint directory's name).
    #[arg(long, env = "GYM_SERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Longest prompt + generation (default: the model's max_position_embeddings).
    #[arg(long, env = "GYM_SERVE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Require `Authorization: Bearer KEY` on the API routes.
    #[arg(long, env = "GYM_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(
        long,
        value_enum,
        default_value = "none",
        env = "GYM_SERVE_REASONING_PARSER"
    )]
    pub reasoning_parser: ReasoningParser,
    #[arg(
        long,
        value_enum,
        default_value = "none",
        env = "GYM_SERVE_TOOL_CALL_PARSER"
    )]
    pub tool_call_parser: ToolCallParser,
    /// Default log-prob mode; requests override it with `logprobs_mode`.
    #[arg(long, default_value = "processed", env = "GYM_SERVE_LOGPROBS_MODE")]
    pub logprobs_mode: LogprobsMode,
    /// Seed for requests that do not bring one (default: random per request).
    #[arg(long, env = "GYM_SERVE_SEED")]
    pub seed: Option<u64>,
    /// Label of the weights loaded at start.
    #[arg(long, default_value = "0", env = "GYM_SERVE_WEIGHT_VERSION")]
    pub weight_version: String,
    /// Tokens the KV pool holds (default: a fifth of system memory, at most
    /// 131072; on a CUDA GPU, what --gpu-memory-utilization leaves).
    #[arg(long, env = "GYM_SERVE_KV_CACHE_TOKENS")]
    pub kv_cache_tokens: Option<usize>,
    /// What the KV cache stores keys and values as: `auto` is the model's
    /// run dtype (f32 on CPU, bf16 on GPU); `bf16` on CPU halves the cache's
    /// memory and what each decode step reads, at bf16 rounding of the cache
    /// (`f16` works too, but on CPU through the slower portable attention).
    #[arg(long, default_value = "auto", env = "GYM_SERVE_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: KvCacheDTypeArg,
    /// What the weight matrices are held in on CPU: `auto` keeps a bf16
    /// checkpoint's bf16 values (half the memory and what each decode step
    /// reads; widened exactly to f32 inside the kernels, so results equal
    /// serving the same values as f32) and anything else as f32; `bf16`
    /// rounds an f32 checkpoint to bf16; `f32` widens a bf16 one. Pushed
    /// weights convert into the dtype held.
    #[arg(long, default_value = "auto", env = "GYM_SERVE_WEIGHT_DTYPE")]
    pub weight_dtype: WeightDTypeArg,
    /// What CPU projections multiply in. `f32` (the default): exact f32
    /// arithmetic on the held weights. `bf16`: activations rounded to bf16
    /// and multiplied with the CPU's BF16 dot products (AVX512-BF16; the
    /// server refuses the mode on CPUs without them), as llama.cpp's BF16
    /// path and bf16 trainers do: up to twice the multiply-adds per
    /// instruction, log-probs within bf16 rounding of exact ones. Weight
    /// matrices are then held as bf16 (an f32 checkpoint is rounded).
    /// Results stay batch-invariant. GPUs compute in bf16 either way.
    #[arg(long, default_value = "f32", env = "GYM_SERVE_COMPUTE_DTYPE")]
    pub compute_dtype: ComputeDTypeArg,
    /// Prefill-sized CPU steps (65+ rows) run candle's blocked matmul
    /// instead of the engine's GEMM: faster prefill on some CPUs, but a
    /// position's log-probs then depend on how its prompt was split into
    /// steps (prefix-cache hits, chunking, other requests), and scoring
    /// equals generation only within ~1e-5. `/v1/models` then reports
    /// `deterministic: false`.
    #[arg(long, env = "GYM_SERVE_FAST_NONDETERMINISTIC")]
    pub fast_nondeterministic: bool,
    /// Tokens per KV block (prefix caching works in whole blocks).
    #[arg(long, default_value_t = 16, env = "GYM_SERVE_BLOCK_SIZE")]
    pub block_size: usize,
    /// Token budget of one engine step; long prompts are prefilled in chunks.
    #[arg(long, default_value_t = 2048, env = "GYM_SERVE_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 256, env = "GYM_SERVE_MAX_NUM_SEQS")]
    pub max_num_seqs: usize,
    /// Run on the GPU (needs the cuda or metal feature).
    #[arg(long, env = "GYM_SERVE_GPU")]
    pub gpu: bool,
    /// With --gpu on CUDA: the share of the GPU's memory this process may
    /// use in all (vLLM's meaning); the KV pool gets what the weights, a
    /// step's activations and a weight push leave. --kv-cache-tokens wins.
    #[arg(long, default_value_t = crate::engine::kv_budget::DEFAULT_GPU_MEMORY_UTILIZATION,
          value_parser = crate::engine::kv_budget::parse_utilization,
          env = "GYM_SERVE_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: f64,
    /// How each step's sampled logits reach the sampler: `auto` is
    /// `summary` on a GPU (per sequence, the mass of each block of the
    /// vocabulary and its best logits, then the one block the draw lands in:
    /// ~1,000 values instead of the whole row) and `rows` on the CPU (read
    /// in place). Top-k, top-p, min_tokens bans and over 32 top_logprobs
    /// take whole rows either way.
    #[arg(long, default_value = "auto", env = "GYM_SERVE_SAMPLING_TRANSFER")]
    pub sampling_transfer: crate::engine::SamplingTransfer,
    /// Require `Authorization: Bearer KEY` on weight and control endpoints.
    #[arg(long, env = "GYM_SERVE_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// Largest `POST /v1/weights` body (default: twice the served weights).
    #[arg(long, env = "GYM_SERVE_MAX_WEIGHTS_BYTES")]
    pub max_weights_bytes: Option<usize>,
    /// Seconds a weight update's body may send nothing before it is cut
    /// (408), so a stalled upload cannot hold the weights lock.
    #[arg(long, default_value_t = 30.0, value_parser = positive_seconds, env = "GYM_SERVE_WEIGHTS_BODY_IDLE_TIMEOUT")]
    pub weights_body_idle_timeout: f64,
    /// Seconds a staged weight update (`POST /v1/weights/stage`) waits for
    /// its commit before it is dropped and its memory returned.
    #[arg(long, default_value_t = 600.0, value_parser = positive_seconds, env = "GYM_SERVE_STAGED_UPDATE_TIMEOUT")]
    pub staged_update_timeout: f64,
    /// This server's name in `/get_weight_version` and `/metrics`, for
    /// auditing a fleet of replicas (default: the bound host:port).
    #[arg(long, env = "GYM_SERVE_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Serve weight and control endpoints without a key on a non-loopback
    /// address (with neither --api-key nor --admin-api-key). Without this
    /// flag such a bind is refused: anyone who can reach the port could
    /// swap the weights.
    #[arg(long, env = "GYM_SERVE_ALLOW_OPEN_ADMIN")]
    pub allow_open_admin: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
}

/// LoRA adapters served beside the base model (vLLM's flags).
#[derive(Debug, Clone, clap::Args)]
pub struct LoraArgs {
    /// Adapters to serve from the start, `NAME=PATH` (a PEFT directory);
    /// requests select one by `model: NAME`. In the environment,
    /// comma-separated.
    #[arg(long, num_args = 1.., value_delimiter = ',', value_parser = lora_module, env = "GYM_SERVE_LORA_MODULES")]
    pub lora_modules: Vec<LoraModule>,
    /// Most adapters loaded at once.
    #[arg(long, default_value_t = 8, env = "GYM_SERVE_MAX_LORAS")]
    pub max_loras: usize,
    /// Largest adapter rank accepted.
    #[arg(long, default_value_t = 64, env = "GYM_SERVE_MAX_LORA_RANK")]
    pub max_lora_rank: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub name: String,
    pub path: PathBuf,
}

fn lora_module(s: &str) -> Result<LoraModule, String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok(LoraModule {
            name: name.to_string(),
            path: PathBuf::from(path),
        }),
        _ => Err(format!("{s:?} is not NAME=PATH")),
    }
}

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v < 1e9 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// Bounds on what one request or connection may cost (see README,
/// Reliability). Every one answers 400 or 413 naming its flag.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Largest body of the JSON inference endpoints (chat, completions,
    /// tokenize, detokenize, logprobs), in bytes.
    #[arg(long, default_value_t = 16 << 20, env = "GYM_SERVE_MAX_REQUEST_BYTES")]
    pub max_request_bytes: usize,
    /// Largest body of the JSON control endpoints (pause, resume,
    /// reset_prefix_cache, update_weights_from_disk), in bytes.
    #[arg(long, default_value_t = 1 << 20, env = "GYM_SERVE_MAX_CONTROL_BYTES")]
    pub max_control_bytes: usize,
    /// Most prompts in one `/v1/completions` request.
    #[arg(long, default_value_t = 1024, env = "GYM_SERVE_MAX_PROMPTS")]
    pub max_prompts: usize,
    /// Most choices (`n`) per prompt.
    #[arg(long, default_value_t = 256, env = "GYM_SERVE_MAX_N",
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub max_n: u64,
    /// Most sequences one request may create (prompts x n).
    #[arg(
        long,
        default_value_t = 4096,
        env = "GYM_SERVE_MAX_SEQUENCES_PER_REQUEST"
    )]
    pub max_sequences_per_request: usize,
    /// Most alternatives per generated token (`top_logprobs`, legacy `logprobs`).
    #[arg(long, default_value_t = 20, env = "GYM_SERVE_MAX_TOP_LOGPROBS")]
    pub max_top_logprobs: usize,
    /// Most alternatives per prompt token (`prompt_logprobs`).
    #[arg(long, default_value_t = 20, env = "GYM_SERVE_MAX_PROMPT_LOGPROBS")]
    pub max_prompt_logprobs: usize,
    /// Most stop strings per request.
    #[arg(long, default_value_t = 128, env = "GYM_SERVE_MAX_STOP_STRINGS")]
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes.
    #[arg(long, default_value_t = 1024, env = "GYM_SERVE_MAX_STOP_STRING_BYTES")]
    pub max_stop_string_bytes: usize,
    /// Largest non-streamed response body, in bytes (streams are sent chunk
    /// by chunk and are not bounded by it).
    #[arg(long, default_value_t = 256 << 20, env = "GYM_SERVE_MAX_RESPONSE_BYTES")]
    pub max_response_bytes: usize,
    /// Host memory that requests' token, log-prob and response buffers may
    /// hold at once, in bytes; a request waits for its share (default: the
    /// KV pool's size, at least 1 GiB).
    #[arg(long, env = "GYM_SERVE_MAX_MEMORY")]
    pub max_memory: Option<usize>,
    /// Seconds a connection may take to send a request's headers (also how
    /// long an idle keep-alive connection stays open).
    #[arg(long, default_value_t = 30.0, env = "GYM_SERVE_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: f64,
    /// Seconds a request body may go without sending a byte.
    #[arg(long, default_value_t = 30.0, env = "GYM_SERVE_BODY_IDLE_TIMEOUT")]
    pub body_idle_timeout: f64,
    /// Seconds a JSON request body may take in all.
    #[arg(long, default_value_t = 120.0, env = "GYM_SERVE_BODY_TIMEOUT")]
    pub body_timeout: f64,
    /// Seconds a `POST /v1/weights` body may take in all.
    #[arg(long, default_value_t = 1800.0, env = "GYM_SERVE_WEIGHTS_BODY_TIMEOUT")]
    pub weights_body_timeout: f64,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT; then
    /// running generations are aborted (streams get their final chunk and
    /// `[DONE]`) and, a second later, remaining connections are cut.
    #[arg(long, default_value_t = 10.0, env = "GYM_SERVE_SHUTDOWN_GRACE")]
    pub shutdown_grace: f64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ArchArg {
    Qwen3,
    Qwen2,
    Llama,
}

impl From<ArchArg> for Architecture {
    fn from(a: ArchArg) -> Self {
        match a {
            ArchArg::Qwen3 => Architecture::Qwen3,
            ArchArg::Qwen2 => Architecture::Qwen2,
            ArchArg::Llama => Architecture::Llama,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KvCacheDTypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

impl KvCacheDTypeArg {
    /// The dtype asked for; `None` for the model's own.
    pub fn dtype(self) -> Option<candle_core::DType> {
        match self {
            KvCacheDTypeArg::Auto => None,
            KvCacheDTypeArg::F32 => Some(candle_core::DType::F32),
            KvCacheDTypeArg::Bf16 => Some(candle_core::DType::BF16),
            KvCacheDTypeArg::F16 => Some(candle_core::DType::F16),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum WeightDTypeArg {
    /// The checkpoint's own: bf16 stays bf16, anything else is f32.
    #[default]
    Auto,
    F32,
    Bf16,
}

impl WeightDTypeArg {
    /// The dtype asked for; `None` for the checkpoint's own.
    pub fn dtype(self) -> Option<candle_core::DType> {
        match self {
            WeightDTypeArg::Auto => None,
            WeightDTypeArg::F32 => Some(candle_core::DType::F32),
            WeightDTypeArg::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}

/// `--compute-dtype`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum ComputeDTypeArg {
    #[default]
    F32,
    Bf16,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DTypeArg {
    F32,
    Bf16,
    F16,
}

// Parsed once per process, so the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible API (the default command).
    Serve(ServeArgs),
    /// Write a seeded Hugging Face checkpoint (weights, tokenizer, chat template).
    MakeModel(MakeModelArgs),
    /// Generate from a prompt and print the text, token IDs and log-probs.
    Generate(GenerateArgs),
    /// Push new weights to a running server (POST /v1/weights).
    PushWeights(PushWeightsArgs),
    /// Check a running server against the token-ID contract (NeMo Gym's integration check).
    Validate(ValidateArgs),
    /// Load-test any OpenAI-compatible server (optionally pushing weights during the run).
    Bench(BenchArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine).
    #[arg(long, env = "GYM_SERVE_URL")]
    pub url: String,
    #[arg(long, env = "GYM_SERVE_BENCH_MODEL")]
    pub model: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8, env = "GYM_SERVE_BENCH_CONCURRENCY")]
    pub concurrency: usize,
    /// Requests to send (ignored with --duration).
    #[arg(long, default_value_t = 64, env = "GYM_SERVE_BENCH_REQUESTS")]
    pub requests: usize,
    /// Run for this many seconds instead of a request count.
    #[arg(long, env = "GYM_SERVE_BENCH_DURATION")]
    pub duration: Option<f64>,
    /// Synthetic prompt length in tokens (exact where the server has /tokenize).
    #[arg(long, default_value_t = 256, env = "GYM_SERVE_BENCH_PROMPT_LEN")]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 128, env = "GYM_SERVE_BENCH_MAX_TOKENS")]
    pub max_tokens: usize,
    /// JSONL file with one `{"messages": [...]}` per line, instead of synthetic prompts.
    #[arg(long, env = "GYM_SERVE_BENCH_DATASET")]
    pub dataset: Option<PathBuf>,
    /// Use /v1/completions (default: /v1/chat/completions).
    #[arg(long, env = "GYM_SERVE_BENCH_COMPLETIONS")]
    pub completions: bool,
    #[arg(long, env = "GYM_SERVE_BENCH_STREAM")]
    pub stream: bool,
    #[arg(long, default_value_t = 1, env = "GYM_SERVE_BENCH_N")]
    pub n: usize,
    #[arg(long, default_value_t = 0, env = "GYM_SERVE_BENCH_SEED")]
    pub seed: u64,
    /// Let generation stop at EOS (default: ignore_eos, so lengths are exact).
    #[arg(long, env = "GYM_SERVE_BENCH_ALLOW_EOS")]
    pub allow_eos: bool,
    /// Write the summary as JSON here.
    #[arg(long, env = "GYM_SERVE_BENCH_JSON")]
    pub json: Option<PathBuf>,
    #[arg(long, env = "GYM_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A safetensors file to push to /v1/weights during the run.
    #[arg(long, env = "GYM_SERVE_BENCH_REFIT")]
    pub refit: Option<PathBuf>,
    /// Seconds between refit pushes.
    #[arg(long, default_value_t = 10.0, env = "GYM_SERVE_BENCH_REFIT_EVERY")]
    pub refit_every: f64,
    #[arg(long, env = "GYM_SERVE_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine).
    #[arg(long, env = "GYM_SERVE_URL")]
    pub url: String,
    /// Model name to send (default: none, or the server's only model).
    #[arg(long, env = "GYM_SERVE_VALIDATE_MODEL")]
    pub model: Option<String>,
    #[arg(long, env = "GYM_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, env = "GYM_SERVE_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// A safetensors file to push for the weight-update check (skipped without it).
    #[arg(long, env = "GYM_SERVE_VALIDATE_WEIGHTS")]
    pub weights: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["dir", "file"])))]
pub struct PushWeightsArgs {
    /// Server base URL, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine).
    /// Repeat it (or separate with commas) for several replicas: the update
    /// is staged on every one, then committed on all of them or on none.
    #[arg(long, env = "GYM_SERVE_URL", required = true, value_delimiter = ',')]
    pub url: Vec<String>,
    /// A checkpoint directory (single or sharded safetensors).
    #[arg(long, env = "GYM_SERVE_PUSH_DIR")]
    pub dir: Option<PathBuf>,
    /// One safetensors file.
    #[arg(long, env = "GYM_SERVE_PUSH_FILE")]
    pub file: Option<PathBuf>,
    /// Version label (default: the server's current version + 1).
    #[arg(long, env = "GYM_SERVE_PUSH_VERSION")]
    pub version: Option<String>,
    /// Replace only the tensors sent (default: every parameter is required).
    #[arg(long, env = "GYM_SERVE_PUSH_PARTIAL")]
    pub partial: bool,
    /// Push a LoRA adapter under this name instead of the base weights:
    /// `--dir` is a PEFT adapter directory (its adapter_config.json goes
    /// along), or `--file` its adapter_model.safetensors (the server keeps
    /// the adapter's config). A new name creates the adapter.
    #[arg(long, env = "GYM_SERVE_PUSH_ADAPTER")]
    pub adapter: Option<String>,
    /// What running requests do during the swap: wait, abort or keep.
    #[arg(long, default_value = "wait", env = "GYM_SERVE_PUSH_PAUSE")]
    pub pause: PauseMode,
    /// With several --url: send the body once, to the first replica, which
    /// passes it on to the next as it stages (`forward_to`), and so on; the
    /// commit still goes to every replica. The replicas need an admin key.
    #[arg(long, env = "GYM_SERVE_PUSH_CHAIN")]
    pub chain: bool,
    #[arg(long, env = "GYM_SERVE_ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct MakeModelArgs {
    /// Directory to write the checkpoint into.
    #[arg(long, env = "GYM_SERVE_OUT")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "qwen3", env = "GYM_SERVE_ARCH")]
    pub arch: ArchArg,
    #[arg(long, value_enum, default_value = "tiny", env = "GYM_SERVE_PRESET")]
    pub preset: Preset,
    #[arg(long, env = "GYM_SERVE_LAYERS")]
    pub layers: Option<usize>,
    #[arg(long, env = "GYM_SERVE_HIDDEN")]
    pub hidden: Option<usize>,
    #[arg(long, env = "GYM_SERVE_HEADS")]
    pub heads: Option<usize>,
    #[arg(long, env = "GYM_SERVE_KV_HEADS")]
    pub kv_heads: Option<usize>,
    #[arg(long, env = "GYM_SERVE_HEAD_DIM")]
    pub head_dim: Option<usize>,
    #[arg(long, env = "GYM_SERVE_INTERMEDIATE")]
    pub intermediate: Option<usize>,
    /// Rows of the embedding (the tokenizer itself has at most 2048 tokens).
    #[arg(long, env = "GYM_SERVE_VOCAB")]
    pub vocab: Option<usize>,
    #[arg(long, env = "GYM_SERVE_TIE_WORD_EMBEDDINGS")]
    pub tie_word_embeddings: Option<bool>,
    #[arg(long, default_value_t = 0, env = "GYM_SERVE_SEED")]
    pub seed: u64,
    /// Dtype the weights are stored in.
    #[arg(long, value_enum, default_value = "f32", env = "GYM_SERVE_DTYPE")]
    pub dtype: DTypeArg,
    /// Number of safetensors shards (more than 1 writes an index file).
    #[arg(long, default_value_t = 1, env = "GYM_SERVE_SHARDS")]
    pub shards: usize,
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face checkpoint directory.
    #[arg(long, env = "GYM_SERVE_MODEL")]
    pub model: PathBuf,
    /// Prompt text (encoded as is unless --chat).
    #[arg(long, env = "GYM_SERVE_PROMPT", required_unless_present = "messages")]
    pub prompt: Option<String>,
    /// Wrap the prompt as a user message with the chat template.
    #[arg(long, env = "GYM_SERVE_CHAT")]
    pub chat: bool,
    /// A JSON file with an OpenAI `messages` list, rendered with the chat template.
    #[arg(long, env = "GYM_SERVE_MESSAGES", conflicts_with = "prompt")]
    pub messages: Option<PathBuf>,
    /// A JSON file with an OpenAI `tools` list (with --messages).
    #[arg(long, env = "GYM_SERVE_TOOLS", requires = "messages")]
    pub tools: Option<PathBuf>,
    /// Chat template switch for `<think>` reasoning (with --chat).
    #[arg(long, env = "GYM_SERVE_ENABLE_THINKING")]
    pub enable_thinking: Option<bool>,
    #[arg(long, default_value_t = 32, env = "GYM_SERVE_MAX_TOKENS")]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 1.0, env = "GYM_SERVE_TEMPERATURE")]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0, env = "GYM_SERVE_TOP_P")]
    pub top_p: f32,
    /// -1 disables.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true, env = "GYM_SERVE_TOP_K")]
    pub top_k: i64,
    #[arg(long, default_value_t = 0.0, env = "GYM_SERVE_MIN_P")]
    pub min_p: f32,
    #[arg(long, env = "GYM_SERVE_SEED")]
    pub seed: Option<u64>,
    #[arg(long, default_value_t = 1, env = "GYM_SERVE_N")]
    pub n: usize,
    #[arg(long, default_value = "processed", env = "GYM_SERVE_LOGPROBS_MODE")]
    pub logprobs_mode: LogprobsMode,
    /// Print one JSON object instead of text.
    #[arg(long, env = "GYM_SERVE_JSON")]
    pub json: bool,
    /// Run on the GPU (needs the cuda or metal feature).
    #[arg(long, env = "GYM_SERVE_GPU")]
    pub gpu: bool,
}
