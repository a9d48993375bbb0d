//! Explicit AVX2/FMA kernels for the two loops that dominate attention on the CPU: dot products
//! of one vector with many rows (logits) and weighted sums of many rows (outputs), for rows of
//! float32, bfloat16 or float16 widened to float32 in registers. Callers check `available()`;
//! other CPUs and float64 take the portable loops in `element`.

#[cfg(target_arch = "x86_64")]
pub use x86::{dot_rows, sum_rows};

/// Whether this CPU runs the kernels here (AVX2, FMA and F16C; checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    use crate::cpu::element::Element;

    /// Storage types widened to float32 eight at a time.
    pub trait Wide: Element<Acc = f32> {
        /// Which widening `load8` does.
        const FORMAT: Format;
    }

    /// How eight stored elements become eight float32 lanes.
    #[derive(Clone, Copy, PartialEq, Eq)]
    pub enum Format {
        /// Already float32.
        F32,
        /// bfloat16: the high half of a float32.
        BF16,
        /// IEEE half (F16C converts).
        F16,
    }

    impl Wide for f32 {
        const FORMAT: Format = Format::F32;
    }
    impl Wide for bf16 {
        const FORMAT: Format = Format::BF16;
    }
    impl Wide for f16 {
        const FORMAT: Format = Format::F16;
    }

    /// Eight elements at `p`, as float32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<T: Wide>(p: *const T) -> __m256 {
        // SAFETY: the caller guarantees 8 readable elements at `p`.
        unsafe {
            match T::FORMAT {
                Format::F32 => _mm256_loadu_ps(p as *const f32),
                Format::BF16 => {
                    let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
                }
                Format::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            }
        }
    }

    /// The eight lane sums of eight vectors, as one vector.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum8(v: [__m256; 8]) -> __m256 {
        let pairs = [0, 2, 4, 6].map(|i| _mm256_hadd_ps(v[i], v[i + 1]));
        let quads = [
            _mm256_hadd_ps(pairs[0], pairs[1]),
            _mm256_hadd_ps(pairs[2], pairs[3]),
        ];
        let low = _mm256_permute2f128_ps::<0x20>(quads[0], quads[1]);
        let high = _mm256_permute2f128_ps::<0x31>(quads[0], quads[1]);
        _mm256_add_ps(low, high)
    }

    /// `out[n] = a . row_n` for dense rows of `a.len()` elements at the addresses `rows`.
    ///
    /// # Safety
    /// The CPU must pass `available()`; every address must hold `a.len()` readable elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows<T: Wide>(a: &[f32], rows: &[usize], out: &mut [f32]) {
        let body = a.len() - a.len() % 8;
        for (group, sums) in rows.chunks(8).zip(out.chunks_mut(8)) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for c in (0..body).step_by(8) {
                // SAFETY: `c + 8 <= a.len()`; rows hold `a.len()` elements.
                unsafe {
                    let x = _mm256_loadu_ps(a.as_ptr().add(c));
                    for (j, &row) in group.iter().enumerate() {
                        acc[j] = _mm256_fmadd_ps(x, load8((row as *const T).add(c)), acc[j]);
                    }
                }
            }
            let mut lanes = [0.0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum8(acc)) };
            for (j, (&row, sum)) in group.iter().zip(sums.iter_mut()).enumerate() {
                let tail = (body..a.len()).map(|c| {
                    // SAFETY: `c < a.len()`.
                    a[c] * unsafe { *(row as *const T).add(c) }.to_acc()
                });
                *sum = lanes[j] + tail.sum::<f32>();
            }
        }
    }

    /// `acc[c] += sum_n w[n] row_n[c]` for dense rows of `acc.len()` elements at `rows`.
    ///
    /// # Safety
    /// The CPU must pass `available()`; every address must hold `acc.len()` readable elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn sum_rows<T: Wide>(w: &[f32], rows: &[usize], acc: &mut [f32]) {
        let dim = acc.len();
        let mut c = 0;
        // Blocks of 32 channels, rows alternating between two sets of four accumulators so
        // that consecutive FMAs do not wait on each other.
        while c + 32 <= dim {
            let mut sets = [[_mm256_setzero_ps(); 4]; 2];
            for (n, (&wn, &row)) in w.iter().zip(rows).enumerate() {
                let weight = _mm256_set1_ps(wn);
                let set = &mut sets[n & 1];
                for (i, s) in set.iter_mut().enumerate() {
                    // SAFETY: `c + 32 <= dim`; rows hold `dim` elements.
                    *s = _mm256_fmadd_ps(
                        weight,
                        unsafe { load8((row as *const T).add(c + 8 * i)) },
                        *s,
                    );
                }
            }
            for (i, (&even, &odd)) in sets[0].iter().zip(&sets[1]).enumerate() {
                // SAFETY: `c + 8 * i + 8 <= dim`.
                unsafe {
                    let dst = acc.as_mut_ptr().add(c + 8 * i);
                    let total = _mm256_add_ps(even, odd);
                    _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), total));
                }
            }
            c += 32;
        }
        while c + 8 <= dim {
            let mut s = _mm256_setzero_ps();
            for (&wn, &row) in w.iter().zip(rows) {
                // SAFETY: `c + 8 <= dim`.
                s = _mm256_fmadd_ps(
                    _mm256_set1_ps(wn),
                    unsafe { load8((row as *const T).add(c)) },
                    s,
                );
            }
            // SAFETY: `c + 8 <= dim`.
            unsafe {
                let dst = acc.as_mut_ptr().add(c);
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), s));
            }
            c += 8;
        }
        for (k, a) in acc.iter_mut().enumerate().skip(c) {
            for (&wn, &row) in w.iter().zip(rows) {
                // SAFETY: `k < dim`.
                *a += wn * unsafe { *(row as *const T).add(k) }.to_acc();
            }
        }
    }
}
