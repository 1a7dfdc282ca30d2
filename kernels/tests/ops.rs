//! Each fused op against a plain f64 reference written here, on seeded random inputs that
//! differ per case, over odd and real sizes. Tolerances are stated per test.

use candle_core::{Device, Tensor};
use fleet_kernels::cpu::{SimdLevel, math, set_max_simd_level};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HIDDEN_SIZES: [usize; 4] = [7, 33, 384, 1536];
const LENGTHS: [usize; 4] = [1, 3, 17, 256];

fn rng(case: u64) -> StdRng {
    StdRng::seed_from_u64(0x5eed_0000 + case)
}

fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape, &Device::Cpu).expect("test tensor")
}

fn u32_tensor(v: &[u32]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).expect("test tensor")
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 output")
}

/// Asserts `|got - want| <= tol(i)` everywhere and that nothing is NaN.
fn assert_close(what: &str, got: &[f32], want: &[f64], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let t = tol(i);
        assert!(
            !g.is_nan() && (f64::from(g) - w).abs() <= t,
            "{what}: element {i}: got {g}, want {w} (tolerance {t:e})"
        );
    }
}

fn cu_seqlens(lengths: &[usize]) -> Vec<u32> {
    let mut cu = vec![0u32];
    for &l in lengths {
        cu.push(cu[cu.len() - 1] + l as u32);
    }
    cu
}

fn gelu_ref(x: f64) -> f64 {
    0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))
}

#[test]
fn fast_erf_and_exp_match_libm() {
    // erf: absolute error <= 1e-6 on a fine grid over [-6, 6] (beyond +-4 it is +-1).
    for i in -60_000..=60_000 {
        let x = i as f32 * 1e-4;
        let err = (f64::from(math::erf(x)) - libm::erf(f64::from(x))).abs();
        assert!(err <= 1e-6, "erf({x}): error {err:e}");
    }
    // exp: relative error <= 1e-6 over [-80, 88], exactly 0 below, no infinities above.
    for i in -80_000..=87_900 {
        let x = i as f32 * 1e-3;
        let want = f64::from(x).exp();
        let rel = ((f64::from(math::exp(x)) - want) / want).abs();
        assert!(rel <= 1e-6, "exp({x}): relative error {rel:e}");
    }
    assert!(math::exp(1e30).is_finite() && math::exp(f32::INFINITY).is_finite());
    for x in [-80.01f32, -100.0, -1e30, f32::NEG_INFINITY] {
        assert_eq!(math::exp(x), 0.0, "exp({x})");
    }
}

/// Tolerance 2e-6 + 1e-6 |y|: the erf approximation (1e-6 absolute on erf, halved and scaled by
/// |x| in gelu) plus f32 rounding.
fn check_bias_gelu_matches_f64_reference() {
    for (case, &n) in HIDDEN_SIZES.iter().enumerate() {
        for (rows_case, rows) in [1usize, 5, 130].into_iter().enumerate() {
            let mut r = rng((case * 10 + rows_case) as u64);
            let x = uniform(&mut r, rows * n, -6.0, 6.0);
            let b = uniform(&mut r, n, -1.0, 1.0);
            let got = values(
                &fleet_kernels::bias_gelu(&tensor(&x, &[rows, n]), &tensor(&b, &[n]))
                    .expect("bias_gelu"),
            );
            let want: Vec<f64> = x
                .iter()
                .enumerate()
                .map(|(i, &x)| gelu_ref(f64::from(x) + f64::from(b[i % n])))
                .collect();
            assert_close(&format!("bias_gelu n={n} rows={rows}"), &got, &want, |i| {
                2e-6 + 1e-6 * want[i].abs()
            });
        }
    }
}

/// Tolerance 1e-5 + 1e-5 |y|: f32 statistics over up to 1536 values.
fn check_add_layer_norm_matches_f64_reference() {
    let eps = 1e-12f64;
    for (case, &n) in HIDDEN_SIZES.iter().enumerate() {
        for (rows_case, rows) in [1usize, 4, 67].into_iter().enumerate() {
            let mut r = rng(100 + (case * 10 + rows_case) as u64);
            // An offset in x checks that the mean is removed before the variance.
            let x: Vec<f32> = uniform(&mut r, rows * n, -3.0, 3.0)
                .into_iter()
                .map(|v| v + 5.0)
                .collect();
            let res = uniform(&mut r, rows * n, -2.0, 2.0);
            let w = uniform(&mut r, n, 0.5, 1.5);
            let b = uniform(&mut r, n, -0.5, 0.5);
            let params: Vec<f32> = w.iter().chain(&b).copied().collect();
            let got = values(
                &fleet_kernels::add_layer_norm(
                    &tensor(&x, &[rows, n]),
                    &tensor(&res, &[rows, n]),
                    &tensor(&params, &[2, n]),
                    eps as f32,
                )
                .expect("add_layer_norm"),
            );
            let mut want = Vec::with_capacity(rows * n);
            for row in 0..rows {
                let v: Vec<f64> = (0..n)
                    .map(|c| f64::from(x[row * n + c]) + f64::from(res[row * n + c]))
                    .collect();
                let mean = v.iter().sum::<f64>() / n as f64;
                let var = v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n as f64;
                for c in 0..n {
                    want.push(
                        (v[c] - mean) / (var + eps).sqrt() * f64::from(w[c]) + f64::from(b[c]),
                    );
                }
            }
            assert_close(
                &format!("add_layer_norm n={n} rows={rows}"),
                &got,
                &want,
                |i| 1e-5 + 1e-5 * want[i].abs(),
            );
        }
    }
}

fn softmax_ref(row: &[f32], valid: usize, scale: f64) -> Vec<f64> {
    let mut out = vec![0.0; row.len()];
    if valid == 0 {
        return out;
    }
    let m = row[..valid]
        .iter()
        .map(|&s| scale * f64::from(s))
        .fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = row[..valid]
        .iter()
        .map(|&s| (scale * f64::from(s) - m).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    for (o, e) in out.iter_mut().zip(e) {
        *o = e / sum;
    }
    out
}

/// Tolerance 1e-6 absolute on probabilities; masked keys and fully masked rows exactly 0.
fn check_scaled_masked_softmax_matches_f64_reference() {
    for (case, &k_len) in LENGTHS.iter().enumerate() {
        let mut r = rng(200 + case as u64);
        let (batch, heads, q_len) = (3usize, 2usize, k_len.min(5));
        // One full row, one partial, one fully masked.
        let lengths = [k_len as u32, (k_len as u32).div_ceil(2), 0];
        let scores = uniform(&mut r, batch * heads * q_len * k_len, -20.0, 20.0);
        let scale = 0.125f32;
        let got = values(
            &fleet_kernels::scaled_masked_softmax(
                &tensor(&scores, &[batch, heads, q_len, k_len]),
                &u32_tensor(&lengths),
                scale,
            )
            .expect("softmax"),
        );
        let mut want = Vec::new();
        for (row_idx, row) in scores.chunks(k_len).enumerate() {
            let b = row_idx / (heads * q_len);
            want.extend(softmax_ref(row, lengths[b] as usize, f64::from(scale)));
        }
        assert_close(&format!("softmax k_len={k_len}"), &got, &want, |_| 1e-6);
        for (row_idx, row) in got.chunks(k_len).enumerate() {
            let len = lengths[row_idx / (heads * q_len)] as usize;
            assert!(
                row[len..].iter().all(|&p| p == 0.0),
                "masked keys must be 0"
            );
            if len > 0 {
                let s: f32 = row.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "row sums to {s}");
            }
        }
    }
}

#[test]
fn scaled_masked_softmax_rejects_length_past_keys() {
    let scores = tensor(&[0.0; 4], &[1, 1, 1, 4]);
    assert!(fleet_kernels::scaled_masked_softmax(&scores, &u32_tensor(&[5]), 1.0).is_err());
}

/// Tolerance 1e-5 absolute: values in [-1, 1], f32 dot products over head_dim and keys.
fn check_varlen_attention_matches_f64_reference() {
    let cases: [(&[usize], usize, usize); 4] = [
        (&[1], 1, 7),
        (&[3, 17, 1], 3, 11),
        (&[256, 3], 12, 32),
        (&[17, 0, 5, 256, 1], 4, 33),
    ];
    for (case, &(lengths, heads, head_dim)) in cases.iter().enumerate() {
        let mut r = rng(300 + case as u64);
        let hidden = heads * head_dim;
        let tokens: usize = lengths.iter().sum();
        let qkv = uniform(&mut r, tokens * 3 * hidden, -1.0, 1.0);
        let cu = cu_seqlens(lengths);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let got = values(
            &fleet_kernels::varlen_attention(
                &tensor(&qkv, &[tokens, 3 * hidden]),
                &u32_tensor(&cu),
                heads,
                scale,
            )
            .expect("attention"),
        );
        let at = |t: usize, part: usize, h: usize, d: usize| {
            f64::from(qkv[t * 3 * hidden + part * hidden + h * head_dim + d])
        };
        let mut want = vec![0.0f64; tokens * hidden];
        for b in 0..lengths.len() {
            let (s, e) = (cu[b] as usize, cu[b + 1] as usize);
            for h in 0..heads {
                for t in s..e {
                    let logits: Vec<f64> = (s..e)
                        .map(|j| {
                            f64::from(scale)
                                * (0..head_dim)
                                    .map(|d| at(t, 0, h, d) * at(j, 1, h, d))
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                    let z: f64 = p.iter().sum();
                    for d in 0..head_dim {
                        want[t * hidden + h * head_dim + d] =
                            (s..e).zip(&p).map(|(j, p)| p / z * at(j, 2, h, d)).sum();
                    }
                }
            }
        }
        assert_close(
            &format!("attention lengths={lengths:?} heads={heads} d={head_dim}"),
            &got,
            &want,
            |_| 1e-5,
        );
    }
}

#[test]
fn varlen_attention_rejects_bad_offsets() {
    let qkv = tensor(&[0.0; 2 * 6], &[2, 6]);
    for cu in [&[0u32, 3][..], &[1, 2], &[0, 2, 1, 2], &[]] {
        assert!(
            fleet_kernels::varlen_attention(&qkv, &u32_tensor(cu), 1, 1.0).is_err(),
            "cu_seqlens {cu:?} must be rejected"
        );
    }
}

/// Tolerance 1e-6 + 1e-6 |y|: f64 sums, one f32 rounding.
fn check_mean_pool_normalize_matches_f64_reference() {
    for (case, &dim) in HIDDEN_SIZES.iter().enumerate() {
        let mut r = rng(400 + case as u64);
        // Lengths include 0: a fully masked sequence pools to zeros.
        let lengths = [1usize, 3, 0, 17, 256];
        let flags = [1u32, 0, 1, 1, 0];
        let cu = cu_seqlens(&lengths);
        let tokens: usize = lengths.iter().sum();
        let hidden = uniform(&mut r, tokens * dim, -2.0, 2.0);
        let got = values(
            &fleet_kernels::mean_pool_normalize(
                &tensor(&hidden, &[tokens, dim]),
                &u32_tensor(&cu),
                &u32_tensor(&flags),
            )
            .expect("pool"),
        );
        let mut want = Vec::new();
        for b in 0..lengths.len() {
            let (s, e) = (cu[b] as usize, cu[b + 1] as usize);
            let mut mean = vec![0.0f64; dim];
            for t in s..e {
                for (m, &h) in mean.iter_mut().zip(&hidden[t * dim..(t + 1) * dim]) {
                    *m += f64::from(h);
                }
            }
            let count = (e - s).max(1) as f64;
            mean.iter_mut().for_each(|m| *m /= count);
            if flags[b] != 0 {
                let norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt().max(1e-12);
                mean.iter_mut().for_each(|m| *m /= norm);
            }
            want.extend(mean);
        }
        assert_close(&format!("pool dim={dim}"), &got, &want, |i| {
            1e-6 + 1e-6 * want[i].abs()
        });
        let row = |b: usize| &got[b * dim..(b + 1) * dim];
        assert!(
            row(2).iter().all(|&v| v == 0.0),
            "empty sequence pools to zeros"
        );
        let norm0: f32 = row(0).iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(
            (norm0 - 1.0).abs() < 1e-5,
            "normalised row has norm {norm0}"
        );
    }
}

/// Tolerance 1e-6 * sum_k |x_k w_k| + 1e-6: a few f32 roundings per accumulated product.
#[test]
fn linear_matches_f64_reference() {
    let cases = [
        (1usize, 7usize, 33usize),
        (17, 33, 7),
        (256, 384, 1152),
        (67, 1536, 384),
    ];
    for (case, &(rows, k, n)) in cases.iter().enumerate() {
        let mut r = rng(500 + case as u64);
        let x = uniform(&mut r, rows * k, -1.0, 1.0);
        let w = uniform(&mut r, n * k, -0.1, 0.1);
        let b = uniform(&mut r, n, -1.0, 1.0);
        let (xt, wt, bt) = (
            tensor(&x, &[rows, k]),
            tensor(&w, &[n, k]),
            tensor(&b, &[n]),
        );
        for with_bias in [true, false] {
            let got =
                values(&fleet_kernels::linear(&xt, &wt, with_bias.then_some(&bt)).expect("linear"));
            let mut want = Vec::with_capacity(rows * n);
            let mut bound = Vec::with_capacity(rows * n);
            for i in 0..rows {
                for j in 0..n {
                    let terms = (0..k).map(|c| f64::from(x[i * k + c]) * f64::from(w[j * k + c]));
                    let bias = if with_bias { f64::from(b[j]) } else { 0.0 };
                    want.push(terms.clone().sum::<f64>() + bias);
                    bound.push(terms.map(f64::abs).sum::<f64>() + bias.abs());
                }
            }
            assert_close(
                &format!("linear {rows}x{k}x{n} bias={with_bias}"),
                &got,
                &want,
                |i| 1e-6 * bound[i] + 1e-6,
            );
        }
    }
}

#[test]
fn ops_reject_mismatched_shapes() {
    let x = tensor(&[0.0; 6], &[2, 3]);
    assert!(fleet_kernels::bias_gelu(&x, &tensor(&[0.0; 2], &[2])).is_err());
    assert!(fleet_kernels::linear(&x, &tensor(&[0.0; 4], &[2, 2]), None).is_err());
    assert!(
        fleet_kernels::add_layer_norm(
            &x,
            &tensor(&[0.0; 3], &[1, 3]),
            &tensor(&[0.0; 6], &[2, 3]),
            1e-5
        )
        .is_err()
    );
    assert!(
        fleet_kernels::mean_pool_normalize(&x, &u32_tensor(&[0, 2]), &u32_tensor(&[1, 1])).is_err()
    );
    // f64 input is refused with an error, not a panic.
    let x64 = Tensor::zeros((2, 3), candle_core::DType::F64, &Device::Cpu).expect("zeros");
    assert!(fleet_kernels::bias_gelu(&x64, &tensor(&[0.0; 3], &[3])).is_err());
}

#[test]
fn bias_gelu_matches_f64_reference() {
    check_bias_gelu_matches_f64_reference();
}

#[test]
fn add_layer_norm_matches_f64_reference() {
    check_add_layer_norm_matches_f64_reference();
}

#[test]
fn scaled_masked_softmax_matches_f64_reference() {
    check_scaled_masked_softmax_matches_f64_reference();
}

#[test]
fn varlen_attention_matches_f64_reference() {
    check_varlen_attention_matches_f64_reference();
}

#[test]
fn mean_pool_normalize_matches_f64_reference() {
    check_mean_pool_normalize_matches_f64_reference();
}

/// The AVX2 and baseline builds of the row kernels, which the tests above do not reach on a
/// machine with AVX-512, against the same references. (Other tests may run meanwhile at any
/// level; their results are level-independent within the tolerances.)
#[test]
fn every_simd_level_matches_f64_reference() {
    for level in [SimdLevel::Baseline, SimdLevel::Avx2, SimdLevel::Avx512] {
        set_max_simd_level(level);
        check_bias_gelu_matches_f64_reference();
        check_add_layer_norm_matches_f64_reference();
        check_scaled_masked_softmax_matches_f64_reference();
        check_varlen_attention_matches_f64_reference();
        check_mean_pool_normalize_matches_f64_reference();
    }
}
