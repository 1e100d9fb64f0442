//! Which vector instruction set the hand-written CPU kernels (skinny matmul,
//! paged attention) run, detected once at run time so one binary runs on any
//! x86-64 and uses AVX-512 where the CPU has it.

use std::sync::atomic::{AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Simd {
    /// Whatever the compilation target guarantees (SSE2 on x86-64).
    Baseline = 0,
    /// AVX2 with FMA (x86-64-v3: Haswell, Zen).
    Avx2 = 1,
    /// AVX-512F (Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4).
    Avx512 = 2,
}

static CAP: AtomicU8 = AtomicU8::new(Simd::Avx512 as u8);

fn detected() -> Simd {
    #[cfg(target_arch = "x86_64")]
    {
        static DETECTED: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            if std::arch::is_x86_feature_detected!("avx512f") {
                Simd::Avx512
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                Simd::Avx2
            } else {
                Simd::Baseline
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Simd::Baseline
}

/// Whether the CPU is AMD's (`AuthenticAMD`): a few memory-access choices
/// were measured to differ between AMD and Intel cores.
pub fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AMD.get_or_init(|| {
            // CPUID leaf 0 (the vendor) exists on every x86-64 CPU.
            let id = std::arch::x86_64::__cpuid(0);
            let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect();
            vendor == b"AuthenticAMD"
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The best instruction set the CPU has, within the cap.
pub fn simd() -> Simd {
    let cap = match CAP.load(Ordering::Relaxed) {
        0 => Simd::Baseline,
        1 => Simd::Avx2,
        _ => Simd::Avx512,
    };
    detected().min(cap)
}

/// Caps the instruction set, process-wide: tests and benchmarks run the
/// AVX2 kernels on an AVX-512 machine this way.
pub fn set_cap(cap: Simd) {
    CAP.store(cap as u8, Ordering::Relaxed);
}
