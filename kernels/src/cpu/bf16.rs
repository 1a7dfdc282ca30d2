//! The linear layer in bf16 on CPUs with AVX512-BF16 (`vdpbf16ps`): weights rounded to bf16
//! once and packed for the micro-kernel ([`PackedLinear::new`]), activations rounded inside the
//! op, products accumulated in f32.
//!
//! Two modes ([`Bf16Mode`]):
//! * `Bf16`: one product of the rounded operands. Each operand keeps 8 significant bits, so a
//!   product is off by up to ~2^-8 relative: fast, not exact.
//! * `Bf16x3`: each f32 operand is split into a bf16 high part and a bf16 low part (the
//!   rounding error of the high part, rounded again), and three products `hi·hi + hi·lo + lo·hi`
//!   are accumulated; only `lo·lo` (~2^-16 relative) and the error of the low parts (~2^-17) are
//!   lost, which keeps the model within its f32 tolerance.
//!
//! `vdpbf16ps` multiplies pairs of bf16 along k and adds both products to one f32 lane, so the
//! packed weights hold, for each panel of [`NR`] output columns and each pair of k, one 32-bit
//! word (two bf16) per column; the activations are rounded into row-major bf16, where a pair of
//! k is already one 32-bit word that the kernel broadcasts. Products of two bf16 are exact in
//! f32, so the accumulation is the only f32 rounding, as in an f32 product.
//!
//! AMX (`tdpbf16ps`, 16x16 tiles) is the next step on Intel CPUs that have it; it would be a
//! second micro-kernel over the same packing (pairs of k per 32-bit word, which is AMX's B
//! layout too), chosen in [`PackedLinear::forward`] when the CPU has `amx-bf16` and the process
//! has been granted the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`). Not written: no machine
//! with AMX was available to test it.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{ShapeError, ensure, write_output};

/// Rows per micro-tile and 16-float vectors per micro-tile row: `MR * NV` accumulators of 16
/// lanes plus `NV` (twice that for `Bf16x3`) weight vectors stay in the 32 zmm registers.
const MR: usize = 8;
const NV: usize = 3;
/// Output columns per packed weight panel.
pub const NR: usize = 16 * NV;
/// Rows per parallel task: their bf16 copy (at most 64 x 1536 x 2 bytes x 2 for `Bf16x3`)
/// stays in L2 while every weight panel passes over it.
const MC: usize = 64;

/// How the f32 operands are represented in the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Mode {
    /// One bf16 product per f32 product (about 3 significant decimal digits per product).
    Bf16,
    /// Three bf16 products (high and low parts): about f32 accuracy at three times the work.
    Bf16x3,
}

/// Whether this CPU runs the bf16 kernels (AVX-512 with the BF16 extension), and no cap from
/// [`set_max_simd_level`](super::set_max_simd_level) forbids AVX-512.
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The weights of one linear layer (`[out_dim, in_dim]`, PyTorch's layout), rounded to bf16
/// and packed for the micro-kernel.
#[derive(Clone)]
pub struct PackedLinear {
    mode: Bf16Mode,
    in_dim: usize,
    out_dim: usize,
    /// `ceil(in_dim / 2)`: an odd `in_dim` is padded with a zero column.
    pairs: usize,
    /// Panel after panel of `NR` columns (the last padded with zero columns): for each pair
    /// of k, `NR` words, each the bf16 of `w[n, 2p]` (low half) and `w[n, 2p + 1]` (high half).
    hi: Vec<u32>,
    /// The low parts in the same layout (`Bf16x3` only, else empty).
    lo: Vec<u32>,
}

impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("mode", &self.mode)
            .field("in_dim", &self.in_dim)
            .field("out_dim", &self.out_dim)
            .finish_non_exhaustive()
    }
}

/// bf16 of `x`, rounded to nearest even (NaN stays NaN).
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn bf16_value(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// The high and low bf16 parts of `x`: `hi = bf16(x)`, `lo = bf16(x - hi)`.
fn split(x: f32) -> (u16, u16) {
    let hi = bf16_bits(x);
    (hi, bf16_bits(x - bf16_value(hi)))
}

impl PackedLinear {
    /// Rounds and packs `weight` (row-major `[out_dim, in_dim]`).
    pub fn new(weight: &[f32], in_dim: usize, mode: Bf16Mode) -> Result<Self, ShapeError> {
        ensure(in_dim > 0 && weight.len().is_multiple_of(in_dim), || {
            format!(
                "packed linear: {} weight values are not rows of {in_dim}",
                weight.len()
            )
        })?;
        let out_dim = weight.len() / in_dim;
        let pairs = in_dim.div_ceil(2);
        let panels = out_dim.div_ceil(NR);
        let len = panels * pairs * NR;
        let mut hi = vec![0u32; len];
        let mut lo = match mode {
            Bf16Mode::Bf16 => Vec::new(),
            Bf16Mode::Bf16x3 => vec![0u32; len],
        };
        let at = |n: usize, k: usize| {
            if k < in_dim {
                weight[n * in_dim + k]
            } else {
                0.0
            }
        };
        for n in 0..out_dim {
            let (panel, col) = (n / NR, n % NR);
            for p in 0..pairs {
                let i = (panel * pairs + p) * NR + col;
                let (h0, l0) = split(at(n, 2 * p));
                let (h1, l1) = split(at(n, 2 * p + 1));
                hi[i] = u32::from(h0) | (u32::from(h1) << 16);
                if mode == Bf16Mode::Bf16x3 {
                    lo[i] = u32::from(l0) | (u32::from(l1) << 16);
                }
            }
        }
        Ok(Self {
            mode,
            in_dim,
            out_dim,
            pairs,
            hi,
            lo,
        })
    }

    pub fn mode(&self) -> Bf16Mode {
        self.mode
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `x · weightᵀ (+ bias)` like [`linear`](super::linear): `x` row-major `[rows, in_dim]`,
    /// `out` row-major `[rows, out_dim]`. Fails with [`ShapeError`] on inconsistent sizes, and
    /// on a CPU without AVX512-BF16 ([`bf16_supported`]).
    pub fn forward(
        &self,
        x: &[f32],
        bias: Option<&[f32]>,
        out: &mut Vec<f32>,
    ) -> Result<(), ShapeError> {
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        ensure(x.len().is_multiple_of(in_dim), || {
            format!(
                "packed linear: {} input values are not rows of {in_dim}",
                x.len()
            )
        })?;
        if let Some(b) = bias {
            ensure(b.len() == out_dim, || {
                format!("packed linear: bias has {} values, need {out_dim}", b.len())
            })?;
        }
        ensure(bf16_supported(), || {
            "packed linear: this CPU lacks AVX512-BF16".into()
        })?;
        let rows = x.len() / in_dim;
        if rows == 0 || out_dim == 0 {
            out.clear();
            return Ok(());
        }
        // SAFETY: every task writes all `out_dim` values of each of its rows (`block`), and the
        // tasks' chunks cover the output.
        unsafe {
            write_output(out, rows * out_dim, |out| {
                out.par_chunks_mut(MC * out_dim)
                    .zip(x.par_chunks(MC * in_dim))
                    .for_each(|(out, x)| self.block(x, bias, out));
            });
        }
        Ok(())
    }

    /// One block of at most `MC` rows: rounds them into this thread's scratch, then runs every
    /// weight panel over them.
    fn block(&self, x: &[f32], bias: Option<&[f32]>, out: &mut [MaybeUninit<f32>]) {
        thread_local! {
            static SCRATCH: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
        }
        SCRATCH.with_borrow_mut(|scratch| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `forward` checked that the CPU has AVX512-BF16 (and AVX-512 F/BW/VL).
            unsafe {
                x86::block(self, x, bias, out, scratch)
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!(
                "bf16_supported() is false off x86_64: {:?}",
                (x, bias, out, scratch)
            )
        });
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::{Bf16Mode, MR, NR, NV, PackedLinear};

    /// Rounds one row of f32 into bf16 words (`pairs` of them; an odd last column pairs with
    /// zero): the high parts into `hi`, and into `lo` the low parts when it is given.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    #[inline]
    unsafe fn round_row(x: &[f32], hi: &mut [u32], lo: Option<&mut [u32]>) {
        let (hi, lo) = (
            hi.as_mut_ptr().cast::<u16>(),
            lo.map(|l| l.as_mut_ptr().cast::<u16>()),
        );
        let mut k = 0;
        while k < x.len() {
            let n = (x.len() - k).min(16);
            let mask: u16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
            // SAFETY: the mask keeps the load inside `x` and the stores inside the `pairs`
            // words (2 * pairs >= x.len() u16s) of each output row.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(k));
                let h = _mm512_cvtneps_pbh(v);
                let h = std::mem::transmute::<__m256bh, __m256i>(h);
                _mm256_mask_storeu_epi16(hi.add(k).cast(), mask, h);
                if let Some(lo) = lo {
                    let back =
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
                    let l = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(
                        _mm512_sub_ps(v, back),
                    ));
                    _mm256_mask_storeu_epi16(lo.add(k).cast(), mask, l);
                }
            }
            k += 16;
        }
        if x.len() % 2 == 1 {
            // SAFETY: the pad half of the last word is inside the row's `pairs` words.
            unsafe {
                *hi.add(x.len()) = 0;
                if let Some(lo) = lo {
                    *lo.add(x.len()) = 0;
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    pub(super) unsafe fn block(
        w: &PackedLinear,
        x: &[f32],
        bias: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
        scratch: &mut Vec<u32>,
    ) {
        let (in_dim, out_dim, pairs) = (w.in_dim, w.out_dim, w.pairs);
        let x3 = w.mode == Bf16Mode::Bf16x3;
        let rows = x.len() / in_dim;
        let padded = rows.div_ceil(MR) * MR;
        // hi rows, then (x3) lo rows; rows past `rows` are zero and their products discarded.
        let per_part = padded * pairs;
        scratch.clear();
        scratch.resize(per_part * if x3 { 2 } else { 1 }, 0);
        let (a_hi, a_lo) = scratch.split_at_mut(per_part);
        for (r, xr) in x.chunks_exact(in_dim).enumerate() {
            let hi = &mut a_hi[r * pairs..(r + 1) * pairs];
            let lo = x3.then(|| &mut a_lo[r * pairs..(r + 1) * pairs]);
            // SAFETY: the features `round_row` uses are enabled on this function.
            unsafe { round_row(xr, hi, lo) };
        }
        let out_ptr = out.as_mut_ptr().cast::<f32>();
        for panel in 0..out_dim.div_ceil(NR) {
            let b_hi = w.hi[panel * pairs * NR..].as_ptr();
            let b_lo = if x3 {
                w.lo[panel * pairs * NR..].as_ptr()
            } else {
                b_hi
            };
            let col0 = panel * NR;
            for r0 in (0..rows).step_by(MR) {
                let a = a_hi[r0 * pairs..].as_ptr();
                // SAFETY: the tile reads MR rows of `pairs` words from the scratch (padded to
                // a multiple of MR rows) and `pairs * NR` words of each weight panel.
                let acc = unsafe {
                    if x3 {
                        tile::<true>(a, a_lo[r0 * pairs..].as_ptr(), pairs, b_hi, b_lo)
                    } else {
                        tile::<false>(a, a, pairs, b_hi, b_lo)
                    }
                };
                // SAFETY: only rows below `rows` and columns below `out_dim` are stored.
                unsafe {
                    store(
                        &acc,
                        rows - r0,
                        out_ptr.add(r0 * out_dim),
                        out_dim,
                        col0,
                        bias,
                    )
                };
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    #[inline]
    unsafe fn tile<const X3: bool>(
        a_hi: *const u32,
        a_lo: *const u32,
        pairs: usize,
        b_hi: *const u32,
        b_lo: *const u32,
    ) -> [[__m512; NV]; MR] {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..pairs {
            // SAFETY (whole loop): the caller's bounds: MR rows of `pairs` words in `a_*`,
            // `pairs * NR` words in `b_*`.
            let bh: [__m512bh; NV] = std::array::from_fn(|v| unsafe {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    b_hi.add(p * NR + v * 16).cast(),
                ))
            });
            let bl: [__m512bh; NV] = std::array::from_fn(|v| unsafe {
                if X3 {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                        b_lo.add(p * NR + v * 16).cast(),
                    ))
                } else {
                    bh[v]
                }
            });
            for (r, acc) in acc.iter_mut().enumerate() {
                let ah: __m512bh = unsafe {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *a_hi.add(r * pairs + p) as i32,
                    ))
                };
                if X3 {
                    let al: __m512bh = unsafe {
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                            *a_lo.add(r * pairs + p) as i32,
                        ))
                    };
                    for v in 0..NV {
                        acc[v] = _mm512_dpbf16_ps(acc[v], al, bh[v]);
                        acc[v] = _mm512_dpbf16_ps(acc[v], ah, bl[v]);
                    }
                }
                for v in 0..NV {
                    acc[v] = _mm512_dpbf16_ps(acc[v], ah, bh[v]);
                }
            }
        }
        acc
    }

    /// Writes the first `rows` (at most MR) rows of a tile, plus the bias, at columns
    /// `col0..col0 + NR` of the output (those below `out_dim`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    #[inline]
    unsafe fn store(
        acc: &[[__m512; NV]; MR],
        rows: usize,
        out: *mut f32,
        out_dim: usize,
        col0: usize,
        bias: Option<&[f32]>,
    ) {
        for v in 0..NV {
            let col = col0 + v * 16;
            if col >= out_dim {
                break;
            }
            let n = (out_dim - col).min(16);
            let mask: u16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
            // SAFETY: masked to the columns below `out_dim`, rows below the caller's `rows`.
            unsafe {
                let b = match bias {
                    Some(b) => _mm512_maskz_loadu_ps(mask, b.as_ptr().add(col)),
                    None => _mm512_setzero_ps(),
                };
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    _mm512_mask_storeu_ps(
                        out.add(r * out_dim + col),
                        mask,
                        _mm512_add_ps(acc[v], b),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// `x · wᵀ + b` in f64, and `sum_k |x_rk| |w_ck|` per output (the scale of rounding errors).
    fn reference(x: &[f32], w: &[f32], b: &[f32], k: usize) -> (Vec<f64>, Vec<f64>) {
        let (rows, n) = (x.len() / k, w.len() / k);
        let (mut out, mut mag) = (Vec::new(), Vec::new());
        for r in 0..rows {
            for c in 0..n {
                let (xr, wc) = (&x[r * k..(r + 1) * k], &w[c * k..(c + 1) * k]);
                let dot = xr
                    .iter()
                    .zip(wc)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b));
                let abs = xr.iter().zip(wc).map(|(&a, &b)| f64::from(a * b).abs());
                out.push(dot.sum::<f64>() + f64::from(b[c]));
                mag.push(abs.sum());
            }
        }
        (out, mag)
    }

    /// Odd sizes on purpose: an odd `in_dim` (a padded pair), output columns that fill no
    /// whole panel, rows that fill no whole micro-tile and span several tasks.
    #[test]
    fn products_stay_within_the_rounding_bound_of_each_mode() {
        if !bf16_supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let mut rng = StdRng::seed_from_u64(3);
        for (rows, k, n) in [(1, 1, 1), (7, 5, 17), (MC + 13, 33, NR + 5), (150, 384, 96)] {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-0.1..0.1)).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let (want, mag) = reference(&x, &w, &b, k);
            // Per product: bf16 rounds both operands (2^-9 each); bf16x3 loses lo·lo (2^-18)
            // and the rounding of both low parts (2^-17 each). Plus f32 accumulation.
            for (mode, rel) in [
                (Bf16Mode::Bf16, 2f64.powi(-8)),
                (Bf16Mode::Bf16x3, 2f64.powi(-15)),
            ] {
                let packed = PackedLinear::new(&w, k, mode).expect("pack");
                let mut got = Vec::new();
                packed.forward(&x, Some(&b), &mut got).expect("forward");
                assert_eq!(got.len(), rows * n);
                for (i, (&g, (&e, &m))) in got.iter().zip(want.iter().zip(&mag)).enumerate() {
                    let bound = rel * m + 1e-6 * (1.0 + e.abs());
                    assert!(
                        (f64::from(g) - e).abs() <= bound,
                        "{mode:?} [{rows}x{k}]·[{n}x{k}]ᵀ at {i}: {g} vs {e} (bound {bound})"
                    );
                }
                let mut no_bias = Vec::new();
                packed.forward(&x, None, &mut no_bias).expect("forward");
                for ((nb, g), bias) in no_bias.iter().zip(&got).zip(b.iter().cycle()) {
                    assert!((nb + bias - g).abs() <= 1e-5 * (1.0 + g.abs()));
                }
            }
        }
    }

    #[test]
    fn bf16x3_is_far_more_accurate_than_bf16() {
        if !bf16_supported() {
            eprintln!("skipped: this CPU lacks AVX512-BF16");
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        let (rows, k, n) = (64, 384, 64);
        let x: Vec<f32> = (0..rows * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-0.1..0.1)).collect();
        let (want, _) = reference(&x, &w, &vec![0.0; n], k);
        let err = |mode| {
            let mut got = Vec::new();
            let packed = PackedLinear::new(&w, k, mode).expect("pack");
            packed.forward(&x, None, &mut got).expect("forward");
            got.iter()
                .zip(&want)
                .map(|(&g, &e)| (f64::from(g) - e).abs())
                .fold(0.0, f64::max)
        };
        let (single, triple) = (err(Bf16Mode::Bf16), err(Bf16Mode::Bf16x3));
        assert!(
            triple * 100.0 < single,
            "bf16 {single:e}, bf16x3 {triple:e}"
        );
    }

    #[test]
    fn inconsistent_sizes_are_refused_and_empty_products_are_empty() {
        let packed = PackedLinear::new(&[0.5; 12], 4, Bf16Mode::Bf16).expect("3 x 4 weights");
        assert_eq!((packed.in_dim(), packed.out_dim()), (4, 3));
        let mut out = Vec::new();
        assert!(packed.forward(&[1.0; 6], None, &mut out).is_err());
        assert!(
            packed
                .forward(&[1.0; 8], Some(&[0.0; 2]), &mut out)
                .is_err()
        );
        assert!(PackedLinear::new(&[0.5; 10], 4, Bf16Mode::Bf16).is_err());
        // No rows, or no outputs: an empty product, not a panic.
        packed
            .forward(&[], Some(&[0.0; 3]), &mut out)
            .expect("no rows");
        assert!(out.is_empty());
        let none = PackedLinear::new(&[], 4, Bf16Mode::Bf16x3).expect("0 x 4 weights");
        none.forward(&[1.0; 8], None, &mut out).expect("no outputs");
        assert!(out.is_empty());
        assert!(PackedLinear::new(&[], 0, Bf16Mode::Bf16x3).is_err());
    }

    #[test]
    fn splitting_keeps_sixteen_bits() {
        for x in [1.0f32, -2.718_281_7, 1e-3, 123_456.78, 0.1] {
            let (h, l) = split(x);
            let back = bf16_value(h) + bf16_value(l);
            assert!(((back - x) / x).abs() < 2f32.powi(-16), "{x}: {back}");
            assert!(((bf16_value(h) - x) / x).abs() <= 2f32.powi(-9), "{x}");
        }
        assert_eq!(bf16_bits(1.0), 0x3f80);
        // Ties go to even: 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125.
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        assert!(bf16_value(bf16_bits(f32::NAN)).is_nan());
    }
}
