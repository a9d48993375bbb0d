//! Huge pages for large outputs. A large tensor that torch allocates for an op's output is
//! mapped fresh from the kernel (glibc maps every allocation above its mmap threshold, at most
//! 32 MiB, on its own, and unmaps it when freed), so each of its 4 KiB pages faults on the
//! kernels' first write to it, every call: on the 1-D problem (L8192, 8 heads, D 64, 67 MB
//! tensors) the faults took more than a quarter of the backward (280 ms; 200 ms with the
//! memory kept mapped) and an eighth of the forward. Asking the kernel to back such memory with 2 MiB
//! pages (`madvise(MADV_HUGEPAGE)`, which needs no privileges and is honoured where
//! transparent huge pages are in `madvise` or `always` mode) cuts the faults 512-fold: that
//! backward took 227 ms, the forward 60 ms instead of 69.
//!
//! Only whole 2 MiB pages inside a tensor's own bytes are advised, so no other memory changes
//! hands. `NATTEN_RS_HUGE_PAGES=0` turns the advice off (on a host whose memory is too
//! fragmented for huge pages, the kernel may compact memory at a fault before it gives up).

use std::sync::OnceLock;

use crate::dlpack::TensorRef;

/// Bytes of a huge page (x86-64 and aarch64 with 4 KiB base pages).
const HUGE_PAGE: usize = 2 << 20;

/// Outputs smaller than this are left alone: glibc serves them from its heap once one of their
/// size has been freed, memory that is already mapped.
const MIN_BYTES: usize = 32 << 20;

/// Ask for huge pages behind the memory of every large tensor of `tensors` (CPU outputs that
/// the kernels are about to write).
pub(super) fn prefer_huge_pages<'a>(tensors: impl IntoIterator<Item = &'a TensorRef>) {
    for t in tensors {
        let (lo, hi) = t.byte_range();
        prefer_huge_pages_for(lo, hi - lo);
    }
}

/// Ask for huge pages behind the `bytes` bytes from address `start` on, when they are many.
pub(super) fn prefer_huge_pages_for(start: usize, bytes: usize) {
    if bytes < MIN_BYTES || !enabled() {
        return;
    }
    if let Some((lo, len)) = whole_huge_pages(start, bytes) {
        advise(lo, len);
    }
}

/// Whether the advice is given (`NATTEN_RS_HUGE_PAGES=0` turns it off).
fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("NATTEN_RS_HUGE_PAGES").is_none_or(|v| v != "0"))
}

/// The whole huge pages inside `[start, start + bytes)`: `(first address, length)`.
fn whole_huge_pages(start: usize, bytes: usize) -> Option<(usize, usize)> {
    let lo = start.checked_next_multiple_of(HUGE_PAGE)?;
    let hi = start.checked_add(bytes)? / HUGE_PAGE * HUGE_PAGE;
    (hi > lo).then_some((lo, hi - lo))
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
fn advise(lo: usize, len: usize) {
    use std::ffi::{c_int, c_void};
    extern "C" {
        fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }
    /// `MADV_HUGEPAGE` on these architectures.
    const MADV_HUGEPAGE: c_int = 14;
    // SAFETY: the range lies inside a live tensor's memory, page-aligned; this advice only
    // changes how pages are backed, never their contents. A failure (a kernel without
    // transparent huge pages) leaves things as they were, so it is ignored.
    unsafe { madvise(lo as *mut c_void, len, MADV_HUGEPAGE) };
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
fn advise(_lo: usize, _len: usize) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_huge_pages_inside_the_range_are_advised() {
        let mb = 1 << 20;
        assert_eq!(whole_huge_pages(0, 4 * mb), Some((0, 4 * mb)));
        assert_eq!(whole_huge_pages(16, 4 * mb), Some((2 * mb, 2 * mb)));
        assert_eq!(whole_huge_pages(16, 4 * mb - 16), Some((2 * mb, 2 * mb)));
        assert_eq!(whole_huge_pages(2 * mb - 1, 2 * mb), None);
        assert_eq!(whole_huge_pages(mb, 3 * mb), Some((2 * mb, 2 * mb)));
        assert_eq!(whole_huge_pages(usize::MAX - mb, 4 * mb), None);
    }
}
