//! The Python module `natten_rs._core`: borrows tensors through DLPack, validates them into a
//! problem, and runs the kernels with the GIL released. The only module that knows pyo3 (one
//! file per op family below this one).

// Entry points mirror the ops' schemas argument for argument.
#![allow(clippy::too_many_arguments)]

use pyo3::create_exception;
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

mod cuda;
mod fused;
mod unfused;

use crate::cpu;
use crate::cuda::{Stream, UnfusedOp};
use crate::dlpack::{borrow_capsule, TensorRef};
use crate::error::Error;
use crate::problem::Problem;

create_exception!(
    natten_rs,
    KernelError,
    PyRuntimeError,
    "A CUDA driver or NVRTC failure; the message carries the compiler log."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let message = e.to_string();
        match e {
            Error::Invalid { .. } => PyValueError::new_err(message),
            Error::WrongType { .. } => PyTypeError::new_err(message),
            Error::Unsupported(_) => PyNotImplementedError::new_err(message),
            Error::Kernel { .. } => KernelError::new_err(message),
        }
    }
}

pub(crate) type Capsule<'a, 'py> = &'a Bound<'py, PyAny>;

pub(crate) fn borrow(arg: &'static str, obj: Capsule) -> PyResult<TensorRef> {
    Ok(borrow_capsule(arg, obj)?)
}

pub(crate) fn borrow_opt(arg: &'static str, obj: Option<Capsule>) -> PyResult<Option<TensorRef>> {
    obj.map(|o| borrow(arg, o)).transpose()
}

/// Run an unfused op on the problem's device with the GIL released: `on_cpu` for CPU tensors,
/// `on_cuda` on `stream` for CUDA tensors, after loading (and, at first use, compiling) the
/// kernels that op `op` launches.
pub(crate) fn launch(
    py: Python<'_>,
    p: &Problem,
    stream: u64,
    op: UnfusedOp,
    on_cpu: impl FnOnce() + Send,
    on_cuda: impl FnOnce(Stream) -> crate::error::Result<()> + Send,
) -> PyResult<()> {
    if cuda::cpu_kernels(p.device) {
        py.detach(on_cpu);
        return Ok(());
    }
    cuda::prepare(py, p, op)?;
    Ok(py.detach(|| cuda::guarded(|| on_cuda(Stream(stream))))?)
}

type DlpackInfo = (usize, Vec<usize>, Vec<isize>, String, String);

/// What natten_rs sees of a DLPack capsule: `(data address, shape, strides, dtype, device)`.
/// Lets tests prove that tensors cross without a copy.
#[pyfunction]
fn dlpack_info(capsule: Capsule) -> PyResult<DlpackInfo> {
    let t = borrow("capsule", capsule)?;
    let dtype = t
        .float_dtype("capsule")
        .map(|d| d.name().to_string())
        .unwrap_or_default();
    Ok((t.data, t.shape, t.strides, dtype, t.device.to_string()))
}

/// The CPU kernels' instruction-set tier: `(in use, best this CPU has)`.
#[pyfunction]
fn cpu_isa() -> (&'static str, &'static str) {
    (cpu::isa().name(), cpu::detected_isa().name())
}

/// Cap the CPU kernels' tier at `isa` (`portable`, `avx2`, `avx512` or `amx`; a tier the CPU lacks
/// runs as the best it has); returns the previous cap.
#[pyfunction]
fn set_cpu_isa(isa: &str) -> PyResult<&'static str> {
    let names = cpu::Isa::ALL.map(|i| format!("'{}'", i.name())).join(", ");
    let tier = cpu::Isa::from_name(isa).ok_or_else(|| {
        PyValueError::new_err(format!("isa: expected one of {names}, got '{isa}'"))
    })?;
    Ok(cpu::set_isa_ceiling(tier).name())
}

/// The `natten_rs._core` extension module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("KernelError", m.py().get_type::<KernelError>())?;
    unfused::register(m)?;
    fused::register(m)?;
    cuda::register(m)?;
    m.add_function(wrap_pyfunction!(dlpack_info, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_isa, m)?)?;
    m.add_function(wrap_pyfunction!(set_cpu_isa, m)?)?;
    Ok(())
}
