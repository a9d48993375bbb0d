//! Explicit SIMD kernels, in tiers chosen at run time: AVX-512 where the CPU has it, else
//! AVX2/FMA, else the portable loops in `element` (other CPUs, and float64). One wheel runs
//! everywhere and takes the widest tier the CPU offers.
//!
//! The tier in use is the best one detected, capped by a ceiling (`set_ceiling`; the Python
//! package sets it from `NATTEN_RS_CPU_ISA`), so that tests and benchmarks can run every tier
//! the machine has side by side, and users can step down from a tier that does not pay.

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(target_arch = "x86_64")]
pub use avx2::Wide;
#[cfg(target_arch = "x86_64")]
pub use avx2::{attend, attend_pair, dot_rows, spread_rows, sum_rows};
#[cfg(target_arch = "x86_64")]
pub use avx512::{
    attend_f32 as attend_avx512, attend_pair_f32 as attend_pair_avx512, exact_pair_dots,
    exact_pair_kernel, spread_pair, sum_pair,
};

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// Instruction-set tiers, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Isa {
    /// Plain Rust loops (whatever the compiler makes of them for the baseline target).
    Portable = 0,
    /// AVX2, FMA and F16C.
    Avx2 = 1,
    /// The AVX2 tier plus AVX-512 F, VL, BW and DQ.
    Avx512 = 2,
    /// The AVX-512 tier plus AVX512_BF16 and AMX bfloat16 tiles, where the OS grants them:
    /// the bfloat16 forward's tile kernels (`amx`); everything else runs as on AVX-512.
    Amx = 3,
}

impl Isa {
    /// Every tier, lowest first.
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Amx];

    /// The tier's name, as `NATTEN_RS_CPU_ISA` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// The tier named `name`.
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }
}

/// The best tier this CPU runs (checked once).
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let has = |features: &[bool]| features.iter().all(|&f| f);
            let avx2 = has(&[
                is_x86_feature_detected!("avx2"),
                is_x86_feature_detected!("fma"),
                is_x86_feature_detected!("f16c"),
            ]);
            let avx512 = has(&[
                is_x86_feature_detected!("avx512f"),
                is_x86_feature_detected!("avx512vl"),
                is_x86_feature_detected!("avx512bw"),
                is_x86_feature_detected!("avx512dq"),
            ]);
            match (avx2, avx512) {
                (true, true) if amx::usable() => return Isa::Amx,
                (true, true) => return Isa::Avx512,
                (true, false) => return Isa::Avx2,
                _ => {}
            }
        }
        Isa::Portable
    })
}

/// `len` rows of `n` elements, `step` elements apart from `src` on, widened to consecutive
/// float32 rows at `dst`, on the best tier in use.
///
/// # Safety
/// `available()` must hold; `src` must hold the rows and `dst` `len * n` writable floats.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub unsafe fn widen_rows<T: Wide>(src: *const T, step: isize, dst: *mut f32, rows: (usize, usize)) {
    // SAFETY (both arms): forwarded contract; each tier's features are the CPU's.
    unsafe {
        if isa() >= Isa::Avx512 {
            avx512::widen_rows(src, step, dst, rows)
        } else {
            avx2::widen_rows(src, step, dst, rows)
        }
    }
}

/// The ceiling, a tier's number.
static CEILING: AtomicU8 = AtomicU8::new(Isa::Amx as u8);

fn ceiling() -> Isa {
    Isa::ALL[CEILING.load(Ordering::Relaxed) as usize]
}

/// Cap the tier at `isa` (a tier above the detected one runs as the detected one); returns
/// the previous ceiling.
pub fn set_ceiling(isa: Isa) -> Isa {
    Isa::ALL[CEILING.swap(isa as u8, Ordering::Relaxed) as usize]
}

/// The tier kernels run on now: the detected one, capped by the ceiling. Never above the
/// detected tier, so any answer is safe to act on even while the ceiling changes.
#[inline]
pub fn isa() -> Isa {
    detected().min(ceiling())
}

/// Whether the AVX2 kernels run (the CPU has them and the ceiling allows them).
#[inline]
pub fn available() -> bool {
    isa() >= Isa::Avx2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tier's widening gives `to_acc`'s values for every row and channel (tails past the
    /// last whole vector included), and writes nothing past the rows.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn widened_rows_hold_each_element_as_float32() {
        use half::{bf16, f16};

        fn check<T: Wide>(tier: Isa, from: fn(f32) -> T) {
            if detected() < tier {
                return;
            }
            let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 7.0;
            for n in [1, 7, 8, 15, 16, 17, 32, 40, 64, 72] {
                let (len, step) = (3, n as isize + 5);
                let src: Vec<T> = (0..len * step as usize).map(|i| from(value(i))).collect();
                let mut dst = vec![f32::NAN; len * n + 16];
                let rows = (src.as_ptr(), step, dst.as_mut_ptr(), (n, len));
                // SAFETY: the CPU has the tier (checked above); `src` holds `len` rows `step`
                // apart and `dst` room for `len * n` floats.
                unsafe {
                    match tier {
                        Isa::Avx512 => avx512::widen_rows(rows.0, rows.1, rows.2, rows.3),
                        _ => avx2::widen_rows(rows.0, rows.1, rows.2, rows.3),
                    }
                }
                for r in 0..len {
                    for c in 0..n {
                        let want = src[r * step as usize + c].to_acc();
                        assert_eq!(
                            dst[r * n + c],
                            want,
                            "{tier:?}, n {n}, row {r}, channel {c}"
                        );
                    }
                }
                assert!(
                    dst[len * n..].iter().all(|x| x.is_nan()),
                    "{tier:?}: wrote past the rows"
                );
            }
        }
        for tier in [Isa::Avx2, Isa::Avx512] {
            check::<f32>(tier, |x| x);
            check::<bf16>(tier, bf16::from_f32);
            check::<f16>(tier, f16::from_f32);
        }
    }

    #[test]
    fn tiers_round_trip_their_names_and_never_exceed_detection() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name("sse2"), None);
        let previous = set_ceiling(Isa::Portable);
        assert_eq!(isa(), Isa::Portable);
        assert!(!available());
        set_ceiling(Isa::Amx);
        assert_eq!(isa(), detected());
        set_ceiling(previous);
    }
}
