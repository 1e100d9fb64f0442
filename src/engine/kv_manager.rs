//! The KV cache manager: every sequence's block table, and each change to
//! one, over the [`BlockPool`]'s reference counts and prefix cache.
//!
//! The scheduler reaches blocks only through here. Each call either does all
//! of what it says or, when the pool is short, returns `None` and changes
//! nothing, so admission can be tried and dropped without undoing anything.

use super::block_pool::BlockPool;
use crate::model::KvPool;

/// The pool blocks that hold one sequence's keys and values, in position
/// order. Only [`KvManager`] changes it, so each entry is one reference.
#[derive(Debug, Default)]
pub struct BlockTable {
    ids: Vec<u32>,
}

impl BlockTable {
    /// Block IDs, position `p` living in block `ids()[p / block_size]`.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What a fork needs of the pool's tensors: the first `rows` positions of
/// block `src` copied into block `dst`, in every layer.
pub trait BlockCopier {
    fn copy_block(&self, src: u32, dst: u32, rows: usize) -> candle_core::Result<()>;
}

impl BlockCopier for KvPool {
    fn copy_block(&self, src: u32, dst: u32, rows: usize) -> candle_core::Result<()> {
        KvPool::copy_block(self, src, dst, rows)
    }
}

pub struct KvManager {
    pool: BlockPool,
}

impl KvManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            pool: BlockPool::new(num_blocks, block_size),
        }
    }

    pub fn block_size(&self) -> usize {
        self.pool.block_size()
    }

    pub fn num_free(&self) -> usize {
        self.pool.num_free()
    }

    /// Blocks referenced by some sequence.
    pub fn num_used(&self) -> usize {
        self.pool.num_used()
    }

    /// Grows `table` to cover `num_tokens` positions, evicting cached blocks
    /// as needed. `None`, and no change, when too few blocks are free;
    /// otherwise the number of blocks added.
    pub fn allocate_slots(&mut self, table: &mut BlockTable, num_tokens: usize) -> Option<usize> {
        let needed = num_tokens.div_ceil(self.pool.block_size());
        let new = needed.saturating_sub(table.ids.len());
        if new > self.pool.num_free() {
            return None;
        }
        for _ in 0..new {
            // Cannot fail: enough blocks were free.
            table.ids.push(self.pool.allocate()?);
        }
        Some(new)
    }

    /// Starts an empty `table` with the cached blocks of the hash chain
    /// `hashes`, up to the first miss; returns how many it found.
    pub fn take_cached_prefix(&mut self, table: &mut BlockTable, hashes: &[u64]) -> usize {
        debug_assert!(table.is_empty(), "a cached prefix starts a table");
        for &h in hashes {
            match self.pool.lookup(h) {
                Some(b) => table.ids.push(b),
                None => break,
            }
        }
        table.ids.len()
    }

    /// Makes the first `full` blocks of `table`, computed, findable under
    /// `hashes` (their hash chain).
    pub fn cache_full_blocks(&mut self, table: &BlockTable, hashes: &[u64], full: usize) {
        for (&block, &hash) in table.ids[..full].iter().zip(&hashes[..full]) {
            self.pool.register(block, hash);
        }
    }

    /// Returns every block of `table` to the pool (cached ones stay findable
    /// until evicted).
    pub fn free(&mut self, table: &mut BlockTable) {
        for b in table.ids.drain(..) {
            self.pool.release(b);
        }
    }

    /// A table for a sequence that shares the first `prompt_len` computed
    /// positions of `leader`: full blocks shared, the partly filled last one
    /// copied through `copier`. `None`, and no change, when no block is free
    /// for the copy or the copy fails.
    pub fn fork(
        &mut self,
        leader: &BlockTable,
        prompt_len: usize,
        copier: &impl BlockCopier,
    ) -> Option<BlockTable> {
        let bs = self.pool.block_size();
        let (full, partial) = (prompt_len / bs, prompt_len % bs);
        let copy = if partial > 0 {
            let dst = self.pool.allocate()?;
            if let Err(e) = copier.copy_block(leader.ids[full], dst, partial) {
                tracing::warn!(error = %e, "copying a shared block failed; the choice will prefill");
                self.pool.release(dst);
                return None;
            }
            Some(dst)
        } else {
            None
        };
        for &b in &leader.ids[..full] {
            self.pool.share(b);
        }
        let mut ids = leader.ids[..full].to_vec();
        ids.extend(copy);
        Some(BlockTable { ids })
    }

    /// Forgets every cached prefix (blocks in use stay allocated).
    pub fn reset_prefix_cache(&mut self) {
        self.pool.reset_prefix_cache();
    }

    /// Counts an admitted prompt: tokens served from the cache, tokens to compute.
    pub fn record_prompt(&mut self, hit_tokens: usize, computed_tokens: usize) {
        self.pool.record_prompt(hit_tokens, computed_tokens);
    }

    /// Prompt tokens served from the prefix cache, and prompt tokens computed.
    pub fn prefix_counters(&self) -> (u64, u64) {
        self.pool.prefix_counters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_past_the_free_blocks_changes_nothing() {
        let mut kv = KvManager::new(4, 4);
        let mut a = BlockTable::default();
        assert_eq!(kv.allocate_slots(&mut a, 9), Some(3));
        assert_eq!(kv.allocate_slots(&mut a, 12), Some(0), "already covered");
        let mut b = BlockTable::default();
        assert_eq!(kv.allocate_slots(&mut b, 5), None);
        assert!(b.is_empty());
        assert_eq!((kv.num_used(), kv.num_free()), (3, 1));
        kv.free(&mut a);
        assert_eq!((kv.num_used(), a.ids().len()), (0, 0));
    }
}
