//! Where CPU work runs. Problems too small to repay waking other threads run on the calling
//! thread. Otherwise, when the process has an OpenMP runtime (torch's CPU ops run on one), rows
//! are spread over its thread team, so torch ops and natten_rs ops share one set of threads
//! instead of two pools fighting over the cores (OpenMP workers spin for milliseconds after each
//! torch op, which halves the speed of a second pool). Without one, rayon. Row kernels are
//! compiled for the best instruction set the CPU has, chosen once at run time, so one wheel
//! runs everywhere and fast where it can.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use super::simd::{self, Isa};

/// Indices handed to a worker at a time, at most (cheap indices come this many at once).
const GRAIN: usize = 16;

/// Multiply-adds handed to a worker at a time, at least: enough to amortise the shared
/// counter. Costly indices come one at a time, so that a few large tasks still spread evenly.
const GRAIN_WORK: usize = 1 << 15;

/// Below this many multiply-adds a problem runs on the calling thread: waking the pool costs
/// more than it saves (and far more when another process holds the other cores).
const SERIAL_WORK: usize = 1 << 18;

/// Run `f(i, state)` for every `i < n`, in parallel when `n * cost` (multiply-adds) is worth
/// it; every worker thread gets its own `state` from `init`.
pub fn for_each_with<S>(
    (n, cost): (usize, usize),
    init: impl Fn() -> S + Sync + Send,
    f: impl Fn(usize, &mut S) + Sync + Send,
) {
    if n.saturating_mul(cost) < SERIAL_WORK {
        let mut state = init();
        (0..n).for_each(|i| f(i, &mut state));
        return;
    }
    let grain = GRAIN_WORK.div_ceil(cost.max(1)).clamp(1, GRAIN);
    let next = AtomicUsize::new(0);
    let worker = || {
        let mut state = init();
        loop {
            let start = next.fetch_add(grain, Ordering::Relaxed);
            if start >= n {
                break;
            }
            for i in start..(start + grain).min(n) {
                f(i, &mut state);
            }
        }
    };
    if !openmp::run_on_team(&worker) {
        (0..n)
            .into_par_iter()
            .with_min_len(grain)
            .for_each_init(&init, |s, i| f(i, s));
    }
}

/// A kernel that computes one output row at a time.
pub trait RowKernel: Sync {
    /// Per-worker scratch space.
    type Scratch;

    /// Fresh scratch space for one worker.
    fn scratch(&self) -> Self::Scratch;

    /// Compute row `r`, using `scratch` freely.
    ///
    /// # Safety
    /// `r` must be below the row count the kernel was built for; implementations must write
    /// only memory that belongs to row `r`.
    unsafe fn row(&self, r: usize, scratch: &mut Self::Scratch);
}

/// Run `kernel` on rows `0..rows`, each costing about `cost` multiply-adds, in parallel when
/// that is worth it.
///
/// # Safety
/// `kernel.row(r, _)` must be sound for every `r < rows`.
pub unsafe fn par_rows<K: RowKernel>((rows, cost): (usize, usize), kernel: &K) {
    let vector = simd::isa() >= Isa::Avx2;
    for_each_with(
        (rows, cost),
        || kernel.scratch(),
        |r, scratch| {
            #[cfg(target_arch = "x86_64")]
            if vector {
                // SAFETY: `r < rows`; the caller vouches for the kernel; the CPU has AVX2,
                // FMA and F16C (detected).
                return unsafe { row_avx2_fma(kernel, r, scratch) };
            }
            // SAFETY: `r < rows`; the caller vouches for the kernel.
            unsafe { kernel.row(r, scratch) }
        },
    );
}

/// `kernel.row` inlined and compiled with AVX2, FMA and F16C enabled. (A version with the
/// AVX-512 tier's features too, for the forward's staging and stores, left P1's forward as it
/// was: 1.02x and 0.97x the time in float32 and bfloat16, within noise.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2_fma<K: RowKernel>(kernel: &K, r: usize, scratch: &mut K::Scratch) {
    // SAFETY: forwarded contract of `par_rows`.
    unsafe { kernel.row(r, scratch) }
}

/// The process's OpenMP runtime (libgomp, as torch's Linux wheels carry), found by symbol.
#[cfg(all(target_os = "linux", not(test)))]
mod openmp {
    use std::ffi::{c_char, c_uint, c_void};
    use std::sync::OnceLock;

    type Body = unsafe extern "C" fn(*mut c_void);
    type Parallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);

    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }

    fn gomp_parallel() -> Option<Parallel> {
        static PARALLEL: OnceLock<Option<Parallel>> = OnceLock::new();
        *PARALLEL.get_or_init(|| {
            // SAFETY: RTLD_DEFAULT (null) searches the loaded objects; the name is a C string.
            let symbol = unsafe { dlsym(std::ptr::null_mut(), c"GOMP_parallel".as_ptr()) };
            // SAFETY: libgomp's `GOMP_parallel(fn, data, num_threads, flags)` has this ABI.
            (!symbol.is_null())
                .then(|| unsafe { std::mem::transmute::<*mut c_void, Parallel>(symbol) })
        })
    }

    unsafe extern "C" fn trampoline(data: *mut c_void) {
        // SAFETY: `data` is the `&&dyn Fn` that `run_on_team` passed and keeps alive.
        let worker = unsafe { &*(data as *const &(dyn Fn() + Sync)) };
        worker();
    }

    /// Run `worker` once on every thread of the OpenMP team (the caller included); false when
    /// the process has no OpenMP runtime.
    pub fn run_on_team(worker: &(dyn Fn() + Sync)) -> bool {
        let Some(parallel) = gomp_parallel() else {
            return false;
        };
        let data = &worker as *const &(dyn Fn() + Sync) as *mut c_void;
        // SAFETY: GOMP_parallel calls `trampoline(data)` on each team thread and returns after
        // all have finished, so `worker` outlives every call; 0 threads means the team's default
        // size (torch.set_num_threads sets it).
        unsafe { parallel(trampoline, data, 0, 0) };
        true
    }
}

/// No OpenMP runtime to share (other systems, and Rust unit tests): rayon runs everything.
#[cfg(any(not(target_os = "linux"), test))]
mod openmp {
    pub fn run_on_team(_worker: &(dyn Fn() + Sync)) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_exactly_once_serial_or_parallel() {
        for n in [0, 1, GRAIN - 1, GRAIN, 1000] {
            for cost in [1, SERIAL_WORK] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                for_each_with((n, cost), Vec::<usize>::new, |i, seen| {
                    seen.push(i);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                let once = hits.iter().all(|h| h.load(Ordering::Relaxed) == 1);
                assert!(once, "n = {n}, cost = {cost}");
            }
        }
    }
}
