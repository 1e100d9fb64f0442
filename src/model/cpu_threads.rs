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
///
/// Also starts the global rayon pool (the engine's kernels) with its
/// workers one notch below the process's other threads ([`COMPUTE_NICE`]).
pub fn configure() {
    if std::env::var_os(CANDLE_SPIN_LIMIT).is_none() {
        // Writing the environment is sound only while single-threaded:
        // callers run this first thing in `main`.
        std::env::set_var(CANDLE_SPIN_LIMIT, SPIN_LIMIT);
    }
    // Fails only if the pool already exists; it then keeps its defaults.
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("gym-serve-compute-{i}"))
        .start_handler(|_| lower_this_thread_priority())
        .build_global();
}

/// Nice value of the compute workers. Kernels use every core all the time;
/// the server's own threads (receiving a weight push, parsing requests,
/// streaming tokens) need little CPU but need it now. On two cores, with a
/// stream generating, a 1.2 GB weight push took a median 0.83-0.86 s at
/// equal priority and 0.65-0.73 s with this (`cargo bench --bench refit`).
const COMPUTE_NICE: i32 = 5;

fn lower_this_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread; a failure only leaves
    // the priority as it was.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, COMPUTE_NICE);
    }
}
