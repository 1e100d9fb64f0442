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
        let tensors = match read_file(&file, device) {
            // A tensor type our header reader refuses (an integer buffer
            // the model may not even read): candle's loader takes any.
            Err(WeightsError::UnsupportedDtype { .. }) => {
                candle_core::safetensors::load(&file, device)
                    .map_err(|e| WeightsError::Format(format!("{}: {e}", file.display())))?
            }
            other => other?,
        };
        all.extend(tensors);
    }
    Ok(all)
}

/// One safetensors file's tensors, each read with a positioned read
/// straight into its own memory. Mapping the whole file and copying out of
/// it (candle's loader) kept every page of the file resident beside the
/// copies until the last tensor: a load peaked at twice the checkpoint.
#[cfg(all(unix, target_endian = "little"))]
fn read_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, WeightsError> {
    use super::header::{data_len, header_length, parse_header, PREFIX};
    use std::os::unix::fs::FileExt;
    let named = |e: WeightsError| match e {
        WeightsError::Format(m) => {
            let m = m.strip_prefix("the body ").unwrap_or(&m).to_string();
            WeightsError::Format(format!("{}: {m}", path.display()))
        }
        other => other,
    };
    let io = |e: std::io::Error| WeightsError::io(path, e);
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut prefix = [0u8; PREFIX];
    file.read_exact_at(&mut prefix, 0).map_err(io)?;
    let len = header_length(prefix).map_err(named)?;
    if (PREFIX + len) as u64 > size {
        return Err(named(WeightsError::Format(format!(
            "the body is {size} bytes, shorter than its {len}-byte header (truncated?)"
        ))));
    }
    let mut json = vec![0u8; len];
    file.read_exact_at(&mut json, PREFIX as u64).map_err(io)?;
    let entries = parse_header(&json).map_err(named)?;
    let start = (PREFIX + len) as u64;
    if start + data_len(&entries) as u64 > size {
        return Err(named(WeightsError::Format(format!(
            "the body is {size} bytes, shorter than its header says ({}; truncated?)",
            start + data_len(&entries) as u64
        ))));
    }
    let mut out = HashMap::with_capacity(entries.len());
    for e in entries {
        let at = start + e.begin as u64;
        let tensor = match e.dtype {
            candle_core::DType::BF16 => read_values::<half::bf16>(&file, at, &e.shape),
            candle_core::DType::F16 => read_values::<half::f16>(&file, at, &e.shape),
            candle_core::DType::F32 => read_values::<f32>(&file, at, &e.shape),
            _ => read_values::<f64>(&file, at, &e.shape),
        }
        .map_err(io)?;
        out.insert(e.name, tensor.to_device(device)?);
    }
    Ok(out)
}

#[cfg(not(all(unix, target_endian = "little")))]
fn read_file(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>, WeightsError> {
    candle_core::safetensors::load(path, device)
        .map_err(|e| WeightsError::Format(format!("{}: {e}", path.display())))
}

/// A tensor of `shape` from the little-endian values at byte `at`.
#[cfg(all(unix, target_endian = "little"))]
fn read_values<T: candle_core::WithDType>(
    file: &std::fs::File,
    at: u64,
    shape: &[usize],
) -> std::io::Result<Tensor> {
    use std::os::unix::fs::FileExt;
    let n: usize = shape.iter().product();
    let mut values = vec![T::zero(); n];
    // SAFETY: `values` owns `n` initialized floats, and every bit pattern is
    // a valid float, so its memory may be written as plain bytes (in this
    // target's byte order, which is the format's).
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>())
    };
    file.read_exact_at(bytes, at)?;
    Tensor::from_vec(values, shape, &Device::Cpu).map_err(std::io::Error::other)
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
