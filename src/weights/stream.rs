//! Staging a safetensors body while it arrives. The header is checked as
//! soon as it is in (names, shapes, dtypes, completeness, offsets), so a bad
//! push is refused before its data is read. Into an f32 CPU engine (the
//! common case: bf16 from a trainer) each tensor is then converted frame by
//! frame as the bytes arrive, on the receiving thread, straight into the
//! memory of the tensor the previous update retired (or a new one): no
//! receive buffer, and nothing left to convert after the last byte.
//! Otherwise (a GPU run dtype, f64 data) each tensor is buffered and handed
//! off for conversion the moment its bytes are complete: the server hands
//! those to the engine thread, which runs them between steps
//! ([`crate::engine::EngineHandle::between_steps`]); without an engine they
//! run on a staging thread. The whole body is never held.

use super::check::{check_header, is_tied_alias, UpdateMode};
use super::convert::{convert_bytes, fill_part, fits_in_place};
use super::header::{data_len, parse_header, HeaderEntry, HeaderReader};
use super::WeightsError;
use crate::config::ModelConfig;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use tokio::sync::oneshot;

/// Runs a conversion job somewhere off the receiving task.
pub type Spawner = std::sync::Arc<dyn Fn(Box<dyn FnOnce() + Send>) + Send + Sync>;

/// Without an engine to run them between steps, conversions run on a thread
/// of their own, not on the global pool the engine's kernels use: a long
/// job queued there would stall generation until it finished.
fn staging_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "gym-serve-staging".into())
            .build()
            .ok()
    })
    .as_ref()
}

/// Every phase consumes at least one byte per step of [`StreamingUpdate::push`]
/// (or moves on), so no input can make it spin.
enum Phase {
    /// Collecting the length prefix and the JSON header.
    Header(HeaderReader),
    /// Collecting tensor `next`'s bytes into `buffer`, or converting them
    /// straight into its target (`direct`).
    Data {
        next: usize,
        buffer: Vec<u8>,
        direct: Option<DirectFill>,
    },
}

/// A tensor being converted into its target as its bytes arrive: no
/// receive buffer to copy through, and nothing left to convert once the
/// last byte is in.
struct DirectFill {
    name: String,
    target: Tensor,
    dtype: DType,
    width: usize,
    /// Values written so far.
    written: usize,
    /// The start of a value split across two frames.
    carry: Vec<u8>,
}

impl DirectFill {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), WeightsError> {
        if !self.carry.is_empty() {
            let take = (self.width - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.carry.len() < self.width {
                return Ok(());
            }
            fill_part(
                &self.name,
                &self.target,
                &self.carry,
                self.dtype,
                self.written,
            )?;
            self.written += 1;
            self.carry.clear();
        }
        let whole = data.len() / self.width * self.width;
        if whole > 0 {
            fill_part(
                &self.name,
                &self.target,
                &data[..whole],
                self.dtype,
                self.written,
            )?;
            self.written += whole / self.width;
        }
        self.carry.extend_from_slice(&data[whole..]);
        Ok(())
    }

    fn complete(&self) -> bool {
        self.written == self.target.elem_count()
    }
}

/// Where `entry` can be converted as it arrives: its retired tensor (taken
/// out of `reuse`) or, without one, a new tensor of the dtype it is held in
/// (`matrices` for two or more dimensions, else f32); `None` where the run
/// is not f32 on the CPU or the dtype has no direct conversion.
fn direct_target(
    reuse: &mut HashMap<String, Tensor>,
    cfg: &ModelConfig,
    entry: &HeaderEntry,
    (run, matrices): (DType, DType),
    device: &Device,
) -> Option<DirectFill> {
    let convertible = matches!(entry.dtype, DType::BF16 | DType::F16 | DType::F32);
    if !convertible || run != DType::F32 || !device.is_cpu() || is_tied_alias(cfg, &entry.name) {
        return None;
    }
    let held = if entry.shape.len() >= 2 {
        matrices
    } else {
        run
    };
    let retired = reuse
        .remove(&entry.name)
        .filter(|t| t.dtype() == held && fits_in_place(t, entry.dtype, &entry.shape));
    let target = match retired {
        Some(t) => t,
        None => Tensor::zeros(entry.shape.as_slice(), held, &Device::Cpu).ok()?,
    };
    Some(DirectFill {
        name: entry.name.clone(),
        target,
        dtype: entry.dtype,
        width: entry.dtype.size_in_bytes(),
        written: 0,
        carry: Vec::new(),
    })
}

pub struct StreamingUpdate {
    cfg: ModelConfig,
    mode: UpdateMode,
    run: DType,
    /// What weight matrices are held in (bf16 or the run dtype).
    matrices: DType,
    device: Device,
    phase: Phase,
    entries: Vec<HeaderEntry>,
    pending: Vec<oneshot::Receiver<Result<(String, Tensor), WeightsError>>>,
    spawner: Option<Spawner>,
    /// Retired tensors, by name, to convert into instead of allocating.
    reuse: HashMap<String, Tensor>,
    buffers: BufferPool,
    /// Length prefix plus JSON header, once the header is in.
    header_bytes: usize,
}

/// Receive buffers handed back once their tensor is converted, so later
/// tensors (and the next push, when the server keeps the pool) reuse memory
/// that is already mapped: a fresh buffer per tensor cost the receiving
/// thread a page fault per 4 KiB.
#[derive(Clone, Default)]
pub struct BufferPool(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    /// Most buffers kept: enough for the conversions in flight.
    const KEEP: usize = 8;

    /// An empty buffer, preferably one that already holds `size` bytes.
    fn take(&self, size: usize) -> Vec<u8> {
        let Ok(mut pool) = self.0.lock() else {
            return Vec::new();
        };
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= size)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => pool.swap_remove(i),
            None => pool.pop().unwrap_or_default(),
        }
    }

    fn give_back(&self, mut buffer: Vec<u8>) {
        buffer.clear();
        if let Ok(mut pool) = self.0.lock() {
            if pool.len() < Self::KEEP {
                pool.push(buffer);
            }
        }
    }
}

impl StreamingUpdate {
    /// Buffered conversions go to `spawner`, or to a staging thread if
    /// `None`, with receive buffers from and back to `buffers`. A tensor
    /// named in `reuse` (which nothing else may read) is converted into as
    /// it arrives rather than allocated anew.
    pub fn new(
        cfg: &ModelConfig,
        mode: UpdateMode,
        run: DType,
        device: &Device,
        spawner: Option<Spawner>,
        reuse: HashMap<String, Tensor>,
        buffers: BufferPool,
    ) -> Self {
        Self {
            spawner,
            reuse,
            buffers,
            cfg: cfg.clone(),
            mode,
            run,
            matrices: run,
            device: device.clone(),
            phase: Phase::Header(HeaderReader::default()),
            entries: Vec::new(),
            pending: Vec::new(),
            header_bytes: 0,
        }
    }

    /// Converts weight matrices straight into `dtype` (what the served ones
    /// are held in) rather than the run dtype.
    pub fn holding_matrices(mut self, dtype: DType) -> Self {
        self.matrices = dtype;
        self
    }

    /// The whole file's size as its header describes it, once the header
    /// has been read and checked.
    pub fn expected_len(&self) -> Option<usize> {
        matches!(self.phase, Phase::Data { .. })
            .then(|| self.header_bytes + data_len(&self.entries))
    }

    /// Feeds the next bytes of the body.
    pub fn push(&mut self, mut chunk: &[u8]) -> Result<(), WeightsError> {
        while !chunk.is_empty() {
            match &mut self.phase {
                Phase::Header(reader) => {
                    if let Some(json) = reader.take(&mut chunk)? {
                        let entries = parse_header(json)?;
                        self.header_bytes = reader.header_bytes();
                        check_header(&self.cfg, &entries, self.mode)?;
                        self.entries = entries;
                        self.phase = Phase::Data {
                            next: 0,
                            buffer: Vec::new(),
                            direct: None,
                        };
                        self.dispatch_ready()?;
                    }
                }
                Phase::Data {
                    next,
                    buffer,
                    direct,
                } => {
                    let Some(entry) = self.entries.get(*next) else {
                        return Err(WeightsError::Format(
                            "the body has bytes past its last tensor".into(),
                        ));
                    };
                    let size = entry.end - entry.begin;
                    if direct.is_none() && buffer.is_empty() && size > 0 {
                        *direct = direct_target(
                            &mut self.reuse,
                            &self.cfg,
                            entry,
                            (self.run, self.matrices),
                            &self.device,
                        );
                    }
                    if let Some(fill) = direct {
                        let take =
                            (size - fill.written * fill.width - fill.carry.len()).min(chunk.len());
                        fill.feed(&chunk[..take])?;
                        chunk = &chunk[take..];
                        self.dispatch_ready()?;
                        continue;
                    }
                    if buffer.capacity() < size {
                        if buffer.is_empty() {
                            *buffer = self.buffers.take(size);
                        }
                        buffer.reserve_exact(size - buffer.len());
                    }
                    let take = (size - buffer.len()).min(chunk.len());
                    buffer.extend_from_slice(&chunk[..take]);
                    chunk = &chunk[take..];
                    self.dispatch_ready()?;
                }
            }
        }
        Ok(())
    }

    /// Hands every complete tensor off for conversion.
    fn dispatch_ready(&mut self) -> Result<(), WeightsError> {
        while let Phase::Data {
            next,
            buffer,
            direct,
        } = &mut self.phase
        {
            let Some(entry) = self.entries.get(*next) else {
                break;
            };
            if let Some(fill) = direct.take_if(|fill| fill.complete()) {
                *next += 1;
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Ok((entry.name.clone(), fill.target)));
                self.pending.push(rx);
                continue;
            }
            if direct.is_some() || buffer.len() < entry.end - entry.begin {
                break;
            }
            let bytes = std::mem::take(buffer);
            *next += 1;
            if is_tied_alias(&self.cfg, &entry.name) {
                continue; // the embedding stands in for it
            }
            let (entry, run, device) = (entry.clone(), self.run, self.device.clone());
            let buffers = self.buffers.clone();
            let (tx, rx) = oneshot::channel();
            let job = move || {
                let result =
                    convert_bytes(&entry.name, &bytes, entry.dtype, &entry.shape, run, &device);
                let _ = tx.send(result.map(|t| (entry.name, t)));
                buffers.give_back(bytes);
            };
            match (&self.spawner, staging_pool()) {
                (Some(spawn), _) => spawn(Box::new(job)),
                (None, Some(pool)) => pool.spawn(job),
                (None, None) => rayon::spawn(job),
            }
            self.pending.push(rx);
        }
        Ok(())
    }

    /// The converted tensors, once the whole body has arrived.
    pub async fn finish(self) -> Result<HashMap<String, Tensor>, WeightsError> {
        let ends = match &self.phase {
            Phase::Data { next, .. } if *next == self.entries.len() => None,
            Phase::Data { .. } => Some("before its last tensor"),
            Phase::Header(reader) if !reader.has_length() => {
                Some("inside its 8-byte header length")
            }
            Phase::Header(_) => Some("inside its JSON header"),
        };
        if let Some(place) = ends {
            return Err(WeightsError::Format(format!(
                "the body is not a valid safetensors file: it ends {place} (truncated?)"
            )));
        }
        let mut out = HashMap::with_capacity(self.pending.len());
        for rx in self.pending {
            let (name, tensor) = rx
                .await
                .map_err(|_| WeightsError::Format("a conversion worker failed".into()))??;
            out.insert(name, tensor);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage() -> StreamingUpdate {
        let shape = crate::make_model::Preset::Tiny.shape(crate::config::Architecture::Qwen3);
        let json = crate::make_model::config_json(&shape, 1, 2).to_string();
        let cfg = ModelConfig::from_json(&json).unwrap();
        StreamingUpdate::new(
            &cfg,
            UpdateMode::Partial,
            DType::F32,
            &Device::Cpu,
            None,
            HashMap::new(),
            BufferPool::default(),
        )
    }

    #[test]
    fn malformed_header_lengths_end_the_stream_at_once() {
        let cases: [(&[u8], &str); 4] = [
            (b"\0\0\0\0\0\0\0\0{}", "header length is 0"),
            (b"\x01\0\0\0\0\0\0\0{}", "header length is 1"),
            (b"\xff\xff\xff\xff\xff\xff\xff\xff{}", "over the"),
            (b"\x04\0\0\0\0\0\0\0nope", "not a JSON object"),
        ];
        for (body, needle) in cases {
            // Fed whole and byte by byte: neither may spin.
            let e = stage().push(body).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
            let mut s = stage();
            let e = body.iter().find_map(|b| s.push(&[*b]).err()).unwrap();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn direct_fill_joins_values_split_across_frames() {
        let values: Vec<f32> = (0..37).map(|i| i as f32 * 0.375 - 5.0).collect();
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let source = Tensor::new(values.as_slice(), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let expected: Vec<f32> = source.to_dtype(DType::F32).unwrap().to_vec1().unwrap();
            let bytes: Vec<u8> = match dtype {
                DType::BF16 => source
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                DType::F16 => source
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            };
            let mut fill = DirectFill {
                name: "w".into(),
                target: Tensor::zeros(37, DType::F32, &Device::Cpu).unwrap(),
                dtype,
                width: dtype.size_in_bytes(),
                written: 0,
                carry: Vec::new(),
            };
            // 3-byte frames split values of every width across frames.
            for (i, frame) in bytes.chunks(3).enumerate() {
                assert!(!fill.complete(), "{dtype:?}: complete after {i} frames");
                fill.feed(frame).unwrap();
            }
            assert!(fill.complete());
            assert_eq!(fill.target.to_vec1::<f32>().unwrap(), expected, "{dtype:?}");
        }
    }
}
