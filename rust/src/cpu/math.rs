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
    5.000_000_1e-1,
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
    fn shifted_exp_sums_what_it_writes() {
        let mut xs: Vec<f32> = (0..19).map(|i| i as f32 * 0.37 - 3.0).collect();
        let expected: f32 = xs.iter().map(|x| (x - 1.5).exp()).sum();
        let sum = exp_shifted_f32(&mut xs, 1.5);
        assert!((sum - expected).abs() < 1e-5 * expected);
        assert!((xs[3] - (3.0f32 * 0.37 - 3.0 - 1.5).exp()).abs() < 1e-6);
    }
}
