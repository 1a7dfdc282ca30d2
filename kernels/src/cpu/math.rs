//! Branch-free `f32` approximations that vectorise (no libm calls in the hot loops).
//!
//! Written as plain `a * b + c` rather than `mul_add`: in the baseline (non-FMA) build
//! `mul_add` becomes a call into libm's software `fmaf`, which is slow and stops vectorisation.

/// `erf(x)` as a rational approximation on [-4, 4] (the form Eigen and XLA use); outside that
/// range `erf` is ±1 to `f32` precision. Absolute error below 1e-6 (tested against libm).
#[inline(always)]
#[allow(clippy::excessive_precision)] // the coefficients as published
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.72614225801306e-10 + 2.77068142495902e-08;
    p = x2 * p + -2.10102402082508e-06;
    p = x2 * p + -5.69250639462346e-05;
    p = x2 * p + -7.34990630326855e-04;
    p = x2 * p + -2.95459980854025e-03;
    p = x2 * p + -1.60960333262415e-02;
    p *= x;
    let mut q = x2 * -1.45660718464996e-05 + -2.13374055278905e-04;
    q = x2 * q + -1.68282697438203e-03;
    q = x2 * q + -7.37332916720468e-03;
    q = x2 * q + -1.42647390514189e-02;
    p / q
}

/// PyTorch's default `gelu`: `0.5 * x * (1 + erf(x / sqrt(2)))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Below this `exp` returns exactly 0 (the true value is under 2e-35).
pub const EXP_ZERO_BELOW: f32 = -80.0;

/// `exp(x)`, Cephes-style: `x = n ln2 + r`, a degree-6 polynomial for `exp(r)` and `2^n` built
/// from the exponent bits. Relative error about 2 ulp on [-80, 88]; inputs above are clamped
/// to 88 (no infinity), inputs below -80 (and -inf) give exactly 0. The cut-off is well above
/// the smallest normal float on purpose: softmax scales these values by up to 1/256 and more,
/// and denormal results cost a microcode assist each (it made the attention softmax 10x slower).
#[inline(always)]
#[allow(clippy::excessive_precision)] // the coefficients as published
pub fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let input = x;
    let x = x.clamp(EXP_ZERO_BELOW, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    // ln 2 split in two so that `n * LN2_HI` is exact.
    let r = x - n * 0.693359375;
    let r = r + n * 2.12194440e-4;
    let mut p = r * 1.9875691500e-4 + 1.3981999507e-3;
    p = r * p + 8.3334519073e-3;
    p = r * p + 4.1665795894e-2;
    p = r * p + 1.6666665459e-1;
    p = r * p + 5.0000001201e-1;
    let y = (r * r) * p + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    if input < EXP_ZERO_BELOW {
        0.0
    } else {
        y * scale
    }
}
