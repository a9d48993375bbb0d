//! The CUDA kernels on the CPU, for testing without a GPU: a kernel source, with
//! kernels/host.h in front of it, compiles with the host's C++ compiler into a shared library
//! whose kernels run on CPU memory (threads as fibers, launches one block after another). While
//! `enable` has a directory set, ops on CPU tensors take the CUDA path, plan their launches as
//! for a GPU and run them here, so the kernels' indexing, window math, reductions and warp
//! shuffles are checked against the CPU kernels. Nothing here is used otherwise.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::cache::StableHasher;
use super::kernels::{Function, KernelKey, HEADERS};
use super::launch::Config;
use crate::error::{Error, Result};

/// `kernels/host.h`, the CUDA built-ins for a host compiler, and the headers it includes.
const HOST_HEADERS: [(&str, &str); 3] = [
    ("host.h", include_str!("../../../kernels/host.h")),
    (
        "host_threads.h",
        include_str!("../../../kernels/host_threads.h"),
    ),
    (
        "host_async.h",
        include_str!("../../../kernels/host_async.h"),
    ),
];

/// `extern "C" int na_host_<kernel>(const void* params, unsigned grid, unsigned bx, unsigned by)`.
type Entry = unsafe extern "C" fn(*const c_void, u32, u32, u32, u32) -> i32;

struct Host {
    /// Where sources and libraries are written.
    dir: PathBuf,
    /// The C++17 compiler.
    compiler: String,
    /// Opened libraries, one per variant; closed when the host build is turned off (their
    /// code runs only while the lock is held). Built with hidden symbols, each binds to its
    /// own inline functions and variables, whatever else is loaded.
    libraries: HashMap<KernelKey, libloading::Library>,
    /// The most blocks a launch runs: fewer than its grid asks for make each block loop over
    /// several tasks, as on a GPU whose grid limit a problem exceeds.
    max_grid: u32,
    /// Whether a block's threads take their turns last first (host.h, `Block::reversed`): a
    /// race between threads that share memory without a barrier shows in one order or the other.
    reversed: bool,
}

static HOST: Mutex<Option<Host>> = Mutex::new(None);

fn host() -> MutexGuard<'static, Option<Host>> {
    super::lock(&HOST)
}

/// Run CUDA kernels on the CPU for CPU tensors, building them in `dir` with `compiler`, each
/// launch on at most `max_grid` blocks, its threads' turns `reversed` or not; `None` turns it
/// off. Returns whether it was on.
pub fn enable(dir: Option<PathBuf>, compiler: &str, max_grid: u32, reversed: bool) -> bool {
    let mut host = host();
    let was = host.is_some();
    *host = dir.map(|dir| Host {
        dir,
        compiler: compiler.to_string(),
        libraries: HashMap::new(),
        max_grid,
        reversed,
    });
    was
}

/// Whether CPU tensors take the CUDA kernels (see `enable`).
pub fn enabled() -> bool {
    host().is_some()
}

/// The translation unit of `key`: the header, the source, and an entry point per kernel.
fn unit(key: &KernelKey) -> String {
    let mut text = format!(
        "#include \"{}\"\n#include \"{}\"\n",
        HOST_HEADERS[0].0,
        key.source.file_name()
    );
    for f in key.source.functions() {
        let params = key.source.params_struct();
        text.push_str(&format!("NA_HOST_ENTRY({}, {params})\n", f.symbol()));
    }
    text
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Kernel {
        message: format!("host kernels: {what} {}: {e}", path.display()),
        log: String::new(),
    }
}

/// Compile `key` into a library under `dir`; its path.
fn build(dir: &Path, compiler: &str, key: &KernelKey) -> Result<PathBuf> {
    let source = (key.source.file_name(), key.source.text());
    let files: Vec<_> = HOST_HEADERS
        .into_iter()
        .chain(HEADERS)
        .chain([source])
        .collect();
    compile(dir, compiler, &files, &unit(key), &key.defines()).map_err(|e| match e {
        Error::Kernel { message, log } => Error::Kernel {
            message: format!("{message} ({})", key.name()),
            log,
        },
        other => other,
    })
}

/// The name a build of `unit` (with `files`, by `compiler`, with `defines`) takes: a hash of
/// everything that goes in, the compiler too, as one folder may hold the builds of several
/// (plain and instrumented, from tests sharing it).
fn library_stem(compiler: &str, files: &[(&str, &str)], unit: &str, defines: &[String]) -> String {
    let mut hash = StableHasher::new();
    hash.write_part(compiler.as_bytes());
    for (name, text) in files {
        hash.write_part(name.as_bytes()).write_part(text.as_bytes());
    }
    hash.write_part(unit.as_bytes());
    for d in defines {
        hash.write_part(d.as_bytes());
    }
    format!("{:016x}", hash.finish())
}

/// Compile translation unit `unit` (which includes `files`, written beside it) with `defines`
/// into a shared library under `dir` named by `library_stem`; its path. A library already there
/// is reused; a new one appears under its name only once complete.
fn compile(
    dir: &Path,
    compiler: &str,
    files: &[(&str, &str)],
    unit: &str,
    defines: &[String],
) -> Result<PathBuf> {
    let stem = library_stem(compiler, files, unit, defines);
    let library = dir.join(format!("{stem}.so"));
    if library.is_file() {
        return Ok(library);
    }
    // Each build works in a folder of its own (builds of one unit may run at once, in threads or
    // processes) and only renames the finished library into place.
    static BUILDS: AtomicU64 = AtomicU64::new(0);
    let nonce = BUILDS.fetch_add(1, Ordering::Relaxed);
    let folder = dir.join(format!("{stem}.{}.{nonce}", std::process::id()));
    std::fs::create_dir_all(&folder).map_err(|e| io_error("creating", &folder, e))?;
    let unit_name = format!("{stem}.cpp");
    for &(name, text) in files.iter().chain([(unit_name.as_str(), unit)].iter()) {
        let path = folder.join(name);
        std::fs::write(&path, text).map_err(|e| io_error("writing", &path, e))?;
    }
    let partial = folder.join(format!("{stem}.so"));
    let output = Command::new(compiler)
        .args([
            "-std=c++17",
            "-O1",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-Wno-unknown-pragmas",
        ])
        .args(defines)
        .arg(folder.join(&unit_name))
        .arg("-o")
        .arg(&partial)
        .output()
        .map_err(|e| io_error(&format!("running {compiler} in"), &folder, e))?;
    if !output.status.success() {
        return Err(Error::Kernel {
            message: format!("host kernels: {compiler} failed"),
            log: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    std::fs::rename(&partial, &library).map_err(|e| io_error("moving", &partial, e))?;
    // The sources stay behind only when the compiler failed on them.
    let _ = std::fs::remove_dir_all(&folder);
    Ok(library)
}

fn open(path: &Path) -> Result<libloading::Library> {
    // SAFETY: a library built from our sources; its initialisers are plain-data statics.
    unsafe { libloading::Library::new(path) }.map_err(|e| Error::Kernel {
        message: format!("host kernels: opening {}: {e}", path.display()),
        log: String::new(),
    })
}

/// Call `symbol` (an `NA_HOST_ENTRY`) of `library` over grid `config` with `params`, the threads'
/// turns `reversed` or not.
///
/// # Safety
/// As `run`.
unsafe fn call<P: Copy>(
    library: &libloading::Library,
    symbol: &str,
    config: Config,
    params: &P,
    reversed: bool,
) -> Result<i32> {
    // SAFETY: NA_HOST_ENTRY defines the symbol with exactly this signature.
    let entry: libloading::Symbol<Entry> =
        unsafe { library.get(symbol.as_bytes()) }.map_err(|e| Error::Kernel {
            message: format!("host kernels: {symbol}: {e}"),
            log: String::new(),
        })?;
    let (bx, by) = config.block;
    // SAFETY: the entry copies `params` (the kernel's struct, by the caller's contract) and
    // runs the kernel over memory the caller vouches for.
    let params = params as *const P as *const c_void;
    Ok(unsafe { entry(params, config.grid, bx, by, u32::from(reversed)) })
}

/// Run kernel `function` of `key` over grid `config` with `params`, on this thread, to its end.
///
/// # Safety
/// `P` must be the `#[repr(C)]` mirror of the kernel's parameter struct, and every address in
/// `params` CPU memory holding what the kernel reaches (as `runtime::enqueue_with` demands of
/// device memory).
pub unsafe fn run<P: Copy>(
    key: &KernelKey,
    (function, config): (Function, Config),
    params: P,
) -> Result<()> {
    let mut guard = host();
    let Some(host) = guard.as_mut() else {
        return Err(Error::Kernel {
            message: "host kernels are not enabled".into(),
            log: String::new(),
        });
    };
    if !host.libraries.contains_key(key) {
        let library = open(&build(&host.dir, &host.compiler, key)?)?;
        host.libraries.insert(*key, library);
    }
    let symbol = format!("na_host_{}", function.symbol());
    let config = Config {
        grid: config.grid.min(host.max_grid),
        ..config
    };
    let library = &host.libraries[key];
    // SAFETY: forwarded contract; the lock serialises launches, whose geometry the library
    // keeps in globals.
    let status = unsafe { call(library, &symbol, config, &params, host.reversed)? };
    let what = match status {
        0 => return Ok(()),
        1 => "deadlocked (a barrier or shuffle that some live thread never reaches, or a copy \
              barrier whose bytes never add up)"
            .to_string(),
        _ => format!("broke a rule of the GPU's: {}", fault(library)),
    };
    Err(Error::Kernel {
        message: format!(
            "host kernels: {} of {} {what}",
            function.symbol(),
            key.name()
        ),
        log: String::new(),
    })
}

/// What the last launch of `library` broke (host.h's `na_host_fault`).
fn fault(library: &libloading::Library) -> String {
    // SAFETY: host.h defines `char na_host_fault[512]`, NUL-terminated (vsnprintf, or zeroed).
    unsafe {
        match library.get::<*const std::ffi::c_char>(b"na_host_fault\0") {
            Ok(symbol) => std::ffi::CStr::from_ptr(*symbol)
                .to_string_lossy()
                .into_owned(),
            Err(e) => format!("(unreadable: {e})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kernels that exercise the emulation itself: shuffles, shared memory with barriers,
    /// threads that leave early, a barrier only half a block reaches, a missing barrier, and
    /// shared memory (arrays, a copy barrier) that a block reads before it writes it.
    const UNIT: &str = r#"
#include "host.h"
struct P {
    float* out;
};
// Every lane ends with the sum of all lanes' values (a butterfly), plus its block's index.
extern "C" __global__ void butterfly(const P p) {
    float x = (float)(threadIdx.x % 32);
    for (int mask = 16; mask > 0; mask /= 2) {
        x += __shfl_xor_sync(0xffffffffu, x, mask);
    }
    p.out[blockIdx.x * blockDim.x + threadIdx.x] = x + 1000.0f * blockIdx.x;
}
// Each block writes its threads' indices to shared memory and reads them back reversed.
extern "C" __global__ void reverse(const P p) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)(100 * blockIdx.x + threadIdx.x);
    __syncthreads();
    p.out[blockIdx.x * 64 + threadIdx.x] = s[63 - threadIdx.x];
}
// Half the block returns at once; the rest meet at a barrier they alone must complete.
extern "C" __global__ void early_exit(const P p) {
    if (threadIdx.x >= 32) {
        return;
    }
    __syncthreads();
    p.out[threadIdx.x] = 1.0f;
}
// Half of warp 0 waits at the block barrier, the other half at a shuffle: neither can complete.
extern "C" __global__ void divergent(const P p) {
    if (threadIdx.x % 32 < 16) {
        __syncthreads();
    } else {
        p.out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
        __syncthreads();
    }
}
// Thread 63 reads what thread 0 writes, with no barrier between: it sees the write or not by
// the order the threads take their turns.
extern "C" __global__ void unsynchronised(const P p) {
    __shared__ float s[1];
    if (threadIdx.x == 0) {
        s[0] = -1.0f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        s[0] = 1.0f;
    }
    if (threadIdx.x == 63) {
        p.out[0] = s[0];
    }
}
// Block 0 writes every thread's entry of a shared array, later blocks only the even threads';
// each thread reads its own back.
extern "C" __global__ void unwritten(const P p) {
    __shared__ float s[64];
    if (blockIdx.x == 0 || threadIdx.x % 2 == 0) {
        s[threadIdx.x] = (float)threadIdx.x;
    }
    __syncthreads();
    p.out[blockIdx.x * 64 + threadIdx.x] = s[threadIdx.x];
}
// Block 0 initialises a copy barrier, later blocks use it as block 0 left it.
extern "C" __global__ void uninitialised_barrier(const P p) {
    __shared__ na_host::Mbarrier full;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        na_host::mbarrier_init(full, 64);
    }
    __syncthreads();
    na_host::mbarrier_arrive(full, 0);
    na_host::mbarrier_wait(full, 0);
    p.out[blockIdx.x * 64 + threadIdx.x] = 1.0f;
}
NA_HOST_ENTRY(butterfly, P)
NA_HOST_ENTRY(reverse, P)
NA_HOST_ENTRY(early_exit, P)
NA_HOST_ENTRY(divergent, P)
NA_HOST_ENTRY(unsynchronised, P)
NA_HOST_ENTRY(unwritten, P)
NA_HOST_ENTRY(uninitialised_barrier, P)
"#;

    /// Launches of a library share its globals (host.h's block, shared memory): the tests,
    /// which run on several threads, take turns as `run` does.
    static LAUNCHES: Mutex<()> = Mutex::new(());

    fn library() -> Option<libloading::Library> {
        if Command::new("c++").arg("--version").output().is_err() {
            eprintln!("no C++ compiler: skipped");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("natten_rs_host_{}", std::process::id()));
        let path = compile(&dir, "c++", &HOST_HEADERS, UNIT, &[]).expect("the unit compiles");
        Some(open(&path).expect("the library opens"))
    }

    fn launch(library: &libloading::Library, kernel: &str, grid: u32, out: &mut [f32]) -> i32 {
        launch_in_turns(library, kernel, grid, out, false)
    }

    fn launch_in_turns(
        library: &libloading::Library,
        kernel: &str,
        grid: u32,
        out: &mut [f32],
        reversed: bool,
    ) -> i32 {
        let config = Config {
            grid,
            block: (64, 1),
        };
        let params = out.as_mut_ptr();
        let symbol = format!("na_host_{kernel}");
        let _serial = super::super::lock(&LAUNCHES);
        // SAFETY: the kernels take `struct P { float* out; }` and write within `grid * 64`
        // floats.
        unsafe { call(library, &symbol, config, &params, reversed) }.unwrap()
    }

    #[test]
    fn builds_by_different_compilers_take_different_names() {
        let defines = ["-DX=1".to_string()];
        let stem = |compiler| library_stem(compiler, &HOST_HEADERS, UNIT, &defines);
        assert_eq!(stem("c++"), stem("c++"));
        assert_ne!(stem("c++"), stem("/tmp/asan-c++"));
        assert_ne!(
            stem("c++"),
            library_stem("c++", &HOST_HEADERS, UNIT, &["-DX=2".to_string()])
        );
    }

    #[test]
    fn shuffles_barriers_and_early_exits_behave_as_on_a_gpu() {
        let Some(library) = library() else { return };
        let mut out = vec![0.0f32; 3 * 64];
        assert_eq!(launch(&library, "butterfly", 3, &mut out), 0);
        for (i, &x) in out.iter().enumerate() {
            assert_eq!(x, 496.0 + 1000.0 * (i / 64) as f32, "thread {i}");
        }
        assert_eq!(launch(&library, "reverse", 3, &mut out), 0);
        for (i, &x) in out.iter().enumerate() {
            assert_eq!(x, (100 * (i / 64) + 63 - i % 64) as f32, "thread {i}");
        }
        let mut flags = vec![0.0f32; 64];
        assert_eq!(launch(&library, "early_exit", 1, &mut flags), 0);
        assert!(flags[..32].iter().all(|&f| f == 1.0) && flags[32..].iter().all(|&f| f == 0.0));
    }

    #[test]
    fn a_missing_barrier_shows_in_one_order_of_turns() {
        let Some(library) = library() else { return };
        let mut out = vec![0.0f32; 64];
        // (The last thread to reach a barrier goes on first: thread 63 in index order.)
        for (reversed, seen) in [(false, -1.0), (true, 1.0)] {
            let status = launch_in_turns(&library, "unsynchronised", 1, &mut out, reversed);
            assert_eq!((status, out[0]), (0, seen), "reversed turns: {reversed}");
        }
        // With the barrier, either order gives the same result.
        for reversed in [false, true] {
            let status = launch_in_turns(&library, "reverse", 1, &mut out, reversed);
            assert_eq!(status, 0);
            assert!(out.iter().enumerate().all(|(i, &x)| x == (63 - i) as f32));
        }
    }

    /// A warpgroup product (wgmma) of A, every element 1, with a 16 x 8 B (K-major, two core
    /// matrices along K) that the block stages into dynamic shared memory from `w.b` (n-major
    /// rows of 16 k), by `w.mode`:
    ///   0  cp.async copies of the first 16 threads, each fencing for the async proxy before the
    ///      block barrier that publishes them;
    ///   1  the same copies, not fenced;
    ///   2  the same copies, fenced after the barrier;
    ///   3  as 0, but the descriptor's start 8 bytes off;
    ///   4  two bulk tensor copies of thread 0 (async proxy writes: no fence needed);
    ///   5  as 4, but landing 16 bytes past a 128-byte boundary;
    ///   6  as 4, but with no wgmma.fence before the product;
    ///   7  as 4, but thread 5's descriptor unlike the warpgroup's.
    const PROXIES: &str = r#"
#include "host.h"
#include "tensor_core.cuh"
struct W {
    float* out;
    const elem_t* b;
    int mode;
};
extern "C" __global__ void proxies(const W w) {
    elem_t* const b = reinterpret_cast<elem_t*>(na_dynamic_shared());
    const unsigned t = threadIdx.x;
    if (w.mode <= 3 && t < 16) {  // row n = t % 8 of core matrix t / 8 (k 8 (t / 8) ..)
        na_host::copy_async(b + 64 * (t / 8) + 8 * (t % 8), w.b + 16 * (t % 8) + 8 * (t / 8));
        na_host::wait_copies();
    }
    if (w.mode >= 4 && t == 0) {
        // B as a 2-d tensor (16 k, 8 n); a box of 8 k by 8 n is one core matrix.
        na_host::HostTensorMap map = {};
        map.address = reinterpret_cast<unsigned long long>(w.b);
        map.dims[0] = 16;
        map.dims[1] = 8;
        map.strides[0] = 32;
        map.box[0] = map.box[1] = 8;
        map.element_strides[0] = map.element_strides[1] = 1;
        map.element_bytes = 2;
        map.rank = 2;
        __shared__ na_host::Mbarrier full;
        na_host::mbarrier_init(full, 1);
        na_host::mbarrier_arrive(full, 256);
        for (int chunk = 0; chunk < 2; ++chunk) {
            const int c[5] = {8 * chunk, 0, 0, 0, 0};
            na_host::tensor_copy(b + 64 * chunk + (w.mode == 5 ? 8 : 0), &map, c, full);
        }
        na_host::mbarrier_wait(full, 0);
    }
    if (w.mode == 0 || w.mode == 3) {
        na_async_proxy_fence();
    }
    __syncthreads();
    if (w.mode == 2) {
        na_async_proxy_fence();
    }
    const unsigned one = from_acc(1.0f);
    const unsigned a[4] = {one | one << 16, one | one << 16, one | one << 16, one | one << 16};
    const unsigned offset = w.mode == 3 ? 8u : w.mode == 7 && t == 5 ? 256u : 0u;
    const NaSmemMatrix m = {b, offset, 128, 256};
    float d[4] = {0, 0, 0, 0};
    if (w.mode != 6) {
        na_wgmma_fence();
    }
    na_wgmma<8, 0>(d, a, m, 0);
    na_wgmma_commit();
    na_wgmma_wait<0>();
    for (int i = 0; i < 4; ++i) {
        w.out[4 * t + i] = d[i];
    }
}
NA_HOST_ENTRY(proxies, W)
"#;

    /// Launch PROXIES in `mode` over B (element (k, n) = k + 16 n); the status and the sums
    /// of B's columns 0 and 1 thread 0 got.
    fn launch_proxies(mode: i32) -> Option<(i32, [f32; 2])> {
        if Command::new("c++").arg("--version").output().is_err() {
            eprintln!("no C++ compiler: skipped");
            return None;
        }
        let key = crate::cuda::kernels::representative_keys()
            .into_iter()
            .find(|k| k.wgmma && k.dtype == crate::dlpack::DType::F16)
            .expect("a warpgroup variant");
        let dir = std::env::temp_dir().join(format!("natten_rs_host_{}", std::process::id()));
        let files: Vec<_> = HOST_HEADERS.into_iter().chain(HEADERS).collect();
        let path = compile(&dir, "c++", &files, PROXIES, &key.defines()).expect("compiles");
        let library = open(&path).expect("the library opens");
        let b: Vec<u16> = (0..8)
            .flat_map(|n| (0..16).map(move |k| half::f16::from_f32((k + 16 * n) as f32).to_bits()))
            .collect();
        let mut out = vec![0.0f32; 4 * 128];
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct W {
            out: *mut f32,
            b: *const u16,
            mode: i32,
        }
        let params = W {
            out: out.as_mut_ptr(),
            b: b.as_ptr(),
            mode,
        };
        let config = Config {
            grid: 1,
            block: (128, 1),
        };
        // SAFETY: W mirrors the kernel's struct; it reads 128 elements of `b` and writes 4 floats
        // per thread of `out`.
        let _serial = super::super::lock(&LAUNCHES);
        let status = unsafe { call(&library, "na_host_proxies", config, &params, false) }.unwrap();
        if status == 2 {
            eprintln!("mode {mode}: {}", fault(&library));
        }
        Some((status, [out[0], out[1]]))
    }

    #[test]
    fn products_read_copies_only_after_fences_and_a_barrier() {
        // Column n of B sums to 120 + 256 n.
        let Some(fenced) = launch_proxies(0) else {
            return;
        };
        assert_eq!(fenced, (0, [120.0, 376.0]));
        for mode in [1, 2, 3, 5, 6, 7] {
            assert_eq!(
                launch_proxies(mode).unwrap().0,
                2,
                "mode {mode} is reported"
            );
        }
        assert_eq!(launch_proxies(4).unwrap(), (0, [120.0, 376.0]));
    }

    #[test]
    fn shared_memory_starts_undefined_in_every_block() {
        let Some(library) = library() else { return };
        let mut out = vec![0.0f32; 2 * 64];
        assert_eq!(launch(&library, "unwritten", 2, &mut out), 0);
        for (i, &x) in out.iter().enumerate() {
            let written = i < 64 || i % 2 == 0;
            // What block 1 did not write reads as all ones (a NaN), not as block 0 left it.
            assert!(
                written == (x == (i % 64) as f32) && written != x.is_nan(),
                "{i}: {x}"
            );
        }
        // A copy barrier too: block 1's use of one it did not initialise is reported.
        assert_eq!(launch(&library, "uninitialised_barrier", 2, &mut out), 2);
        assert!(fault(&library).contains("not initialised in this block"));
        assert!(out.iter().all(|&x| x == 1.0), "the launch ran on");
    }

    #[test]
    fn a_barrier_that_cannot_complete_is_reported_not_hung() {
        let Some(library) = library() else { return };
        let mut out = vec![0.0f32; 64];
        assert_eq!(launch(&library, "divergent", 2, &mut out), 1);
    }
}
