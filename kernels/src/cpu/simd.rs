//! Run-time selection of an AVX2+FMA build of a kernel.
//!
//! The crate is compiled for the baseline target (no `target-cpu=native` is required), so each
//! hot loop is compiled twice: once inside a `#[target_feature(enable = "avx2,fma")]` function,
//! chosen at run time when the CPU has both, and once for the baseline as the fallback. Helpers
//! called from the loops are `#[inline(always)]` so that they are compiled with the same features.

#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Defines `fn $name(args) -> ret { body }` that runs the body compiled for AVX2+FMA where the
/// CPU supports it, and the baseline build otherwise.
macro_rules! simd_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
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
