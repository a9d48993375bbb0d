//! Entry points of the unfused ops: `na_qk`, `na_av`, their backward and output shapes. Each
//! op's last argument, `stream`, is torch's current CUDA stream on the tensors' device (ignored
//! for CPU tensors): CUDA kernels are enqueued there.

use pyo3::prelude::*;

use super::cuda::cpu_kernels;
use super::{borrow, borrow_opt, launch, Capsule};
use crate::cpu::{self, AvGrads, AvTensors, QkGrads, QkTensors};
use crate::cuda::{self, UnfusedOp};
use crate::dlpack::{DType, TensorRef};
use crate::error::Error;
use crate::problem::{expect_scratch, Neighborhood, Problem};

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
    stream: u64,
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
    // SAFETY (CUDA): the tensors were validated against `p` (shapes, strides, device; `attn`
    // dense and apart from the inputs), and torch keeps them alive and orders their reuse on
    // `stream`, the stream torch itself is using.
    launch(
        py,
        &p,
        stream,
        UnfusedOp::Qk,
        || cpu::qk(&p, &t, &attn),
        |s| unsafe { cuda::qk(&p, &t, &attn, s) },
    )
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
    stream: u64,
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
    // SAFETY (CUDA): as in `na_qk`.
    launch(
        py,
        &p,
        stream,
        UnfusedOp::Av,
        || cpu::av(&p, &t, &out),
        |s| unsafe { cuda::av(&p, &t, &out, s) },
    )
}

/// Gradients of `na_qk` given `d_attn`; `d_rpb` / `d_additional_keys` are written when given.
/// `bias_scratch`, `qk_bias_scratch_shape` of it, lets the CUDA kernels sum `d_rpb` tile by tile
/// (without it, they take one pass over every logit gradient per bias entry).
#[pyfunction]
#[pyo3(signature = (
    d_attn, query, key, additional_keys, d_query, d_key, d_rpb, d_additional_keys, kernel_size,
    dilation, is_causal, stream, bias_scratch=None
))]
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
    stream: u64,
    bias_scratch: Option<Capsule>,
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
    let scratch = borrow_opt("bias_scratch", bias_scratch)?;
    if let Some(s) = &scratch {
        let mut others = inputs.clone();
        others.extend([&dq, &dk].into_iter().chain(d_rpb.as_ref()));
        expect_scratch("bias_scratch", s, bias_scratch_shape(&p), p.device, &others)?;
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
        bias_scratch: scratch.as_ref(),
    };
    // SAFETY (CUDA): as in `na_qk`.
    launch(
        py,
        &p,
        stream,
        UnfusedOp::QkBackward,
        || cpu::qk_backward(&p, &grad, &t, &grads),
        |s| unsafe { cuda::qk_backward(&p, &grad, &t, &grads, s) },
    )
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
    stream: u64,
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
    // SAFETY (CUDA): as in `na_qk`.
    launch(
        py,
        &p,
        stream,
        UnfusedOp::AvBackward,
        || cpu::av_backward(&p, &grad, &t, &grads),
        |s| unsafe { cuda::av_backward(&p, &grad, &t, &grads, s) },
    )
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

/// The scratch `na_qk_backward` takes for `d_rpb`: `(elements, dtype)` (the accumulator type of
/// the problem's dtype); no elements where the CPU kernels run or the CUDA ones need none.
fn bias_scratch_shape(p: &Problem) -> (usize, DType) {
    let len = if cpu_kernels(p.device) {
        0
    } else {
        cuda::bias_scratch_len(p)
    };
    (len, p.dtype.accumulator())
}

/// Validate the inputs of `na_qk_backward`; the scratch it takes for `d_rpb` as `(elements,
/// dtype name)` (`bias_scratch`).
#[pyfunction]
fn qk_bias_scratch_shape(
    query: Capsule,
    key: Capsule,
    kernel_size: Vec<i64>,
    dilation: Vec<i64>,
    is_causal: Vec<bool>,
) -> PyResult<(usize, String)> {
    let nbhd = Neighborhood::unfused(kernel_size, dilation, is_causal);
    let (q, k) = (borrow("query", query)?, borrow("key", key)?);
    let p = Problem::for_qk(&q, &k, None, None, &nbhd)?;
    let (len, dtype) = bias_scratch_shape(&p);
    Ok((len, dtype.name().to_string()))
}

/// Add the unfused entry points to the module.
pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(na_qk, m)?)?;
    m.add_function(wrap_pyfunction!(na_av, m)?)?;
    m.add_function(wrap_pyfunction!(na_qk_backward, m)?)?;
    m.add_function(wrap_pyfunction!(na_av_backward, m)?)?;
    m.add_function(wrap_pyfunction!(qk_output_shape, m)?)?;
    m.add_function(wrap_pyfunction!(qk_bias_scratch_shape, m)?)?;
    m.add_function(wrap_pyfunction!(av_output_shape, m)?)?;
    Ok(())
}
