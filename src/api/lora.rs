//! LoRA adapters over HTTP, as vLLM serves them: `POST /v1/load_lora_adapter`,
//! `POST /v1/unload_lora_adapter`, the adapters' entries in `/v1/models`,
//! resolving a request's `model` to an adapter, and the adapter push
//! (`POST /v1/weights?adapter=NAME`): one adapter's tensors replaced all or
//! nothing, with a version of its own.
//!
//! The push is its own small transaction (read, check, build the new
//! version beside the served one, swap it in the registry, tell the engine),
//! independent of the full-weights update path.

use super::error::ApiError;
use super::json::ApiJson;
use super::weights::body as weights_body;
use super::AppState;
use crate::engine::PauseMode;
use crate::lora::registry::{check_name, read_adapter_dir};
use crate::lora::stream::{AdapterStream, ResolveConfig, CONFIG_METADATA};
use crate::lora::{AdapterConfig, LoraAdapter, LoraError, LoraRegistry};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Header a push may carry the adapter's `adapter_config.json` in (else
/// the safetensors metadata key `adapter_config`, else the config of the
/// adapter being replaced).
pub const CONFIG_HEADER: &str = "x-adapter-config";

/// Version label of an adapter loaded from disk.
const LOADED_VERSION: &str = "0";

fn refused(adapter: &str, source: LoraError) -> ApiError {
    ApiError::Lora {
        adapter: adapter.to_string(),
        source,
    }
}

impl AppState {
    /// The adapter a request's `model` names: `None` for the base model
    /// (or no `model`), 404 for a name nothing is served under.
    pub fn resolve_model(&self, model: Option<&str>) -> Result<Option<Arc<LoraAdapter>>, ApiError> {
        match model {
            None => Ok(None),
            Some(m) if m == self.served_model_name || m == self.model_root => Ok(None),
            Some(m) => self
                .lora
                .get(m)
                .map(Some)
                .ok_or_else(|| ApiError::ModelNotFound(m.to_string())),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct LoadRequest {
    lora_name: String,
    lora_path: PathBuf,
}

#[derive(Debug, Deserialize)]
pub struct UnloadRequest {
    lora_name: String,
}

/// Checks a name a client wants to serve an adapter under.
fn check_new_name(state: &AppState, name: &str) -> Result<(), ApiError> {
    check_name(name).map_err(|e| refused(name, e))?;
    if name == state.served_model_name || name == state.model_root {
        return Err(refused(
            name,
            LoraError::InvalidName("it is the base model's name".into()),
        ));
    }
    Ok(())
}

/// Reads `dir` and starts serving it as `name` (refused if the name is taken).
pub async fn load_adapter(state: &Arc<AppState>, name: &str, dir: PathBuf) -> Result<(), ApiError> {
    check_new_name(state, name)?;
    state.lora.check_room(name).map_err(|e| refused(name, e))?;
    if state.lora.get(name).is_some() {
        return Err(refused(name, LoraError::AlreadyLoaded));
    }
    let (config, limits, owned_name) = (
        state.refitter.model_config().clone(),
        state.lora.limits(),
        name.to_string(),
    );
    let shown = crate::weights::shown(&dir);
    let mut adapter = tokio::task::spawn_blocking(move || {
        read_adapter_dir(&owned_name, &dir, LOADED_VERSION, &config, limits)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("adapter loader: {e}")))?
    .map_err(|e| refused(name, e))?;
    adapter.source = shown;
    tracing::info!(
        adapter = name,
        rank = adapter.rank(),
        projections = adapter.num_adapted(),
        bytes = adapter.bytes(),
        "LoRA adapter loaded"
    );
    state
        .lora
        .insert(Arc::new(adapter), false)
        .map_err(|e| refused(name, e))?;
    Ok(())
}

/// `POST /v1/load_lora_adapter {lora_name, lora_path}` (vLLM's answer: plain text).
pub async fn load_lora_adapter(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<LoadRequest>,
) -> Result<String, ApiError> {
    load_adapter(&state, &req.lora_name, req.lora_path).await?;
    Ok(format!(
        "Success: LoRA adapter '{}' added successfully.",
        req.lora_name
    ))
}

/// `POST /v1/unload_lora_adapter {lora_name}`: new requests can no longer
/// select it; sequences already running under it finish.
pub async fn unload_lora_adapter(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<UnloadRequest>,
) -> Result<String, ApiError> {
    state
        .lora
        .remove(&req.lora_name)
        .map_err(|e| refused(&req.lora_name, e))?;
    tracing::info!(adapter = %req.lora_name, "LoRA adapter unloaded");
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        req.lora_name
    ))
}

/// One adapter's entry in `/v1/models`, as vLLM lists them.
pub fn adapter_card<'a>(state: &'a AppState, a: &'a LoraAdapter) -> super::protocol::ModelCard<'a> {
    super::protocol::ModelCard {
        id: &a.name,
        object: "model",
        created: state.created,
        owned_by: "gym-serve",
        root: &a.source,
        max_model_len: state.max_model_len(),
        parent: Some(&state.served_model_name),
        weight_version: Some(&a.version),
        deterministic: state.deterministic,
        compute_dtype: state.compute_dtype,
    }
}

/// What an adapter push answers.
#[derive(Debug, Serialize)]
pub struct AdapterPushed {
    adapter: String,
    weight_version: String,
    tensors: usize,
    bytes: usize,
    /// From the request's start to the new version serving.
    seconds: f64,
    /// Sequences ended (`pause=abort`) and switched to the new version (`keep`).
    aborted: usize,
    kept: usize,
}

/// A push's options from the query of `POST /v1/weights`.
pub struct AdapterPush {
    pub name: String,
    pub version: Option<String>,
    pub pause: PauseMode,
}

/// The config of a pushed adapter: the header, else the file's metadata,
/// else the current version's.
fn push_config(
    name: &str,
    header: Option<AdapterConfig>,
    from_file: Option<&str>,
    current: Option<&LoraAdapter>,
) -> Result<AdapterConfig, LoraError> {
    if let Some(config) = header {
        return Ok(config);
    }
    if let Some(text) = from_file {
        return AdapterConfig::from_json(text);
    }
    current.map(|c| c.config.clone()).ok_or_else(|| {
        LoraError::Config(format!(
            "adapter {name:?} is new: send its adapter_config.json in the {CONFIG_HEADER} header or the file's `{CONFIG_METADATA}` metadata"
        ))
    })
}

/// The adapter config a push's header carries, if any.
fn header_config(headers: &HeaderMap) -> Result<Option<AdapterConfig>, LoraError> {
    let Some(h) = headers.get(CONFIG_HEADER) else {
        return Ok(None);
    };
    let text = h
        .to_str()
        .map_err(|_| LoraError::Config(format!("the {CONFIG_HEADER} header is not ASCII")))?;
    AdapterConfig::from_json(text).map(Some)
}

/// `POST /v1/weights?adapter=NAME[&version=V&pause=wait|abort|keep]`: the
/// body is a PEFT adapter state dict as safetensors; it replaces (or
/// creates) adapter NAME all or nothing.
pub async fn push_adapter(
    state: Arc<AppState>,
    push: AdapterPush,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<AdapterPushed>, ApiError> {
    let started = Instant::now();
    let name = push.name.clone();
    let (limit, idle) = (state.max_weights_bytes, state.weights_body_idle);
    let mut body = body;
    let current = state.lora.get(&name);
    let version = push.version.clone().unwrap_or_else(|| {
        current.as_ref().map_or("1".to_string(), |c| {
            crate::engine::refit::next_version(&c.version)
        })
    });
    let checked = check_new_name(&state, &name).and_then(|()| {
        state
            .lora
            .check_room(&name)
            .map_err(|e| refused(&name, e))?;
        header_config(&headers).map_err(|e| refused(&name, e))
    });
    let header = match checked {
        Ok(header) => header,
        Err(e) => {
            // The client still sending gets the answer, not a reset.
            weights_body::discard(body, &headers, idle);
            return Err(e);
        }
    };
    // The config is known once the file's header is in (it may carry it).
    let limits = state.lora.limits();
    let resolve: ResolveConfig = {
        let (name, current) = (name.clone(), current.clone());
        Box::new(move |from_file| {
            let config = push_config(&name, header, from_file, current.as_deref())?;
            LoraRegistry::check_limits(limits, &config)?;
            Ok(config)
        })
    };
    let model = state.refitter.model_config().clone();
    let mut stream = AdapterStream::new(&name, &version, model, resolve);
    let mut len = 0usize;
    let received = weights_body::receive_with(&mut body, &headers, limit, idle, |chunk| {
        len += chunk.len();
        stream.feed(chunk).map_err(|e| refused(&name, e))
    })
    .await;
    if let Err(e) = received {
        weights_body::discard(body, &headers, idle);
        return Err(e);
    }
    let received_s = started.elapsed().as_secs_f64();
    let adapter = stream.finish().map_err(|e| refused(&name, e))?;
    let mut adapter = adapter;
    adapter.source = "pushed".into();
    let tensors = 2 * adapter.num_adapted();
    state
        .lora
        .insert(Arc::new(adapter), true)
        .map_err(|e| refused(&name, e))?;
    let report = state.engine.swap_adapter(name.clone(), push.pause).await?;
    let seconds = started.elapsed().as_secs_f64();
    // Where a slow push's time went: receiving and converting, or the swap.
    tracing::info!(
        adapter = %name, version = %version, bytes = len, seconds, received_s,
        "LoRA adapter pushed"
    );
    Ok(Json(AdapterPushed {
        adapter: name,
        weight_version: version,
        tensors,
        bytes: len,
        seconds,
        aborted: report.aborted,
        kept: report.kept,
    }))
}
