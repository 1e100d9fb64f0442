//! Counters the engine thread keeps for `/metrics` and tests; read lock-free.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct EngineStats {
    running: AtomicUsize,
    waiting: AtomicUsize,
    blocks_used: AtomicUsize,
    blocks_free: AtomicUsize,
    prefix_hit_tokens: AtomicU64,
    prefix_computed_tokens: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    forward_tokens: AtomicU64,
    steps: AtomicU64,
    preemptions: AtomicU64,
    paused: AtomicBool,
    weight_version: Mutex<Option<Arc<str>>>,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl EngineStats {
    /// Sequences the engine is running now.
    pub fn running_sequences(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }
    /// Sequences queued for admission (new or preempted).
    pub fn waiting_sequences(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
    pub fn kv_blocks_used(&self) -> usize {
        self.blocks_used.load(Ordering::Relaxed)
    }
    pub fn kv_blocks_free(&self) -> usize {
        self.blocks_free.load(Ordering::Relaxed)
    }
    /// Prompt tokens whose KV came from the prefix cache.
    pub fn prefix_hit_tokens(&self) -> u64 {
        get(&self.prefix_hit_tokens)
    }
    /// Prompt tokens that had to be computed (prefix-cache misses).
    pub fn prefix_computed_tokens(&self) -> u64 {
        get(&self.prefix_computed_tokens)
    }
    pub fn prompt_tokens(&self) -> u64 {
        get(&self.prompt_tokens)
    }
    pub fn generation_tokens(&self) -> u64 {
        get(&self.generation_tokens)
    }
    /// Tokens run through the model (prefill chunks plus decode tokens).
    pub fn forward_tokens(&self) -> u64 {
        get(&self.forward_tokens)
    }
    pub fn steps(&self) -> u64 {
        get(&self.steps)
    }
    pub fn preemptions(&self) -> u64 {
        get(&self.preemptions)
    }

    /// The weight version serving now.
    pub fn weight_version(&self) -> Arc<str> {
        self.weight_version
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
            .unwrap_or_else(|| Arc::from("0"))
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    pub(crate) fn set_weight_version(&self, version: Arc<str>) {
        if let Ok(mut v) = self.weight_version.lock() {
            *v = Some(version);
        }
    }
    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub(crate) fn set_queues(&self, running: usize, waiting: usize) {
        self.running.store(running, Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
    }
    pub(crate) fn set_blocks(&self, used: usize, free: usize) {
        self.blocks_used.store(used, Ordering::Relaxed);
        self.blocks_free.store(free, Ordering::Relaxed);
    }
    pub(crate) fn set_prefix(&self, hits: u64, computed: u64) {
        self.prefix_hit_tokens.store(hits, Ordering::Relaxed);
        self.prefix_computed_tokens
            .store(computed, Ordering::Relaxed);
    }
    pub(crate) fn add_prompt_tokens(&self, n: usize) {
        self.prompt_tokens.fetch_add(n as u64, Ordering::Relaxed);
    }
    /// Counted before the token's event is sent, so a client that has its
    /// response never scrapes a count without its tokens.
    pub(crate) fn add_generation_token(&self) {
        self.generation_tokens.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn record_step(&self, forwarded: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.forward_tokens
            .fetch_add(forwarded as u64, Ordering::Relaxed);
    }
    pub(crate) fn record_preemption(&self) {
        self.preemptions.fetch_add(1, Ordering::Relaxed);
    }
}
