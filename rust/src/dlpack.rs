//! DLPack: the C structs through which torch lends us tensors, and the pyo3-free description of a
//! borrowed tensor (`TensorRef`) that validation and kernels work with.

use std::ffi::c_void;

use crate::error::{Error, Result};

/// `DLDevice`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDevice {
    /// `DLDeviceType` (1 = CPU, 2 = CUDA, ...).
    pub device_type: i32,
    /// Ordinal of the device.
    pub device_id: i32,
}

/// `DLDataType`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DLDataType {
    /// Type class (0 int, 1 uint, 2 float, 4 bfloat, 5 complex, 6 bool).
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes per element (1 for every torch dtype).
    pub lanes: u16,
}

/// `DLTensor`.
#[repr(C)]
pub struct DLTensor {
    /// Base pointer (add `byte_offset`).
    pub data: *mut c_void,
    /// Where the memory lives.
    pub device: DLDevice,
    /// Number of dimensions.
    pub ndim: i32,
    /// Element type.
    pub dtype: DLDataType,
    /// `ndim` sizes.
    pub shape: *mut i64,
    /// `ndim` strides in elements, or null for a compact row-major tensor.
    pub strides: *mut i64,
    /// Offset of the first element from `data`, in bytes.
    pub byte_offset: u64,
}

/// `DLManagedTensor` (the unversioned capsule, name `dltensor`).
#[repr(C)]
pub struct DLManagedTensor {
    /// The tensor.
    pub dl_tensor: DLTensor,
    /// Owner's context.
    pub manager_ctx: *mut c_void,
    /// Owner's release function (called by the capsule, never by us: we only borrow).
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// `DLPackVersion`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLPackVersion {
    /// Major version; 1 for the layout below.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

/// `DLManagedTensorVersioned` (DLPack >= 1.0, capsule name `dltensor_versioned`).
#[repr(C)]
pub struct DLManagedTensorVersioned {
    /// Layout version of this struct.
    pub version: DLPackVersion,
    /// Owner's context.
    pub manager_ctx: *mut c_void,
    /// Owner's release function.
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    /// Bit flags (`READ_ONLY`, `IS_COPIED`, ...).
    pub flags: u64,
    /// The tensor.
    pub dl_tensor: DLTensor,
}

/// `flags` bit: the producer forbids writes.
pub const FLAG_READ_ONLY: u64 = 1;
/// `flags` bit: the producer made a copy to export the tensor.
pub const FLAG_IS_COPIED: u64 = 2;

/// Element types the kernels compute with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single.
    F32,
    /// IEEE double.
    F64,
}

impl DType {
    /// torch's name of the dtype.
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// The type kernels accumulate this one in (`acc_t`): float64 for float64, else float32.
    pub fn accumulator(self) -> DType {
        match self {
            DType::F64 => DType::F64,
            _ => DType::F32,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// Where a tensor's memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// Memory of CUDA device `n`.
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A borrowed tensor: where its elements are and how to index them. Sizes and strides are in
/// elements. The memory belongs to the producer (torch) and outlives the call that borrows it.
#[derive(Clone, Debug)]
pub struct TensorRef {
    /// Address of element `[0, 0, ...]`.
    pub data: usize,
    /// Element type as DLPack describes it (checked against `DType` by validation).
    pub dtype: DLDataType,
    /// Where the memory lives.
    pub device: Device,
    /// Sizes.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub strides: Vec<isize>,
    /// Whether the producer forbids writes.
    pub read_only: bool,
}

impl TensorRef {
    /// A dense row-major tensor description with no memory, for validation tests.
    pub fn meta(shape: &[usize], dtype: DType, device: Device) -> Self {
        let (code, bits) = match dtype {
            DType::F16 => (2, 16),
            DType::BF16 => (4, 16),
            DType::F32 => (2, 32),
            DType::F64 => (2, 64),
        };
        TensorRef {
            data: 0,
            dtype: DLDataType {
                code,
                bits,
                lanes: 1,
            },
            device,
            shape: shape.to_vec(),
            strides: contiguous_strides(shape),
            read_only: false,
        }
    }

    /// The element type, or an error naming `arg` when the kernels do not compute in it.
    pub fn float_dtype(&self, arg: &'static str) -> Result<DType> {
        match (self.dtype.code, self.dtype.bits, self.dtype.lanes) {
            (2, 16, 1) => Ok(DType::F16),
            (4, 16, 1) => Ok(DType::BF16),
            (2, 32, 1) => Ok(DType::F32),
            (2, 64, 1) => Ok(DType::F64),
            _ => Err(Error::invalid(
                arg,
                "a float16, bfloat16, float32 or float64 tensor",
                format!("a {} tensor", dtype_name(self.dtype)),
            )),
        }
    }

    /// Whether every element's offset from element `[0, 0, ...]` lies in `[0, 2^32)` (no
    /// negative stride; an empty tensor has none).
    pub fn offsets_fit_32_bits(&self) -> bool {
        if self.shape.contains(&0) {
            return true;
        }
        let last = self
            .shape
            .iter()
            .zip(&self.strides)
            .try_fold(0u64, |sum, (&n, &s)| {
                let s = u64::try_from(s).ok()?;
                sum.checked_add((n as u64 - 1).checked_mul(s)?)
            });
        last.is_some_and(|last| last < 1 << 32)
    }

    /// Whether every row (run along the last axis) is dense and starts 16-byte aligned: a unit
    /// stride along the last axis, an aligned address, and every other stride a whole number of
    /// 16 bytes (axes of one element aside), so that a row's 16-byte chunks copy as they lie.
    pub fn rows_dense_and_aligned(&self) -> bool {
        let size = self.element_size();
        // (Modulo 2^64, a multiple of 16, a step's bytes keep their remainder by 16.)
        let whole_chunks = |s: isize| s.unsigned_abs().wrapping_mul(size).is_multiple_of(16);
        let mut axes = self.shape.iter().zip(&self.strides).rev();
        let last_dense = axes.next().is_none_or(|(&n, &s)| n <= 1 || s == 1);
        last_dense && self.data.is_multiple_of(16) && axes.all(|(&n, &s)| n <= 1 || whole_chunks(s))
    }

    /// Whether a tensor map (sm_90's bulk tensor copies; cuda/tma.rs) can describe the tensor
    /// with its last two axes merged, innermost first: those two dense together (a unit stride,
    /// the second-to-last stride the last axis's length), every other stride a positive whole
    /// number of 16 bytes, below 2^40, that spans at least the axes inside it (so that the
    /// map's strides grow outwards, as the driver documents them), and a 16-byte aligned
    /// address. Axes of one element aside.
    pub fn fits_tensor_maps(&self) -> bool {
        let size = self.element_size();
        let rank = self.shape.len();
        if rank < 2 || !self.data.is_multiple_of(16) {
            return false;
        }
        let (channels, heads) = (self.shape[rank - 1], self.shape[rank - 2]);
        let inner_dense = (channels <= 1 || self.strides[rank - 1] == 1)
            && (heads <= 1 || self.strides[rank - 2] == channels as isize);
        let mut spanned = heads * channels * size;
        if !inner_dense || !spanned.is_multiple_of(16) {
            return false;
        }
        for (&n, &s) in self.shape[..rank - 2].iter().zip(&self.strides).rev() {
            if n <= 1 {
                continue;
            }
            let Ok(step) = usize::try_from(s) else {
                return false;
            };
            let bytes = step.saturating_mul(size);
            if bytes < spanned || bytes >= 1 << 40 || !bytes.is_multiple_of(16) {
                return false;
            }
            spanned = bytes.saturating_mul(n);
        }
        true
    }

    /// Whether the elements are dense and row-major (so that no two indices share memory).
    pub fn is_contiguous(&self) -> bool {
        let expected = contiguous_strides(&self.shape);
        self.shape
            .iter()
            .zip(self.strides.iter().zip(expected))
            .all(|(&n, (&s, e))| n <= 1 || s == e)
    }

    /// Bytes per element.
    pub fn element_size(&self) -> usize {
        usize::from(self.dtype.bits).div_ceil(8) * usize::from(self.dtype.lanes)
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Half-open byte range `[lo, hi)` that the elements occupy (empty for empty tensors).
    pub fn byte_range(&self) -> (usize, usize) {
        if self.numel() == 0 {
            return (self.data, self.data);
        }
        let (mut lo, mut hi) = (0isize, 0isize);
        for (&n, &s) in self.shape.iter().zip(&self.strides) {
            let reach = (n as isize - 1) * s;
            if reach < 0 {
                lo += reach;
            } else {
                hi += reach;
            }
        }
        let size = self.element_size() as isize;
        let base = self.data as isize;
        (
            (base + lo * size) as usize,
            (base + (hi + 1) * size) as usize,
        )
    }
}

/// Row-major strides of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![1isize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1].max(1) as isize;
    }
    strides
}

/// torch-like name of a DLPack element type, for messages.
fn dtype_name(t: DLDataType) -> String {
    let class = match t.code {
        0 => "int",
        1 => "uint",
        2 => "float",
        4 => "bfloat",
        5 => "complex",
        6 => return "bool".into(),
        _ => "unknown",
    };
    if t.lanes == 1 {
        format!("{class}{}", t.bits)
    } else {
        format!("{class}{}x{}", t.bits, t.lanes)
    }
}

/// Describe the tensor a DLPack struct points at.
///
/// # Safety
/// `t` must be a valid `DLTensor` whose shape and strides arrays hold `ndim` entries.
pub unsafe fn describe(t: &DLTensor, read_only: bool) -> Result<TensorRef> {
    let device = match t.device.device_type {
        1 | 3 => Device::Cpu,
        2 | 13 => Device::Cuda(t.device.device_id),
        other => {
            return Err(Error::Unsupported(format!(
                "tensors on DLPack device type {other}"
            )));
        }
    };
    let ndim = usize::try_from(t.ndim).unwrap_or(0);
    // SAFETY: the caller guarantees `shape` holds `ndim` entries.
    let shape: Vec<usize> = unsafe { std::slice::from_raw_parts(t.shape, ndim) }
        .iter()
        .map(|&n| n as usize)
        .collect();
    let strides = if t.strides.is_null() {
        contiguous_strides(&shape)
    } else {
        // SAFETY: the caller guarantees non-null `strides` holds `ndim` entries.
        unsafe { std::slice::from_raw_parts(t.strides, ndim) }
            .iter()
            .map(|&s| s as isize)
            .collect()
    };
    Ok(TensorRef {
        data: t.data as usize + t.byte_offset as usize,
        dtype: t.dtype,
        device,
        shape,
        strides,
        read_only,
    })
}

#[cfg(feature = "python")]
pub use capsule::borrow_capsule;

#[cfg(feature = "python")]
mod capsule {
    use super::*;
    use pyo3::prelude::*;
    use pyo3::{ffi, types::PyCapsule};

    const NAME: &std::ffi::CStr = c"dltensor";
    const NAME_VERSIONED: &std::ffi::CStr = c"dltensor_versioned";

    /// Read the tensor inside a DLPack capsule without consuming it: the capsule keeps
    /// ownership and frees the producer's context when Python drops it.
    pub fn borrow_capsule(arg: &'static str, obj: &Bound<'_, PyAny>) -> Result<TensorRef> {
        let not_capsule = || Error::WrongType {
            arg,
            expected: "a DLPack capsule".into(),
            got: obj
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_default(),
        };
        if !obj.is_instance_of::<PyCapsule>() {
            return Err(not_capsule());
        }
        let ptr = obj.as_ptr();
        // SAFETY: `ptr` is a live capsule (checked above); IsValid only reads its name.
        if unsafe { ffi::PyCapsule_IsValid(ptr, NAME_VERSIONED.as_ptr()) } == 1 {
            // SAFETY: a valid `dltensor_versioned` capsule holds a DLManagedTensorVersioned that
            // lives as long as the capsule, which the caller holds for the whole call.
            let managed = unsafe {
                &*(ffi::PyCapsule_GetPointer(ptr, NAME_VERSIONED.as_ptr())
                    as *const DLManagedTensorVersioned)
            };
            if managed.version.major != 1 {
                return Err(Error::Unsupported(format!(
                    "DLPack version {}.{} (this build reads 1.x)",
                    managed.version.major, managed.version.minor
                )));
            }
            if managed.flags & FLAG_IS_COPIED != 0 {
                return Err(Error::invalid(
                    arg,
                    "a tensor exported without a copy",
                    "a copy",
                ));
            }
            // SAFETY: the producer fills shape/strides with `ndim` entries.
            return unsafe { describe(&managed.dl_tensor, managed.flags & FLAG_READ_ONLY != 0) };
        }
        // SAFETY: as above, for the unversioned struct.
        if unsafe { ffi::PyCapsule_IsValid(ptr, NAME.as_ptr()) } == 1 {
            // SAFETY: a valid `dltensor` capsule holds a DLManagedTensor alive with the capsule.
            let managed = unsafe {
                &*(ffi::PyCapsule_GetPointer(ptr, NAME.as_ptr()) as *const DLManagedTensor)
            };
            // SAFETY: the producer fills shape/strides with `ndim` entries.
            return unsafe { describe(&managed.dl_tensor, false) };
        }
        Err(Error::invalid(
            arg,
            "an unconsumed DLPack capsule",
            "a used or foreign capsule",
        ))
    }
}
