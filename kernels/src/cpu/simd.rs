//! Run-time selection of AVX-512 / AVX2+FMA builds of a kernel.
//!
//! The crate is compiled for the baseline target (no `target-cpu=native` is required), so each
//! hot loop is compiled three times: inside a `#[target_feature]` function for AVX-512, one for
//! AVX2+FMA, and for the baseline; the widest the CPU supports is chosen at run time (the
//! detection is cached by std). Helpers called from the loops are `#[inline(always)]` so that
//! they are compiled with the same features.

use std::sync::atomic::{AtomicU8, Ordering};

/// The widest instruction set the row kernels may use (matrix products are gemm's business).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Baseline = 0,
    Avx2 = 1,
    Avx512 = 2,
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(SimdLevel::Avx512 as u8);

/// Caps the instruction set the row kernels use, so that tests and benchmarks can run the
/// AVX2 and baseline builds on a machine that has AVX-512. The default is no cap; the CPU's
/// features still decide below the cap.
pub fn set_max_simd_level(level: SimdLevel) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

#[cfg(target_arch = "x86_64")]
fn allowed(level: SimdLevel) -> bool {
    MAX_LEVEL.load(Ordering::Relaxed) >= level as u8
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx512() -> bool {
    allowed(SimdLevel::Avx512)
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    allowed(SimdLevel::Avx2)
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
}

/// Defines `fn $name(args) -> ret { body }` that runs the body compiled for AVX-512 or
/// AVX2+FMA where the CPU supports them, and the baseline build otherwise.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if $crate::cpu::simd::has_avx512() {
                    // SAFETY: the CPU supports these features, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::cpu::simd::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

pub(crate) use simd_fn;
