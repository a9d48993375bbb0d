//! The parallel loop over rows, with the row kernel compiled for the best instruction set this
//! CPU has (chosen once at run time, so one wheel runs everywhere and fast where it can).

use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows handed to one rayon task at least: enough work to amortise scheduling.
const MIN_ROWS_PER_TASK: usize = 16;

/// A kernel that computes one output row at a time.
pub trait RowKernel: Sync {
    /// Scratch element type.
    type Acc: Copy + Send + Sync;

    /// Compute row `r`, using `scratch` freely.
    ///
    /// # Safety
    /// `r` must be below the row count the kernel was built for; implementations must write
    /// only memory that belongs to row `r`.
    unsafe fn row(&self, r: usize, scratch: &mut [Self::Acc]);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
        Isa::Baseline
    })
}

/// Run `kernel` on rows `0..rows` in parallel, each task with a scratch buffer of `width`.
///
/// # Safety
/// `kernel.row(r, _)` must be sound for every `r < rows`.
pub unsafe fn par_rows<K: RowKernel>(rows: usize, width: usize, zero: K::Acc, kernel: &K) {
    let isa = isa();
    (0..rows)
        .into_par_iter()
        .with_min_len(MIN_ROWS_PER_TASK)
        .for_each_init(
            || vec![zero; width],
            |scratch, r| match isa {
                // SAFETY: `r < rows` by the range; the caller vouches for the kernel.
                Isa::Baseline => unsafe { kernel.row(r, scratch) },
                // SAFETY: as above, and the CPU has AVX2 and FMA (detected).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => unsafe { row_avx2_fma(kernel, r, scratch) },
            },
        );
}

/// `kernel.row` inlined and compiled with AVX2 and FMA enabled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2_fma<K: RowKernel>(kernel: &K, r: usize, scratch: &mut [K::Acc]) {
    // SAFETY: forwarded contract of `par_rows`.
    unsafe { kernel.row(r, scratch) }
}
