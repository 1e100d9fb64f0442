//! Settings for the CPU thread pools the engine shares cores with, applied
//! once at process start (before any pool exists or any thread reads the
//! environment).

/// Environment variable candle 0.11 reads once, when its thread pool starts.
const CANDLE_SPIN_LIMIT: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";

/// Spins a candle pool worker makes before it sleeps (candle's default is
/// 25,000, about a millisecond of `pause`s after every candle op).
const SPIN_LIMIT: &str = "100";

/// A decode step alternates candle ops (norms, residual adds) with our own
/// rayon kernels (matmuls, attention). With candle's default, its idle
/// worker keeps spinning through most of each kernel that follows, taking
/// a core from it: on two cores, 32-sequence decode ran ~6% slower
/// (`cargo bench --bench engine`, 107 vs 114 tok/s). A value already set in
/// the environment is left alone.
pub fn configure() {
    if std::env::var_os(CANDLE_SPIN_LIMIT).is_none() {
        // Writing the environment is sound only while single-threaded:
        // callers run this first thing in `main`.
        std::env::set_var(CANDLE_SPIN_LIMIT, SPIN_LIMIT);
    }
}
