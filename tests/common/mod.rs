//! Shared fixtures: tiny checkpoints written by `make-model` into temp dirs,
//! and the real server started on them.
#![allow(dead_code)]

pub mod engine;
pub mod probe;
pub mod server;

use candle_core::{DType, Device};
use gym_serve::config::Architecture;
use gym_serve::loader::LoadedModel;
use gym_serve::make_model::{make_model, MakeModelOptions, Preset};
use std::path::Path;
use tempfile::TempDir;

pub fn tiny_options(arch: Architecture, seed: u64) -> MakeModelOptions {
    MakeModelOptions {
        shape: Preset::Tiny.shape(arch),
        seed,
        dtype: DType::F32,
        shards: 1,
    }
}

/// Writes a checkpoint with `opts` into a fresh temp dir.
pub fn write_model(opts: &MakeModelOptions) -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    make_model(dir.path(), opts).expect("make-model");
    dir
}

pub fn load(dir: &Path) -> LoadedModel {
    LoadedModel::load(dir, &Device::Cpu, DType::F32).expect("load model")
}

/// A tiny Qwen3 checkpoint, loaded.
pub fn tiny_qwen3(seed: u64) -> (TempDir, LoadedModel) {
    let dir = write_model(&tiny_options(Architecture::Qwen3, seed));
    let loaded = load(dir.path());
    (dir, loaded)
}

/// Chat prompts of different lengths, encoded with the model's own template.
pub fn prompts(loaded: &LoadedModel) -> Vec<Vec<u32>> {
    let texts = [
        "Hi",
        "What is the weather in Paris today? Please answer in one short sentence.",
        "Write a short poem about the sea, the wind and the boats that sail on it at night.",
    ];
    texts
        .iter()
        .map(|t| {
            let messages = serde_json::json!([{"role": "user", "content": t}]);
            loaded
                .chat
                .encode_chat(&messages, None, true, &serde_json::Map::new())
                .expect("encode chat")
        })
        .collect()
}

/// Starts an engine thread on a loaded model with default options.
pub fn spawn_engine(loaded: LoadedModel) -> gym_serve::engine::EngineHandle {
    let eos = loaded.chat.eos_token_ids().to_vec();
    gym_serve::engine::EngineHandle::spawn(loaded.model, eos, Default::default()).expect("engine")
}

/// Lowercase hex SHA-256 of `bytes`, as `x-weights-sha256` carries it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
