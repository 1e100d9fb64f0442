//! PEFT's `adapter_config.json`: the few fields that set a LoRA adapter's
//! math (`r`, `lora_alpha`, `use_rslora`, `target_modules`), and a refusal,
//! by field name, of every setting that would change the math in a way the
//! engine does not implement (DoRA, `modules_to_save`, layer patterns, ...).

use super::LoraError;
use crate::weights::names::{layer_module, LayerModule};
use serde_json::Value;

/// Largest `adapter_config.json` read (real ones are a few kilobytes).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Which projections an adapter targets, as PEFT's `target_modules` says.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// A list: a module matches an entry equal to its full name or to a
    /// dotted suffix of it (`q_proj`, `self_attn.q_proj`).
    Names(Vec<String>),
    /// A string other than `all-linear`: a regex the full module name
    /// (`model.layers.3.self_attn.q_proj`) must match entirely.
    Regex(String),
    /// `all-linear`: every projection (PEFT leaves the output head out).
    AllLinear,
}

/// What of an adapter config the forward pass uses.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: TargetModules,
}

/// Settings that change the math, refused when set to anything but their
/// "off" value: (field, why it is refused).
const REFUSED: &[(&str, &str)] = &[
    ("use_dora", "DoRA is not supported"),
    (
        "modules_to_save",
        "fully trained modules (modules_to_save) are not supported",
    ),
    (
        "layers_to_transform",
        "adapting only some layers (layers_to_transform) is not supported",
    ),
    ("layers_pattern", "layers_pattern is not supported"),
    (
        "rank_pattern",
        "per-module ranks (rank_pattern) are not supported",
    ),
    (
        "alpha_pattern",
        "per-module alphas (alpha_pattern) are not supported",
    ),
    ("exclude_modules", "exclude_modules is not supported"),
    ("layer_replication", "layer_replication is not supported"),
    ("lora_bias", "a bias on lora_B (lora_bias) is not supported"),
    (
        "trainable_token_indices",
        "trainable token embeddings are not supported",
    ),
    (
        "target_parameters",
        "adapting parameters directly (target_parameters) is not supported",
    ),
    ("use_qalora", "QA-LoRA is not supported"),
    (
        "alora_invocation_tokens",
        "activated LoRA (aLoRA) is not supported",
    ),
    (
        "megatron_config",
        "Megatron-parallel adapters are not supported",
    ),
];

/// Whether a JSON value is an "off" setting: null, false, empty.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::Number(_) => false,
    }
}

fn invalid(field: &str, why: impl std::fmt::Display) -> LoraError {
    LoraError::Config(format!("`{field}` {why}"))
}

impl AdapterConfig {
    /// Parses and checks `adapter_config.json`.
    pub fn from_json(text: &str) -> Result<Self, LoraError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| LoraError::Config(format!("not valid JSON: {e}")))?;
        Self::from_value(&v)
    }

    pub fn from_value(v: &Value) -> Result<Self, LoraError> {
        let obj = v
            .as_object()
            .ok_or_else(|| LoraError::Config("must be a JSON object".into()))?;
        if let Some(t) = obj.get("peft_type").filter(|t| !t.is_null()) {
            if t.as_str() != Some("LORA") {
                return Err(invalid(
                    "peft_type",
                    format!("is {t}; only LORA adapters are supported"),
                ));
            }
        }
        for (field, why) in REFUSED {
            if obj.get(*field).is_some_and(|v| !is_off(v)) {
                return Err(LoraError::Unsupported {
                    field: field.to_string(),
                    why: why.to_string(),
                });
            }
        }
        match obj.get("bias") {
            None | Some(Value::Null) => {}
            Some(Value::String(b)) if b == "none" => {}
            Some(b) => {
                return Err(LoraError::Unsupported {
                    field: "bias".into(),
                    why: format!(
                        "is {b}; only \"none\" is supported (trained biases change the base model)"
                    ),
                })
            }
        }
        let rank = match obj.get("r") {
            Some(r) => r
                .as_u64()
                .filter(|&r| r > 0)
                .ok_or_else(|| invalid("r", format!("must be a positive integer, got {r}")))?,
            None => 8, // PEFT's default
        } as usize;
        let alpha = match obj.get("lora_alpha") {
            Some(a) => a
                .as_f64()
                .filter(|a| a.is_finite())
                .ok_or_else(|| invalid("lora_alpha", format!("must be a number, got {a}")))?,
            None => 8.0,
        };
        let use_rslora = match obj.get("use_rslora") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(invalid(
                    "use_rslora",
                    format!("must be a boolean, got {other}"),
                ))
            }
        };
        // fan_in_fan_out only concerns Conv1D base layers (GPT-2); PEFT resets
        // it to false for the nn.Linear projections these models have, so
        // either value means the same math here.
        if let Some(f) = obj
            .get("fan_in_fan_out")
            .filter(|f| !f.is_null() && !f.is_boolean())
        {
            return Err(invalid(
                "fan_in_fan_out",
                format!("must be a boolean, got {f}"),
            ));
        }
        let targets = match obj.get("target_modules") {
            Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => {
                TargetModules::AllLinear
            }
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            Some(Value::Array(items)) if !items.is_empty() => TargetModules::Names(
                items
                    .iter()
                    .map(|i| {
                        i.as_str().map(str::to_string).ok_or_else(|| {
                            invalid(
                                "target_modules",
                                format!("entries must be strings, got {i}"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(invalid(
                    "target_modules",
                    format!(
                        "must be a non-empty list of module names or a string, got {}",
                        other.map_or("nothing".to_string(), Value::to_string)
                    ),
                ))
            }
        };
        Ok(Self {
            rank,
            alpha,
            use_rslora,
            targets,
        })
    }

    /// The factor the low-rank update is multiplied by: `alpha / sqrt(r)`
    /// with rsLoRA, else `alpha / r`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// The (layer, projection) pairs the adapter targets in a model of
    /// `num_layers` layers. A target that names nothing this engine can
    /// adapt (an embedding, the output head, a typo) is refused by name.
    pub fn targeted(&self, num_layers: usize) -> Result<Vec<(usize, LayerModule)>, LoraError> {
        let all =
            || (0..num_layers).flat_map(|l| LayerModule::PROJECTIONS.iter().map(move |&m| (l, m)));
        let picked: Vec<(usize, LayerModule)> = match &self.targets {
            TargetModules::AllLinear => all().collect(),
            TargetModules::Names(names) => {
                for name in names {
                    if !all().any(|(l, m)| name_matches(name, &layer_module(l, m))) {
                        return Err(LoraError::UnknownTargetModule(name.clone()));
                    }
                }
                all()
                    .filter(|&(l, m)| {
                        let full = layer_module(l, m);
                        names.iter().any(|n| name_matches(n, &full))
                    })
                    .collect()
            }
            TargetModules::Regex(pattern) => {
                let re = regex::Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| invalid("target_modules", format!("is not a valid regex: {e}")))?;
                for other in ["model.embed_tokens", "lm_head"] {
                    if re.is_match(other) {
                        return Err(LoraError::UnknownTargetModule(other.to_string()));
                    }
                }
                let picked: Vec<_> = all()
                    .filter(|&(l, m)| re.is_match(&layer_module(l, m)))
                    .collect();
                if picked.is_empty() {
                    return Err(LoraError::UnknownTargetModule(pattern.clone()));
                }
                picked
            }
        };
        Ok(picked)
    }
}

/// PEFT's list matching: the full name, or a dotted suffix of it.
fn name_matches(target: &str, full: &str) -> bool {
    full == target
        || full
            .strip_suffix(target)
            .is_some_and(|head| head.ends_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<AdapterConfig, LoraError> {
        AdapterConfig::from_value(&v)
    }

    #[test]
    fn reads_rank_alpha_and_both_scales() {
        let c = parse(json!({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"], "bias": "none", "fan_in_fan_out": false, "lora_dropout": 0.05})).unwrap();
        assert_eq!((c.rank, c.alpha, c.use_rslora), (16, 32.0, false));
        assert_eq!(c.scale(), 2.0);
        let c = parse(
            json!({"r": 16, "lora_alpha": 32, "use_rslora": true, "target_modules": ["q_proj"]}),
        )
        .unwrap();
        assert_eq!(c.scale(), 8.0);
    }

    #[test]
    fn target_forms_pick_the_right_projections() {
        let picked =
            |t: Value| parse(json!({"r": 4, "target_modules": t})).and_then(|c| c.targeted(2));
        assert_eq!(
            picked(json!(["q_proj", "mlp.down_proj"])).unwrap(),
            vec![
                (0, LayerModule::QProj),
                (0, LayerModule::DownProj),
                (1, LayerModule::QProj),
                (1, LayerModule::DownProj)
            ]
        );
        assert_eq!(picked(json!("all-linear")).unwrap().len(), 14);
        assert_eq!(
            picked(json!(r".*\.1\.self_attn\.(k|v)_proj")).unwrap(),
            vec![(1, LayerModule::KProj), (1, LayerModule::VProj)]
        );
        // A partial name is not a suffix match (PEFT's rule): refused by name.
        let err = picked(json!(["q_pro"])).unwrap_err();
        assert!(
            matches!(&err, LoraError::UnknownTargetModule(n) if n == "q_pro"),
            "{err}"
        );
        let err = picked(json!(["q_proj", "embed_tokens"])).unwrap_err();
        assert!(err.to_string().contains("embed_tokens"), "{err}");
        let err = picked(json!(".*")).unwrap_err();
        assert!(err.to_string().contains("embed_tokens"), "{err}");
    }

    #[test]
    fn refuses_what_changes_the_math_by_name() {
        let base = json!({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]});
        for (field, value) in [
            ("use_dora", json!(true)),
            ("modules_to_save", json!(["lm_head"])),
            ("layers_to_transform", json!([0])),
            ("layers_pattern", json!("layers")),
            ("rank_pattern", json!({"q_proj": 8})),
            ("alpha_pattern", json!({"q_proj": 8})),
            ("bias", json!("all")),
            ("lora_bias", json!(true)),
        ] {
            let mut v = base.clone();
            v[field] = value;
            let err = parse(v).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        // Their "off" values are fine.
        let mut v = base.clone();
        for field in [
            "use_dora",
            "modules_to_save",
            "layers_to_transform",
            "rank_pattern",
        ] {
            v[field] = if field == "use_dora" {
                json!(false)
            } else if field == "rank_pattern" {
                json!({})
            } else {
                Value::Null
            };
        }
        parse(v).unwrap();
        let err = parse(json!({"peft_type": "IA3", "target_modules": ["q_proj"]})).unwrap_err();
        assert!(err.to_string().contains("peft_type"), "{err}");
        let err = parse(json!({"r": 0, "target_modules": ["q_proj"]})).unwrap_err();
        assert!(err.to_string().contains("`r`"), "{err}");
    }
}
