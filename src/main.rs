use anyhow::Context;
use clap::Parser;
use gym_serve::cli::{Cli, Command, DTypeArg, GenerateArgs, MakeModelArgs, ServeArgs};
use gym_serve::engine::{DistributionParams, EngineHandle, SamplingParams};
use gym_serve::loader::{run_dtype, select_device, LoadedModel};
use gym_serve::make_model::{make_model, MakeModelOptions};
use serde_json::{json, Map, Value};
use std::time::Instant;

#[global_allocator]
static ALLOC: gym_serve::huge_pages::HugePageAlloc = gym_serve::huge_pages::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    gym_serve::model::cpu_threads::configure();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::MakeModel(args)) => run_make_model(args),
        Some(Command::Generate(args)) => run_generate(args),
        Some(Command::Serve(args)) => run_serve(args),
        Some(Command::PushWeights(args)) => gym_serve::client::push::push_weights(args),
        Some(Command::Bench(args)) => gym_serve::client::bench::bench(args),
        Some(Command::Validate(args)) => {
            let target = gym_serve::client::validate::Target::new(
                &args.url,
                args.model,
                args.api_key,
                args.admin_api_key,
            )?;
            if gym_serve::client::validate::run(&target, args.weights.as_deref()) {
                Ok(())
            } else {
                anyhow::bail!("validation failed")
            }
        }
        None => run_serve(cli.serve),
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(gym_serve::server::serve(args));
    // Blocking work still running (a weight staging, a response being
    // serialized) must not hold the exit past the shutdown grace.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

fn run_make_model(a: MakeModelArgs) -> anyhow::Result<()> {
    let mut shape = a.preset.shape(a.arch.into());
    let set = |slot: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *slot = v;
        }
    };
    set(&mut shape.layers, a.layers);
    set(&mut shape.hidden, a.hidden);
    set(&mut shape.heads, a.heads);
    set(&mut shape.kv_heads, a.kv_heads);
    set(&mut shape.head_dim, a.head_dim);
    set(&mut shape.intermediate, a.intermediate);
    set(&mut shape.vocab, a.vocab);
    if let Some(t) = a.tie_word_embeddings {
        shape.tie_word_embeddings = t;
    }
    let dtype = match a.dtype {
        DTypeArg::F32 => candle_core::DType::F32,
        DTypeArg::Bf16 => candle_core::DType::BF16,
        DTypeArg::F16 => candle_core::DType::F16,
    };
    let started = Instant::now();
    make_model(
        &a.out,
        &MakeModelOptions {
            shape,
            seed: a.seed,
            dtype,
            shards: a.shards,
        },
    )
    .with_context(|| format!("writing a model to {}", a.out.display()))?;
    tracing::info!(out = %a.out.display(), seconds = started.elapsed().as_secs_f32(), "model written");
    Ok(())
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    let device = select_device(a.gpu)?;
    let started = Instant::now();
    let loaded = LoadedModel::load(&a.model, &device, run_dtype(&device))
        .with_context(|| format!("loading {}", a.model.display()))?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f32(),
        params = loaded.store.len(),
        "model loaded"
    );
    let chat = &loaded.chat;
    let mut kwargs = Map::new();
    if let Some(t) = a.enable_thinking {
        kwargs.insert("enable_thinking".into(), Value::Bool(t));
    }
    let read_json = |path: &std::path::Path| -> anyhow::Result<Value> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    };
    let prompt_ids = match (&a.messages, &a.prompt) {
        (Some(path), _) => {
            let tools = a.tools.as_deref().map(read_json).transpose()?;
            chat.encode_chat(&read_json(path)?, tools.as_ref(), true, &kwargs)?
        }
        (None, Some(prompt)) if a.chat => {
            let messages = json!([{"role": "user", "content": prompt}]);
            chat.encode_chat(&messages, None, true, &kwargs)?
        }
        (None, Some(prompt)) => chat.tokenizer.encode(prompt, true)?,
        (None, None) => anyhow::bail!("give --prompt or --messages"),
    };
    let params = SamplingParams {
        distribution: DistributionParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: usize::try_from(a.top_k).ok().filter(|&k| k > 0),
            min_p: a.min_p,
        },
        max_tokens: a.max_tokens,
        seed: a.seed,
        n: a.n,
        logprobs_mode: a.logprobs_mode,
        ..SamplingParams::default()
    };
    let engine = EngineHandle::spawn(
        loaded.model,
        chat.eos_token_ids().to_vec(),
        Default::default(),
    )?;
    let started = Instant::now();
    let choices = engine
        .generate(prompt_ids.clone(), params)?
        .collect_blocking()?;
    let seconds = started.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        let text = chat.tokenizer.decode(&c.token_ids, false)?;
        if a.json {
            out.push(json!({
                "index": i,
                "text": text,
                "generation_token_ids": c.token_ids,
                "generation_log_probs": c.logprobs,
                "finish_reason": c.finish_reason.map(|f| f.as_str()),
            }));
        } else {
            println!(
                "--- choice {i} ({}) ---",
                c.finish_reason.map_or("?", |f| f.as_str())
            );
            println!("{text}");
            println!("token ids: {:?}", c.token_ids);
            let lp: Vec<String> = c.logprobs.iter().map(|l| format!("{l:.4}")).collect();
            println!("log-probs: [{}]", lp.join(", "));
        }
    }
    if a.json {
        println!(
            "{}",
            json!({"prompt_token_ids": prompt_ids, "choices": out})
        );
    } else {
        let generated: usize = choices.iter().map(|c| c.token_ids.len()).sum();
        println!("prompt token ids: {prompt_ids:?}");
        println!("{generated} tokens in {seconds:.3}s");
    }
    Ok(())
}
