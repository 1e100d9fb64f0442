//! Giving memory back to the system after large responses. glibc keeps
//! freed heap memory in its per-thread arenas, so a burst of large
//! responses (millions of small log-prob allocations) left RSS at its peak
//! for good; `malloc_trim` returns the free pages of every arena.

/// Frees what the allocator holds but nothing uses. Takes milliseconds on a
/// large heap: call it off the async runtime.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory the allocator owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads this process's resident memory (`VmRSS`) in bytes, where known.
pub fn resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<usize>()
        .ok()?;
    Some(kb * 1024)
}
