//! CUDA kernels of the unfused and the fused ops (forward and backward): sources under `kernels/`
//! embedded in the binary, compiled by NVRTC at first use for the device's exact architecture
//! (cached in memory and on disk), and launched in the device's primary context on the stream
//! torch is using. Neither libcuda nor libnvrtc is linked: both are opened at first use, so the
//! extension imports without CUDA.
//!
//! `kernels` says which variant a problem needs, `launch` and `fused_launch` plan the launches
//! (pure), `programs` and `nvrtc` compile, `cache` keeps binaries on disk, `runtime` talks to
//! the driver, and `host` runs the kernels on the CPU for tests.

mod cache;
mod fused_launch;
pub mod host;
mod kernels;
mod launch;
mod nvrtc;
mod programs;
mod runtime;
mod tiling;
mod tma;
mod tuning;

pub use kernels::{representative_keys, KernelKey, Source, DTYPES, MAX_FUSED_BACKWARD_DIM};
pub use nvrtc::{version as nvrtc_version, Arch, Resources, INSTALL_HINT};
pub use programs::{Origin, Report};
pub use runtime::Stream;

use crate::cpu::{AvGrads, AvTensors, FusedGrads, FusedTensors, QkGrads, QkTensors, Saved};
use crate::dlpack::{DType, Device, TensorRef};
use crate::error::{Error, Result};
use crate::problem::{FusedProblem, Problem};
use launch::Launch;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where launches run: a CUDA device, or the CPU through the host build of the kernels
/// (`host::enable`, for tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Gpu(i32),
    Host,
}

impl Target {
    fn of(device: Device) -> Result<Target> {
        match device {
            Device::Cuda(n) => Ok(Target::Gpu(n)),
            Device::Cpu if host::enabled() => Ok(Target::Host),
            Device::Cpu => Err(Error::invalid(
                "device",
                "CUDA tensors on the CUDA path",
                "cpu",
            )),
        }
    }

    /// Launch kernel `function` of `key` with `params`: enqueued on `stream` for a GPU (after
    /// loading `key`), run to its end on the host.
    ///
    /// # Safety
    /// As `runtime::enqueue_with`, with memory of the target's device.
    unsafe fn launch<P: Copy>(
        self,
        key: &KernelKey,
        shape: (kernels::Function, launch::Config),
        params: P,
        stream: Stream,
    ) -> Result<()> {
        match self {
            Target::Gpu(device) => {
                runtime::load(device, *key)?;
                // SAFETY: forwarded contract.
                unsafe { runtime::enqueue_with(device, key, shape, params, stream) }
            }
            // SAFETY: forwarded contract.
            Target::Host => unsafe { host::run(key, shape, params) },
        }
    }
}

impl Target {
    /// Encode for the driver the tensor maps `tma` of a launch of variant `key`, planned in the
    /// host build's encoding: where the variant takes bulk copies on an sm_90 device (elsewhere
    /// its kernels stage by cp.async and never read them; the host build reads them as planned).
    fn encode_tensor_maps(self, key: &KernelKey, tma: &mut tma::TmaParams) -> Result<()> {
        match self {
            Target::Gpu(device) if key.tma && runtime::device_arch(device)?.number >= 90 => {
                runtime::encode_tensor_maps(device, tma)
            }
            _ => Ok(()),
        }
    }

    /// `launch` for a planned fused launch; nothing when the plan is empty.
    ///
    /// # Safety
    /// As `launch`.
    unsafe fn launch_planned<P: Copy>(
        self,
        key: &KernelKey,
        launch: Option<fused_launch::FusedLaunch<P>>,
        stream: Stream,
    ) -> Result<()> {
        let Some(launch) = launch else {
            return Ok(());
        };
        // SAFETY: forwarded contract.
        unsafe { self.launch(key, (launch.function, launch.config), launch.params, stream) }
    }
}

/// An unfused op, for the variants it launches (`keys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnfusedOp {
    /// Logits: window products (`Pairwise`).
    Qk,
    /// Weighted sums: window products (`Gather`).
    Av,
    /// `d_query` (`Gather`), `d_key` (`Scatter`), the extra keys' and the bias's gradients.
    QkBackward,
    /// `d_attn` (`Pairwise`), `d_value` (`Scatter`), the extra values' gradient.
    AvBackward,
}

/// The variants unfused op `op` of problem `p` launches: what `prepare` must load before it.
/// Window products run on the tensor-core source where the problem and its device allow it.
pub fn keys(p: &Problem, op: UnfusedOp) -> Result<Vec<KernelKey>> {
    let on_tensor_cores = products_on_tensor_cores(p)?;
    let products = |source| match on_tensor_cores {
        true => Source::UnfusedTc,
        false => source,
    };
    let sources = match op {
        UnfusedOp::Qk => vec![products(Source::Qk)],
        UnfusedOp::Av => vec![products(Source::Av)],
        UnfusedOp::QkBackward => vec![products(Source::Av), Source::Av, Source::Qk],
        UnfusedOp::AvBackward => vec![products(Source::Qk), Source::Av],
    };
    let mut keys: Vec<KernelKey> = Vec::new();
    for source in sources {
        let key = unfused_key(source, p)?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// The variant of unfused-op source `source` that problem `p` launches (with the settings of
/// `NATTEN_RS_TUNE` it reads).
fn unfused_key(source: Source, p: &Problem) -> Result<KernelKey> {
    tuning::tuned(KernelKey::for_problem(source, p))
}

/// Whether the unfused ops may take the tensor-core window products (NATTEN's "GEMM NA"; the
/// Python context's `use_gemm_na`): on unless turned off, as a way round them.
static UNFUSED_TENSOR_CORES: AtomicBool = AtomicBool::new(true);

/// Let the unfused ops take the tensor-core window products where they fit (`true`, the
/// default), or keep them on the kernels with a thread per output (`false`).
pub fn use_unfused_tensor_cores(on: bool) {
    UNFUSED_TENSOR_CORES.store(on, Ordering::Relaxed);
}

/// Whether the unfused ops may take the tensor-core window products (`use_unfused_tensor_cores`).
pub fn unfused_tensor_cores() -> bool {
    UNFUSED_TENSOR_CORES.load(Ordering::Relaxed)
}

/// Whether the window products of problem `p` (`Pairwise`, `Gather`) run on tensor cores: they
/// are allowed (`unfused_tensor_cores`), the problem fits the tensor-core kernels
/// (`launch::takes_tensor_cores`) and its device has them.
fn products_on_tensor_cores(p: &Problem) -> Result<bool> {
    Ok(unfused_tensor_cores()
        && launch::takes_tensor_cores(p)
        && device_has_tensor_cores(p.device)?)
}

/// The variant of fused source `source` (forward or backward) that problem `p` needs, or why
/// there is none: what `prepare` must load before `fused_forward` or `fused_backward`.
pub fn fused_key(source: Source, p: &FusedProblem) -> Result<KernelKey> {
    let limit = source.max_dim();
    if p.dim.max(p.dim_v) > limit {
        let pass = if source == Source::FusedBwd {
            "backward"
        } else {
            "forward"
        };
        return Err(Error::Unsupported(format!(
            "fused neighborhood attention {pass} on CUDA with a head dim above {limit} (got \
             query/key {}, value {}); the CPU runs it",
            p.dim, p.dim_v
        )));
    }
    tuning::tuned(KernelKey::for_fused(source, p))
}

/// The variant the fused forward of problem `p` runs: the tensor-core one where the problem and
/// the device allow it (half types, head dims multiples of 8, indices in 32 bits, compute
/// capability 8.0 or later), else the one-warp-per-query one.
pub fn fused_forward_key(p: &FusedProblem) -> Result<KernelKey> {
    let tensor_cores = fused_may_take_tensor_cores(p)?;
    match forward_source(p.dtype, (p.dim, p.dim_v), tensor_cores) {
        Source::FusedTc => tuning::tuned(KernelKey::for_fused(Source::FusedTc, p)),
        source => fused_key(source, p),
    }
}

/// Whether fused problem `p` may take the tensor-core kernels (if its dtype and head dims fit
/// them): its indices fit their 32 bits and its device has tensor cores.
fn fused_may_take_tensor_cores(p: &FusedProblem) -> Result<bool> {
    Ok(fused_launch::fused_indices_fit_32_bits(p) && device_has_tensor_cores(p.device)?)
}

/// Whether `device` has tensor cores (the host build emulates them).
fn device_has_tensor_cores(device: Device) -> Result<bool> {
    Ok(match Target::of(device)? {
        Target::Host => true,
        Target::Gpu(device) => has_tensor_cores(runtime::device_arch(device)?),
    })
}

/// Whether the backward of problem `p` takes the tensor-core kernels for `d_query`, `d_key` and
/// `d_value`; or why it has no kernels (its head dims).
fn backward_on_tensor_cores(p: &FusedProblem) -> Result<bool> {
    fused_key(Source::FusedBwd, p)?;
    Ok(backward_takes_tensor_cores(
        p.dtype,
        (p.dim, p.dim_v),
        fused_may_take_tensor_cores(p)?,
    ))
}

/// Whether a backward of `dtype` with head dims `dims` takes the tensor-core kernels on a device
/// with tensor cores or not.
fn backward_takes_tensor_cores(dtype: DType, dims: (usize, usize), tensor_cores: bool) -> bool {
    tensor_cores && fused_launch::takes_tensor_cores(Source::FusedBwdTc, dtype, dims)
}

/// The variants the fused backward of problem `p` with gradients `grads` launches, without
/// repeats: what `prepare` must load before `fused_backward`.
pub fn fused_backward_keys(p: &FusedProblem, grads: &FusedGrads) -> Result<Vec<KernelKey>> {
    let plan = fused_launch::backward_plan(p, grads, backward_on_tensor_cores(p)?);
    let mut keys: Vec<KernelKey> = Vec::new();
    for (function, _) in plan {
        let key = KernelKey::for_fused(function.source(), p);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

/// Whether the tensor-core forward runs on `arch` (mma.sync: compute capability 8.0 on).
fn has_tensor_cores(arch: Arch) -> bool {
    arch.number >= 80
}

/// The source of the fused forward of `dtype` with head dims `dims` on a device with tensor
/// cores or not (`has_tensor_cores`).
fn forward_source(dtype: DType, dims: (usize, usize), tensor_cores: bool) -> Source {
    match tensor_cores && fused_launch::takes_tensor_cores(Source::FusedTc, dtype, dims) {
        true => Source::FusedTc,
        false => Source::FusedFwd,
    }
}

/// `mutex`'s guard, also when a thread panicked holding it: the maps it guards stay consistent
/// (a panic leaves an entry missing, never half-written), and the panic itself was reported.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The subset of `keys` not yet loaded on `device` (a launch would compile or load them).
pub fn pending(device: i32, keys: &[KernelKey]) -> Vec<KernelKey> {
    keys.iter()
        .copied()
        .filter(|k| !runtime::is_loaded(device, k))
        .collect()
}

/// Load `keys` on `device`, compiling what no cache holds (several at once); reports of what
/// was fetched.
pub fn prepare(device: i32, keys: &[KernelKey]) -> Result<Vec<Report>> {
    let loads: Vec<Option<Report>> = keys
        .par_iter()
        .map(|&key| runtime::load(device, key))
        .collect::<Result<_>>()?;
    Ok(loads.into_iter().flatten().collect())
}

/// Enqueue `launches` on `stream`.
///
/// # Safety
/// The tensors the launches address must be CUDA memory of the problem's device, valid for the
/// problem's shapes and strides (what `Problem` and `expect_output` validated), and stay
/// allocated until the stream has run the kernels.
unsafe fn run(p: &Problem, launches: &[Launch], stream: Stream) -> Result<()> {
    let target = Target::of(p.device)?;
    for launch in launches {
        let key = unfused_key(launch.function.source(), p)?;
        let shape = (launch.function, launch.config);
        // SAFETY: forwarded contract; kernels of the unfused ops' sources take one `NaParams`.
        unsafe { target.launch(&key, shape, launch.params, stream)? };
    }
    Ok(())
}

/// Forward `qk` into `attn` (see `cpu::qk`).
///
/// # Safety
/// As `run`: validated CUDA tensors of `p`'s device, alive until `stream` has run the kernels.
pub unsafe fn qk(p: &Problem, t: &QkTensors, attn: &TensorRef, stream: Stream) -> Result<()> {
    let launches = launch::qk(p, t, attn, products_on_tensor_cores(p)?);
    // SAFETY: forwarded contract.
    unsafe { run(p, &launches, stream) }
}

/// Forward `av` into `out` (see `cpu::av`).
///
/// # Safety
/// As `qk`.
pub unsafe fn av(p: &Problem, t: &AvTensors, out: &TensorRef, stream: Stream) -> Result<()> {
    let launches = launch::av(p, t, out, products_on_tensor_cores(p)?);
    // SAFETY: forwarded contract.
    unsafe { run(p, &launches, stream) }
}

/// Gradients of `qk` (see `cpu::qk_backward`).
///
/// # Safety
/// As `qk`.
pub unsafe fn qk_backward(
    p: &Problem,
    d_attn: &TensorRef,
    t: &QkTensors,
    grads: &QkGrads,
    stream: Stream,
) -> Result<()> {
    let launches = launch::qk_backward(p, d_attn, t, grads, products_on_tensor_cores(p)?);
    // SAFETY: forwarded contract.
    unsafe { run(p, &launches, stream) }
}

/// Gradients of `av` (see `cpu::av_backward`).
///
/// # Safety
/// As `qk`.
pub unsafe fn av_backward(
    p: &Problem,
    d_out: &TensorRef,
    t: &AvTensors,
    grads: &AvGrads,
    stream: Stream,
) -> Result<()> {
    let launches = launch::av_backward(p, d_out, t, grads, products_on_tensor_cores(p)?);
    // SAFETY: forwarded contract.
    unsafe { run(p, &launches, stream) }
}

/// Fused attention forward into `out` and `lse` (see `cpu::fused_forward`).
///
/// # Safety
/// As `qk`: validated CUDA tensors of `p`'s device, alive until `stream` has run the kernel.
pub unsafe fn fused_forward(
    p: &FusedProblem,
    t: &FusedTensors,
    out: &TensorRef,
    lse: &TensorRef,
    stream: Stream,
) -> Result<()> {
    let target = Target::of(p.device)?;
    let key = fused_forward_key(p)?;
    // SAFETY (both arms): forwarded contract; each kernel takes the parameter block its plan
    // mirrors (`NaFusedTcParams`, `NaFusedParams`).
    unsafe {
        if key.source == Source::FusedTc {
            let mut launch = fused_launch::tensor_core_forward(p, t, out, lse, &key);
            if let Some(launch) = launch.as_mut() {
                target.encode_tensor_maps(&key, &mut launch.params.tma)?;
            }
            target.launch_planned(&key, launch, stream)
        } else {
            target.launch_planned(&key, fused_launch::forward(p, t, out, lse), stream)
        }
    }
}

/// Fused attention backward into `grads` (see `cpu::fused_backward`); `stats` is a scratch
/// tensor of `fused_stats_len(p)` elements of the accumulator type (float64 for float64
/// problems, float32 otherwise) on the problem's device.
///
/// # Safety
/// As `qk`: validated tensors of `p`'s device, alive until `stream` has run the kernels.
pub unsafe fn fused_backward(
    p: &FusedProblem,
    t: &FusedTensors,
    saved: &Saved,
    grads: &FusedGrads,
    stats: &TensorRef,
    stream: Stream,
) -> Result<()> {
    let target = Target::of(p.device)?;
    let tensor_cores = backward_on_tensor_cores(p)?;
    let bulk_copies = tensor_cores && KernelKey::for_fused(Source::FusedBwdTc, p).tma;
    let plan = fused_launch::backward(p, t, saved, grads, stats, (tensor_cores, bulk_copies));
    for mut launch in plan {
        let key = KernelKey::for_fused(launch.function.source(), p);
        use kernels::Function::{FusedBackwardKeysTc, FusedBackwardQueryTc};
        if matches!(launch.function, FusedBackwardQueryTc | FusedBackwardKeysTc) {
            target.encode_tensor_maps(&key, &mut launch.params.tma)?;
        }
        let shape = (launch.function, launch.config);
        // SAFETY: forwarded contract; the backward kernels take one `NaFusedBwdParams`, which
        // `FusedBackwardParams` mirrors, and run in stream order (stats before their readers).
        unsafe { target.launch(&key, shape, launch.params, stream)? };
    }
    Ok(())
}

/// Elements of the fused backward's `stats` scratch for problem `p`.
pub fn fused_stats_len(p: &FusedProblem) -> usize {
    fused_launch::backward_stats_len(p)
}

/// Accumulators of scratch the CUDA kernels of `d_rpb` take for `p` (0: none).
pub fn bias_scratch_len(p: &Problem) -> usize {
    launch::bias_scratch_len(p)
}

/// The architecture kernels are compiled for on CUDA device `ordinal`.
pub fn device_arch(ordinal: i32) -> Result<Arch> {
    runtime::device_arch(ordinal)
}

/// Compile (or find in a cache) every variant in `keys` for `arch`, several at once (one per
/// core); the reports in the order of `keys`. Needs libnvrtc, no GPU.
pub fn compile(keys: &[KernelKey], arch: Arch) -> Result<Vec<Report>> {
    keys.par_iter()
        .map(|&key| Ok(programs::fetch(key, arch)?.1))
        .collect()
}

/// The variants `precompile` builds for `arch`: for every combination of `dtypes` and
/// neighborhood shapes (kernel sizes and causal flags per padded axis, as
/// `Problem::kernel_shape` validates them), the unfused ops' two sources, and for every pair of
/// head dims in `dims` (query/key, value), the unfused ops' tensor-core source where a head dim
/// pair of equals takes it (problems without additional tokens), the fused forward the device
/// would run and the fused backward's sources (stride 1; strided problems compile at first
/// use), each with the settings of `NATTEN_RS_TUNE` it reads (`tuning::tuned`).
pub fn variants(
    dtypes: &[DType],
    shapes: &[([usize; 3], [bool; 3])],
    dims: &[(usize, usize)],
    rpb: bool,
    arch: Arch,
) -> Result<Vec<KernelKey>> {
    let mut keys = Vec::new();
    for &(kernel, causal) in shapes {
        for &dtype in dtypes {
            let key = |source, dims| {
                let wgmma = kernels::wgmma_for(source, dims);
                KernelKey {
                    wgmma,
                    // (where asked for, as contiguous tensors would take them)
                    tma: wgmma && tma::requested(),
                    // (the common layouts; others compile at first use)
                    dense_rows: source.stages_dense_rows(),
                    biased: rpb && source.specialises_bias(),
                    ..KernelKey::stride_one(source, dtype, kernel, causal, dims)
                }
            };
            keys.extend(Source::UNFUSED.map(|source| key(source, (0, 0))));
            let slots = kernel.iter().product();
            for &d in dims {
                let tensor_cores = has_tensor_cores(arch);
                if tensor_cores
                    && d.0 == d.1
                    && launch::products_take_tensor_cores(dtype, d.0, slots, 0)
                {
                    let unfused = key(Source::UnfusedTc, d);
                    keys.push(unfused);
                    if unfused.biased {
                        // (av problems, which add no bias, take the unbiased one)
                        keys.push(KernelKey {
                            biased: false,
                            ..unfused
                        });
                    }
                }
                keys.push(key(forward_source(dtype, d, tensor_cores), d));
                if backward_takes_tensor_cores(dtype, d, tensor_cores) {
                    keys.push(key(Source::FusedBwdTc, d));
                }
                keys.push(key(Source::FusedBwd, d));
            }
        }
    }
    keys.into_iter().map(tuning::tuned).collect()
}

/// Forget the compiled programs held in memory (the disk cache and loaded modules stay).
pub fn forget_programs() {
    programs::forget();
}

/// Parse an architecture name such as `sm_80` or `sm_90a`.
pub fn parse_arch(name: &str) -> Result<Arch> {
    Arch::parse(name)
}
