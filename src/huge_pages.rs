//! A global allocator that asks Linux for transparent huge pages on large
//! allocations (weights, the KV pool, a pushed tensor's staging copy).
//!
//! Why: with 4 KiB pages, writing 2.4 GB of fresh memory (the first weight
//! push) costs ~600k page faults, as long as the conversion itself, and
//! streaming the weights every decode step walks a page table entry every
//! 4 KiB. Most kernels ship THP in `madvise` mode, so the allocation must ask.
//! Everything else is the system allocator, untouched; off Linux it is the
//! system allocator and nothing more.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

/// Allocations at least this large are advised; smaller ones gain nothing
/// from 2 MiB pages and may sit in the allocator's shared heap.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
const HUGE_PAGE_MIN_BYTES: usize = 8 << 20;
#[cfg(target_os = "linux")]
const HUGE_PAGE: usize = 2 << 20;

/// 0: not read yet, 1: on, 2: off (`GYM_SERVE_HUGE_PAGES=off`).
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Whether large allocations are advised; `GYM_SERVE_HUGE_PAGES=off` turns
/// the advice off (to compare, or where huge pages are unwelcome).
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // Reading the variable allocates only small blocks, which never
            // come back here.
            let off = std::env::var("GYM_SERVE_HUGE_PAGES")
                .is_ok_and(|v| matches!(v.as_str(), "off" | "0" | "false"));
            ENABLED.store(if off { 2 } else { 1 }, Ordering::Relaxed);
            !off
        }
    }
}

/// The system allocator, with `MADV_HUGEPAGE` on the 2 MiB-aligned interior
/// of every allocation of at least [`HUGE_PAGE_MIN_BYTES`].
pub struct HugePageAlloc;

impl HugePageAlloc {
    #[cfg(not(target_os = "linux"))]
    fn advise(_: *mut u8, _: usize) {}

    #[cfg(target_os = "linux")]
    fn advise(ptr: *mut u8, size: usize) {
        if ptr.is_null() || size < HUGE_PAGE_MIN_BYTES || !enabled() {
            return;
        }
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + size) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside an allocation we own; the advice
            // changes only how its pages are backed, never their contents.
            // A refusal (no THP support) is harmless, so the result is ignored.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
}

// SAFETY: every call is forwarded to `System` unchanged; `advise` only adds
// a hint on memory the caller now owns.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc(layout);
        Self::advise(ptr, layout.size());
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = System.alloc_zeroed(layout);
        Self::advise(ptr, layout.size());
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = System.realloc(ptr, layout, new_size);
        Self::advise(new, new_size);
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_allocations_keep_their_contents_through_realloc() {
        let alloc = HugePageAlloc;
        let size = HUGE_PAGE_MIN_BYTES + 12345;
        let layout = Layout::from_size_align(size, 64).unwrap();
        // SAFETY: the layout is non-zero; every access stays within the
        // allocation's current size; the block is freed with its layout.
        unsafe {
            let ptr = alloc.alloc_zeroed(layout);
            assert!(!ptr.is_null());
            let bytes = std::slice::from_raw_parts_mut(ptr, size);
            assert!(bytes.iter().all(|&b| b == 0));
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let grown = alloc.realloc(ptr, layout, 2 * size);
            assert!(!grown.is_null());
            let bytes = std::slice::from_raw_parts(grown, size);
            assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
            alloc.dealloc(grown, Layout::from_size_align(2 * size, 64).unwrap());
        }
    }
}
