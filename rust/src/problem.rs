//! Every shape and argument rule of the ops, checked once, before any memory is touched. A
//! problem that validated is the kernels' proof that indexing by its sizes stays in bounds.
//! Ranks 1 and 2 are padded to rank 3 with leading unit axes.

mod fused;
mod unfused;

pub use fused::{FusedInputs, FusedProblem};
pub use unfused::Problem;

use crate::dlpack::{DType, Device, TensorRef};
use crate::error::{Error, Result};
use crate::window::Axis;

/// Neighborhood arguments, one entry per spatial axis, as the caller passed them.
#[derive(Clone, Debug, Default)]
pub struct Neighborhood {
    /// `kernel_size`.
    pub kernel: Vec<i64>,
    /// `stride` (empty: 1 on every axis; the unfused ops take no stride).
    pub stride: Vec<i64>,
    /// `dilation`.
    pub dilation: Vec<i64>,
    /// `is_causal`.
    pub causal: Vec<bool>,
}

impl Neighborhood {
    /// The arguments of an unfused op (which takes no stride).
    pub fn unfused(kernel: Vec<i64>, dilation: Vec<i64>, causal: Vec<bool>) -> Self {
        Neighborhood {
            kernel,
            stride: Vec::new(),
            dilation,
            causal,
        }
    }
}

/// Which op family's kernel rules apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// Legacy ops: odd kernels >= 3, no stride.
    Unfused,
    /// Fused ops: kernels >= 2 (even allowed), strides `1..=kernel`.
    Fused,
}

/// Axes over `spatial` (padded to three), after checking every neighborhood argument.
fn axes(spatial: &[usize], nbhd: &Neighborhood, family: Family) -> Result<[Axis; 3]> {
    let rank = spatial.len();
    let stride = if nbhd.stride.is_empty() {
        vec![1; rank]
    } else {
        nbhd.stride.clone()
    };
    for (arg, len) in [
        ("kernel_size", nbhd.kernel.len()),
        ("stride", stride.len()),
        ("dilation", nbhd.dilation.len()),
        ("is_causal", nbhd.causal.len()),
    ] {
        if len != rank {
            return Err(per_axis(arg, rank, len));
        }
    }
    let kernel = &nbhd.kernel;
    match family {
        Family::Unfused if kernel.iter().any(|&k| k < 3 || k % 2 == 0) => {
            return Err(Error::invalid(
                "kernel_size",
                "odd sizes >= 3 (unfused ops)",
                format!("{kernel:?}"),
            ));
        }
        Family::Fused if kernel.iter().any(|&k| k < 2) => {
            return Err(Error::invalid(
                "kernel_size",
                "sizes >= 2",
                format!("{kernel:?}"),
            ));
        }
        _ => {}
    }
    if stride.iter().zip(kernel).any(|(&s, &k)| s < 1 || s > k) {
        let got = format!("stride {stride:?} with kernel_size {kernel:?}");
        return Err(Error::invalid(
            "stride",
            "1 <= stride <= kernel_size on every axis",
            got,
        ));
    }
    if nbhd.dilation.iter().any(|&d| d < 1) {
        return Err(Error::invalid(
            "dilation",
            "values >= 1",
            format!("{:?}", nbhd.dilation),
        ));
    }
    let mut axes = [Axis::UNIT; 3];
    for (n, &length) in spatial.iter().enumerate() {
        let (kernel, dilation) = (nbhd.kernel[n] as usize, nbhd.dilation[n] as usize);
        if kernel.saturating_mul(dilation) > length {
            return Err(Error::invalid(
                "kernel_size",
                "kernel_size * dilation <= the input's size on every axis",
                format!(
                    "kernel_size {:?} * dilation {:?} on spatial shape {spatial:?}",
                    nbhd.kernel, nbhd.dilation
                ),
            ));
        }
        let (stride, causal) = (stride[n] as usize, nbhd.causal[n]);
        axes[3 - rank + n] = Axis {
            length,
            kernel,
            stride,
            dilation,
            causal,
        };
    }
    Ok(axes)
}

fn per_axis(arg: &'static str, rank: usize, got: usize) -> Error {
    Error::invalid(
        arg,
        format!("{rank} values (one per spatial axis)"),
        format!("{got} values"),
    )
}

/// The rank (number of spatial axes) named by `kernel_size`.
fn rank_of(nbhd: &Neighborhood) -> Result<usize> {
    let rank = nbhd.kernel.len();
    if !(1..=3).contains(&rank) {
        return Err(Error::invalid(
            "kernel_size",
            "1 to 3 values",
            format!("{rank} values"),
        ));
    }
    Ok(rank)
}

/// Check that `t` has the given dtype, device and shape.
fn expect_tensor(
    arg: &'static str,
    t: &TensorRef,
    dtype: DType,
    device: Device,
    shape: &[usize],
) -> Result<()> {
    let got = t.float_dtype(arg)?;
    if got != dtype {
        return Err(Error::invalid(arg, dtype.name(), got.name()));
    }
    if t.device != device {
        return Err(Error::invalid(
            arg,
            format!("a tensor on {device}"),
            t.device.to_string(),
        ));
    }
    if t.shape != shape {
        return Err(Error::invalid(
            arg,
            format!("shape {shape:?}"),
            format!("shape {:?}", t.shape),
        ));
    }
    Ok(())
}

/// Check a float32 per-token tensor (lse and its gradient).
pub fn expect_f32(arg: &'static str, t: &TensorRef, device: Device, shape: &[usize]) -> Result<()> {
    expect_tensor(arg, t, DType::F32, device, shape)
}

/// Check a scratch tensor the kernels write: `len` elements of `dtype` on `device`, dense,
/// writable, and sharing no memory with `others` (the op's inputs and outputs).
pub fn expect_scratch(
    arg: &'static str,
    t: &TensorRef,
    (len, dtype): (usize, DType),
    device: Device,
    others: &[&TensorRef],
) -> Result<()> {
    expect_tensor(arg, t, dtype, device, &[len])?;
    expect_writable(arg, t, others)
}

/// Check an output tensor: dense, writable, and sharing no memory with any input (the kernels
/// read inputs while writing outputs). Shape, dtype and device are checked by the caller.
fn expect_writable(arg: &'static str, out: &TensorRef, inputs: &[&TensorRef]) -> Result<()> {
    if !out.is_contiguous() {
        return Err(Error::invalid(
            arg,
            "a contiguous output",
            format!("strides {:?}", out.strides),
        ));
    }
    if out.read_only {
        return Err(Error::invalid(
            arg,
            "a writable output",
            "a read-only tensor",
        ));
    }
    let (lo, hi) = out.byte_range();
    if inputs.iter().any(|t| overlaps((lo, hi), t.byte_range())) {
        return Err(Error::invalid(
            arg,
            "an output sharing no memory with the inputs",
            "overlap",
        ));
    }
    Ok(())
}

fn overlaps(a: (usize, usize), b: (usize, usize)) -> bool {
    a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1
}
