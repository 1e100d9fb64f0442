//! Staging a weight update: every incoming tensor is checked (name, shape,
//! dtype) before anything is converted, then converted into a new
//! [`ParamStore`] built beside the served one. The served store is never
//! touched, so a failed update leaves the weights bit for bit as they were.

use super::convert::convert_slice;
use super::finite::check_tensor;
use super::spec::param_specs;
use super::{ParamStore, WeightsError};
use crate::config::ModelConfig;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetensors::SafeTensors;
use std::collections::HashMap;

/// Whether an update must bring every parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateMode {
    Full,
    Partial,
}

impl std::str::FromStr for UpdateMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "partial" => Ok(Self::Partial),
            other => Err(format!("unknown mode {other:?} (expected full or partial)")),
        }
    }
}

/// What an incoming tensor claims to be, before its bytes are converted.
struct Incoming<'a> {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    data: &'a [u8],
}

fn st_dtype(name: &str, dtype: safetensors::Dtype) -> Result<DType, WeightsError> {
    match dtype {
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::F16 => Ok(DType::F16),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F64 => Ok(DType::F64),
        other => Err(WeightsError::UnsupportedDtype {
            name: name.to_string(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// Checks a streamed header: names, shapes, dtypes, completeness.
pub(crate) fn check_header(
    cfg: &ModelConfig,
    entries: &[super::header::HeaderEntry],
    mode: UpdateMode,
) -> Result<(), WeightsError> {
    let incoming: Vec<Incoming<'_>> = entries
        .iter()
        .filter(|e| !is_tied_alias(cfg, &e.name))
        .map(|e| Incoming {
            name: e.name.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            data: &[],
        })
        .collect();
    check(cfg, &incoming, mode)
}

/// Converts tensor `name`'s raw little-endian bytes to the run dtype on
/// `device`, refusing NaN and infinite values.
pub(crate) fn convert_bytes(
    name: &str,
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    run: DType,
    device: &Device,
) -> Result<Tensor, WeightsError> {
    if run == DType::F32 && f32_source_width(dtype).is_some() {
        // The common case (a bf16 push into an f32 engine): no intermediate
        // copy, and the check rides along the conversion.
        let (values, finite) = bytes_to_f32(bytes, dtype);
        if !finite {
            return Err(WeightsError::NonFinite(name.to_string()));
        }
        return Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?);
    }
    if !device.is_cpu() {
        return super::device_convert::convert_on_device(name, bytes, dtype, shape, run, device);
    }
    // Checked after the conversion, on the CPU: f64 values past f32's range
    // become infinite on the way.
    let tensor = Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)?.to_dtype(run)?;
    check_tensor(name, &tensor)?;
    Ok(tensor.to_device(device)?)
}

/// Checks names, shapes, dtypes and (in `full` mode) completeness.
fn check(
    cfg: &ModelConfig,
    incoming: &[Incoming<'_>],
    mode: UpdateMode,
) -> Result<(), WeightsError> {
    if incoming.is_empty() {
        return Err(WeightsError::NoTensors);
    }
    let specs: HashMap<String, Vec<usize>> = param_specs(cfg)
        .into_iter()
        .map(|s| (s.name, s.shape))
        .collect();
    for t in incoming {
        let Some(expected) = specs.get(&t.name) else {
            return Err(WeightsError::UnknownTensor(t.name.clone()));
        };
        if &t.shape != expected {
            return Err(WeightsError::ShapeMismatch {
                name: t.name.clone(),
                expected: expected.clone(),
                found: t.shape.clone(),
            });
        }
        if !matches!(t.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(WeightsError::UnsupportedDtype {
                name: t.name.clone(),
                dtype: format!("{:?}", t.dtype),
            });
        }
    }
    if mode == UpdateMode::Full {
        let mut names: Vec<&String> = specs.keys().collect();
        names.sort();
        if let Some(missing) = names
            .into_iter()
            .find(|n| !incoming.iter().any(|t| &t.name == *n))
        {
            return Err(WeightsError::MissingTensor(missing.clone()));
        }
    }
    Ok(())
}

/// A tied model's checkpoint may still carry `lm_head.weight` (PyTorch state
/// dicts do); it is the embedding, so it is skipped rather than refused.
pub(crate) fn is_tied_alias(cfg: &ModelConfig, name: &str) -> bool {
    cfg.tie_word_embeddings && name == "lm_head.weight"
}

/// Little-endian bf16/f16/f32 bytes straight to f32 values, in one pass;
/// also whether every value is finite.
fn bytes_to_f32(bytes: &[u8], dtype: DType) -> (Vec<f32>, bool) {
    let width = f32_source_width(dtype).unwrap_or(4);
    let mut out = vec![0f32; bytes.len() / width];
    let finite = convert_into(bytes, dtype, &mut out);
    (out, finite)
}

/// Bytes per value of a dtype [`convert_into`] reads.
fn f32_source_width(dtype: DType) -> Option<usize> {
    match dtype {
        DType::BF16 | DType::F16 => Some(2),
        DType::F32 => Some(4),
        _ => None,
    }
}

/// Little-endian bf16/f16/f32 `bytes` into `out`, split across the calling
/// rayon pool (the conversion is memory-bound; one core does not saturate
/// memory). `out` holds exactly one value per source value. Returns
/// whether every value is finite.
fn convert_into(bytes: &[u8], dtype: DType, out: &mut [f32]) -> bool {
    let width = f32_source_width(dtype).unwrap_or(4);
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * width))
        .map(|(dst, src)| convert_slice(src, dtype, dst))
        .reduce(|| true, |a, b| a && b)
}

/// Whether [`fill_part`] can write a tensor of `dtype` and `shape` into
/// `target`.
pub(crate) fn fits_in_place(target: &Tensor, dtype: DType, shape: &[usize]) -> bool {
    f32_source_width(dtype).is_some()
        && target.device().is_cpu()
        && target.dtype() == DType::F32
        && target.dims() == shape
        && target.is_contiguous()
}

/// Converts `bytes` (whole values of `dtype`) into `target` from value
/// `offset` on, on the calling thread: a pushed tensor written into its
/// target piece by piece as the body arrives. `target` must fit
/// ([`fits_in_place`]) and be read by nothing else: a new tensor, or a
/// retired copy of the weights from before the last update (see
/// `AppState::spare_weights`), whose memory is already mapped. A NaN or
/// infinite value refuses the tensor, named `name`.
pub(crate) fn fill_part(
    name: &str,
    target: &Tensor,
    bytes: &[u8],
    dtype: DType,
    offset: usize,
) -> Result<(), WeightsError> {
    let fill = FillFromBytes {
        bytes,
        dtype,
        offset,
        finite: std::cell::Cell::new(true),
    };
    target.inplace_op1(&fill)?;
    if fill.finite.get() {
        Ok(())
    } else {
        Err(WeightsError::NonFinite(name.to_string()))
    }
}

/// In-place fill of an f32 CPU tensor, from value `offset` on, with raw
/// little-endian bytes; notes whether they were all finite.
struct FillFromBytes<'a> {
    bytes: &'a [u8],
    dtype: DType,
    offset: usize,
    finite: std::cell::Cell<bool>,
}

impl candle_core::InplaceOp1 for FillFromBytes<'_> {
    fn name(&self) -> &'static str {
        "fill-from-bytes"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("fill-from-bytes: target is not f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fill-from-bytes: target is not contiguous");
        };
        let width = f32_source_width(self.dtype).unwrap_or(4);
        let count = self.bytes.len() / width;
        let Some(out) = data[start..end].get_mut(self.offset..self.offset + count) else {
            candle_core::bail!("fill-from-bytes: more values than the target holds");
        };
        self.finite.set(convert_slice(self.bytes, self.dtype, out));
        Ok(())
    }
}

fn convert(t: Incoming<'_>, run: DType, device: &Device) -> Result<(String, Tensor), WeightsError> {
    let tensor = convert_bytes(&t.name, t.data, t.dtype, &t.shape, run, device)?;
    Ok((t.name, tensor))
}

fn build(
    current: &ParamStore,
    cfg: &ModelConfig,
    incoming: Vec<Incoming<'_>>,
    mode: UpdateMode,
    device: &Device,
) -> Result<(ParamStore, usize), WeightsError> {
    check(cfg, &incoming, mode)?;
    let count = incoming.len();
    let run = current.dtype();
    // Tensors convert independently: spread them over the cores.
    let updates: HashMap<String, Tensor> = incoming
        .into_par_iter()
        .map(|t| convert(t, run, device))
        .collect::<Result<_, _>>()?;
    Ok((current.with_replacements(updates), count))
}

/// Stages an update from a safetensors body. Returns the new store and the
/// number of tensors it replaced.
pub fn stage_from_bytes(
    current: &ParamStore,
    cfg: &ModelConfig,
    body: &[u8],
    mode: UpdateMode,
    device: &Device,
) -> Result<(ParamStore, usize), WeightsError> {
    let st = SafeTensors::deserialize(body).map_err(|e| {
        WeightsError::Format(format!("the body is not a valid safetensors file: {e}"))
    })?;
    let mut incoming = Vec::new();
    for (name, view) in st.tensors() {
        if is_tied_alias(cfg, &name) {
            continue;
        }
        let dtype = st_dtype(&name, view.dtype())?;
        incoming.push(Incoming {
            shape: view.shape().to_vec(),
            data: view.data(),
            dtype,
            name,
        });
    }
    build(current, cfg, incoming, mode, device)
}
