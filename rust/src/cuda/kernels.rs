//! The kernel sources (embedded at build time) and how a problem picks a compiled variant: a
//! `KernelKey` names one source specialised by `-D` constants (dtype, kernel sizes, causal
//! flags), which NVRTC compiles into one module.

use crate::dlpack::DType;
use crate::problem::Problem;

/// Header included by every source, as NVRTC sees it: `(include name, text)`.
pub const COMMON_HEADER: (&str, &str) = ("common.cuh", include_str!("../../../kernels/common.cuh"));

/// Threads per block of the one-thread-per-output kernels.
pub const BLOCK: u32 = 256;
/// Threads per block of the bias-gradient reduction (a power of two: a tree reduction).
pub const REDUCE_THREADS: u32 = 256;
/// Query groups per block of the additional-token gradient (blocks are 32 x this).
pub const EXTRA_ROWS: u32 = 8;

/// A kernel source file; each compiles into one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `kernels/na_qk.cu`: window dot products and the bias gradient.
    Qk,
    /// `kernels/na_av.cu`: window weighted sums, their transpose, the extra-token gradient.
    Av,
}

impl Source {
    /// Every source.
    pub const ALL: [Source; 2] = [Source::Qk, Source::Av];

    /// File name (also the program name in NVRTC's messages).
    pub fn file_name(self) -> &'static str {
        match self {
            Source::Qk => "na_qk.cu",
            Source::Av => "na_av.cu",
        }
    }

    /// The embedded text.
    pub fn text(self) -> &'static str {
        match self {
            Source::Qk => include_str!("../../../kernels/na_qk.cu"),
            Source::Av => include_str!("../../../kernels/na_av.cu"),
        }
    }

    /// The kernels the source defines.
    pub fn functions(self) -> &'static [Function] {
        match self {
            Source::Qk => &[Function::Pairwise, Function::BiasGrad],
            Source::Av => &[Function::Gather, Function::Scatter, Function::ExtraGrad],
        }
    }
}

/// One `extern "C" __global__` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Function {
    /// `out[x, slot] = a[x] . b[key(x, slot)] (+ bias)`, extra slots dotted with extra tokens.
    Pairwise,
    /// `d_bias[h, offset] = sum of w[.., slot at offset]`.
    BiasGrad,
    /// `out[x] = sum_slot w[x, slot] b[key(x, slot)] (+ extra tokens)`.
    Gather,
    /// `out[y] = sum over queries x seeing y of w[x, slot(x, y)] a[x]`.
    Scatter,
    /// `out[e] = sum_x w[x, slots + e] a[x]`.
    ExtraGrad,
}

impl Function {
    /// The symbol in the module.
    pub fn symbol(self) -> &'static str {
        match self {
            Function::Pairwise => "na_pairwise",
            Function::BiasGrad => "na_bias_grad",
            Function::Gather => "na_gather",
            Function::Scatter => "na_scatter",
            Function::ExtraGrad => "na_extra_grad",
        }
    }

    /// The source that defines it.
    pub fn source(self) -> Source {
        match self {
            Function::Pairwise | Function::BiasGrad => Source::Qk,
            Function::Gather | Function::Scatter | Function::ExtraGrad => Source::Av,
        }
    }
}

/// One compiled variant: a source specialised for a dtype and the padded rank-3 neighborhood
/// shape. Lengths, dilations, head dim and tensor strides stay run-time parameters.
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
}

impl KernelKey {
    /// The variant of `source` that problem `p` needs.
    pub fn for_problem(source: Source, p: &Problem) -> KernelKey {
        KernelKey {
            source,
            dtype: p.dtype,
            kernel: p.axes.map(|a| a.kernel),
            causal: p.axes.map(|a| a.causal),
        }
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
        }
        flags
    }

    /// A readable name, e.g. `na_qk[float16, kernel 1x7x7, causal 010]`.
    pub fn name(&self) -> String {
        let [k0, k1, k2] = self.kernel;
        let causal: String = self
            .causal
            .iter()
            .map(|&c| if c { '1' } else { '0' })
            .collect();
        format!(
            "{}[{}, kernel {k0}x{k1}x{k2}, causal {causal}]",
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
/// ranks 1 to 3, small and large kernels, causal and not, on every axis position.
pub fn representative_keys() -> Vec<KernelKey> {
    let shapes: [([usize; 3], [bool; 3]); 4] = [
        ([1, 1, 3], [false, false, false]),
        ([1, 7, 7], [false, true, false]),
        ([3, 5, 7], [true, false, true]),
        ([1, 1, 13], [false, false, true]),
    ];
    let mut keys = Vec::new();
    for source in Source::ALL {
        for dtype in DTYPES {
            for (kernel, causal) in shapes {
                keys.push(KernelKey {
                    source,
                    dtype,
                    kernel,
                    causal,
                });
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
                assert!(source
                    .text()
                    .contains(&format!(" {}(const NaParams p)", f.symbol())));
            }
        }
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
        let (_, header) = COMMON_HEADER;
        let guard = header.split("#error").next().unwrap();
        for name in guard.split("defined(").skip(1) {
            let name = name.split(')').next().unwrap();
            assert!(defined.iter().any(|d| d == name), "{name} not defined");
        }
    }

    #[test]
    fn dtype_codes_match_common_cuh() {
        let (_, header) = COMMON_HEADER;
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
