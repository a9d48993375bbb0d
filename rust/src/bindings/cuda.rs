//! Entry points of the CUDA runtime: ahead-of-time compiles, and the loading of kernels before
//! an op's first launch on a device, logged so that a first-use compile is never a silent pause.

use std::panic::{catch_unwind, AssertUnwindSafe};

use pyo3::prelude::*;

use crate::cuda::{self, Arch, KernelKey, Report, UnfusedOp};
use crate::dlpack::{DType, Device};
use crate::error::{Error, Result};
use crate::problem::Problem;

/// Run `f`, turning a panic (cudarc panics when a library lacks a symbol it expects) into a
/// `KernelError` instead of a Python-level crash.
pub(super) fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(Error::Kernel {
            message: format!("CUDA runtime failure: {what}"),
            log: String::new(),
        })
    })
}

/// Log `message` at INFO on the `natten_rs` logger. The only call from Rust into Python, made
/// with the GIL held and before any kernel runs.
fn log_info(py: Python<'_>, message: &str) -> PyResult<()> {
    let logger = py
        .import("logging")?
        .call_method1("getLogger", ("natten_rs",))?;
    logger.call_method1("info", (message,))?;
    Ok(())
}

/// One line per fetched variant: where it came from, how long it took, registers and spills.
fn describe(report: &Report) -> String {
    let kernels: Vec<String> = report
        .kernels
        .iter()
        .map(|(symbol, resources)| match resources {
            Some(r) => format!(
                "{symbol}: {} registers, {} spill bytes",
                r.registers,
                r.spill_stores + r.spill_loads
            ),
            None => format!("{symbol}: no resource report"),
        })
        .collect();
    let how = match report.origin {
        cuda::Origin::Compiled => "compiled with NVRTC",
        cuda::Origin::Disk => "read from the disk cache",
        cuda::Origin::Memory => "already compiled",
    };
    format!(
        "{} for {}: {how} in {:.2} s ({})",
        report.variant,
        report.arch,
        report.seconds,
        kernels.join("; ")
    )
}

/// Load the kernels that unfused op `op` of problem `p` launches on its device, logging what is
/// fetched.
pub(super) fn prepare(py: Python<'_>, p: &Problem, op: UnfusedOp) -> PyResult<()> {
    prepare_keys(py, p.device, &cuda::keys(p, op)?)
}

/// Load the variants `keys` on `device`, logging what is fetched (nothing for the CPU).
pub(super) fn prepare_keys(py: Python<'_>, device: Device, keys: &[KernelKey]) -> PyResult<()> {
    let Device::Cuda(device) = device else {
        return Ok(());
    };
    let pending = cuda::pending(device, keys);
    if pending.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = pending.iter().map(KernelKey::name).collect();
    log_info(
        py,
        &format!(
            "preparing CUDA kernels for cuda:{device} (first use; compiled by NVRTC \
             unless the disk cache has them): {}",
            names.join(", ")
        ),
    )?;
    let reports = py.detach(|| guarded(|| cuda::prepare(device, &pending)))?;
    for report in &reports {
        log_info(py, &describe(report))?;
    }
    Ok(())
}

/// `(name, registers, spill bytes, log, origin)` for each kernel of each report; registers and
/// spills are `None` when NVRTC wrote no resource report.
type KernelRow = (String, Option<u32>, Option<u32>, String, String);

fn rows(reports: &[Report]) -> Vec<KernelRow> {
    reports
        .iter()
        .flat_map(|r| {
            r.kernels.iter().map(move |(symbol, resources)| {
                (
                    format!("{}/{symbol}", r.variant),
                    resources.as_ref().map(|x| x.registers),
                    resources.as_ref().map(|x| x.spill_stores + x.spill_loads),
                    r.log.clone(),
                    r.origin.name().to_string(),
                )
            })
        })
        .collect()
}

/// Compile a spread of variants that covers every kernel's code paths (each source and dtype;
/// ranks 1 to 3, causal and not) for `arch` (`"sm_80"`, `"sm_90a"`, ...). Needs libnvrtc but
/// no GPU. Returns `(name, registers, spill bytes, log, origin)` per kernel.
#[pyfunction]
fn compile_kernels(py: Python<'_>, arch: &str) -> PyResult<Vec<KernelRow>> {
    let arch = Arch::parse(arch)?;
    let reports = py.detach(|| guarded(|| cuda::compile(&cuda::representative_keys(), arch)))?;
    Ok(rows(&reports))
}

fn parse_dtype(name: &str) -> Result<DType> {
    cuda::DTYPES
        .into_iter()
        .find(|d| d.name() == name)
        .ok_or_else(|| {
            Error::invalid(
                "dtypes",
                "names among float16, bfloat16, float32, float64",
                name,
            )
        })
}

/// Compile ahead of time the unfused kernels for every dtype in `dtypes` and every
/// `(kernel_size, is_causal)` in `shapes`, and the fused ones for every `(head dim, value head
/// dim)` in `head_dims` too, for `arch`, or for device `device`'s architecture when `arch` is
/// None; the tensor-core ones for problems with a relative positional bias where `rpb`. Results
/// land in the in-process and disk caches. Returns rows as `compile_kernels` does.
#[pyfunction]
#[pyo3(signature = (arch, device, dtypes, shapes, head_dims=Vec::new(), rpb=false))]
fn precompile(
    py: Python<'_>,
    arch: Option<&str>,
    device: i32,
    dtypes: Vec<String>,
    shapes: Vec<(Vec<i64>, Vec<bool>)>,
    head_dims: Vec<(i64, i64)>,
    rpb: bool,
) -> PyResult<Vec<KernelRow>> {
    let dtypes = dtypes
        .iter()
        .map(|d| parse_dtype(d))
        .collect::<Result<Vec<_>>>()?;
    let shapes = shapes
        .into_iter()
        .map(|(kernel, causal)| Problem::kernel_shape(kernel, causal))
        .collect::<Result<Vec<_>>>()?;
    let limit = cuda::MAX_FUSED_BACKWARD_DIM;
    let dims = head_dims
        .into_iter()
        .map(|(d, dv)| match (usize::try_from(d), usize::try_from(dv)) {
            (Ok(d @ 1..), Ok(dv @ 1..)) if d.max(dv) <= limit => Ok((d, dv)),
            _ => Err(Error::invalid(
                "head_dims",
                format!("head dims from 1 to {limit}"),
                format!("({d}, {dv})"),
            )),
        })
        .collect::<Result<Vec<_>>>()?;
    let reports = py.detach(|| {
        guarded(|| {
            let arch = match arch {
                Some(name) => Arch::parse(name)?,
                None => cuda::device_arch(device)?,
            };
            cuda::compile(&cuda::variants(&dtypes, &shapes, &dims, rpb, arch)?, arch)
        })
    })?;
    for report in &reports {
        log_info(py, &describe(report))?;
    }
    Ok(rows(&reports))
}

/// NVRTC's version `(major, minor)`.
#[pyfunction]
fn nvrtc_version(py: Python<'_>) -> PyResult<(i32, i32)> {
    Ok(py.detach(|| guarded(cuda::nvrtc_version))?)
}

/// Forget the compiled kernels held in memory, so the next compile reads the disk cache or runs
/// NVRTC (kernels already loaded on a device stay loaded).
#[pyfunction]
fn forget_compiled() {
    cuda::forget_programs();
}

/// Run the CUDA kernels on the CPU for CPU tensors (a test aid): while `directory` is set, ops
/// on CPU tensors plan their CUDA launches and run them through kernels built there by
/// `compiler` (C++17) from the same sources, each on at most `max_grid` blocks (the kernels
/// loop over what a smaller grid leaves), a block's threads taking their turns last first where
/// `reversed_threads` (so that a missing barrier shows). `None` turns it off. Returns whether it
/// was on.
#[pyfunction]
#[pyo3(signature = (directory, compiler = "c++", max_grid = u32::MAX, reversed_threads = false))]
fn run_cuda_kernels_on_host(
    directory: Option<std::path::PathBuf>,
    compiler: &str,
    max_grid: u32,
    reversed_threads: bool,
) -> PyResult<bool> {
    if max_grid == 0 {
        return Err(Error::invalid("max_grid", "at least 1 block", "0").into());
    }
    Ok(cuda::host::enable(
        directory,
        compiler,
        max_grid,
        reversed_threads,
    ))
}

/// Let the unfused ops take their tensor-core window products where they fit (`mode` True, the
/// default), or keep them on the kernels with a thread per output (NATTEN's `use_gemm_na`).
#[pyfunction]
fn use_unfused_tensor_cores(mode: bool) {
    cuda::use_unfused_tensor_cores(mode);
}

/// Whether the unfused ops may take their tensor-core window products.
#[pyfunction]
fn unfused_tensor_cores() -> bool {
    cuda::unfused_tensor_cores()
}

/// Whether a problem on `device` runs the CPU kernels: CPU tensors do, unless
/// `run_cuda_kernels_on_host` sends them through the CUDA kernels.
pub(super) fn cpu_kernels(device: Device) -> bool {
    device == Device::Cpu && !cuda::host::enabled()
}

/// Add the CUDA entry points to the module.
pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compile_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(precompile, m)?)?;
    m.add_function(wrap_pyfunction!(nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(forget_compiled, m)?)?;
    m.add_function(wrap_pyfunction!(run_cuda_kernels_on_host, m)?)?;
    m.add_function(wrap_pyfunction!(use_unfused_tensor_cores, m)?)?;
    m.add_function(wrap_pyfunction!(unfused_tensor_cores, m)?)?;
    Ok(())
}
