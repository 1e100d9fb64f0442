//! Counters the engine thread keeps for `/metrics` and tests; read lock-free.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct EngineStats {
    running: AtomicUsize,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    steps: AtomicU64,
}

impl EngineStats {
    /// Sequences the engine is running now.
    pub fn running_sequences(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }
    pub fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens.load(Ordering::Relaxed)
    }
    pub fn generation_tokens(&self) -> u64 {
        self.generation_tokens.load(Ordering::Relaxed)
    }
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }

    pub(crate) fn set_running(&self, n: usize) {
        self.running.store(n, Ordering::Relaxed);
    }
    pub(crate) fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }
    pub(crate) fn record_step(&self, generated: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }
}
