//! Bookkeeping of the KV pool's blocks: reference counts, the free list in
//! least-recently-used order, and the prefix cache (full blocks keyed by a
//! hash of their tokens, their predecessors and the weight version).
//!
//! No tensors here: the model reads and writes the pool; this decides which
//! block holds what.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

pub struct BlockPool {
    block_size: usize,
    ref_counts: Vec<u32>,
    /// The prefix-cache key a block is registered under, if any.
    hashes: Vec<Option<u64>>,
    cached: HashMap<u64, u32>,
    /// Unreferenced blocks, oldest release first: the eviction order.
    free: BTreeMap<u64, u32>,
    /// When each free block was released (its key in `free`).
    released_at: Vec<u64>,
    clock: u64,
    hit_tokens: u64,
    computed_prompt_tokens: u64,
}

/// Hash of a full block given the previous block's hash (or the seed).
pub fn chain_hash(previous: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    previous.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The seed of a hash chain: blocks computed under other weights never match.
pub fn version_seed(weight_version: &str) -> u64 {
    let mut h = DefaultHasher::new();
    "gym-serve-kv".hash(&mut h);
    weight_version.hash(&mut h);
    h.finish()
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let mut pool = Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::new(),
            free: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
            hit_tokens: 0,
            computed_prompt_tokens: 0,
        };
        for b in 0..num_blocks as u32 {
            pool.push_free(b);
        }
        pool
    }

    fn push_free(&mut self, block: u32) {
        self.clock += 1;
        self.released_at[block as usize] = self.clock;
        self.free.insert(self.clock, block);
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// A fresh block (evicting the least recently used cached one), or `None`
    /// when every block is referenced.
    pub fn allocate(&mut self) -> Option<u32> {
        let (_, block) = self.free.pop_first()?;
        if let Some(h) = self.hashes[block as usize].take() {
            if self.cached.get(&h) == Some(&block) {
                self.cached.remove(&h);
            }
        }
        self.ref_counts[block as usize] = 1;
        Some(block)
    }

    /// Takes another reference on a block already in use (sharing it).
    pub fn share(&mut self, block: u32) {
        debug_assert!(
            self.ref_counts[block as usize] > 0,
            "sharing a free block {block}"
        );
        self.ref_counts[block as usize] += 1;
    }

    /// Drops one reference; an unreferenced block stays cached until evicted.
    pub fn release(&mut self, block: u32) {
        let rc = &mut self.ref_counts[block as usize];
        debug_assert!(*rc > 0, "block {block} released twice");
        *rc = rc.saturating_sub(1);
        if *rc == 0 {
            self.push_free(block);
        }
    }

    /// Takes a reference on the cached block with this hash, if there is one.
    pub fn lookup(&mut self, hash: u64) -> Option<u32> {
        let block = *self.cached.get(&hash)?;
        if self.ref_counts[block as usize] == 0 {
            let at = self.released_at[block as usize];
            self.free.remove(&at);
        }
        self.ref_counts[block as usize] += 1;
        Some(block)
    }

    /// Makes a full, computed block findable under `hash` (first one wins).
    pub fn register(&mut self, block: u32, hash: u64) {
        if self.hashes[block as usize].is_none() && !self.cached.contains_key(&hash) {
            self.cached.insert(hash, block);
            self.hashes[block as usize] = Some(hash);
        }
    }

    /// Forgets every cached prefix (blocks in use stay allocated).
    pub fn reset_prefix_cache(&mut self) {
        self.cached.clear();
        self.hashes.iter_mut().for_each(|h| *h = None);
    }

    pub fn record_prompt(&mut self, hit_tokens: usize, computed_tokens: usize) {
        self.hit_tokens += hit_tokens as u64;
        self.computed_prompt_tokens += computed_tokens as u64;
    }

    /// Prompt tokens served from the prefix cache, and prompt tokens computed.
    pub fn prefix_counters(&self) -> (u64, u64) {
        (self.hit_tokens, self.computed_prompt_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_are_reused_until_evicted_in_lru_order() {
        let mut pool = BlockPool::new(3, 4);
        let a = pool.allocate().unwrap();
        let b = pool.allocate().unwrap();
        pool.register(a, 11);
        pool.register(b, 22);
        pool.release(a);
        pool.release(b);
        assert_eq!(pool.num_free(), 3);
        assert_eq!(pool.lookup(22), Some(b));
        pool.release(b);
        // The never-used block goes first, then `a` (released before `b`).
        let c = pool.allocate().unwrap();
        assert!(c != a && c != b);
        assert_eq!(pool.allocate(), Some(a));
        assert_eq!(pool.lookup(11), None, "evicted");
        assert_eq!(pool.lookup(22), Some(b));
        assert_eq!(pool.allocate(), None);
        assert_eq!(pool.num_used(), 3);
    }
}
