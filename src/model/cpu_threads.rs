//! Settings for the CPU thread pools the engine shares cores with, and for
//! the allocator their tensors come from, applied once at process start
//! (before any pool exists or any thread reads the environment).

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
/// workers one notch below the process's other threads ([`COMPUTE_NICE`]),
/// and keeps freed activation memory for reuse ([`keep_freed_memory`]).
pub fn configure() {
    keep_freed_memory();
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

/// Largest allocation glibc serves from its heaps rather than a fresh
/// `mmap` (its own ceiling on 64-bit).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory a heap keeps before glibc hands its top back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 1 << 30;

/// A step allocates every activation afresh (a 2,048-token prefill step of
/// the 0.6B shape: ~250 MB a layer). By default glibc maps allocations
/// that large with `mmap`, or trims its heap once they are freed, so each
/// step's tensors landed on new pages that the kernel faulted in and
/// zeroed one by one: 10% of a prefill's CPU time was in the kernel
/// (`perf stat`, 8 x 256-token prefill, sys 12.1 s of 109 s; with these
/// settings 2.9 s), and that prefill ran 1.19x faster (processes of the
/// two builds in turn, three rounds each: 91-107 -> 115-130 tok/s, the
/// AVX2 EPYC). Memory is then held at the largest step's high-water mark
/// instead of returned between steps (the engine bench's peak RSS, f32
/// weights: 3.44 -> 3.75 GB).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it runs before
    // other threads exist, and a refused value leaves glibc's default.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
