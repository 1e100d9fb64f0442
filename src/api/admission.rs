//! Admission by memory cost. The engine bounds the KV cache by its pool;
//! what a request holds on the host (each sequence's tokens, every token's
//! log-probs and alternatives, the response body) is bounded here: a
//! request reserves its worst case from one budget (`--max-memory`) before
//! it reaches the engine, and waits, in arrival order, while the budget is
//! spent. A legal request can wait; it cannot push the process past it.

use super::error::ApiError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Permits count KiB: a u32 of permits then covers 4 TiB.
const UNIT: usize = 1024;

/// After a request that held this much, free heap pages are returned to the
/// system (see `memory::trim`).
const TRIM_AFTER_BYTES: usize = 8 << 20;

#[derive(Debug)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_units: usize,
    reserved: Arc<AtomicUsize>,
}

/// Worst-case host bytes of one request, from its shape.
#[derive(Debug, Clone, Copy)]
pub struct RequestShape {
    pub sequences: usize,
    /// Prompt tokens of one sequence (the longest prompt of the request).
    pub prompt_tokens: usize,
    /// Most tokens a sequence may generate (max_tokens, clamped to the context).
    pub max_tokens: usize,
    /// Alternatives per generated token.
    pub top_logprobs: usize,
    /// Whether the whole response is built in memory (not streamed).
    pub buffered: bool,
}

impl RequestShape {
    /// Bytes per generated token held while running: the engine's token,
    /// the event carrying it, the token ID, log-prob and alternatives kept
    /// for the response.
    fn token_bytes(&self) -> usize {
        let held = 96 + 16 * self.top_logprobs;
        // Upper bound of the JSON of one token in a buffered response: its
        // ID, log-prob and `logprobs` entry, each alternative's entry.
        let json = if self.buffered {
            160 + 120 * self.top_logprobs
        } else {
            0
        };
        held + json
    }

    /// Bytes of the worst case, capped at what the response bound lets a
    /// buffered request grow to (it fails past `max_response_bytes`).
    pub fn cost(&self, max_response_bytes: usize) -> usize {
        let per_sequence = self
            .max_tokens
            .saturating_mul(self.token_bytes())
            .saturating_add(
                self.prompt_tokens
                    .saturating_mul(if self.buffered { 16 } else { 4 }),
            )
            .saturating_add(1024);
        let worst = per_sequence.saturating_mul(self.sequences.max(1));
        if self.buffered {
            // Past the bound the request is cut; what it held up to then
            // is the response plus at most as much again in token state.
            worst.min(max_response_bytes.saturating_mul(2))
        } else {
            worst
        }
    }
}

/// A request's share of the budget, returned when dropped.
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
    reserved: Arc<AtomicUsize>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.bytes, Ordering::Relaxed);
        if self.bytes >= TRIM_AFTER_BYTES {
            // The request's buffers are freed by now (the reservation is
            // dropped after them); give their pages back, off the runtime.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                drop(runtime.spawn_blocking(crate::memory::trim));
            }
        }
    }
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> Self {
        let total_units = (bytes / UNIT).clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(total_units)),
            total_units,
            reserved: Arc::default(),
        }
    }

    pub fn total_bytes(&self) -> usize {
        self.total_units * UNIT
    }

    /// Bytes reserved by requests now (for `/metrics`).
    pub fn reserved_bytes(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    /// Waits until `bytes` (capped at the whole budget, so every request
    /// fits eventually) are free, and takes them.
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation, ApiError> {
        let units = bytes.div_ceil(UNIT).clamp(1, self.total_units);
        let units32 = u32::try_from(units).unwrap_or(u32::MAX);
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(units32)
            .await
            .map_err(|_| ApiError::Internal("the memory budget is closed".into()))?;
        let bytes = units32 as usize * UNIT;
        self.reserved.fetch_add(bytes, Ordering::Relaxed);
        Ok(Reservation {
            _permit: Some(permit),
            bytes,
            reserved: self.reserved.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffered_request_costs_at_most_twice_the_response_bound() {
        let shape = RequestShape {
            sequences: 64,
            prompt_tokens: 10,
            max_tokens: 4000,
            top_logprobs: 20,
            buffered: true,
        };
        assert_eq!(shape.cost(100 << 20), 200 << 20);
        let small = RequestShape {
            sequences: 1,
            max_tokens: 16,
            ..shape
        };
        assert!(small.cost(100 << 20) < 100_000);
    }

    #[tokio::test]
    async fn reservations_wait_for_each_other_and_never_exceed_the_budget() {
        let budget = Arc::new(MemoryBudget::new(10 * UNIT));
        let a = budget.reserve(8 * UNIT).await.unwrap();
        // Larger than the whole budget: capped, so it can still run alone.
        let b = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(100 * UNIT).await.map(|_| ()) })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!b.is_finished());
        assert_eq!(budget.reserved_bytes(), 8 * UNIT);
        drop(a);
        b.await.unwrap().unwrap();
        assert_eq!(budget.reserved_bytes(), 0);
    }
}
