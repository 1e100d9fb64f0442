//! Checkpoint loading: make-model round trips, dtype conversion, shards, and
//! clear errors for broken checkpoints.

mod common;

use candle_core::{DType, Device, Tensor};
use gym_serve::config::{Architecture, ModelConfig};
use gym_serve::loader::LoadedModel;
use gym_serve::make_model::random_weights;
use gym_serve::model::Model;
use gym_serve::weights::checkpoint::{read_checkpoint, write_checkpoint};
use gym_serve::weights::ParamStore;
use std::collections::HashMap;
use std::path::Path;

const TOKENS: [u32; 12] = [1, 317, 263, 201, 480, 293, 262, 409, 311, 2, 201, 5];

fn logits(model: &Model) -> Vec<Vec<f32>> {
    model.full_logits(&TOKENS).unwrap().to_vec2().unwrap()
}

/// The logits of a model built straight from the in-memory weights `make-model`
/// draws for `seed` (optionally rounded through `dtype`, as the file stores them).
fn in_memory_logits(cfg: &ModelConfig, seed: u64, dtype: DType) -> Vec<Vec<f32>> {
    let tensors: HashMap<String, Tensor> = random_weights(cfg, seed)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.to_dtype(dtype).unwrap()))
        .collect();
    let store = ParamStore::from_tensors(cfg, tensors, DType::F32, &Device::Cpu).unwrap();
    logits(&Model::new(cfg, &store, &Device::Cpu).unwrap())
}

#[test]
fn make_model_round_trips_every_architecture() {
    for arch in [
        Architecture::Qwen3,
        Architecture::Qwen2,
        Architecture::Llama,
    ] {
        let dir = common::write_model(&common::tiny_options(arch, 31));
        let loaded = common::load(dir.path());
        assert_eq!(loaded.config.architecture, arch);
        assert_eq!(
            logits(&loaded.model),
            in_memory_logits(&loaded.config, 31, DType::F32),
            "{arch:?}"
        );
    }
}

#[test]
fn bf16_and_sharded_checkpoints_convert_to_f32() {
    let mut opts = common::tiny_options(Architecture::Qwen3, 32);
    opts.dtype = DType::BF16;
    opts.shards = 3;
    let dir = common::write_model(&opts);
    assert!(dir.path().join("model.safetensors.index.json").exists());
    let loaded = common::load(dir.path());
    assert_eq!(loaded.store.dtype(), DType::F32);
    assert_eq!(
        logits(&loaded.model),
        in_memory_logits(&loaded.config, 32, DType::BF16)
    );

    let mut opts = common::tiny_options(Architecture::Qwen3, 32);
    opts.dtype = DType::F16;
    let dir = common::write_model(&opts);
    let loaded = common::load(dir.path());
    assert_eq!(
        logits(&loaded.model),
        in_memory_logits(&loaded.config, 32, DType::F16)
    );
}

#[test]
fn tied_embeddings_need_no_lm_head() {
    let mut opts = common::tiny_options(Architecture::Qwen3, 33);
    opts.shape.tie_word_embeddings = true;
    let dir = common::write_model(&opts);
    let tensors = read_checkpoint(dir.path(), &Device::Cpu).unwrap();
    assert!(!tensors.contains_key("lm_head.weight"));
    let loaded = common::load(dir.path());
    assert_eq!(
        logits(&loaded.model),
        in_memory_logits(&loaded.config, 33, DType::F32)
    );
}

#[test]
fn mistral_checkpoints_load() {
    let dir = common::write_model(&common::tiny_options(Architecture::Llama, 34));
    edit_config(dir.path(), |cfg| {
        cfg["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        cfg["model_type"] = serde_json::json!("mistral");
        cfg["rope_scaling"] = serde_json::Value::Null;
    });
    let loaded = common::load(dir.path());
    assert_eq!(loaded.config.architecture, Architecture::Mistral);
    assert_eq!(logits(&loaded.model).len(), TOKENS.len());
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = read_checkpoint(dir, &Device::Cpu).unwrap();
    edit(&mut tensors);
    let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    write_checkpoint(dir, &list, 1).unwrap();
}

fn load_error(dir: &Path) -> String {
    match LoadedModel::load(dir, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("a broken checkpoint loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = common::write_model(&common::tiny_options(Architecture::Qwen3, 35));
    rewrite_weights(dir.path(), |t| {
        t.remove("model.layers.1.self_attn.k_norm.weight");
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("missing tensor model.layers.1.self_attn.k_norm.weight"),
        "{err}"
    );
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let dir = common::write_model(&common::tiny_options(Architecture::Qwen3, 36));
    rewrite_weights(dir.path(), |t| {
        let bad = Tensor::zeros((192, 32), DType::F32, &Device::Cpu).unwrap();
        t.insert("model.layers.0.mlp.up_proj.weight".into(), bad);
    });
    let err = load_error(dir.path());
    assert!(err.contains("model.layers.0.mlp.up_proj.weight"), "{err}");
    assert!(
        err.contains("[192, 32]") && err.contains("[192, 64]"),
        "{err}"
    );
}

#[test]
fn integer_tensor_is_refused_by_name() {
    let dir = common::write_model(&common::tiny_options(Architecture::Qwen3, 37));
    rewrite_weights(dir.path(), |t| {
        let bad = Tensor::zeros(64, DType::U32, &Device::Cpu).unwrap();
        t.insert("model.norm.weight".into(), bad);
    });
    let err = load_error(dir.path());
    assert!(
        err.contains("model.norm.weight") && err.contains("dtype"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let dir = common::write_model(&common::tiny_options(Architecture::Qwen3, 38));
    edit_config(dir.path(), |cfg| {
        cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    });
    let err = load_error(dir.path());
    assert!(err.contains("GPTNeoXForCausalLM"), "{err}");
}

#[test]
fn truncated_weights_file_is_an_error_not_a_panic() {
    let dir = common::write_model(&common::tiny_options(Architecture::Qwen3, 39));
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}
