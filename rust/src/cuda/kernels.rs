//! The kernel sources (embedded at build time) and how a problem picks a compiled variant: a
//! `KernelKey` names one source specialised by `-D` constants (dtype, kernel sizes, causal
//! flags, strides, and for the fused kernels the head dims), which NVRTC compiles into one
//! module.

use super::fused_launch::TC_WARPS;
use super::tma::{self, Slabs};
use super::tuning::Tuning;
use crate::dlpack::DType;
use crate::problem::{FusedProblem, Problem};
use crate::window::Axis;

/// Headers the sources include, as NVRTC sees them: `(include name, text)`. `common.cuh` is
/// included by every source, `fused.cuh` by the fused ones, `fused_bwd.cuh` by the backward
/// ones, `tensor_core.cuh` and `fused_tc.cuh` (with its parts `tc_tile.cuh`, `tc_mask.cuh` and
/// `tc_logits.cuh`) by the tensor-core ones, and `bwd_tc.cuh`, `bwd_tc_bias.cuh` and
/// `bwd_tc_keys.cuh` by the tensor-core backward.
pub const HEADERS: [(&str, &str); 12] = [
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("fused.cuh", include_str!("../../../kernels/fused.cuh")),
    (
        "fused_bwd.cuh",
        include_str!("../../../kernels/fused_bwd.cuh"),
    ),
    (
        "tensor_core.cuh",
        include_str!("../../../kernels/tensor_core.cuh"),
    ),
    ("tc_tile.cuh", include_str!("../../../kernels/tc_tile.cuh")),
    ("tma.cuh", include_str!("../../../kernels/tma.cuh")),
    ("tc_mask.cuh", include_str!("../../../kernels/tc_mask.cuh")),
    (
        "tc_logits.cuh",
        include_str!("../../../kernels/tc_logits.cuh"),
    ),
    (
        "fused_tc.cuh",
        include_str!("../../../kernels/fused_tc.cuh"),
    ),
    ("bwd_tc.cuh", include_str!("../../../kernels/bwd_tc.cuh")),
    (
        "bwd_tc_bias.cuh",
        include_str!("../../../kernels/bwd_tc_bias.cuh"),
    ),
    (
        "bwd_tc_keys.cuh",
        include_str!("../../../kernels/bwd_tc_keys.cuh"),
    ),
];

/// Threads per block of the one-thread-per-output kernels.
pub const BLOCK: u32 = 256;
/// Threads per block of the bias-gradient reduction (a power of two: a tree reduction).
pub const REDUCE_THREADS: u32 = 256;
/// Query groups per block of the additional-token gradient (blocks are 32 x this).
pub const EXTRA_ROWS: u32 = 8;
/// Query rows per tile of the unfused bias-gradient's first pass (`NA_BIAS_TILE_ROWS`).
pub const BIAS_TILE_ROWS: usize = 256;
/// Tiles of queries each block of the tensor-core bias-gradient reduction's first pass sums
/// (`NA_BIAS_SLICE`).
pub const BIAS_SLICE: usize = 128;

/// A kernel source file; each compiles into one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `kernels/na_qk.cu`: window dot products and the bias gradient.
    Qk,
    /// `kernels/na_av.cu`: window weighted sums, their transpose, the extra-token gradient.
    Av,
    /// `kernels/na_fused_fwd.cu`: fused attention forward (output and logsumexp).
    FusedFwd,
    /// `kernels/na_fused_bwd.cu`: fused attention backward (every gradient).
    FusedBwd,
    /// `kernels/na_fused_tc.cu`: fused attention forward on tensor cores (half types, sm_80+).
    FusedTc,
    /// `kernels/na_fused_bwd_tc.cu`: the fused attention backward on tensor cores (half types,
    /// sm_80+; `d_rpb` of large bias tables stays on `FusedBwd`).
    FusedBwdTc,
    /// `kernels/na_unfused_tc.cu`: the unfused ops' window products on tensor cores (half
    /// types, sm_80+, no additional tokens; `launch::takes_tensor_cores`).
    UnfusedTc,
}

impl Source {
    /// Every source.
    pub const ALL: [Source; 7] = [
        Source::Qk,
        Source::Av,
        Source::FusedFwd,
        Source::FusedBwd,
        Source::FusedTc,
        Source::FusedBwdTc,
        Source::UnfusedTc,
    ];
    /// The sources of the fused ops that take every dtype.
    pub const FUSED: [Source; 2] = [Source::FusedFwd, Source::FusedBwd];
    /// The sources of the unfused ops.
    pub const UNFUSED: [Source; 2] = [Source::Qk, Source::Av];

    /// File name (also the program name in NVRTC's messages).
    pub fn file_name(self) -> &'static str {
        match self {
            Source::Qk => "na_qk.cu",
            Source::Av => "na_av.cu",
            Source::FusedFwd => "na_fused_fwd.cu",
            Source::FusedBwd => "na_fused_bwd.cu",
            Source::FusedTc => "na_fused_tc.cu",
            Source::FusedBwdTc => "na_fused_bwd_tc.cu",
            Source::UnfusedTc => "na_unfused_tc.cu",
        }
    }

    /// The embedded text.
    pub fn text(self) -> &'static str {
        match self {
            Source::Qk => include_str!("../../../kernels/na_qk.cu"),
            Source::Av => include_str!("../../../kernels/na_av.cu"),
            Source::FusedFwd => include_str!("../../../kernels/na_fused_fwd.cu"),
            Source::FusedBwd => include_str!("../../../kernels/na_fused_bwd.cu"),
            Source::FusedTc => include_str!("../../../kernels/na_fused_tc.cu"),
            Source::FusedBwdTc => include_str!("../../../kernels/na_fused_bwd_tc.cu"),
            Source::UnfusedTc => include_str!("../../../kernels/na_unfused_tc.cu"),
        }
    }

    /// The kernels the source defines.
    pub fn functions(self) -> &'static [Function] {
        match self {
            Source::Qk => &[
                Function::Pairwise,
                Function::BiasGrad,
                Function::BiasGradTiles,
                Function::BiasGradSum,
            ],
            Source::Av => &[Function::Gather, Function::Scatter, Function::ExtraGrad],
            Source::FusedFwd => &[Function::FusedForward],
            Source::FusedBwd => &[
                Function::FusedBackwardQuery,
                Function::FusedBackwardKeys,
                Function::FusedBackwardExtras,
                Function::FusedBackwardBias,
            ],
            Source::FusedTc => &[Function::FusedForwardTc],
            Source::FusedBwdTc => &[
                Function::FusedBackwardQueryTc,
                Function::FusedBackwardKeysTc,
                Function::FusedBackwardExtrasTc,
                Function::FusedBackwardBiasSlicesTc,
                Function::FusedBackwardBiasTc,
            ],
            Source::UnfusedTc => &[Function::PairwiseTc, Function::GatherTc],
        }
    }

    /// Whether the source's variants are specialised by the presence of a bias
    /// (`KernelKey::biased`): the tensor-core ones.
    pub fn specialises_bias(self) -> bool {
        matches!(
            self,
            Source::FusedTc | Source::FusedBwdTc | Source::UnfusedTc
        )
    }

    /// Whether the source's variants come in two stagings (`KernelKey::dense_rows`): the
    /// tensor-core kernels, which stage rows of the problem's tensors through shared memory.
    pub fn stages_dense_rows(self) -> bool {
        matches!(
            self,
            Source::FusedTc | Source::FusedBwdTc | Source::UnfusedTc
        )
    }

    /// The largest head dim a source with compile-time head dims takes (0 for the others,
    /// whose head dim is a run-time parameter).
    pub fn max_dim(self) -> usize {
        match self {
            Source::Qk | Source::Av => 0,
            Source::FusedFwd => MAX_FUSED_DIM,
            Source::FusedBwd | Source::FusedTc => MAX_FUSED_BACKWARD_DIM,
            Source::FusedBwdTc | Source::UnfusedTc => MAX_TENSOR_CORE_BACKWARD_DIM,
        }
    }

    /// The dtypes the source compiles for.
    pub fn dtypes(self) -> &'static [DType] {
        match self {
            Source::FusedTc | Source::FusedBwdTc | Source::UnfusedTc => &[DType::F16, DType::BF16],
            _ => &DTYPES,
        }
    }

    /// Whether the head dims are compile-time constants of the source (`NA_DIM`, `NA_DIM_V`).
    pub fn fixed_dims(self) -> bool {
        !matches!(self, Source::Qk | Source::Av)
    }

    /// The parameter struct that each of its kernels takes by value.
    pub fn params_struct(self) -> &'static str {
        match self {
            Source::Qk | Source::Av | Source::UnfusedTc => "NaParams",
            Source::FusedFwd => "NaFusedParams",
            Source::FusedBwd | Source::FusedBwdTc => "NaFusedBwdParams",
            Source::FusedTc => "NaFusedTcParams",
        }
    }
}

/// One `extern "C" __global__` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Function {
    /// `out[x, slot] = a[x] . b[key(x, slot)] (+ bias)`, extra slots dotted with extra tokens.
    Pairwise,
    /// `d_bias[h, offset] = sum of w[.., slot at offset]`, a block per entry.
    BiasGrad,
    /// `BiasGrad`'s sums over each tile of query rows, into a scratch row per tile.
    BiasGradTiles,
    /// `d_bias` as the sum of `BiasGradTiles`' rows.
    BiasGradSum,
    /// `out[x] = sum_slot w[x, slot] b[key(x, slot)] (+ extra tokens)`.
    Gather,
    /// `out[y] = sum over queries x seeing y of w[x, slot(x, y)] a[x]`.
    Scatter,
    /// `out[e] = sum_x w[x, slots + e] a[x]`.
    ExtraGrad,
    /// `out[x] = softmax(scale q[x] . k[keys(x)] (+ bias)) . v[keys(x)]` and its logsumexp.
    FusedForward,
    /// `FusedForward` on tensor cores, a tile of queries per block.
    FusedForwardTc,
    /// Fused backward per query row: `d_query`, and the row's `(lse, delta)`.
    FusedBackwardQuery,
    /// Fused backward per key row: `d_key`, `d_value`.
    FusedBackwardKeys,
    /// Fused backward per additional token: its `d_key`, `d_value`.
    FusedBackwardExtras,
    /// Fused backward per bias entry: `d_rpb`.
    FusedBackwardBias,
    /// `FusedBackwardQuery` on tensor cores, a tile of queries per block.
    FusedBackwardQueryTc,
    /// `FusedBackwardKeys` on tensor cores, a tile of keys per block.
    FusedBackwardKeysTc,
    /// `FusedBackwardExtras` on tensor cores, a tile of additional tokens per block.
    FusedBackwardExtrasTc,
    /// First pass of `d_rpb` from the tensor-core query tiles' partial sums: slices of
    /// `BIAS_SLICE` tiles summed.
    FusedBackwardBiasSlicesTc,
    /// Second pass: `d_rpb` as the sum of the slices.
    FusedBackwardBiasTc,
    /// `Pairwise` on tensor cores, a tile of queries per block (no extra tokens).
    PairwiseTc,
    /// `Gather` on tensor cores, a tile of queries per block (no extra tokens).
    GatherTc,
}

impl Function {
    /// The symbol in the module.
    pub fn symbol(self) -> &'static str {
        match self {
            Function::Pairwise => "na_pairwise",
            Function::BiasGrad => "na_bias_grad",
            Function::BiasGradTiles => "na_bias_grad_tiles",
            Function::BiasGradSum => "na_bias_grad_sum",
            Function::Gather => "na_gather",
            Function::Scatter => "na_scatter",
            Function::ExtraGrad => "na_extra_grad",
            Function::FusedForward => "na_fused_forward",
            Function::FusedForwardTc => "na_fused_forward_tc",
            Function::FusedBackwardQuery => "na_fused_backward_query",
            Function::FusedBackwardKeys => "na_fused_backward_keys",
            Function::FusedBackwardExtras => "na_fused_backward_extras",
            Function::FusedBackwardBias => "na_fused_backward_bias",
            Function::FusedBackwardQueryTc => "na_fused_backward_query_tc",
            Function::FusedBackwardKeysTc => "na_fused_backward_keys_tc",
            Function::FusedBackwardExtrasTc => "na_fused_backward_extras_tc",
            Function::FusedBackwardBiasSlicesTc => "na_fused_backward_bias_slices_tc",
            Function::FusedBackwardBiasTc => "na_fused_backward_bias_tc",
            Function::PairwiseTc => "na_pairwise_tc",
            Function::GatherTc => "na_gather_tc",
        }
    }

    /// The source that defines it.
    pub fn source(self) -> Source {
        match self {
            Function::Pairwise
            | Function::BiasGrad
            | Function::BiasGradTiles
            | Function::BiasGradSum => Source::Qk,
            Function::Gather | Function::Scatter | Function::ExtraGrad => Source::Av,
            Function::FusedForward => Source::FusedFwd,
            Function::FusedForwardTc => Source::FusedTc,
            Function::FusedBackwardQuery
            | Function::FusedBackwardKeys
            | Function::FusedBackwardExtras
            | Function::FusedBackwardBias => Source::FusedBwd,
            Function::FusedBackwardQueryTc
            | Function::FusedBackwardKeysTc
            | Function::FusedBackwardExtrasTc
            | Function::FusedBackwardBiasSlicesTc
            | Function::FusedBackwardBiasTc => Source::FusedBwdTc,
            Function::PairwiseTc | Function::GatherTc => Source::UnfusedTc,
        }
    }
}

/// One compiled variant: a source specialised for a dtype and the padded rank-3 neighborhood
/// shape (and, for the fused source, the head dims). Lengths, dilations, unfused head dims and
/// tensor strides stay run-time parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// Which source.
    pub source: Source,
    /// Element type.
    pub dtype: DType,
    /// Kernel size per (padded) axis; 1 on unit axes.
    pub kernel: [usize; 3],
    /// Causal flag per (padded) axis.
    pub causal: [bool; 3],
    /// Query stride per (padded) axis; 1 for the unfused sources.
    pub stride: [usize; 3],
    /// Head dims `(D, Dv)` of the fused source; `(0, 0)` for the unfused ones.
    pub dims: (usize, usize),
    /// Whether the tensor-core forward, or the tensor-core backward's tile kernels (d_query,
    /// and d_key with d_value), take warpgroup products (wgmma) where their target has them
    /// (`wgmma_for`); false for every other source.
    pub wgmma: bool,
    /// Whether the warpgroup variant of the tensor-core forward, or of the backward's d_query
    /// and key kernels, stages its slabs by bulk tensor copies (TMA, sm_90;
    /// `takes_bulk_copies`); false for every other variant.
    pub tma: bool,
    /// Whether a tensor-core source's problem guarantees dense, 16-byte aligned rows wherever
    /// it stages them (`FusedProblem::rows_dense`, `Problem::rows_dense`), so that its staging
    /// compiles 16-byte copies alone; false for every other source (and for other layouts,
    /// whose variants also compile element-by-element copies into their slab loops).
    pub dense_rows: bool,
    /// Whether a tensor-core variant's problems add a relative positional bias: variants without
    /// compile no bias path (NA_BIASED), which would be cold code in their slab loops; false for
    /// every other source.
    pub biased: bool,
    /// Settings of `NATTEN_RS_TUNE` the variant is compiled with (`tuning::tuned`): none but
    /// where a benchmark asks for them.
    pub tuning: Tuning,
}

/// The widest rows (query/key and value head dims) of the forward's warpgroup products: their
/// queries and output stay in registers (na_fused_tc.cu's NA_TC_WGMMA).
pub const MAX_WGMMA_DIM: usize = 128;

/// Whether variants of `source` with head dims `dims` take warpgroup products: where they apply
/// (`wgmma_applies`) while `NATTEN_RS_WGMMA=1` is set (read at each lookup, so that the variant
/// follows it). Off by default; the kernel takes them only on sm_90a, and mma.sync elsewhere.
pub fn wgmma_for(source: Source, dims: (usize, usize)) -> bool {
    wgmma_applies(source, dims) && std::env::var_os("NATTEN_RS_WGMMA").is_some_and(|v| v == "1")
}

/// Whether variants of `source` with head dims `dims` have warpgroup products to take: the
/// tensor-core forward and the tensor-core backward's tile kernels, up to `MAX_WGMMA_DIM`.
fn wgmma_applies(source: Source, dims: (usize, usize)) -> bool {
    matches!(source, Source::FusedTc | Source::FusedBwdTc) && dims.0.max(dims.1) <= MAX_WGMMA_DIM
}

/// The largest head dim the fused forward takes: each lane of a warp keeps `dim / 32` query
/// channels and `dim_v / 32` output channels in registers.
pub const MAX_FUSED_DIM: usize = 512;
/// The largest head dim the fused backward takes: its kernels keep two gradient rows per lane in
/// registers, which past 256 float64 channels no longer fit.
pub const MAX_FUSED_BACKWARD_DIM: usize = 256;
/// The largest head dim the tensor-core backward takes: its key kernel keeps both gradient rows'
/// accumulators in registers and stages its tile's key and value rows in 48 KiB of shared
/// memory. Wider problems take the warp kernels.
pub const MAX_TENSOR_CORE_BACKWARD_DIM: usize = 128;

/// The most bias entries (`(2 K - 1)` per axis, multiplied) whose gradients the tensor-core
/// d_query kernel of head dims `dims` sums itself: it keeps at least one float copy of the table
/// per warp (four; up to four per warp where they fit: kernels/na_fused_bwd_tc.cu,
/// NA_TCB_COPIES) in shared memory beside its staged rows, all within 48 KiB. Rows up to 64 channels
/// take at most 36 KiB, leaving 8 KiB (512 entries: 2-D kernels up to 11x11, 3-D 3x3x3); wider
/// ones at most 42.5 KiB, leaving 4 KiB (256: 2-D up to 7x7). Larger tables take the warp
/// kernel.
pub fn max_tensor_core_bias_span(dims: (usize, usize)) -> usize {
    if dims.0 <= 64 && dims.1 <= 64 {
        512
    } else {
        256
    }
}

/// The kernel sizes a variant is compiled for. The kernels drop the work of an axis whose size is
/// 1 where another axis's is more (common.cuh, `na_unit_axis`), taking it for an axis that only
/// pads the rank, of length 1: real axes take sizes of 2 or more (problem.rs), and dense attention
/// (no window) takes 1 on every axis.
fn kernel_sizes(axes: &[Axis; 3]) -> [usize; 3] {
    let kernel = axes.map(|a| a.kernel);
    let dense = kernel == [1; 3];
    assert!(
        dense || axes.iter().all(|a| a.kernel > 1 || a.length == 1),
        "an axis of kernel size 1 beside larger ones has length 1: {axes:?}"
    );
    kernel
}

impl KernelKey {
    /// The variant of unfused-op source `source` that problem `p` needs.
    pub fn for_problem(source: Source, p: &Problem) -> KernelKey {
        let dims = if source.fixed_dims() {
            (p.dim, p.dim)
        } else {
            (0, 0)
        };
        let (kernel, causal) = (kernel_sizes(&p.axes), p.axes.map(|a| a.causal));
        KernelKey {
            dense_rows: source.stages_dense_rows() && p.rows_dense,
            biased: source.specialises_bias() && p.rpb,
            ..KernelKey::stride_one(source, p.dtype, kernel, causal, dims)
        }
    }

    /// A variant of `source` at stride 1 with no other specialisation (no warpgroup products,
    /// bulk copies, dense rows or bias; `dims` (0, 0) for sources whose head dims stay run-time).
    pub(crate) fn stride_one(
        source: Source,
        dtype: DType,
        kernel: [usize; 3],
        causal: [bool; 3],
        dims: (usize, usize),
    ) -> KernelKey {
        KernelKey {
            source,
            dtype,
            kernel,
            causal,
            stride: [1; 3],
            dims,
            wgmma: false,
            tma: false,
            dense_rows: false,
            biased: false,
            tuning: Tuning::default(),
        }
    }

    /// The variant of fused source `source` that problem `p` needs.
    pub fn for_fused(source: Source, p: &FusedProblem) -> KernelKey {
        let key = KernelKey {
            source,
            dtype: p.dtype,
            kernel: kernel_sizes(&p.axes),
            causal: p.axes.map(|a| a.causal),
            stride: p.axes.map(|a| a.stride),
            dims: (p.dim, p.dim_v),
            wgmma: wgmma_for(source, (p.dim, p.dim_v)),
            tma: false,
            dense_rows: source.stages_dense_rows() && p.rows_dense,
            biased: source.specialises_bias() && p.rpb,
            tuning: Tuning::default(),
        };
        KernelKey {
            tma: key.takes_bulk_copies(p),
            ..key
        }
    }

    /// Whether this variant of the tensor-core forward or backward of `p` stages its slabs by
    /// bulk tensor copies: its warpgroup variant where `tma::takes_bulk_copies` allows them, for
    /// the forward's key and value slabs, and for the backward's both those of its d_query
    /// kernel and the query and output gradient slabs of its key kernel.
    fn takes_bulk_copies(&self, p: &FusedProblem) -> bool {
        let rows = 16 * self.tensor_core_warps();
        let slabs: &[Slabs] = match self.source {
            Source::FusedTc => &[Slabs::Keys],
            Source::FusedBwdTc => &[Slabs::Keys, Slabs::Queries],
            _ => &[],
        };
        !slabs.is_empty()
            && self.wgmma
            && self.dense_rows
            && slabs.iter().all(|&s| tma::takes_bulk_copies(p, s, rows))
    }

    /// Warps per block of the variant's tensor-core kernels: two warpgroups for the forward's
    /// warpgroup products of rows wider than 32 channels, so that each staged slab serves 128
    /// queries (such a block takes an SM's registers, as two blocks of four warps do at those
    /// widths); `TC_WARPS` otherwise.
    pub fn tensor_core_warps(&self) -> usize {
        if self.source == Source::FusedTc && self.wgmma && self.dims.0.max(self.dims.1) > 32 {
            2 * TC_WARPS
        } else {
            TC_WARPS
        }
    }

    /// Entries of the bias table of the variant's kernel size: `2 K - 1` per axis.
    pub fn bias_span(&self) -> usize {
        self.kernel.iter().map(|k| 2 * k - 1).product()
    }

    /// Whether the tensor-core backward variant sums the bias gradient on tensor cores (its
    /// d_query kernel adding up each tile's share, two reduction kernels the tiles'), rather than
    /// leaving it to the warp kernel: when its table is small enough.
    pub fn bias_grads_on_tensor_cores(&self) -> bool {
        self.source == Source::FusedBwdTc
            && self.biased
            && self.bias_span() <= max_tensor_core_bias_span(self.dims)
    }

    /// The `-D` flags that specialise the source (common.cuh lists them).
    pub fn defines(&self) -> Vec<String> {
        let mut flags = vec![
            format!("-DNA_DTYPE={}", dtype_code(self.dtype)),
            format!("-DNA_BLOCK={BLOCK}"),
            format!("-DNA_REDUCE_THREADS={REDUCE_THREADS}"),
            format!("-DNA_EXTRA_ROWS={EXTRA_ROWS}"),
        ];
        for axis in 0..3 {
            flags.push(format!("-DNA_K{axis}={}", self.kernel[axis]));
            flags.push(format!("-DNA_C{axis}={}", u8::from(self.causal[axis])));
            flags.push(format!("-DNA_S{axis}={}", self.stride[axis]));
        }
        if self.source.fixed_dims() {
            flags.push(format!("-DNA_DIM={}", self.dims.0));
            flags.push(format!("-DNA_DIM_V={}", self.dims.1));
        }
        if self.wgmma {
            flags.push("-DNA_WGMMA=1".to_string());
        }
        if self.tma {
            flags.push("-DNA_TMA=1".to_string());
        }
        if self.source == Source::FusedTc {
            flags.push(format!("-DNA_TC_WARPS={}", self.tensor_core_warps()));
        }
        if self.source.stages_dense_rows() {
            flags.push(format!("-DNA_DENSE_ROWS={}", u8::from(self.dense_rows)));
        }
        if self.source.specialises_bias() {
            flags.push(format!("-DNA_BIASED={}", u8::from(self.biased)));
        }
        if self.source == Source::Qk {
            flags.push(format!("-DNA_BIAS_TILE_ROWS={BIAS_TILE_ROWS}"));
        }
        if self.source == Source::FusedBwdTc && self.wgmma {
            let queries = tma::key_row_slab_queries(self.dims);
            flags.push(format!("-DNA_TCB_WGMMA_QUERIES={queries}"));
        }
        if self.source == Source::FusedBwdTc {
            let on = u8::from(self.bias_grads_on_tensor_cores());
            flags.push(format!("-DNA_TCB_BIAS_GRADS={on}"));
            flags.push(format!("-DNA_BIAS_SLICE={BIAS_SLICE}"));
        }
        flags.extend(
            self.tuning
                .settings()
                .map(|(name, value)| format!("-D{name}={value}")),
        );
        flags
    }

    /// A readable name, e.g. `na_qk[float16, kernel 1x7x7, causal 010]` or
    /// `na_fused_fwd[bfloat16, kernel 1x7x7, causal 000, stride 1x1x2, dim 64/64]`.
    pub fn name(&self) -> String {
        let [k0, k1, k2] = self.kernel;
        let causal: String = self
            .causal
            .iter()
            .map(|&c| if c { '1' } else { '0' })
            .collect();
        let fused = if self.source.fixed_dims() {
            let [s0, s1, s2] = self.stride;
            let (d, dv) = self.dims;
            let any_rows = if self.source.stages_dense_rows() && !self.dense_rows {
                ", any rows"
            } else {
                ""
            };
            let rpb = if self.biased { ", rpb" } else { "" };
            let wgmma = match (self.wgmma, self.tma) {
                (true, true) => ", wgmma, tma",
                (true, false) => ", wgmma",
                _ => "",
            };
            let tuned: String = self
                .tuning
                .settings()
                .map(|(name, value)| format!(", {name}={value}"))
                .collect();
            format!(", stride {s0}x{s1}x{s2}, dim {d}/{dv}{rpb}{any_rows}{wgmma}{tuned}")
        } else {
            String::new()
        };
        format!(
            "{}[{}, kernel {k0}x{k1}x{k2}, causal {causal}{fused}]",
            self.source.file_name().trim_end_matches(".cu"),
            self.dtype.name()
        )
    }
}

/// `NA_DTYPE` code of a dtype (the `NA_F32`... constants of common.cuh).
fn dtype_code(dtype: DType) -> u8 {
    match dtype {
        DType::F32 => 0,
        DType::F64 => 1,
        DType::F16 => 2,
        DType::BF16 => 3,
    }
}

/// Every dtype the kernels compute in.
pub const DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];

/// A spread of variants that covers every code path of every kernel: each source and dtype,
/// ranks 1 to 3, small and large kernels, causal and not, on every axis position; for the fused
/// source also strides, even kernels and head dims from one channel per lane up to the largest.
pub fn representative_keys() -> Vec<KernelKey> {
    let shapes: [([usize; 3], [bool; 3]); 4] = [
        ([1, 1, 3], [false, false, false]),
        ([1, 7, 7], [false, true, false]),
        ([3, 5, 7], [true, false, true]),
        ([1, 1, 13], [false, false, true]),
    ];
    let mut keys = Vec::new();
    for source in Source::UNFUSED {
        for dtype in DTYPES {
            for (kernel, causal) in shapes {
                keys.push(KernelKey::stride_one(source, dtype, kernel, causal, (0, 0)));
            }
        }
    }
    keys.extend(representative_fused_keys());
    keys.extend(representative_unfused_tensor_core_keys());
    keys
}

/// The unfused ops' tensor-core source: ranks 1 to 3, causal and not, head dims from one
/// 16-channel step (padded) to the widest, each window as large as fits beside that width; rows
/// of any layout once per dtype.
fn representative_unfused_tensor_core_keys() -> Vec<KernelKey> {
    type Shape = ([usize; 3], [bool; 3], usize);
    let shapes: [Shape; 4] = [
        ([1, 1, 3], [false; 3], 8),
        ([1, 7, 7], [false, true, false], 32),
        ([3, 5, 7], [true, false, true], 128),
        ([1, 13, 13], [false; 3], 24),
    ];
    let source = Source::UnfusedTc;
    let mut keys = Vec::new();
    for &dtype in source.dtypes() {
        for (kernel, causal, dim) in shapes {
            let key = KernelKey {
                dense_rows: true,
                ..KernelKey::stride_one(source, dtype, kernel, causal, (dim, dim))
            };
            keys.extend([
                key,
                KernelKey {
                    biased: true,
                    ..key
                },
            ]);
            if dim == 32 {
                keys.push(KernelKey {
                    dense_rows: false,
                    ..key
                });
            }
        }
    }
    keys
}

/// Fused variants: `(kernel, causal, stride, (D, Dv))` shapes for every fused source and the
/// dtypes it takes, the last at the source's largest head dim (every head dim here is a multiple
/// of 8, as the tensor-core source needs).
fn representative_fused_keys() -> Vec<KernelKey> {
    type Shape = ([usize; 3], [bool; 3], [usize; 3], (usize, usize));
    let shapes: [Shape; 5] = [
        ([1, 1, 7], [false; 3], [1; 3], (32, 32)),
        ([1, 8, 8], [false, true, false], [1, 2, 4], (64, 64)),
        ([3, 5, 7], [true, false, true], [1, 5, 1], (128, 96)),
        ([1, 13, 13], [false; 3], [1; 3], (24, 40)),
        ([2, 4, 6], [false; 3], [2, 1, 3], (0, 0)),
    ];
    let mut keys = Vec::new();
    for source in Source::FUSED
        .into_iter()
        .chain([Source::FusedTc, Source::FusedBwdTc])
    {
        for &dtype in source.dtypes() {
            for (kernel, causal, stride, dims) in shapes {
                let widest = (source.max_dim(), source.max_dim());
                let dims = if dims == (0, 0) { widest } else { dims };
                let key = KernelKey {
                    source,
                    dtype,
                    kernel,
                    causal,
                    stride,
                    dims,
                    wgmma: false,
                    tma: false,
                    dense_rows: source.stages_dense_rows(),
                    biased: false,
                    tuning: Tuning::default(),
                };
                // With a bias as well, where one may be given (odd kernels, stride 1).
                let may_be_biased = kernel.iter().all(|k| k % 2 == 1) && stride == [1; 3];
                let biases: &[bool] = if source.specialises_bias() && may_be_biased {
                    &[false, true]
                } else {
                    &[false]
                };
                for &biased in biases {
                    let key = KernelKey { biased, ..key };
                    keys.push(key);
                    // The warpgroup products as well, where they apply (head dims up to 128):
                    // the shapes at 32/32, 128/96 and 24/40 (padded to 16) cover their paths;
                    // 64/64 would only add compile time.
                    if wgmma_applies(source, dims) && dims != (64, 64) {
                        keys.push(KernelKey { wgmma: true, ..key });
                        // And its bulk tensor copies (dense rows only).
                        if key.dense_rows {
                            keys.push(KernelKey {
                                wgmma: true,
                                tma: true,
                                ..key
                            });
                        }
                    }
                }
                // The tensor-core kernels of other layouts (element-by-element copies beside the
                // 16-byte ones), once per dtype.
                if source.stages_dense_rows() && dims == (32, 32) {
                    keys.push(KernelKey {
                        dense_rows: false,
                        ..key
                    });
                }
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_function_belongs_to_the_source_that_lists_it() {
        for source in Source::ALL {
            for f in source.functions() {
                assert_eq!(f.source(), source);
                let params = source.params_struct();
                let text = source.text();
                assert!(
                    text.contains(&format!(" {}(const {params} p)", f.symbol()))
                        || text.contains(&format!(
                            " {}(const __grid_constant__ {params} p)",
                            f.symbol()
                        ))
                );
            }
        }
    }

    #[test]
    fn kernel_sizes_of_1_beside_larger_ones_belong_to_unit_axes() {
        let axis = |length, kernel| Axis {
            length,
            kernel,
            ..Axis::UNIT
        };
        let planar = [Axis::UNIT, axis(9, 3), axis(8, 2)];
        assert_eq!(kernel_sizes(&planar), [1, 3, 2]);
        // Dense attention: no window, kernel 1 on axes of any length.
        assert_eq!(kernel_sizes(&[Axis::UNIT, axis(5, 1), axis(7, 1)]), [1; 3]);
        let padded_wrongly = [axis(4, 1), axis(9, 3), axis(8, 2)];
        let refused = std::panic::catch_unwind(|| kernel_sizes(&padded_wrongly));
        assert!(refused.is_err());
    }

    #[test]
    fn defines_cover_every_constant_common_cuh_requires() {
        let key = representative_keys()[0];
        let defined: Vec<String> = key
            .defines()
            .iter()
            .map(|d| {
                d.trim_start_matches("-D")
                    .split('=')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let (_, header) = HEADERS[0];
        let guard = header.split("#error").next().unwrap();
        for name in guard.split("defined(").skip(1) {
            let name = name.split(')').next().unwrap();
            assert!(defined.iter().any(|d| d == name), "{name} not defined");
        }
    }

    #[test]
    fn fused_keys_name_their_stride_and_head_dims() {
        let keys = representative_fused_keys();
        let defines = keys[1].defines();
        for flag in ["-DNA_S1=2", "-DNA_S2=4", "-DNA_DIM=64", "-DNA_DIM_V=64"] {
            assert!(defines.iter().any(|d| d == flag), "{flag} in {defines:?}");
        }
        assert!(keys[1].name().ends_with("stride 1x2x4, dim 64/64]"));
        let unfused = representative_keys()[0].defines();
        assert!(!unfused.iter().any(|d| d.starts_with("-DNA_DIM")));
    }

    #[test]
    fn warpgroup_products_apply_to_the_tensor_core_forward_up_to_128_channels() {
        assert!(wgmma_applies(Source::FusedTc, (128, 128)));
        assert!(wgmma_applies(Source::FusedTc, (8, 128)));
        assert!(!wgmma_applies(Source::FusedTc, (136, 64)));
        assert!(!wgmma_applies(Source::FusedTc, (64, 256)));
        assert!(wgmma_applies(Source::FusedBwdTc, (64, 64)));
        assert!(!wgmma_applies(Source::UnfusedTc, (64, 64)));
        assert!(!wgmma_applies(Source::FusedFwd, (64, 64)));
    }

    #[test]
    fn the_warpgroup_forward_of_wide_rows_takes_two_warpgroups_per_block() {
        let key = |source, wgmma, dims| KernelKey {
            wgmma,
            dense_rows: true,
            ..KernelKey::stride_one(source, DType::BF16, [1, 7, 7], [false; 3], dims)
        };
        let warps_flag = |k: &KernelKey| {
            k.defines()
                .iter()
                .find_map(|d| d.strip_prefix("-DNA_TC_WARPS=").map(str::to_string))
        };
        for (wgmma, dims, warps) in [
            (true, (64, 64), 8),
            (true, (32, 64), 8),
            (true, (128, 128), 8),
            (true, (32, 32), 4),
            (false, (128, 128), 4),
        ] {
            let k = key(Source::FusedTc, wgmma, dims);
            assert_eq!(k.tensor_core_warps(), warps, "{dims:?}, wgmma {wgmma}");
            assert_eq!(warps_flag(&k), Some(warps.to_string()));
        }
        // The other tensor-core kernels keep the kernels' own four warps, the backward's
        // warpgroup kernels included.
        for wgmma in [false, true] {
            let backward = key(Source::FusedBwdTc, wgmma, (128, 128));
            assert_eq!(
                (backward.tensor_core_warps(), warps_flag(&backward)),
                (TC_WARPS, None)
            );
        }
    }

    #[test]
    fn dtype_codes_match_common_cuh() {
        let (_, header) = HEADERS[0];
        for (dtype, name) in [
            (DType::F32, "NA_F32"),
            (DType::F64, "NA_F64"),
            (DType::F16, "NA_F16"),
            (DType::BF16, "NA_BF16"),
        ] {
            let line = format!("#define {name} {}", dtype_code(dtype));
            assert!(header.contains(&line), "{line}");
        }
    }

    #[test]
    fn names_are_distinct() {
        let keys = representative_keys();
        let mut names: Vec<String> = keys.iter().map(KernelKey::name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), keys.len());
    }
}
