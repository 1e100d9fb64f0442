//! Handing device tensors from one thread to another.
//!
//! candle's CUDA device queues each thread's work on that thread's own
//! stream (`CU_STREAM_PER_THREAD`), with nothing ordering one thread's
//! stream after another's. A tensor made or converted on one thread (a
//! push converted on a worker, a model built on a blocking thread, the KV
//! pool zeroed where the engine is spawned) may still be in flight when the
//! engine thread reads it, so the thread that made it waits for its own
//! stream before handing it over. The same holds the other way: memory is
//! freed on the stream of the thread that drops it last, so the engine
//! waits for its kernels on the old weights before a swap's reply lets the
//! refit thread drop them.

use candle_core::{Device, Result};

/// Waits until the work this thread queued on `device` is done (free on
/// the CPU).
pub fn settle(device: &Device) -> Result<()> {
    if device.is_cpu() {
        return Ok(());
    }
    device.synchronize()
}
