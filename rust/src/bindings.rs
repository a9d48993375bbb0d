//! The Python module `natten_rs._core`: borrows tensors through DLPack, validates them into a
//! `Problem`, and runs the kernels with the GIL released. The only file that knows pyo3.

// Entry points mirror the ops' schemas argument for argument.
#![allow(clippy::too_many_arguments)]

use pyo3::create_exception;
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::cpu::{self, AvGrads, AvTensors, FusedGrads, FusedTensors, QkGrads, QkTensors, Saved};
use crate::dlpack::DType;
use crate::dlpack::{borrow_capsule, Device, TensorRef};
use crate::error::Error;
use crate::problem::{FusedInputs, FusedProblem, Neighborhood, Problem};

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

type Capsule<'a, 'py> = &'a Bound<'py, PyAny>;

fn borrow(arg: &'static str, obj: Capsule) -> PyResult<TensorRef> {
    Ok(borrow_capsule(arg, obj)?)
}

fn borrow_opt(arg: &'static str, obj: Option<Capsule>) -> PyResult<Option<TensorRef>> {
    obj.map(|o| borrow(arg, o)).transpose()
}

/// Run `kernel` on the problem's device with the GIL released.
fn launch(py: Python<'_>, device: Device, kernel: impl FnOnce() + Send) -> PyResult<()> {
    match device {
        Device::Cpu => {
            py.detach(kernel);
            Ok(())
        }
        Device::Cuda(_) => Err(Error::Unsupported(
            "CUDA tensors: this build of natten_rs has no CUDA kernels yet".into(),
        )
        .into()),
    }
}

/// `attn = query . key^T` over each query's neighborhood (+ rpb, + additional keys).
#[pyfunction]
fn na_qk(
    py: Python<'_>,
    query: Capsule,
    key: Capsule,
    rpb: Option<Capsule>,
    additional_keys: Option<Capsule>,
    attn: Capsule,
    kernel_size: Vec<i64>,
    dilation: Vec<i64>,
    is_causal: Vec<bool>,
) -> PyResult<()> {
    let nbhd = Neighborhood::unfused(kernel_size, dilation, is_causal);
    let (q, k) = (borrow("query", query)?, borrow("key", key)?);
    let rpb = borrow_opt("rpb", rpb)?;
    let extra = borrow_opt("additional_keys", additional_keys)?;
    let attn = borrow("attn", attn)?;
    let p = Problem::for_qk(&q, &k, rpb.as_ref(), extra.as_ref(), &nbhd)?;
    let inputs: Vec<&TensorRef> = [Some(&q), Some(&k), rpb.as_ref(), extra.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    p.expect_output("attn", &attn, &p.attn_shape(), &inputs)?;
    let t = QkTensors {
        query: &q,
        key: &k,
        rpb: rpb.as_ref(),
        additional_keys: extra.as_ref(),
    };
    launch(py, p.device, || cpu::qk(&p, &t, &attn))
}

/// `out = attn . value` over each query's neighborhood (+ additional values).
#[pyfunction]
fn na_av(
    py: Python<'_>,
    attn: Capsule,
    value: Capsule,
    additional_values: Option<Capsule>,
    out: Capsule,
    kernel_size: Vec<i64>,
    dilation: Vec<i64>,
    is_causal: Vec<bool>,
) -> PyResult<()> {
    let nbhd = Neighborhood::unfused(kernel_size, dilation, is_causal);
    let (a, v) = (borrow("attn", attn)?, borrow("value", value)?);
    let extra = borrow_opt("additional_values", additional_values)?;
    let out = borrow("out", out)?;
    let p = Problem::for_av(&a, &v, extra.as_ref(), &nbhd)?;
    let inputs: Vec<&TensorRef> = [Some(&a), Some(&v), extra.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    p.expect_output("out", &out, &p.token_shape(p.dim), &inputs)?;
    let t = AvTensors {
        attn: &a,
        value: &v,
        additional_values: extra.as_ref(),
    };
    launch(py, p.device, || cpu::av(&p, &t, &out))
}

/// Gradients of `na_qk` given `d_attn`; `d_rpb` / `d_additional_keys` are written when given.
#[pyfunction]
fn na_qk_backward(
    py: Python<'_>,
    d_attn: Capsule,
    query: Capsule,
    key: Capsule,
    additional_keys: Option<Capsule>,
    d_query: Capsule,
    d_key: Capsule,
    d_rpb: Option<Capsule>,
    d_additional_keys: Option<Capsule>,
    kernel_size: Vec<i64>,
    dilation: Vec<i64>,
    is_causal: Vec<bool>,
) -> PyResult<()> {
    let nbhd = Neighborhood::unfused(kernel_size, dilation, is_causal);
    let grad = borrow("d_attn", d_attn)?;
    let (q, k) = (borrow("query", query)?, borrow("key", key)?);
    let extra = borrow_opt("additional_keys", additional_keys)?;
    let (dq, dk) = (borrow("d_query", d_query)?, borrow("d_key", d_key)?);
    let d_rpb = borrow_opt("d_rpb", d_rpb)?;
    let d_extra = borrow_opt("d_additional_keys", d_additional_keys)?;
    let p = Problem::for_qk(&q, &k, None, extra.as_ref(), &nbhd)?;
    p.expect("d_attn", &grad, &p.attn_shape())?;
    if d_extra.is_some() != extra.is_some() {
        return Err(Error::invalid(
            "d_additional_keys",
            "given exactly when additional_keys is",
            "a mismatch",
        )
        .into());
    }
    let inputs: Vec<&TensorRef> = [Some(&grad), Some(&q), Some(&k), extra.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    p.expect_output("d_query", &dq, &p.token_shape(p.dim), &inputs)?;
    p.expect_output("d_key", &dk, &p.token_shape(p.dim), &inputs)?;
    if let Some(d) = &d_rpb {
        p.expect_output("d_rpb", d, &p.rpb_shape(), &inputs)?;
    }
    if let Some(d) = &d_extra {
        p.expect_output("d_additional_keys", d, &p.extra_shape(), &inputs)?;
    }
    let t = QkTensors {
        query: &q,
        key: &k,
        rpb: None,
        additional_keys: extra.as_ref(),
    };
    let grads = QkGrads {
        d_query: &dq,
        d_key: &dk,
        d_rpb: d_rpb.as_ref(),
        d_additional_keys: d_extra.as_ref(),
    };
    launch(py, p.device, || cpu::qk_backward(&p, &grad, &t, &grads))
}

/// Gradients of `na_av` given `d_out`; `d_additional_values` is written when given.
#[pyfunction]
fn na_av_backward(
    py: Python<'_>,
    d_out: Capsule,
    attn: Capsule,
    value: Capsule,
    additional_values: Option<Capsule>,
    d_attn: Capsule,
    d_value: Capsule,
    d_additional_values: Option<Capsule>,
    kernel_size: Vec<i64>,
    dilation: Vec<i64>,
    is_causal: Vec<bool>,
) -> PyResult<()> {
    let nbhd = Neighborhood::unfused(kernel_size, dilation, is_causal);
    let grad = borrow("d_out", d_out)?;
    let (a, v) = (borrow("attn", attn)?, borrow("value", value)?);
    let extra = borrow_opt("additional_values", additional_values)?;
    let (da, dv) = (borrow("d_attn", d_attn)?, borrow("d_value", d_value)?);
    let d_extra = borrow_opt("d_additional_values", d_additional_values)?;
    let p = Problem::for_av(&a, &v, extra.as_ref(), &nbhd)?;
    p.expect("d_out", &grad, &p.token_shape(p.dim))?;
    if d_extra.is_some() != extra.is_some() {
        return Err(Error::invalid(
            "d_additional_values",
            "given exactly when additional_values is",
            "a mismatch",
        )
        .into());
    }
    let inputs: Vec<&TensorRef> = [Some(&grad), Some(&a), Some(&v), extra.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    p.expect_output("d_attn", &da, &p.attn_shape(), &inputs)?;
    p.expect_output("d_value", &dv, &p.token_shape(p.dim), &inputs)?;
    if let Some(d) = &d_extra {
        p.expect_output("d_additional_values", d, &p.extra_shape(), &inputs)?;
    }
    let t = AvTensors {
        attn: &a,
        value: &v,
        additional_values: extra.as_ref(),
    };
    let grads = AvGrads {
        d_attn: &da,
        d_value: &dv,
        d_additional_values: d_extra.as_ref(),
    };
    launch(py, p.device, || cpu::av_backward(&p, &grad, &t, &grads))
}

/// Validate the inputs of `na_qk` and return the shape of `attn`.
#[pyfunction]
fn qk_output_shape(
    query: Capsule,
    key: Capsule,
    rpb: Option<Capsule>,
    additional_keys: Option<Capsule>,
    kernel_size: Vec<i64>,
    dilation: Vec<i64>,
    is_causal: Vec<bool>,
) -> PyResult<Vec<usize>> {
    let nbhd = Neighborhood::unfused(kernel_size, dilation, is_causal);
    let (q, k) = (borrow("query", query)?, borrow("key", key)?);
    let rpb = borrow_opt("rpb", rpb)?;
    let extra = borrow_opt("additional_keys", additional_keys)?;
    Ok(Problem::for_qk(&q, &k, rpb.as_ref(), extra.as_ref(), &nbhd)?.attn_shape())
}

/// Validate the inputs of `na_av` and return the shape of `out`.
#[pyfunction]
fn av_output_shape(
    attn: Capsule,
    value: Capsule,
    additional_values: Option<Capsule>,
    kernel_size: Vec<i64>,
    dilation: Vec<i64>,
    is_causal: Vec<bool>,
) -> PyResult<Vec<usize>> {
    let nbhd = Neighborhood::unfused(kernel_size, dilation, is_causal);
    let (a, v) = (borrow("attn", attn)?, borrow("value", value)?);
    let extra = borrow_opt("additional_values", additional_values)?;
    let p = Problem::for_av(&a, &v, extra.as_ref(), &nbhd)?;
    Ok(p.token_shape(p.dim))
}

/// Fused-op inputs as Python passes them: `(query, key, value, additional_keys,
/// additional_values, rpb)`.
type FusedArgs<'py> = (
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);
/// `(kernel_size, stride, dilation, is_causal)`; an empty kernel means dense attention.
type NbhdArgs = (Vec<i64>, Vec<i64>, Vec<i64>, Vec<bool>);

/// Borrowed fused inputs, in `FusedArgs` order.
struct Borrowed([Option<TensorRef>; 6]);

/// Argument names of the fused inputs and of their gradients.
const INPUT_NAMES: [&str; 6] = [
    "query",
    "key",
    "value",
    "additional_keys",
    "additional_values",
    "rpb",
];
const GRAD_NAMES: [&str; 6] = [
    "d_query",
    "d_key",
    "d_value",
    "d_additional_keys",
    "d_additional_values",
    "d_rpb",
];

impl Borrowed {
    fn new(args: &FusedArgs, names: [&'static str; 6]) -> PyResult<Borrowed> {
        let (q, k, v, ek, ev, rpb) = args;
        let optional = [k, v, ek, ev, rpb];
        let mut tensors = [Some(borrow(names[0], q)?), None, None, None, None, None];
        for (n, arg) in optional.into_iter().enumerate() {
            tensors[n + 1] = borrow_opt(names[n + 1], arg.as_ref())?;
        }
        Ok(Borrowed(tensors))
    }

    fn problem(
        &self,
        (kernel, stride, dilation, causal): NbhdArgs,
        scale: f64,
    ) -> PyResult<FusedProblem> {
        let nbhd = Neighborhood {
            kernel,
            stride,
            dilation,
            causal,
        };
        let [q, k, v, ek, ev, rpb] = self.0.each_ref().map(Option::as_ref);
        let inputs = FusedInputs {
            query: q,
            key: k,
            value: v,
            additional_keys: ek,
            additional_values: ev,
            rpb,
        };
        Ok(FusedProblem::new(&inputs, &nbhd, scale)?)
    }

    fn tensors(&self) -> FusedTensors<'_> {
        let [q, k, v, ek, ev, rpb] = self.0.each_ref().map(Option::as_ref);
        FusedTensors {
            query: q.expect("query is always borrowed"),
            key: k,
            value: v,
            additional_keys: ek,
            additional_values: ev,
            rpb,
        }
    }

    fn all(&self) -> Vec<&TensorRef> {
        self.0.iter().flatten().collect()
    }
}

/// Validate the inputs of a fused op; the shapes of `(out, lse)`.
#[pyfunction]
fn fused_output_shapes(
    inputs: FusedArgs,
    nbhd: NbhdArgs,
    scale: f64,
) -> PyResult<(Vec<usize>, Vec<usize>)> {
    let p = Borrowed::new(&inputs, INPUT_NAMES)?.problem(nbhd, scale)?;
    Ok((p.out_shape(), p.lse_shape()))
}

/// Fused attention forward into `out` `[B, *spatial, heads, Dv]` and `lse` `[B, *spatial,
/// heads]` (float32).
#[pyfunction]
fn na_fused(
    py: Python<'_>,
    inputs: FusedArgs,
    nbhd: NbhdArgs,
    scale: f64,
    out: Capsule,
    lse: Capsule,
) -> PyResult<()> {
    let borrowed = Borrowed::new(&inputs, INPUT_NAMES)?;
    let p = borrowed.problem(nbhd, scale)?;
    let (out, lse) = (borrow("out", out)?, borrow("lse", lse)?);
    let ins = borrowed.all();
    p.expect_output("out", &out, (&p.out_shape(), p.dtype), &ins)?;
    p.expect_output("lse", &lse, (&p.lse_shape(), DType::F32), &ins)?;
    let t = borrowed.tensors();
    launch(py, p.device, || cpu::fused_forward(&p, &t, &out, &lse))
}

/// Fused attention backward. `saved` is `(out, d_out, d_lse)`; `grads` is `(d_query, d_key,
/// d_value, d_additional_keys, d_additional_values, d_rpb)`, each written when given.
#[pyfunction]
fn na_fused_backward(
    py: Python<'_>,
    inputs: FusedArgs,
    nbhd: NbhdArgs,
    scale: f64,
    saved: (Bound<'_, PyAny>, Bound<'_, PyAny>, Option<Bound<'_, PyAny>>),
    grads: FusedArgs,
) -> PyResult<()> {
    let borrowed = Borrowed::new(&inputs, INPUT_NAMES)?;
    let p = borrowed.problem(nbhd, scale)?;
    let (out, d_out) = (borrow("out", &saved.0)?, borrow("d_out", &saved.1)?);
    let d_lse = borrow_opt("d_lse", saved.2.as_ref())?;
    p.expect("out", &out, &p.out_shape())?;
    p.expect("d_out", &d_out, &p.out_shape())?;
    if let Some(d_lse) = &d_lse {
        crate::problem::expect_f32("d_lse", d_lse, p.device, &p.lse_shape())?;
    }
    let d = Borrowed::new(&grads, GRAD_NAMES)?;
    let mut ins = borrowed.all();
    ins.extend([&out, &d_out]);
    ins.extend(d_lse.as_ref());
    let expected = [
        ("d_query", Some((p.token_shape(p.heads, p.dim), true))),
        (
            "d_key",
            p.window.then(|| (p.token_shape(p.heads_kv, p.dim), true)),
        ),
        (
            "d_value",
            p.window.then(|| (p.token_shape(p.heads_kv, p.dim_v), true)),
        ),
        (
            "d_additional_keys",
            (p.extra > 0).then(|| (p.extra_shape(p.dim), true)),
        ),
        (
            "d_additional_values",
            (p.extra > 0).then(|| (p.extra_shape(p.dim_v), true)),
        ),
        ("d_rpb", p.rpb.then(|| (p.rpb_shape(), true))),
    ];
    for ((arg, shape), grad) in expected.iter().zip(&d.0) {
        match (shape, grad) {
            (Some((shape, _)), Some(grad)) => p.expect_output(arg, grad, (shape, p.dtype), &ins)?,
            (None, None) => {}
            _ => {
                return Err(
                    Error::invalid(arg, "given exactly when its input is", "a mismatch").into(),
                )
            }
        }
    }
    let [dq, dk, dv, dek, dev, drpb] = d.0.each_ref().map(Option::as_ref);
    let grads = FusedGrads {
        d_query: dq.expect("d_query is always borrowed"),
        d_key: dk,
        d_value: dv,
        d_additional_keys: dek,
        d_additional_values: dev,
        d_rpb: drpb,
    };
    let saved = Saved {
        out: &out,
        d_out: &d_out,
        d_lse: d_lse.as_ref(),
    };
    let t = borrowed.tensors();
    launch(py, p.device, || cpu::fused_backward(&p, &t, &saved, &grads))
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

/// The `natten_rs._core` extension module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("KernelError", m.py().get_type::<KernelError>())?;
    m.add_function(wrap_pyfunction!(na_qk, m)?)?;
    m.add_function(wrap_pyfunction!(na_av, m)?)?;
    m.add_function(wrap_pyfunction!(na_qk_backward, m)?)?;
    m.add_function(wrap_pyfunction!(na_av_backward, m)?)?;
    m.add_function(wrap_pyfunction!(qk_output_shape, m)?)?;
    m.add_function(wrap_pyfunction!(av_output_shape, m)?)?;
    m.add_function(wrap_pyfunction!(fused_output_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(na_fused, m)?)?;
    m.add_function(wrap_pyfunction!(na_fused_backward, m)?)?;
    m.add_function(wrap_pyfunction!(dlpack_info, m)?)?;
    Ok(())
}
