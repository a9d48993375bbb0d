//! sm_90's bulk tensor copies (TMA) for the tensor-core kernels' warpgroup variants
//! (kernels/tma.cuh; na_fused_tc.cu's NA_TC_TMA, na_fused_bwd_tc.cu's NA_TCB_TMA): which problems
//! take them, the one slab shape a launch's tiles share (a tensor map's box is fixed when it is
//! encoded), and the maps of what the slabs stage (keys and values for the forward and the
//! backward's d_query kernel, queries and output gradients for its key kernel), planned here in
//! the host build's plain encoding, which `runtime::encode_tensor_maps` turns into the driver's
//! for a GPU. Pure planning, testable without a GPU.

use super::launch::View;
use super::tiling::query_tile;
use crate::problem::FusedProblem;
use crate::window::Axis;

/// Keys per slab of the warpgroup forward and d_query kernel (na_fused_tc.cu's NA_TC_KEYS and
/// bwd_tc.cuh's NA_TCB_KEYS, head dims up to 128).
const SLAB_KEYS: usize = 64;
/// The driver's limits on a map: elements per box side, element stride, dimensions; and its
/// strides stay below 2^40 bytes.
const MAX_BOX_SIDE: usize = 256;
const MAX_ELEMENT_STRIDE: usize = 8;
const RANK: usize = 5;
const MAX_STRIDE: u64 = 1 << 40;
/// Channels per copy: one 16-byte chunk of each row (the rows land chunk-major).
const CHUNK: usize = 8;
/// Bytes per element: the copies stage the half types.
const ELEMENT: u64 = 2;

/// A tensor map's 128 bytes (aligned as CUDA 13's `CUtensorMap`): the driver's encoding on a
/// GPU, or `MapPlan::host_encoding` on the host build.
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TensorMap {
    /// Opaque to the kernels but on the host build.
    pub words: [u64; 16],
}

/// The bulk copies' part of the tensor-core kernels' parameter blocks (`NaTmaParams` in
/// kernels/common.cuh); zeros but in the launches of variants that take the copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TmaParams {
    /// The maps of the two tensors a slab stages: its keys and values (the forward, the
    /// backward's d_query kernel) or its queries and output gradients (the backward's key
    /// kernel).
    pub maps: [TensorMap; 2],
    /// log2 of the sides of every tile's slabs.
    pub slab_shift: [i32; 3],
    /// Padding (as in the kernel source).
    pub reserved: i32,
}

// The static_assert of tma.cuh checks the same size on the device side.
const _: () = assert!(std::mem::size_of::<TmaParams>() == 3 * 128);

/// What a tensor map describes (cuTensorMapEncodeTiled's arguments, 2-byte elements, no
/// interleave or swizzle, zeros outside the tensor); laid out as the host build reads it
/// (host_async.h, `HostTensorMap`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapPlan {
    /// Address of element 0.
    pub address: u64,
    /// Elements along each dimension, innermost first.
    pub dims: [u64; RANK],
    /// Bytes from one element to the next along dimensions 1 to 4 (dimension 0 is dense).
    pub strides: [u64; RANK - 1],
    /// Elements a box spans along each dimension.
    pub boxes: [u32; RANK],
    /// Every how many elements a box takes one, along each dimension.
    pub element_strides: [u32; RANK],
    /// Bytes per element.
    pub element_bytes: u32,
    /// Dimensions.
    pub rank: u32,
}

const _: () = assert!(std::mem::size_of::<MapPlan>() == 128);

impl MapPlan {
    /// The host build's encoding: the plan's own bytes.
    pub fn host_encoding(&self) -> TensorMap {
        // SAFETY: both are 128 bytes of plain integers (checked above), any bit pattern valid.
        TensorMap {
            words: unsafe { std::mem::transmute::<MapPlan, [u64; 16]>(*self) },
        }
    }

    /// The plan a host encoding holds.
    pub fn from_host(map: &TensorMap) -> MapPlan {
        // SAFETY: as `host_encoding`.
        unsafe { std::mem::transmute::<[u64; 16], MapPlan>(map.words) }
    }
}

/// Whether `NATTEN_RS_TMA=1` asks for the bulk copies (read at each lookup, so that the variant
/// follows it). Off by default: they take effect where the warpgroup products do (sm_90a, with
/// `NATTEN_RS_WGMMA=1`).
pub fn requested() -> bool {
    std::env::var_os("NATTEN_RS_TMA").is_some_and(|v| v == "1")
}

/// What a kernel's slabs stage, for which tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slabs {
    /// Keys and values, for tiles of queries: the forward, the backward's d_query kernel.
    Keys,
    /// Queries and output gradients, for tiles of keys: the backward's key kernel.
    Queries,
}

/// Queries per slab of the backward's key-row kernels on warpgroup products, for head dims
/// `(dim, dim_v)`: 64 for rows up to 32 channels (their registers take them at no cost in
/// blocks per SM, and such slabs take fewer instructions per product), else 32. The kernels
/// take it from the host (`KernelKey::defines`: NA_TCB_WGMMA_QUERIES), which plans the bulk
/// copies' slabs by it.
pub fn key_row_slab_queries((dim, dim_v): (usize, usize)) -> usize {
    if dim <= 32 && dim_v <= 32 {
        64
    } else {
        32
    }
}

impl Slabs {
    /// Columns per slab: the kernels' NA_TC_KEYS and NA_TCB_KEYS (`SLAB_KEYS`), or
    /// `key_row_slab_queries`.
    fn columns(self, p: &FusedProblem) -> usize {
        match self {
            Slabs::Keys => SLAB_KEYS,
            Slabs::Queries => key_row_slab_queries((p.dim, p.dim_v)),
        }
    }

    /// Heads of the staged tensors.
    fn heads(self, p: &FusedProblem) -> usize {
        match self {
            Slabs::Keys => p.heads_kv,
            Slabs::Queries => p.heads,
        }
    }

    /// Whether tensor maps describe the staged tensors (`FusedProblem::kv_tensor_maps`,
    /// `FusedProblem::query_tensor_maps`).
    fn mapped(self, p: &FusedProblem) -> bool {
        match self {
            Slabs::Keys => p.kv_tensor_maps,
            Slabs::Queries => p.query_tensor_maps,
        }
    }
}

/// Whether the warpgroup kernel of `p` whose tiles of `rows` take `slabs` stages them by bulk
/// tensor copies: asked for, a neighborhood to stage, tensors that tensor maps describe,
/// coordinates in 31 bits, and a slab shape whose boxes the driver takes (`slab_shift`).
pub fn takes_bulk_copies(p: &FusedProblem, slabs: Slabs, rows: usize) -> bool {
    let channels = slabs.heads(p).checked_mul(p.dim.max(p.dim_v));
    requested()
        && p.window
        && slabs.mapped(p)
        && channels.is_some_and(|c| c <= i32::MAX as usize)
        && slab_shift(p, slabs, rows).is_some()
}

/// The longest side, in group indices, of the boxes of the tiles of `tile` positions along
/// `axis`: for tiles of queries (`Slabs::Keys`) a box spans the windows of the tile's first and
/// last query, for tiles of keys the queries whose windows hold one of its keys (the kernels'
/// na_fused_inverse_run). Every dilation group of one length gives the same boxes.
fn longest_box(axis: &Axis, tile: usize, slabs: Slabs) -> usize {
    let d = axis.dilation;
    let mut longest = 0;
    for group in [0, d.min(axis.length) - 1] {
        // Each query's window in group indices, [start, end): both ends move monotonically.
        let windows: Vec<(usize, usize)> = (0..axis.group_len(group))
            .map(|i| {
                let w = axis.window(i * d + group);
                (w.first / d, w.first / d + w.count)
            })
            .collect();
        for first in (0..windows.len()).step_by(tile) {
            let last = (first + tile).min(windows.len()) - 1;
            let (start, end) = match slabs {
                Slabs::Keys => (windows[first].0, windows[last].1),
                Slabs::Queries => (
                    windows.partition_point(|w| w.1 <= first),
                    windows.partition_point(|w| w.0 <= last),
                ),
            };
            longest = longest.max(end.saturating_sub(start));
        }
    }
    longest
}

/// The element stride of a box side of `side` slab positions along an axis of dilation `d`
/// (the positions of one dilation group), or `None` where the driver's limits refuse it.
fn element_stride(side: usize, d: usize) -> Option<usize> {
    match side {
        1 => Some(1),
        _ if d <= MAX_ELEMENT_STRIDE && side * d <= MAX_BOX_SIDE => Some(d),
        _ => None,
    }
}

/// log2 of the sides of the `slabs` every tile (of `rows` positions) of the kernel of `p` that
/// stages them takes: of the shapes whose boxes the driver takes (`element_stride`), none longer
/// on the first two axes than their longest box rounded up to a power of two (the last takes
/// what is left, as na_cut_box does), the one with the fewest slabs over the longest boxes, then
/// the most even, then the longest along the last axis. `None` where none fits.
pub fn slab_shift(p: &FusedProblem, slabs: Slabs, rows: usize) -> Option<[u32; 3]> {
    let tile = query_tile(&p.axes, rows);
    let boxes: [usize; 3] = [0, 1, 2].map(|a| longest_box(&p.axes[a], tile[a], slabs));
    let total = slabs.columns(p).trailing_zeros();
    let most = |a: usize| boxes[a].next_power_of_two().trailing_zeros().min(total);
    let mut best: Option<((usize, u32, u32), [u32; 3])> = None;
    for s0 in 0..=most(0) {
        for s1 in 0..=most(1).min(total - s0) {
            let shift = [s0, s1, total - s0 - s1];
            let fits = (0..3).all(|a| element_stride(1 << shift[a], p.axes[a].dilation).is_some());
            if !fits {
                continue;
            }
            let slabs = (0..3).map(|a| boxes[a].div_ceil(1 << shift[a])).product();
            let rank = (slabs, s0.max(s1).max(shift[2]), total - shift[2]);
            if best.is_none_or(|(r, _)| rank < r) {
                best = Some((rank, shift));
            }
        }
    }
    best.map(|(_, shift)| shift)
}

/// The map of the tokens `v` (`heads` of `channels`, 2-byte elements) of `p`, whose boxes are
/// `CHUNK` channels by a slab of sides `1 << shift`: dimensions innermost first the channels of
/// every head, the axes from the last, the batch. An axis of one element takes the stride that
/// packs it (it is never stepped along). `None` where a stride reaches 2^40 bytes.
pub fn map_of(
    p: &FusedProblem,
    v: &View,
    (heads, channels): (usize, usize),
    shift: [u32; 3],
) -> Option<MapPlan> {
    let mut plan = MapPlan {
        address: v.data,
        element_bytes: ELEMENT as u32,
        rank: RANK as u32,
        ..MapPlan::default()
    };
    plan.dims[0] = (heads * channels) as u64;
    plan.boxes[0] = CHUNK as u32;
    plan.element_strides[0] = 1;
    // Dimensions 1 to 4: axes 2, 1, 0, then the batch.
    let outer = [(2, p.axes[2]), (1, p.axes[1]), (0, p.axes[0])];
    let mut packed = plan.dims[0] * ELEMENT;
    for (dim, (axis, a)) in outer.into_iter().enumerate() {
        let side = 1usize << shift[axis];
        let stride = element_stride(side, a.dilation)?;
        plan.dims[dim + 1] = a.length as u64;
        plan.boxes[dim + 1] = (side * stride) as u32;
        plan.element_strides[dim + 1] = stride as u32;
        plan.strides[dim] = step(a.length, v.stride[2 + axis], packed);
        packed = plan.strides[dim] * a.length as u64;
    }
    plan.dims[4] = p.batch as u64;
    plan.boxes[4] = 1;
    plan.element_strides[4] = 1;
    plan.strides[3] = step(p.batch, v.stride[0], packed);
    plan.strides
        .iter()
        .all(|&s| s > 0 && s < MAX_STRIDE && s.is_multiple_of(16))
        .then_some(plan)
}

/// Bytes between elements along an axis of `length` elements `stride` apart, or `packed` for
/// an axis of one element.
fn step(length: usize, stride: i64, packed: u64) -> u64 {
    if length <= 1 {
        packed
    } else {
        stride as u64 * ELEMENT
    }
}

/// The bulk copies' parameters of the kernel of `p` whose tiles of `rows` stage `slabs`, from
/// `tensors` (keys and values, or queries and output gradients); `None` where
/// `takes_bulk_copies` would refuse them.
pub fn params(
    p: &FusedProblem,
    slabs: Slabs,
    tensors: [&View; 2],
    rows: usize,
) -> Option<TmaParams> {
    let shift = slab_shift(p, slabs, rows)?;
    let heads = slabs.heads(p);
    let [first, second] = tensors;
    Some(TmaParams {
        maps: [
            map_of(p, first, (heads, p.dim), shift)?.host_encoding(),
            map_of(p, second, (heads, p.dim_v), shift)?.host_encoding(),
        ],
        slab_shift: shift.map(|s| s as i32),
        reserved: 0,
    })
}

#[cfg(test)]
#[path = "tma_tests.rs"]
mod tests;
