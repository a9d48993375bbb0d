//! Vectorizable math for the softmax: `exp` over a slice, written so that the compiler turns
//! it into SIMD (range reduction to `[-ln2/2, ln2/2]`, a degree-6 polynomial, and the exponent
//! put back through the float's bits), accurate to about 2 ulp.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split into a part exact in few bits and the rest, so `x - n ln2` loses nothing.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Taylor-like minimax coefficients of `(e^r - 1 - r) / r^2` on the reduced range.
const POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// Below this `e^x` is under the smallest normal float; results there are flushed to 0.
const MIN_X: f32 = -87.33;
const MAX_X: f32 = 88.72;

/// `e^x`, branch-free.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let clamped = x.clamp(MIN_X, MAX_X);
    let n = (clamped * LOG2_E + 0.5).floor();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = POLY.iter().fold(0.0f32, |p, &c| p * r + c);
    let mantissa = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < MIN_X {
        0.0
    } else {
        mantissa * scale
    }
}

/// `xs[i] = e^(xs[i] - shift)`; returns the sum.
#[inline(always)]
pub fn exp_shifted_f32(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::simd::available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::exp_shifted(xs, shift) };
    }
    exp_shifted_portable(xs, shift)
}

/// `exp_shifted_f32` in plain Rust.
fn exp_shifted_portable(xs: &mut [f32], shift: f32) -> f32 {
    const LANES: usize = 8;
    let mut sums = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, s) in chunk.iter_mut().zip(sums.iter_mut()) {
            *x = exp_f32(*x - shift);
            *s += *x;
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - shift);
        sums[0] += *x;
    }
    sums.iter().sum()
}

/// The same exp, eight lanes at a time with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::{exp_f32, LN2_HI, LN2_LO, LOG2_E, MAX_X, MIN_X, POLY};

    /// `e^x` in each lane.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp8(x: __m256) -> __m256 {
        let splat = _mm256_set1_ps;
        let clamped = _mm256_min_ps(_mm256_max_ps(x, splat(MIN_X)), splat(MAX_X));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(clamped, splat(LOG2_E), splat(0.5)));
        let r = _mm256_fnmadd_ps(
            n,
            splat(LN2_LO),
            _mm256_fnmadd_ps(n, splat(LN2_HI), clamped),
        );
        let p = POLY[1..]
            .iter()
            .fold(splat(POLY[0]), |p, &c| _mm256_fmadd_ps(p, r, splat(c)));
        let mantissa = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, splat(1.0)));
        let exponent = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(exponent));
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, splat(MIN_X));
        _mm256_blendv_ps(
            _mm256_mul_ps(mantissa, scale),
            _mm256_setzero_ps(),
            underflow,
        )
    }

    /// `xs[i] = e^(xs[i] - shift)`; returns the sum.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
        let mut sum = _mm256_setzero_ps();
        let mut chunks = xs.chunks_exact_mut(8);
        for chunk in &mut chunks {
            // SAFETY: `chunk` holds 8 floats; unaligned loads and stores.
            unsafe {
                let e = exp8(_mm256_sub_ps(
                    _mm256_loadu_ps(chunk.as_ptr()),
                    _mm256_set1_ps(shift),
                ));
                _mm256_storeu_ps(chunk.as_mut_ptr(), e);
                sum = _mm256_add_ps(sum, e);
            }
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let mut total: f32 = lanes.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp_f32(*x - shift);
            total += *x;
        }
        total
    }
}

/// The same exp, sixteen lanes at a time with AVX-512.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::{LN2_HI, LN2_LO, LOG2_E, MAX_X, MIN_X, POLY};

    /// `e^x` in each lane; lanes below `MIN_X` (masked logits included) are 0.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp16(x: __m512) -> __m512 {
        let splat = _mm512_set1_ps;
        let clamped = _mm512_min_ps(_mm512_max_ps(x, splat(MIN_X)), splat(MAX_X));
        // Round toward -inf, exceptions suppressed: floor.
        let n = _mm512_roundscale_ps::<0x09>(_mm512_fmadd_ps(clamped, splat(LOG2_E), splat(0.5)));
        let r = _mm512_fnmadd_ps(
            n,
            splat(LN2_LO),
            _mm512_fnmadd_ps(n, splat(LN2_HI), clamped),
        );
        let p = POLY[1..]
            .iter()
            .fold(splat(POLY[0]), |p, &c| _mm512_fmadd_ps(p, r, splat(c)));
        let mantissa = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, splat(1.0)));
        let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, splat(MIN_X));
        // `mantissa * 2^n`, the exponent put in by the hardware.
        _mm512_maskz_scalef_ps(keep, mantissa, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0.0f64;
        for i in -87_000..88_000 {
            let x = i as f32 * 1e-3;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
    }

    #[test]
    fn exp_flushes_far_negative_and_masked_inputs_to_zero() {
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
    }

    #[test]
    fn shifted_exp_sums_what_it_writes_on_every_path() {
        let inputs: Vec<f32> = (0..19).map(|i| i as f32 * 7.37 - 90.0).collect();
        let expected: Vec<f64> = inputs.iter().map(|&x| (x as f64 - 1.5).exp()).collect();
        type ExpShifted = fn(&mut [f32], f32) -> f32;
        let mut paths: Vec<(&str, ExpShifted)> = vec![("portable", exp_shifted_portable)];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA.
            paths.push(("avx2", |xs, s| unsafe { avx2::exp_shifted(xs, s) }));
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            paths.push(("avx512", |xs, s| {
                use std::arch::x86_64::*;
                let mut sum = 0.0;
                for x in xs.iter_mut() {
                    let mut lanes = [0.0f32; 16];
                    // SAFETY: the CPU has AVX-512 F; `lanes` holds 16 floats.
                    unsafe {
                        let v = avx512::exp16(_mm512_set1_ps(*x - s));
                        _mm512_storeu_ps(lanes.as_mut_ptr(), v);
                    }
                    *x = lanes[0];
                    sum += lanes[15];
                }
                sum
            }));
        }
        for (name, exp_shifted) in paths {
            let mut xs = inputs.clone();
            let sum = exp_shifted(&mut xs, 1.5) as f64;
            let total: f64 = expected.iter().sum();
            assert!(
                (sum - total).abs() <= 1e-6 * total,
                "{name}: sum {sum} vs {total}"
            );
            for (i, (&got, &want)) in xs.iter().zip(&expected).enumerate() {
                let ok = (got as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.max(1e-37);
                assert!(
                    ok || (want < 1e-37 && got == 0.0),
                    "{name}: element {i}: {got} vs {want}"
                );
            }
        }
    }
}
