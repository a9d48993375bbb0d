//! Entry points of the fused ops: `na_fused`, its backward and output shapes.

use pyo3::prelude::*;

use super::{borrow, borrow_opt, cuda as on_cuda, Capsule};
use crate::cpu::{self, FusedGrads, FusedTensors, Saved};
use crate::cuda::{self, Stream};
use crate::dlpack::{DType, TensorRef};
use crate::error::Error;
use crate::problem::{FusedInputs, FusedProblem, Neighborhood};

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
/// heads]` (float32). `stream` is torch's current CUDA stream (for CUDA tensors).
#[pyfunction]
fn na_fused(
    py: Python<'_>,
    inputs: FusedArgs,
    nbhd: NbhdArgs,
    scale: f64,
    out: Capsule,
    lse: Capsule,
    stream: u64,
) -> PyResult<()> {
    let borrowed = Borrowed::new(&inputs, INPUT_NAMES)?;
    let p = borrowed.problem(nbhd, scale)?;
    let (out, lse) = (borrow("out", out)?, borrow("lse", lse)?);
    let ins = borrowed.all();
    p.expect_output("out", &out, (&p.out_shape(), p.dtype), &ins)?;
    p.expect_output("lse", &lse, (&p.lse_shape(), DType::F32), &ins)?;
    let t = borrowed.tensors();
    if on_cuda::cpu_kernels(p.device) {
        py.detach(|| cpu::fused_forward(&p, &t, &out, &lse));
        return Ok(());
    }
    on_cuda::prepare_keys(py, p.device, &[cuda::fused_forward_key(&p)?])?;
    Ok(py.detach(|| {
        on_cuda::guarded(|| {
            // SAFETY: `p` validated every input and both outputs (shapes, strides, device, no
            // overlap); torch keeps them alive until `stream` has run the kernel.
            unsafe { cuda::fused_forward(&p, &t, &out, &lse, Stream(stream)) }
        })
    })?)
}

/// Fused attention backward. `saved` is `(out, lse, d_out, d_lse)`: the forward's outputs and
/// the gradients flowing into them; `grads` is `(d_query, d_key,
/// d_value, d_additional_keys, d_additional_values, d_rpb)`, each written when given. `stats`
/// is scratch for the CUDA kernels, `fused_stats_shape` of it (the CPU kernels ignore it).
/// `stream` is torch's current CUDA stream (for CUDA tensors).
#[pyfunction]
fn na_fused_backward(
    py: Python<'_>,
    inputs: FusedArgs,
    nbhd: NbhdArgs,
    scale: f64,
    saved: (
        Bound<'_, PyAny>,
        Bound<'_, PyAny>,
        Bound<'_, PyAny>,
        Option<Bound<'_, PyAny>>,
    ),
    grads: FusedArgs,
    stats: Capsule,
    stream: u64,
) -> PyResult<()> {
    let borrowed = Borrowed::new(&inputs, INPUT_NAMES)?;
    let p = borrowed.problem(nbhd, scale)?;
    let (out, lse) = (borrow("out", &saved.0)?, borrow("lse", &saved.1)?);
    let d_out = borrow("d_out", &saved.2)?;
    let d_lse = borrow_opt("d_lse", saved.3.as_ref())?;
    let p = p.with_output_gradient(&d_out);
    p.expect("out", &out, &p.out_shape())?;
    crate::problem::expect_f32("lse", &lse, p.device, &p.lse_shape())?;
    p.expect("d_out", &d_out, &p.out_shape())?;
    if let Some(d_lse) = &d_lse {
        crate::problem::expect_f32("d_lse", d_lse, p.device, &p.lse_shape())?;
    }
    let d = Borrowed::new(&grads, GRAD_NAMES)?;
    let mut ins = borrowed.all();
    ins.extend([&out, &lse, &d_out]);
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
        lse: &lse,
        d_out: &d_out,
        d_lse: d_lse.as_ref(),
    };
    let t = borrowed.tensors();
    if on_cuda::cpu_kernels(p.device) {
        py.detach(|| cpu::fused_backward(&p, &t, &saved, &grads));
        return Ok(());
    }
    let stats = borrow("stats", stats)?;
    let (len, dtype) = stats_shape(&p);
    p.expect_output("stats", &stats, (&[len], dtype), &ins)?;
    on_cuda::prepare_keys(py, p.device, &cuda::fused_backward_keys(&p, &grads)?)?;
    Ok(py.detach(|| {
        on_cuda::guarded(|| {
            // SAFETY: `p` validated every input, gradient and the scratch (shapes, strides,
            // device, no overlap with the inputs); torch keeps them alive until `stream` has run
            // the kernels.
            unsafe { cuda::fused_backward(&p, &t, &saved, &grads, &stats, Stream(stream)) }
        })
    })?)
}

/// The backward's scratch: `(elements, dtype)` (the accumulator type of the problem's dtype).
fn stats_shape(p: &FusedProblem) -> (usize, DType) {
    (cuda::fused_stats_len(p), p.dtype.accumulator())
}

/// Validate the inputs of a fused op; the backward's scratch as `(elements, dtype name)`.
#[pyfunction]
fn fused_stats_shape(inputs: FusedArgs, nbhd: NbhdArgs, scale: f64) -> PyResult<(usize, String)> {
    let p = Borrowed::new(&inputs, INPUT_NAMES)?.problem(nbhd, scale)?;
    let (len, dtype) = stats_shape(&p);
    Ok((len, dtype.name().to_string()))
}

/// Add the fused entry points to the module.
pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fused_output_shapes, m)?)?;
    m.add_function(wrap_pyfunction!(na_fused, m)?)?;
    m.add_function(wrap_pyfunction!(na_fused_backward, m)?)?;
    m.add_function(wrap_pyfunction!(fused_stats_shape, m)?)?;
    Ok(())
}
