//! RoPE settings as transformers reads them, from either config layout, and
//! the inverse frequencies each `rope_type` derives from them.
//!
//! transformers 4 writes top-level `rope_theta` and `rope_scaling`; transformers
//! 5 writes `rope_parameters: {"rope_type", "rope_theta", ...}`, or a map of
//! such objects keyed by layer type. Every key of those objects is either used
//! by its `rope_type` or refused by name: a silent default is a silently wrong
//! log-prob.
//!
//! The arithmetic mirrors transformers' `modeling_rope_utils` step by step in
//! f32 (its tensors are f32; its Python scalars are f64), so the tables equal
//! the ones it builds.

use super::ConfigError;
use serde_json::{Map, Value};

/// Llama-3 frequency-dependent scaling (`rope_type: "llama3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// YaRN (`rope_type: "yarn"`): interpolated low frequencies, extrapolated high
/// ones, a linear ramp between, and cos/sin scaled by an attention factor.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnScaling {
    /// When absent: `max_position_embeddings / original_max_position_embeddings`.
    pub factor: Option<f64>,
    pub original_max_position_embeddings: f64,
    pub attention_factor: Option<f64>,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    pub truncate: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// `default`: `1 / theta^(2i/d)`.
    Default,
    /// `linear`: the default frequencies divided by `factor`.
    Linear {
        factor: f64,
    },
    /// `dynamic` (NTK-aware): the default frequencies until a sequence passes
    /// `max_position_embeddings`; past it transformers recomputes them from the
    /// longest sequence of the batch. The engine's context ends there, so it
    /// never gets past it.
    Dynamic {
        factor: f64,
    },
    Yarn(Box<YarnScaling>),
    Llama3(Llama3Scaling),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

impl Default for RopeConfig {
    fn default() -> Self {
        Self {
            theta: DEFAULT_THETA,
            scaling: RopeScaling::Default,
        }
    }
}

/// transformers' default `rope_theta` for all four families.
const DEFAULT_THETA: f64 = 10_000.0;

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(message)
}

/// One object of RoPE settings, with the config path used in error messages.
struct Params<'a> {
    path: &'a str,
    obj: &'a Map<String, Value>,
    /// A top-level `original_max_position_embeddings` (Phi-3 style), which
    /// transformers prefers to the RoPE object's own.
    top_original: Option<f64>,
    max_position_embeddings: usize,
}

impl Params<'_> {
    fn number(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(format!("{}.{key} must be a number, found {v}", self.path))),
        }
    }

    fn required(&self, key: &str, rope_type: &str) -> Result<f64, ConfigError> {
        self.number(key)?.ok_or_else(|| {
            invalid(format!(
                "{}.{key} is required for rope_type {rope_type:?}",
                self.path
            ))
        })
    }

    /// The pretrained length llama3 and yarn scale from, filled in the way
    /// transformers' `standardize_rope_params` fills it.
    fn original_length(&self) -> Result<f64, ConfigError> {
        let own = self.number("original_max_position_embeddings")?;
        let v = self
            .top_original
            .or(own)
            .unwrap_or(self.max_position_embeddings as f64);
        positive(self, "original_max_position_embeddings", v)
    }

    fn rope_type(&self) -> Result<String, ConfigError> {
        // transformers 4 accepted the older name `type` too.
        match self.obj.get("rope_type").or_else(|| self.obj.get("type")) {
            None | Some(Value::Null) => Ok("default".into()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(invalid(format!(
                "{}.rope_type must be a string, found {v}",
                self.path
            ))),
        }
    }

    /// Refuses any key `rope_type` does not use, so nothing present is ignored.
    fn only(&self, rope_type: &str, used: &[&str]) -> Result<(), ConfigError> {
        const ALWAYS: [&str; 3] = ["rope_type", "type", "rope_theta"];
        for (key, value) in self.obj {
            if value.is_null() || ALWAYS.contains(&key.as_str()) || used.contains(&key.as_str()) {
                continue;
            }
            if key == "partial_rotary_factor" && value.as_f64() == Some(1.0) {
                continue;
            }
            return Err(invalid(format!(
                "{}.{key} = {value} is not supported with rope_type {rope_type:?}",
                self.path
            )));
        }
        Ok(())
    }

    fn scaling(&self) -> Result<RopeScaling, ConfigError> {
        let rope_type = self.rope_type()?;
        let t = rope_type.as_str();
        let scaling = match t {
            "default" => {
                // transformers 4 checkpoints often carry this key with default RoPE.
                self.only(t, &["original_max_position_embeddings"])?;
                RopeScaling::Default
            }
            "linear" => {
                self.only(t, &["factor", "original_max_position_embeddings"])?;
                RopeScaling::Linear {
                    factor: positive(self, "factor", self.required("factor", t)?)?,
                }
            }
            "dynamic" => {
                self.only(t, &["factor", "original_max_position_embeddings"])?;
                RopeScaling::Dynamic {
                    factor: positive(self, "factor", self.required("factor", t)?)?,
                }
            }
            "llama3" => {
                self.only(
                    t,
                    &[
                        "factor",
                        "low_freq_factor",
                        "high_freq_factor",
                        "original_max_position_embeddings",
                    ],
                )?;
                let s = Llama3Scaling {
                    factor: positive(self, "factor", self.required("factor", t)?)?,
                    low_freq_factor: self.required("low_freq_factor", t)?,
                    high_freq_factor: self.required("high_freq_factor", t)?,
                    original_max_position_embeddings: self.original_length()?,
                };
                if s.high_freq_factor <= s.low_freq_factor {
                    return Err(invalid(format!(
                        "{}.high_freq_factor ({}) must be greater than low_freq_factor ({})",
                        self.path, s.high_freq_factor, s.low_freq_factor
                    )));
                }
                RopeScaling::Llama3(s)
            }
            "yarn" => {
                self.only(
                    t,
                    &[
                        "factor",
                        "original_max_position_embeddings",
                        "attention_factor",
                        "beta_fast",
                        "beta_slow",
                        "mscale",
                        "mscale_all_dim",
                        "truncate",
                    ],
                )?;
                let truncate = match self.obj.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => {
                        return Err(invalid(format!(
                            "{}.truncate must be a boolean, found {v}",
                            self.path
                        )))
                    }
                };
                RopeScaling::Yarn(Box::new(YarnScaling {
                    factor: self
                        .number("factor")?
                        .map(|f| positive(self, "factor", f))
                        .transpose()?,
                    original_max_position_embeddings: self.original_length()?,
                    attention_factor: self.number("attention_factor")?,
                    beta_fast: self.number("beta_fast")?.unwrap_or(32.0),
                    beta_slow: self.number("beta_slow")?.unwrap_or(1.0),
                    mscale: self.number("mscale")?,
                    mscale_all_dim: self.number("mscale_all_dim")?,
                    truncate,
                }))
            }
            other => {
                return Err(invalid(format!(
                    "{}.rope_type {other:?} is not supported (supported: default, linear, dynamic, yarn, llama3)",
                    self.path
                )))
            }
        };
        Ok(scaling)
    }
}

fn positive(p: &Params, key: &str, v: f64) -> Result<f64, ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(invalid(format!(
            "{}.{key} must be positive, found {v}",
            p.path
        )))
    }
}

/// Reads RoPE settings from `config.json`. `layer_types` are the attention
/// types of the model's layers, which pick entries of a per-layer-type map.
pub fn read_rope(
    raw: &Map<String, Value>,
    layer_types: &[&str],
    max_position_embeddings: usize,
) -> Result<RopeConfig, ConfigError> {
    let top_original = raw
        .get("original_max_position_embeddings")
        .and_then(Value::as_f64);
    let top_theta = match raw.get("rope_theta") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| invalid(format!("rope_theta must be a number, found {v}")))?,
        ),
    };
    let legacy = match raw.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(Value::Object(obj)) => Some(Params {
            path: "rope_scaling",
            obj,
            top_original,
            max_position_embeddings,
        }),
        Some(v) => {
            return Err(invalid(format!(
                "rope_scaling must be an object, found {v}"
            )))
        }
    };
    let config = match raw.get("rope_parameters") {
        None | Some(Value::Null) => RopeConfig {
            theta: top_theta.unwrap_or(DEFAULT_THETA),
            scaling: match &legacy {
                Some(p) => p.scaling()?,
                None => RopeScaling::Default,
            },
        },
        Some(Value::Object(obj)) => {
            let (path, obj) = per_layer_entry(obj, layer_types)?;
            let params = Params {
                path: &path,
                obj,
                top_original,
                max_position_embeddings,
            };
            let config = RopeConfig {
                theta: params
                    .number("rope_theta")?
                    .or(top_theta)
                    .unwrap_or(DEFAULT_THETA),
                scaling: params.scaling()?,
            };
            if let Some(legacy) = &legacy {
                if legacy.scaling()? != config.scaling {
                    return Err(invalid(
                        "rope_scaling and rope_parameters are both set and disagree".into(),
                    ));
                }
            }
            config
        }
        Some(v) => {
            return Err(invalid(format!(
                "rope_parameters must be an object, found {v}"
            )))
        }
    };
    if !(config.theta.is_finite() && config.theta > 1.0) {
        return Err(invalid(format!(
            "rope_theta must be greater than 1, found {}",
            config.theta
        )));
    }
    Ok(config)
}

/// The RoPE object that applies: `rope_parameters` itself, or, for a map keyed
/// by layer type, the one entry all of this model's layer types share.
fn per_layer_entry<'a>(
    obj: &'a Map<String, Value>,
    layer_types: &[&str],
) -> Result<(String, &'a Map<String, Value>), ConfigError> {
    let is_map = !obj.is_empty()
        && obj.values().all(Value::is_object)
        && !obj.contains_key("rope_type")
        && !obj.contains_key("rope_theta");
    if !is_map {
        return Ok(("rope_parameters".into(), obj));
    }
    let mut chosen: Option<(&str, &Map<String, Value>)> = None;
    for layer_type in layer_types {
        let entry = obj
            .get(*layer_type)
            .and_then(Value::as_object)
            .ok_or_else(|| {
                invalid(format!(
                    "rope_parameters has no entry for layer type {layer_type:?}"
                ))
            })?;
        match chosen {
            Some((first, settings)) if settings != entry => {
                return Err(invalid(format!(
                    "rope_parameters differ between layer types {first:?} and {layer_type:?}; per-layer RoPE is not supported"
                )))
            }
            Some(_) => {}
            None => chosen = Some((layer_type, entry)),
        }
    }
    let (name, entry) =
        chosen.ok_or_else(|| invalid("rope_parameters: the model has no layers".into()))?;
    Ok((format!("rope_parameters.{name}"), entry))
}

impl RopeConfig {
    /// The `dim / 2` inverse frequencies and the factor cos and sin are scaled
    /// by, as transformers' `ROPE_INIT_FUNCTIONS[rope_type]` computes them.
    pub fn inverse_frequencies(
        &self,
        dim: usize,
        max_position_embeddings: usize,
    ) -> (Vec<f32>, f32) {
        let base = default_frequencies(self.theta, dim);
        match &self.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => (base, 1.0),
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                (base.into_iter().map(|x| x / f).collect(), 1.0)
            }
            RopeScaling::Llama3(s) => (llama3(base, s), 1.0),
            RopeScaling::Yarn(s) => yarn(self.theta, dim, max_position_embeddings, s),
        }
    }
}

/// `1 / base^(arange(0, dim, 2) / dim)` in f32, as torch computes it.
fn default_frequencies(theta: f64, dim: usize) -> Vec<f32> {
    pos_frequencies(theta, dim)
        .into_iter()
        .map(|p| 1.0 / p)
        .collect()
}

/// `base^(arange(0, dim, 2) / dim)` in f32.
fn pos_frequencies(theta: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| (theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}

fn llama3(base: Vec<f32>, s: &Llama3Scaling) -> Vec<f32> {
    let factor = s.factor as f32;
    let old_len = s.original_max_position_embeddings;
    let low_wavelen = (old_len / s.low_freq_factor) as f32;
    let high_wavelen = (old_len / s.high_freq_factor) as f32;
    base.into_iter()
        .map(|f| {
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            if wavelen < high_wavelen || wavelen > low_wavelen {
                return scaled;
            }
            let smooth = (old_len as f32 / wavelen - s.low_freq_factor as f32)
                / (s.high_freq_factor - s.low_freq_factor) as f32;
            (1.0 - smooth) * scaled / factor + smooth * scaled
        })
        .collect()
}

fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn yarn(
    theta: f64,
    dim: usize,
    max_position_embeddings: usize,
    s: &YarnScaling,
) -> (Vec<f32>, f32) {
    let original = s.original_max_position_embeddings;
    let factor = s
        .factor
        .unwrap_or(max_position_embeddings as f64 / original);
    let attention_factor =
        s.attention_factor
            .unwrap_or_else(|| match (s.mscale, s.mscale_all_dim) {
                (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, all)
                }
                _ => yarn_mscale(factor, 1.0),
            });
    let correction_dim = |rotations: f64| {
        (dim as f64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln())
            / (2.0 * theta.ln())
    };
    let (mut low, mut high) = (correction_dim(s.beta_fast), correction_dim(s.beta_slow));
    if s.truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let mut high = high.min(dim as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    let (low32, span32) = (low as f32, (high - low) as f32);
    let inv = pos_frequencies(theta, dim)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let extrapolation = 1.0 / p;
            let interpolation = 1.0 / (factor as f32 * p);
            let ramp = ((i as f32 - low32) / span32).clamp(0.0, 1.0);
            let extrapolation_factor = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor
        })
        .collect();
    (inv, attention_factor as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values printed by transformers 5.24's `ROPE_INIT_FUNCTIONS`
    /// (LlamaConfig, head_dim 64) for entries 0, 7, 15, 20, 25, 31, and the
    /// attention factor.
    fn check(rope_parameters: &str, max_pos: usize, expected: [f64; 6], attention: f64) {
        let text = format!(r#"{{"rope_parameters": {rope_parameters}}}"#);
        let raw: Map<String, Value> = serde_json::from_str(&text).unwrap();
        let rope = read_rope(&raw, &["full_attention"], max_pos).unwrap();
        let (inv, att) = rope.inverse_frequencies(64, max_pos);
        assert_eq!(inv.len(), 32);
        for (&i, want) in [0usize, 7, 15, 20, 25, 31].iter().zip(expected) {
            let got = inv[i] as f64;
            assert!(
                ((got - want) / want).abs() < 1e-6,
                "{rope_parameters}: inv[{i}] = {got}, transformers {want}"
            );
        }
        assert!(
            (att as f64 - attention).abs() < 1e-6,
            "{rope_parameters}: attention factor {att} vs {attention}"
        );
    }

    #[test]
    fn inverse_frequencies_equal_transformers() {
        check(
            r#"{"rope_type": "default", "rope_theta": 1000000.0}"#,
            4096,
            [
                1.0,
                0.04869675263762474,
                0.0015399265103042126,
                0.00017782794020604342,
                2.0535249859676696e-05,
                1.5399265294036013e-06,
            ],
            1.0,
        );
        check(
            r#"{"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}"#,
            4096,
            [
                0.25,
                0.0333380363881588,
                0.0033338037319481373,
                0.0007905694656074047,
                0.00018747354624792933,
                3.333803761051968e-05,
            ],
            1.0,
        );
        check(
            r#"{"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}"#,
            4096,
            [
                1.0,
                0.1333521455526352,
                0.01333521492779255,
                0.003162277862429619,
                0.0007498941849917173,
                0.0001333521504420787,
            ],
            1.0,
        );
        check(
            r#"{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
            131072,
            [
                1.0,
                0.05666961893439293,
                0.0013718936825171113,
                3.428102354519069e-05,
                4.411534519022098e-06,
                3.76732259610435e-07,
            ],
            1.0,
        );
        check(
            r#"{"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 4096}"#,
            16384,
            [
                1.0,
                0.045044492930173874,
                0.0005004761624149978,
                4.4456985051510856e-05,
                5.133812464919174e-06,
                3.8498163235090033e-07,
            ],
            1.138629436111989,
        );
        check(
            r#"{"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}"#,
            163840,
            [
                1.0,
                0.1333521455526352,
                0.0083345090970397,
                0.0007905694073997438,
                1.8747354260995053e-05,
                3.3338035336782923e-06,
            ],
            1.0857263992561355,
        );
    }

    #[test]
    fn both_layouts_read_the_same() {
        let v4: Map<String, Value> = serde_json::from_str(r#"{"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#).unwrap();
        let v5: Map<String, Value> = serde_json::from_str(r#"{"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#).unwrap();
        let a = read_rope(&v4, &["full_attention"], 131072).unwrap();
        assert_eq!(a, read_rope(&v5, &["full_attention"], 131072).unwrap());
        assert_eq!(a.theta, 500000.0);
        // The old `type` key, as Qwen checkpoints wrote it.
        let old: Map<String, Value> = serde_json::from_str(r#"{"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}"#).unwrap();
        assert!(matches!(
            read_rope(&old, &["full_attention"], 131072)
                .unwrap()
                .scaling,
            RopeScaling::Yarn(_)
        ));
    }

    #[test]
    fn per_layer_type_maps_and_refusals() {
        let map: Map<String, Value> = serde_json::from_str(r#"{"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}"#).unwrap();
        assert_eq!(
            read_rope(&map, &["full_attention"], 4096).unwrap().theta,
            1e6
        );
        let err = read_rope(&map, &["full_attention", "sliding_attention"], 4096).unwrap_err();
        assert!(
            err.to_string().contains("differ between layer types"),
            "{err}"
        );
        for (text, named) in [
            (
                r#"{"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}"#,
                "longrope",
            ),
            (
                r#"{"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}"#,
                "partial_rotary_factor",
            ),
            (
                r#"{"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}"#,
                "factor",
            ),
            (
                r#"{"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}"#,
                "low_freq_factor",
            ),
            (
                r#"{"rope_parameters": {"rope_type": "linear", "factor": 2.0, "mrope_section": [1]}}"#,
                "mrope_section",
            ),
            (
                r#"{"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}"#,
                "disagree",
            ),
        ] {
            let raw: Map<String, Value> = serde_json::from_str(text).unwrap();
            let err = read_rope(&raw, &["full_attention"], 4096)
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
    }
}
