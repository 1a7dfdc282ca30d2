//! Matrix-product rates of the linear layer at the model's shapes (all-MiniLM-L6-v2: QKV
//! 384->1152, attention output 384->384, intermediate 384->1536, output 1536->384) in each
//! precision, against the peak rates of this CPU's f32 FMA and bf16 dot-product instructions
//! (register-only loops on one thread, the best of many short rounds so that a shared
//! machine's preemptions drop out; times the thread count): the roofline of BENCHMARKS.md.
//!
//! cargo run --release -p fleet-kernels --example gemm_rate -- [rows...]   (default 2048 4096)

use std::time::Instant;

use fleet_kernels::cpu::{self, Bf16Mode, PackedLinear};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (name, in_dim, out_dim) of one encoder layer's products.
const SHAPES: [(&str, usize, usize); 4] = [
    ("qkv", 384, 1152),
    ("attn_out", 384, 384),
    ("inter", 384, 1536),
    ("out", 1536, 384),
];

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// Seconds per call of `f`, the best of several timed rounds of at least 0.2 s each.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        let mut n = 0u32;
        while start.elapsed().as_secs_f64() < 0.2 {
            f();
            n += 1;
        }
        best = best.min(start.elapsed().as_secs_f64() / f64::from(n));
    }
    best
}

#[cfg(target_arch = "x86_64")]
mod peak {
    /// Instructions per call of each loop: `ITERS` x 16 independent accumulators (more than
    /// latency times throughput), each 16 lanes: an FMA is 2 FLOPs a lane, a bf16 dot product
    /// 4 (a pair). In assembly: compiled from intrinsics, the loop kept some accumulators on
    /// the stack and measured those spills instead.
    pub const ITERS: usize = 1 << 14;
    pub const ACC: usize = 16;

    macro_rules! peak_loop {
        ($name:ident, $features:literal, $insn:literal) => {
            #[target_feature(enable = $features)]
            pub fn $name() {
                // SAFETY: registers only (all clobbered ones declared), no memory, no stack;
                // the features are enabled on this function.
                unsafe {
                    std::arch::asm!(
                        "vpxord zmm16, zmm16, zmm16",
                        "vpxord zmm17, zmm17, zmm17",
                        "2:",
                        concat!($insn, " zmm0, zmm16, zmm17"),
                        concat!($insn, " zmm1, zmm16, zmm17"),
                        concat!($insn, " zmm2, zmm16, zmm17"),
                        concat!($insn, " zmm3, zmm16, zmm17"),
                        concat!($insn, " zmm4, zmm16, zmm17"),
                        concat!($insn, " zmm5, zmm16, zmm17"),
                        concat!($insn, " zmm6, zmm16, zmm17"),
                        concat!($insn, " zmm7, zmm16, zmm17"),
                        concat!($insn, " zmm8, zmm16, zmm17"),
                        concat!($insn, " zmm9, zmm16, zmm17"),
                        concat!($insn, " zmm10, zmm16, zmm17"),
                        concat!($insn, " zmm11, zmm16, zmm17"),
                        concat!($insn, " zmm12, zmm16, zmm17"),
                        concat!($insn, " zmm13, zmm16, zmm17"),
                        concat!($insn, " zmm14, zmm16, zmm17"),
                        concat!($insn, " zmm15, zmm16, zmm17"),
                        "dec {n}",
                        "jnz 2b",
                        n = inout(reg) ITERS => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm12") _, out("zmm13") _, out("zmm14") _, out("zmm15") _,
                        out("zmm16") _, out("zmm17") _,
                        options(nomem, nostack),
                    );
                }
            }
        };
    }

    peak_loop!(fma, "avx512f", "vfmadd231ps");
    peak_loop!(dpbf16, "avx512f,avx512bf16", "vdpbf16ps");
}

fn main() {
    let mut rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("rows: a number"))
        .collect();
    if rows.is_empty() {
        rows = vec![2048, 4096];
    }
    let threads = rayon::current_num_threads();
    let bf16 = cpu::bf16_supported();
    println!("{threads} threads; AVX512-BF16: {bf16}");

    #[cfg(target_arch = "x86_64")]
    if cpu::bf16_supported() {
        let best = |f: fn()| {
            (0..200)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        let per_call = (peak::ITERS * peak::ACC * 16) as f64;
        // SAFETY: AVX-512 F and BF16 are present (bf16_supported).
        let f32_peak = 2.0 * per_call / best(|| unsafe { peak::fma() });
        let bf16_peak = 4.0 * per_call / best(|| unsafe { peak::dpbf16() });
        println!(
            "peak per core: f32 FMA {:.1} GFLOP/s, bf16 dot product {:.1} GFLOP/s; x {threads} threads: {:.1} and {:.1}",
            f32_peak / 1e9,
            bf16_peak / 1e9,
            f32_peak * threads as f64 / 1e9,
            bf16_peak * threads as f64 / 1e9
        );
    }

    let mut rng = StdRng::seed_from_u64(7);
    for &m in &rows {
        for (name, k, n) in SHAPES {
            let x = random(&mut rng, m * k, 1.0);
            let w = random(&mut rng, n * k, 0.05);
            let b = random(&mut rng, n, 0.1);
            let flops = 2.0 * (m * n * k) as f64;
            let mut want = Vec::new();
            let f32_s = time(|| cpu::linear(&x, k, &w, Some(&b), &mut want).expect("f32"));
            print!(
                "rows {m:5} {name:8} [{k:4} -> {n:4}]: f32 {:6.1} GFLOP/s",
                flops / f32_s / 1e9
            );
            if bf16 {
                for mode in [Bf16Mode::Bf16, Bf16Mode::Bf16x3] {
                    let p = PackedLinear::new(&w, k, mode).expect("pack");
                    let mut got = Vec::new();
                    let s = time(|| p.forward(&x, Some(&b), &mut got).expect("bf16"));
                    let err = got
                        .iter()
                        .zip(&want)
                        .map(|(g, w)| (g - w).abs())
                        .fold(0.0f32, f32::max);
                    print!(
                        ", {mode:?} {:6.1} GFLOP/s (max abs diff {err:.1e})",
                        flops / s / 1e9
                    );
                }
            }
            println!();
        }
    }
}
