//! Reading a checkpoint directory for `/update_weights_from_disk` without
//! trusting it: only regular files (judged after following symlinks, so a
//! link to `/dev/zero` or a FIFO is refused before it is opened for real),
//! no larger than the config's parameters can take, each file exactly the
//! size its header describes. Files are streamed through the same
//! [`StreamingUpdate`] a push uses, so the header is checked before data
//! is read and values are converted (and checked for NaN) as they arrive:
//! nothing is read whole, and a hostile file costs at most its bounded size.

use super::check::{is_tied_alias, UpdateMode};
use super::checkpoint::{INDEX_FILE, SINGLE_FILE};
use super::header::{header_length, PREFIX};
use super::spec::param_specs;
use super::stream::{BufferPool, Spawner, StreamingUpdate};
use super::{shown, WeightsError};
use crate::config::ModelConfig;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest `model.safetensors.index.json` read (real ones are ~100 KB).
const MAX_INDEX_BYTES: u64 = 16 << 20;

/// Header allowance: a fixed part plus this much per parameter (real
/// headers take about 100 bytes per tensor).
const HEADER_BASE: u64 = 1 << 20;
const HEADER_PER_TENSOR: u64 = 4096;

/// Bytes read from a file at a time.
const READ_CHUNK: usize = 1 << 20;

/// The widest dtype a checkpoint may store (f64).
const WIDEST: u64 = 8;

/// Most bytes a checkpoint of `cfg` in `files` files can take: every
/// parameter (and a tied model's spare `lm_head`) in the widest dtype, plus
/// their headers.
pub fn max_checkpoint_bytes(cfg: &ModelConfig, files: usize) -> u64 {
    let specs = param_specs(cfg);
    let numel = |shape: &[usize]| shape.iter().product::<usize>() as u64;
    let mut data: u64 = specs.iter().map(|s| numel(&s.shape)).sum::<u64>() * WIDEST;
    if cfg.tie_word_embeddings {
        data += (cfg.vocab_size * cfg.hidden_size) as u64 * WIDEST;
    }
    let headers = HEADER_BASE + HEADER_PER_TENSOR * (specs.len() as u64 + 1);
    data + headers + PREFIX as u64 * files as u64
}

fn file_kind(t: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

fn not_regular(path: &Path, t: std::fs::FileType) -> WeightsError {
    WeightsError::NotRegularFile {
        path: shown(path),
        kind: file_kind(t),
    }
}

/// Opens a regular file and returns it with its size.
fn open_regular(path: &Path) -> Result<(File, u64), WeightsError> {
    // `metadata` follows symlinks: a link is judged by what it points at,
    // and a FIFO or device is refused before an `open` that could block.
    let meta = std::fs::metadata(path).map_err(|e| WeightsError::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, meta.file_type()));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // Should the path become a FIFO after the check, opening it must
        // not wait for a writer (no effect on regular files).
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(|e| WeightsError::io(path, e))?;
    let meta = file.metadata().map_err(|e| WeightsError::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(path, meta.file_type()));
    }
    Ok((file, meta.len()))
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The safetensors files of the checkpoint in `dir`, the index (if any)
/// read under its bound.
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let index = dir.join(INDEX_FILE);
    if std::fs::symlink_metadata(&index).is_ok() {
        let (file, size) = open_regular(&index)?;
        if size > MAX_INDEX_BYTES {
            return Err(WeightsError::Format(format!(
                "{} is {size} bytes, over the {MAX_INDEX_BYTES}-byte limit for an index",
                shown(&index)
            )));
        }
        let mut text = String::new();
        file.take(MAX_INDEX_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| WeightsError::io(&index, e))?;
        let parsed: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| WeightsError::Format(format!("{}: {e}", shown(&index))))?;
        let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    let single = dir.join(SINGLE_FILE);
    if std::fs::symlink_metadata(&single).is_ok() {
        return Ok(vec![single]);
    }
    Err(WeightsError::Format(format!(
        "{} has neither {SINGLE_FILE} nor {INDEX_FILE}",
        shown(dir)
    )))
}

/// What a checkpoint stages in: the run dtype and device, where buffered
/// conversions run, and the receive buffers they use.
pub struct StageTarget {
    pub run: DType,
    /// What weight matrices are held in (bf16 or `run`).
    pub matrices: DType,
    pub device: Device,
    pub spawner: Option<Spawner>,
    pub buffers: BufferPool,
}

/// Names a file in a stage's error (which speaks of "the body").
fn in_file(path: &Path, e: WeightsError) -> WeightsError {
    match e {
        WeightsError::Format(m) => match m.strip_prefix("the body") {
            Some(rest) => WeightsError::Format(format!("{}{rest}", shown(path))),
            None => WeightsError::Format(format!("{}: {m}", shown(path))),
        },
        other => other,
    }
}

/// Feeds `file` into `stage` until `upto` bytes of it have been read.
fn feed(
    path: &Path,
    file: &mut File,
    stage: &mut StreamingUpdate,
    read: &mut u64,
    upto: u64,
    buf: &mut [u8],
) -> Result<(), WeightsError> {
    while *read < upto {
        let want = buf.len().min((upto - *read) as usize);
        let n = match file.read(&mut buf[..want]) {
            // Shrunk since its size was taken: the stage reports it truncated.
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WeightsError::io(path, e)),
        };
        *read += n as u64;
        stage.push(&buf[..n]).map_err(|e| in_file(path, e))?;
    }
    Ok(())
}

/// Streams one file of `size` bytes into a new stage: the length prefix,
/// the header (checked, and the file's size held against it), then the data.
fn stage_file(
    cfg: &ModelConfig,
    path: &Path,
    mut file: File,
    size: u64,
    mode: UpdateMode,
    target: &StageTarget,
) -> Result<StreamingUpdate, WeightsError> {
    let mut stage = StreamingUpdate::new(
        cfg,
        mode,
        target.run,
        &target.device,
        target.spawner.clone(),
        HashMap::new(),
        target.buffers.clone(),
    )
    .holding_matrices(target.matrices);
    let mut prefix = [0u8; PREFIX];
    file.read_exact(&mut prefix).map_err(|e| {
        WeightsError::Format(format!(
            "{} is {size} bytes, too short for a safetensors header ({e})",
            shown(path)
        ))
    })?;
    let header_end = (PREFIX + header_length(prefix).map_err(|e| in_file(path, e))?) as u64;
    if header_end > size {
        return Err(WeightsError::Format(format!(
            "{} is {size} bytes, but its header length runs to byte {header_end}",
            shown(path)
        )));
    }
    stage.push(&prefix).map_err(|e| in_file(path, e))?;
    let mut buf = vec![0u8; READ_CHUNK.min(size as usize)];
    let mut read = PREFIX as u64;
    feed(path, &mut file, &mut stage, &mut read, header_end, &mut buf)?;
    match stage.expected_len() {
        Some(expected) if expected as u64 == size => {}
        Some(expected) => {
            return Err(WeightsError::Format(format!(
                "{} is {size} bytes, but its header describes {expected}",
                shown(path)
            )))
        }
        // Shrunk while the header was read: `finish` reports it truncated.
        None => return Ok(stage),
    }
    feed(path, &mut file, &mut stage, &mut read, size, &mut buf)?;
    Ok(stage)
}

/// Checks and streams every file of the checkpoint in `dir` into stages
/// (blocking: call it off the async threads). Returns the stages with
/// their files, for [`finish_checkpoint`].
pub fn stage_checkpoint(
    dir: &Path,
    cfg: &ModelConfig,
    target: &StageTarget,
) -> Result<Vec<(PathBuf, StreamingUpdate)>, WeightsError> {
    let files = checkpoint_files(dir)?;
    let limit = max_checkpoint_bytes(cfg, files.len());
    let mut opened = Vec::with_capacity(files.len());
    let mut total = 0u64;
    // Every size is checked before anything is read.
    for path in files {
        let (file, size) = open_regular(&path)?;
        total = total.saturating_add(size);
        if total > limit {
            return Err(WeightsError::TooLarge {
                path: shown(&path),
                size,
                limit,
            });
        }
        opened.push((path, file, size));
    }
    // One file must hold everything; shards are checked as a whole later.
    let mode = if opened.len() == 1 {
        UpdateMode::Full
    } else {
        UpdateMode::Partial
    };
    opened
        .into_iter()
        .map(|(path, file, size)| {
            let stage = stage_file(cfg, &path, file, size, mode, target)?;
            Ok((path, stage))
        })
        .collect()
}

/// Waits for the stages' conversions; checks that the files together bring
/// every parameter exactly once.
pub async fn finish_checkpoint(
    cfg: &ModelConfig,
    stages: Vec<(PathBuf, StreamingUpdate)>,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    let mut all = HashMap::new();
    for (path, stage) in stages {
        for (name, tensor) in stage.finish().await.map_err(|e| in_file(&path, e))? {
            if all.insert(name.clone(), tensor).is_some() {
                return Err(WeightsError::Format(format!(
                    "tensor {name} is in more than one shard"
                )));
            }
        }
    }
    if let Some(missing) = param_specs(cfg)
        .into_iter()
        .find(|s| !is_tied_alias(cfg, &s.name) && !all.contains_key(&s.name))
    {
        return Err(WeightsError::MissingTensor(missing.name));
    }
    Ok(all)
}
