//! The system's CBLAS (OpenBLAS), loaded at run time, for the benchmark's
//! opt-in comparison only (`GYM_SERVE_BENCH_BLAS=1`): the engine runs its own
//! GEMM (src/model/gemm) and needs no BLAS.

use std::sync::OnceLock;

// CBLAS enum values (cblas.h).
const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

type Sgemm = unsafe extern "C" fn(
    order: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

pub struct Blas {
    sgemm: Sgemm,
    /// Which library was loaded, for logs and the benchmark.
    pub name: String,
    _lib: libloading::Library,
}

/// Library names tried in order; `GYM_SERVE_BLAS_LIB` (a path) goes first.
const CANDIDATES: [&str; 4] = [
    "libopenblas.so.0",
    "libopenblas.so",
    "libcblas.so.3",
    "libopenblas.dylib",
];

fn load() -> Option<Blas> {
    let mut names: Vec<String> = std::env::var("GYM_SERVE_BLAS_LIB").into_iter().collect();
    names.extend(CANDIDATES.iter().map(|s| s.to_string()));
    for name in names {
        // SAFETY: loading a shared library runs its initializers; these are
        // the standard BLAS libraries, whose initializers only set up threads.
        let Ok(lib) = (unsafe { libloading::Library::new(&name) }) else {
            continue;
        };
        // SAFETY: cblas_sgemm has this C signature in every CBLAS (LP64 ints).
        let sgemm = match unsafe { lib.get::<Sgemm>(b"cblas_sgemm\0") } {
            Ok(f) => *f,
            Err(_) => continue,
        };
        return Some(Blas {
            sgemm,
            name,
            _lib: lib,
        });
    }
    None
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

/// The loaded BLAS, unless none was found.
pub fn blas() -> Option<&'static Blas> {
    BLAS.get_or_init(load).as_ref()
}

impl Blas {
    /// `out = x @ w^T` for row-major f32 `x: [m, k]`, `w: [n, k]`, `out: [m, n]`.
    pub fn matmul_t(&self, x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
        assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
        if m == 0 || n == 0 {
            return;
        }
        // SAFETY: x is m*k, w is n*k and out is m*n f32 values, row-major,
        // as the dimensions and leading strides passed here describe.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                NO_TRANS,
                TRANS,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                x.as_ptr(),
                k as i32,
                w.as_ptr(),
                k as i32,
                0.0,
                out.as_mut_ptr(),
                n as i32,
            );
        }
    }
}
