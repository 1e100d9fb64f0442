//! Reading and writing safetensors checkpoints: one `model.safetensors`, or
//! shards listed in `model.safetensors.index.json`.

use super::WeightsError;
use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The safetensors files that make up the checkpoint in `dir`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| WeightsError::io(&index, e))?;
        let parsed: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| WeightsError::Format(format!("{}: {e}", index.display())))?;
        let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(WeightsError::Format(format!(
        "{} has neither {SINGLE_FILE} nor {INDEX_FILE}",
        dir.display()
    )))
}

/// Reads every tensor of the checkpoint in `dir`, in the dtype it was stored in.
pub fn read_checkpoint(
    dir: &Path,
    device: &Device,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    let mut all = HashMap::new();
    for file in checkpoint_files(dir)? {
        let tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| WeightsError::Format(format!("{}: {e}", file.display())))?;
        all.extend(tensors);
    }
    Ok(all)
}

/// Writes `tensors` as a safetensors file with the `{"format": "pt"}` metadata
/// transformers checks for.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), WeightsError> {
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| WeightsError::Format(format!("{}: {e}", path.display())))
}

/// Writes a checkpoint into `dir`: one file, or `shards` files plus an index.
pub fn write_checkpoint(
    dir: &Path,
    tensors: &[(String, Tensor)],
    shards: usize,
) -> Result<(), WeightsError> {
    if shards <= 1 {
        return write_safetensors(&dir.join(SINGLE_FILE), tensors);
    }
    let per_shard = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    let mut total_size = 0usize;
    for (i, chunk) in tensors.chunks(per_shard.max(1)).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        write_safetensors(&dir.join(&file), chunk)?;
        for (name, t) in chunk {
            total_size += t.elem_count() * t.dtype().size_in_bytes();
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({
        "metadata": {"total_size": total_size},
        "weight_map": weight_map,
    });
    let path = dir.join(INDEX_FILE);
    let text =
        serde_json::to_string_pretty(&index).map_err(|e| WeightsError::Format(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| WeightsError::io(&path, e))
}
