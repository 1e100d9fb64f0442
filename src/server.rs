//! `gym-serve --model PATH`: load the checkpoint, start the engine thread,
//! serve HTTP until SIGINT/SIGTERM, then let in-flight requests finish
//! within `--shutdown-grace`.

use crate::api::admission::MemoryBudget;
use crate::api::limits::{seconds, RequestLimits};
use crate::api::types::SamplingDefaults;
use crate::api::{router, AppState};
use crate::cli::{ComputeDTypeArg, ServeArgs, WeightDTypeArg};
use crate::connections::{ConnectionOptions, OpenConnections};
use crate::engine::refit::{Refitter, RefitterOptions};
use crate::engine::{EngineHandle, EngineOptions, PauseMode};
use crate::loader::{run_dtype, select_device, LoadedModel};
use anyhow::Context;
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

/// Request memory budget when `--max-memory` is not given.
const MIN_DEFAULT_MEMORY: usize = 1 << 30;

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Refuse an unsafe bind before loading anything.
    let admin_api_key = crate::api::auth::admin_key(
        args.api_key.as_deref(),
        args.admin_api_key.as_deref(),
        &args.host,
        args.allow_open_admin,
    )?;
    let model_dir = args
        .model
        .clone()
        .context("--model PATH is required (a Hugging Face checkpoint directory)")?;
    let device = select_device(args.gpu)?;
    let dtype = run_dtype(&device);
    tracing::info!(model = %model_dir.display(), ?device, ?dtype, "loading checkpoint");
    let started = Instant::now();
    let dir = model_dir.clone();
    let device_for_updates = device.clone();
    // Our CPU kernels reduce every row in a fixed order; candle's (GPU, and
    // CPU prefill in the fast mode) do not promise that.
    crate::model::linear::set_fast_nondeterministic(args.fast_nondeterministic);
    // (`--compute-dtype bf16` holds every matrix as bf16 and multiplies it on
    // our kernels, fast mode or not.)
    let deterministic = device.is_cpu()
        && (!args.fast_nondeterministic || args.compute_dtype == ComputeDTypeArg::Bf16);
    if args.fast_nondeterministic {
        tracing::info!("--fast-nondeterministic: prefill steps use candle's matmul; results depend on batching");
    }
    let matrices = weight_matrix_dtype(&args, device.is_cpu())?;
    let loaded = tokio::task::spawn_blocking(move || {
        LoadedModel::load_holding(&dir, &device, dtype, matrices)
    })
    .await
    .context("loader thread")?
    .with_context(|| format!("loading {}", model_dir.display()))?;
    tracing::info!(
        architecture = ?loaded.config.architecture,
        parameters = loaded.store.len(),
        megabytes = loaded.store.size_in_bytes() as f64 / 1e6,
        seconds = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let chat = Arc::new(loaded.chat);
    let max_weights_bytes = args
        .max_weights_bytes
        // Twice the f32 size, whatever the weights are held in: a trainer
        // may push f32 into bf16-held weights.
        .unwrap_or_else(|| (8 * loaded.store.elem_count()).max(64 << 20));
    let lora = Arc::new(crate::lora::LoraRegistry::new(crate::lora::LoraLimits {
        max_loras: args.lora.max_loras,
        max_rank: args.lora.max_lora_rank,
    }));
    let engine = EngineHandle::spawn(
        loaded.model,
        chat.eos_token_ids().to_vec(),
        EngineOptions {
            max_model_len: args.max_model_len,
            weight_version: Some(args.weight_version.clone()),
            kv_cache_tokens: args.kv_cache_tokens,
            kv_cache_dtype: args.kv_cache_dtype.dtype(),
            block_size: Some(args.block_size),
            max_num_batched_tokens: Some(args.max_num_batched_tokens),
            max_num_seqs: Some(args.max_num_seqs),
            adapters: Some(lora.clone()),
            gpu_memory_utilization: Some(args.gpu_memory_utilization),
            weights_bytes: Some(loaded.store.size_in_bytes()),
            sampling_transfer: args.sampling_transfer,
        },
    )?;
    let served_model_name = args.served_model_name.clone().unwrap_or_else(|| {
        model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| model_dir.display().to_string())
    });
    let engine_stats = engine.shared_stats();
    let engine_on_cpu = device_for_updates.is_cpu();
    let refitter = Refitter::new(
        engine.clone(),
        loaded.config,
        device_for_updates,
        loaded.store,
        RefitterOptions {
            staged_timeout: seconds(args.staged_update_timeout),
        },
    );
    let refits = refitter.stats();
    let limits = RequestLimits::from_args(&args.limits);
    let memory_bytes = args.limits.max_memory.unwrap_or_else(|| {
        // A GPU pool is not host memory: the host budget stays a fifth of RAM at most.
        let pool = engine.limits().kv_pool_bytes;
        let pool = if engine_on_cpu {
            pool
        } else {
            pool.min(crate::engine::total_memory_bytes() / 5)
        };
        pool.max(MIN_DEFAULT_MEMORY)
    });
    let memory = Arc::new(MemoryBudget::new(memory_bytes));
    let connections = Arc::new(OpenConnections::default());
    tracing::info!(
        max_memory = memory.total_bytes(),
        max_response_bytes = limits.max_response_bytes,
        max_request_bytes = limits.max_request_bytes,
        "request limits"
    );
    // Bound before the state is built: the default replica id is the
    // address (with --port 0, the port picked).
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let replica_id = args.replica_id.clone().unwrap_or_else(|| addr.to_string());
    let state = Arc::new(AppState {
        engine,
        chat,
        served_model_name,
        model_root: model_dir.display().to_string(),
        api_key: args.api_key.clone(),
        reasoning_parser: args.reasoning_parser,
        tool_call_parser: args.tool_call_parser,
        defaults: SamplingDefaults {
            logprobs_mode: args.logprobs_mode,
            seed: args.seed,
        },
        created: crate::api::protocol::unix_time(),
        refitter,
        replica_id: replica_id.clone(),
        admin_api_key,
        max_weights_bytes,
        weights_body_idle: std::time::Duration::from_secs_f64(args.weights_body_idle_timeout),
        metrics: crate::api::metrics::Metrics::new(
            engine_stats,
            refits,
            connections.clone(),
            memory.clone(),
            replica_id,
        ),
        limits,
        memory,
        lora,
        deterministic,
        compute_dtype: if engine_on_cpu && args.compute_dtype == ComputeDTypeArg::F32 {
            "f32"
        } else {
            "bf16"
        },
    });
    for m in &args.lora.lora_modules {
        crate::api::lora::load_adapter(&state, &m.name, m.path.clone())
            .await
            .map_err(|e| anyhow::anyhow!("--lora-modules {}: {e}", m.name))?;
    }
    tracing::info!(%addr, replica_id = %state.replica_id, model = %state.served_model_name, max_model_len = state.max_model_len(), "serving");
    // Scripts and tests read the bound address (with --port 0) from stdout.
    println!("gym-serve listening on http://{addr}");
    std::io::stdout().flush().ok();
    let options = ConnectionOptions {
        header_read_timeout: seconds(args.limits.header_read_timeout),
        shutdown_grace: seconds(args.limits.shutdown_grace),
    };
    let engine = state.engine.clone();
    let abort_running = || async move {
        // Ends every running generation with what it has; streams send
        // their final chunk and `[DONE]`.
        let _ = engine.pause(PauseMode::Abort).await;
    };
    crate::connections::serve(
        listener,
        router(state),
        options,
        connections,
        shutdown_signal(),
        abort_running,
    )
    .await;
    tracing::info!("shut down");
    Ok(())
}

/// The dtype weight matrices are held in (`None`: the checkpoint's own),
/// after `--compute-dtype bf16` is checked and switched on: it multiplies
/// bf16 weights, so they are held as bf16 (an f32 checkpoint rounded).
fn weight_matrix_dtype(
    args: &ServeArgs,
    on_cpu: bool,
) -> anyhow::Result<Option<candle_core::DType>> {
    if args.compute_dtype == ComputeDTypeArg::F32 || !on_cpu {
        if !on_cpu && args.compute_dtype == ComputeDTypeArg::Bf16 {
            tracing::info!("--compute-dtype bf16: the GPU computes in bf16 already");
        }
        return Ok(args.weight_dtype.dtype());
    }
    if !crate::model::gemm::bf16_products::supported() {
        anyhow::bail!(
            "--compute-dtype bf16 needs a CPU with AVX512-BF16 dot products, which this one \
             lacks (exact f32, the default, is faster here than emulating them)"
        );
    }
    if args.weight_dtype == WeightDTypeArg::F32 {
        anyhow::bail!(
            "--compute-dtype bf16 multiplies bf16 weights; drop --weight-dtype f32 \
             (or use --compute-dtype f32 for exact arithmetic)"
        );
    }
    crate::model::linear::set_bf16_products(true);
    tracing::info!(
        kernel = crate::model::gemm::bf16_products::kernel_name(),
        "--compute-dtype bf16: activations rounded to bf16 for every projection, \
         f32 sums; weight matrices held as bf16"
    );
    Ok(Some(candle_core::DType::BF16))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests (--shutdown-grace)");
}
