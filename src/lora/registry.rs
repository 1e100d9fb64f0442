//! The adapters being served, by name, within `--max-loras` and
//! `--max-lora-rank`; and reading one from a PEFT directory. Shared by the
//! HTTP layer (which validates and names them) and the engine (which
//! resolves a sequence's adapter when it is queued).

use super::adapter::LoraAdapter;
use super::config::{AdapterConfig, MAX_CONFIG_BYTES};
use super::LoraError;
use crate::config::ModelConfig;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// Longest adapter name accepted.
const MAX_NAME_BYTES: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct LoraLimits {
    /// Most adapters loaded at once.
    pub max_loras: usize,
    /// Largest rank accepted.
    pub max_rank: usize,
}

impl Default for LoraLimits {
    fn default() -> Self {
        Self {
            max_loras: 8,
            max_rank: 64,
        }
    }
}

#[derive(Debug, Default)]
pub struct LoraRegistry {
    limits: LoraLimits,
    adapters: RwLock<BTreeMap<String, Arc<LoraAdapter>>>,
}

impl LoraRegistry {
    pub fn new(limits: LoraLimits) -> Self {
        Self {
            limits,
            adapters: RwLock::default(),
        }
    }

    pub fn limits(&self) -> LoraLimits {
        self.limits
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<LoraAdapter>>> {
        // A panic while holding the lock cannot leave the map half-written
        // (every write is one insert or remove), so a poisoned lock is usable.
        self.adapters.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<LoraAdapter>>> {
        self.adapters.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The version of `name` being served now.
    pub fn get(&self, name: &str) -> Option<Arc<LoraAdapter>> {
        self.read().get(name).cloned()
    }

    /// Every adapter, by name.
    pub fn list(&self) -> Vec<Arc<LoraAdapter>> {
        self.read().values().cloned().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Refuses a config over the rank limit.
    pub fn check_config(&self, config: &AdapterConfig) -> Result<(), LoraError> {
        Self::check_limits(self.limits, config)
    }

    /// [`Self::check_config`] without the registry at hand.
    pub fn check_limits(limits: LoraLimits, config: &AdapterConfig) -> Result<(), LoraError> {
        if config.rank > limits.max_rank {
            return Err(LoraError::RankTooLarge {
                rank: config.rank,
                limit: limits.max_rank,
            });
        }
        Ok(())
    }

    /// Adds a new adapter (`replace: false`, refused if the name is taken)
    /// or replaces or creates one (`replace: true`, a push). Returns the
    /// version it replaced.
    pub fn insert(
        &self,
        adapter: Arc<LoraAdapter>,
        replace: bool,
    ) -> Result<Option<Arc<LoraAdapter>>, LoraError> {
        self.check_config(&adapter.config)?;
        let mut map = self.write();
        let exists = map.contains_key(&adapter.name);
        if exists && !replace {
            return Err(LoraError::AlreadyLoaded);
        }
        if !exists && map.len() >= self.limits.max_loras {
            return Err(LoraError::TooManyAdapters { loaded: map.len() });
        }
        Ok(map.insert(adapter.name.clone(), adapter))
    }

    /// Whether a new adapter could be added now (checked before reading one).
    pub fn check_room(&self, name: &str) -> Result<(), LoraError> {
        let map = self.read();
        if !map.contains_key(name) && map.len() >= self.limits.max_loras {
            return Err(LoraError::TooManyAdapters { loaded: map.len() });
        }
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<Arc<LoraAdapter>, LoraError> {
        self.write().remove(name).ok_or(LoraError::NotFound)
    }
}

/// An adapter name a client gave: non-empty, bounded, printable.
pub fn check_name(name: &str) -> Result<(), LoraError> {
    if name.is_empty() {
        return Err(LoraError::InvalidName("it is empty".into()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(LoraError::InvalidName(format!(
            "it is {} bytes, over {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(LoraError::InvalidName("it has control characters".into()));
    }
    Ok(())
}

/// Reads a regular file of at most `limit` bytes.
fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, LoraError> {
    let shown = crate::weights::shown(path);
    let io = |e: std::io::Error| LoraError::Io {
        path: shown.clone(),
        message: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(LoraError::Io {
            path: shown.clone(),
            message: "not a regular file".into(),
        });
    }
    if meta.len() > limit {
        return Err(LoraError::TooLarge {
            path: shown.clone(),
            size: meta.len(),
            limit,
        });
    }
    std::fs::read(path).map_err(io)
}

/// Reads a PEFT adapter directory (`adapter_config.json` and
/// `adapter_model.safetensors`), checking it against `model` and `limits`.
pub fn read_adapter_dir(
    name: &str,
    dir: &Path,
    version: &str,
    model: &ModelConfig,
    limits: LoraLimits,
) -> Result<LoraAdapter, LoraError> {
    let config_bytes = read_bounded(&dir.join("adapter_config.json"), MAX_CONFIG_BYTES as u64)?;
    let text =
        String::from_utf8(config_bytes).map_err(|_| LoraError::Config("is not UTF-8".into()))?;
    let config = AdapterConfig::from_json(&text)?;
    if config.rank > limits.max_rank {
        return Err(LoraError::RankTooLarge {
            rank: config.rank,
            limit: limits.max_rank,
        });
    }
    config.targeted(model.num_hidden_layers)?;
    let limit = LoraAdapter::max_file_bytes(&config, model) as u64;
    let weights_path = dir.join("adapter_model.safetensors");
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(LoraError::Format(
            "only adapter_model.safetensors is read (adapter_model.bin is a pickle); save with safe_serialization=True".into(),
        ));
    }
    let bytes = read_bounded(&weights_path, limit)?;
    LoraAdapter::from_safetensors(name, version, config, &bytes, model)
}
