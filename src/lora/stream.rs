//! An adapter push built as its bytes arrive. The safetensors header is
//! checked against the adapter's config the moment it is in (every factor
//! present, of its shape and dtype, nothing else), so a bad push is refused
//! before its data is read; then each factor is converted to fp32, frame by
//! frame, straight into its own buffer. There is no receive buffer: a 40 MB
//! f32 adapter collected whole first (fresh pages, then one more copy) spent
//! more time there than in everything else the push does.

use super::adapter::{expected_factors, unexpected_tensor, ExpectedFactor};
use super::{AdapterConfig, LoraAdapter, LoraError};
use crate::config::ModelConfig;
use crate::weights::convert::convert_slice;
use crate::weights::header::{parse_header, HeaderEntry, HeaderReader};
use candle_core::DType;

/// Decides the adapter's config once the header is in, from the config its
/// `__metadata__` carries (PEFT's `adapter_config.json` as text), if any.
pub type ResolveConfig =
    Box<dyn FnOnce(Option<&str>) -> Result<AdapterConfig, LoraError> + Send + Sync>;

/// Key of `__metadata__` an adapter file may carry its config under.
pub const CONFIG_METADATA: &str = "adapter_config";

/// Every phase consumes at least one byte per step of [`AdapterStream::feed`]
/// (or fails), so no input can make it spin.
enum Phase {
    /// Collecting the length prefix and the JSON header.
    Header(HeaderReader),
    /// Converting the factors' data, in file order.
    Data(Filling),
    /// A refusal was returned; nothing more is taken.
    Refused,
}

/// The factors being filled: `order[i]` is the factor whose bytes come
/// `i`-th in the file, converted into `values[order[i].0]`.
struct Filling {
    config: AdapterConfig,
    expected: Vec<ExpectedFactor>,
    values: Vec<Vec<f32>>,
    /// `(index into expected, dtype)` in file order.
    order: Vec<(usize, DType)>,
    next: usize,
    /// Values of `order[next]` written so far.
    written: usize,
    /// The start of a value split across two frames.
    carry: Vec<u8>,
}

impl Filling {
    /// Matches the header's tensors to the factors `config` calls for.
    fn plan(
        config: AdapterConfig,
        model: &ModelConfig,
        entries: Vec<HeaderEntry>,
    ) -> Result<Self, LoraError> {
        let expected = expected_factors(&config, model)?;
        let mut by_name: std::collections::HashMap<&str, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.as_str(), i))
            .collect();
        // File position of each expected factor, checked in the order the
        // disk loader checks them (so both name the same first problem).
        let mut at = vec![0usize; entries.len()];
        let mut dtypes = vec![DType::F32; entries.len()];
        for (i, e) in expected.iter().enumerate() {
            let pos = by_name
                .remove(e.name.as_str())
                .ok_or_else(|| LoraError::MissingTensor(e.name.clone()))?;
            e.check_shape(&entries[pos].shape)?;
            dtypes[pos] = e.check_dtype(entries[pos].dtype)?;
            at[pos] = i;
        }
        if let Some(extra) = by_name.keys().min() {
            return Err(unexpected_tensor(extra));
        }
        // Every entry is now an expected factor: the file order is `at`.
        let order = (0..entries.len())
            .map(|pos| (at[pos], dtypes[pos]))
            .collect();
        let values = expected
            .iter()
            .map(|e| vec![0f32; e.shape[0] * e.shape[1]])
            .collect();
        Ok(Self {
            config,
            expected,
            values,
            order,
            next: 0,
            written: 0,
            carry: Vec::new(),
        })
    }

    /// Converts as much of `chunk` as belongs to the current factor;
    /// returns the bytes it took.
    fn feed(&mut self, chunk: &[u8]) -> Result<usize, LoraError> {
        let Some(&(index, dtype)) = self.order.get(self.next) else {
            return Err(LoraError::Format(
                "the body has bytes past its last tensor".into(),
            ));
        };
        let width = dtype.size_in_bytes();
        let out = &mut self.values[index];
        let left = (out.len() - self.written) * width - self.carry.len();
        let mut data = &chunk[..left.min(chunk.len())];
        let taken = data.len();
        let mut finite = true;
        if !self.carry.is_empty() {
            let more = (width - self.carry.len()).min(data.len());
            self.carry.extend_from_slice(&data[..more]);
            data = &data[more..];
            if self.carry.len() == width {
                finite &= convert_slice(&self.carry, dtype, &mut out[self.written..][..1]);
                self.written += 1;
                self.carry.clear();
            }
        }
        let whole = data.len() / width;
        finite &= convert_slice(
            &data[..whole * width],
            dtype,
            &mut out[self.written..][..whole],
        );
        self.written += whole;
        self.carry.extend_from_slice(&data[whole * width..]);
        if !finite {
            return Err(LoraError::NonFinite(self.expected[index].name.clone()));
        }
        if self.written == out.len() {
            self.next += 1;
            self.written = 0;
        }
        Ok(taken)
    }

    /// The next factor still waiting for bytes, if any.
    fn missing(&self) -> Option<&str> {
        let &(index, _) = self.order.get(self.next)?;
        Some(&self.expected[index].name)
    }
}

/// The adapter config in a safetensors header's `__metadata__`, if any.
fn metadata_config(json: &[u8]) -> Result<Option<String>, LoraError> {
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: Option<std::collections::HashMap<String, String>>,
    }
    let header: Header =
        serde_json::from_slice(json).map_err(|e| LoraError::Format(e.to_string()))?;
    Ok(header.metadata.and_then(|mut m| m.remove(CONFIG_METADATA)))
}

/// A pushed adapter, built frame by frame ([`AdapterStream::feed`]) and
/// finished once the body has ended ([`AdapterStream::finish`]).
pub struct AdapterStream {
    name: String,
    version: String,
    model: ModelConfig,
    resolve: Option<ResolveConfig>,
    phase: Phase,
}

impl AdapterStream {
    pub fn new(name: &str, version: &str, model: ModelConfig, resolve: ResolveConfig) -> Self {
        Self {
            name: name.to_string(),
            version: version.to_string(),
            model,
            resolve: Some(resolve),
            phase: Phase::Header(HeaderReader::default()),
        }
    }

    /// Takes the next bytes of the body; the first refusal ends the stream.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), LoraError> {
        let fed = self.feed_inner(chunk);
        if fed.is_err() {
            self.phase = Phase::Refused;
        }
        fed
    }

    fn feed_inner(&mut self, mut chunk: &[u8]) -> Result<(), LoraError> {
        while !chunk.is_empty() {
            match &mut self.phase {
                Phase::Header(reader) => {
                    let format = |e: crate::weights::WeightsError| LoraError::Format(e.to_string());
                    if let Some(json) = reader.take(&mut chunk).map_err(format)? {
                        let entries = parse_header(json).map_err(format)?;
                        let from_file = metadata_config(json)?;
                        let resolve = self.resolve.take().ok_or_else(|| {
                            LoraError::Format("the header was already read".into())
                        })?;
                        let config = resolve(from_file.as_deref())?;
                        self.phase = Phase::Data(Filling::plan(config, &self.model, entries)?);
                    }
                }
                Phase::Data(filling) => {
                    let taken = filling.feed(chunk)?;
                    chunk = &chunk[taken..];
                }
                Phase::Refused => {
                    return Err(LoraError::Format("the push was already refused".into()))
                }
            }
        }
        Ok(())
    }

    /// The adapter, once every factor's bytes are in.
    pub fn finish(self) -> Result<LoraAdapter, LoraError> {
        let filling = match self.phase {
            Phase::Data(filling) => filling,
            Phase::Refused => return Err(LoraError::Format("the push was refused".into())),
            _ => {
                return Err(LoraError::Format(
                    "the body ended inside the safetensors header".into(),
                ))
            }
        };
        if let Some(name) = filling.missing() {
            return Err(LoraError::Format(format!(
                "the body ended before the data of tensor {}",
                crate::weights::clip(name)
            )));
        }
        Ok(LoraAdapter::assemble(
            &self.name,
            &self.version,
            filling.config,
            &self.model,
            &filling.expected,
            filling.values,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;
    use crate::make_model::{config_json, Preset};
    use crate::weights::names::{lora_param, LayerModule, LoraFactor};
    use candle_core::{Device, Tensor};

    fn model() -> ModelConfig {
        let shape = Preset::Tiny.shape(Architecture::Qwen3);
        ModelConfig::from_json(&config_json(&shape, 1, 2).to_string()).unwrap()
    }

    fn config(r: usize) -> AdapterConfig {
        AdapterConfig::from_json(&format!(
            r#"{{"peft_type": "LORA", "r": {r}, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}}"#
        ))
        .unwrap()
    }

    /// An adapter file for `config(2)`: f32 A factors and bf16 B factors
    /// (two dtypes, so values of 4 and 2 bytes split across frames).
    fn file(model: &ModelConfig, poison: Option<usize>) -> Vec<u8> {
        serialize(tensors(model, poison))
    }

    fn serialize(tensors: Vec<(String, Tensor)>) -> Vec<u8> {
        let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn tensors(model: &ModelConfig, poison: Option<usize>) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for e in expected_factors(&config(2), model).unwrap() {
            let n = e.shape[0] * e.shape[1];
            let mut v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            if poison == Some(tensors.len()) {
                v[n / 2] = f32::NAN;
            }
            let t = Tensor::from_vec(v, (e.shape[0], e.shape[1]), &Device::Cpu).unwrap();
            let t = if e.name.contains("lora_B") {
                t.to_dtype(DType::BF16).unwrap()
            } else {
                t
            };
            tensors.push((e.name, t));
        }
        tensors
    }

    fn stream_in(
        bytes: &[u8],
        frame: usize,
        model: &ModelConfig,
    ) -> Result<LoraAdapter, LoraError> {
        let resolve: ResolveConfig = Box::new(|_| Ok(config(2)));
        let mut stream = AdapterStream::new("t", "1", model.clone(), resolve);
        for chunk in bytes.chunks(frame) {
            stream.feed(chunk)?;
        }
        stream.finish()
    }

    #[test]
    fn any_framing_builds_what_the_disk_loader_builds() {
        let model = model();
        let bytes = file(&model, None);
        let disk = LoraAdapter::from_safetensors("t", "1", config(2), &bytes, &model).unwrap();
        for frame in [1, 2, 3, 5, 7, 64, 4096, bytes.len()] {
            let pushed = stream_in(&bytes, frame, &model).unwrap();
            for layer in 0..model.num_hidden_layers {
                for m in LayerModule::PROJECTIONS {
                    let (a, b) = (disk.weights(layer, m), pushed.weights(layer, m));
                    assert_eq!(a.is_some(), b.is_some(), "{layer} {m:?}");
                    if let (Some(a), Some(b)) = (a, b) {
                        assert_eq!((&a.a, &a.b), (&b.a, &b.b), "frame {frame}: {layer} {m:?}");
                    }
                }
            }
            assert_eq!(pushed.num_adapted(), 2 * model.num_hidden_layers);
        }
    }

    #[test]
    fn the_config_in_the_files_metadata_reaches_the_resolver() {
        let model = model();
        let text = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}"#;
        let named = tensors(&model, None);
        let views: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let meta = Some(std::collections::HashMap::from([(
            CONFIG_METADATA.to_string(),
            text.to_string(),
        )]));
        let with_meta = safetensors::serialize(views, meta).unwrap();
        for (bytes, expect) in [(with_meta, Some(text)), (file(&model, None), None)] {
            let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
            let sink = seen.clone();
            let resolve: ResolveConfig = Box::new(move |from_file| {
                *sink.lock().unwrap() = Some(from_file.map(str::to_string));
                Ok(config(2))
            });
            let mut stream = AdapterStream::new("t", "1", model.clone(), resolve);
            stream.feed(&bytes).unwrap();
            assert_eq!(stream.finish().unwrap().rank(), 2);
            let seen = seen.lock().unwrap().clone();
            assert_eq!(seen, Some(expect.map(str::to_string)));
        }
    }

    #[test]
    fn a_short_a_long_or_a_poisoned_body_is_refused_by_name() {
        let model = model();
        let bytes = file(&model, None);
        let short = stream_in(&bytes[..bytes.len() - 3], 100, &model).unwrap_err();
        assert!(
            short
                .to_string()
                .contains("ended before the data of tensor"),
            "{short}"
        );
        let mut long = bytes.clone();
        long.push(0);
        let long = stream_in(&long, 100, &model).unwrap_err();
        assert!(long.to_string().contains("past its last tensor"), "{long}");
        let header_only = stream_in(&bytes[..20], 7, &model).unwrap_err();
        assert!(header_only.to_string().contains("header"), "{header_only}");
        let poisoned = stream_in(&file(&model, Some(3)), 9, &model).unwrap_err();
        let third = &expected_factors(&config(2), &model).unwrap()[3].name;
        assert!(poisoned.to_string().contains(third.as_str()), "{poisoned}");
        // A factor the config does not call for, named before any data is read.
        let extra = lora_param(0, LayerModule::UpProj, LoraFactor::A);
        let mut named = tensors(&model, None);
        let t = Tensor::zeros((2, model.hidden_size), DType::F32, &Device::Cpu).unwrap();
        named.push((extra.clone(), t));
        let e = stream_in(&serialize(named), 1 << 20, &model).unwrap_err();
        assert!(
            matches!(&e, LoraError::UnknownTensor(n) if *n == extra),
            "{e}"
        );
    }
}
