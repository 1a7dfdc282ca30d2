//! The arithmetic of the encoder's linear layers (almost all of its work), chosen at load.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use fleet_kernels::cpu::{self, Bf16Mode};

/// How the linear layers multiply. Layer norm, softmax, GELU, attention, pooling and every
/// accumulation stay f32 in all modes.
///
/// Each mode has an accuracy contract ([`Precision::contract`]): the least cosine similarity
/// and the largest per-component difference its normalised embeddings may show against the
/// reference (sentence-transformers on PyTorch, f32; `fixtures/minilm_reference.json`), which
/// `model/tests/precision.rs` checks on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// f32 products (the `gemm` crate). Runs everywhere.
    F32,
    /// Weights and activations rounded to bf16, products accumulated in f32 (AVX512-BF16).
    /// About twice f32's matrix rate on such CPUs, with about 3 significant digits per
    /// product: a looser contract.
    Bf16,
    /// Compensated bf16: each operand split into bf16 high and low parts, three products
    /// accumulated in f32 (AVX512-BF16). Meets f32's contract; three bf16 products cost more
    /// than one f32 product where bf16 runs at only twice f32's rate (AVX-512, not AMX).
    Bf16x3,
    /// The fastest mode that meets [`Precision::DEFAULT_CONTRACT`] on this machine: see
    /// [`Precision::resolve`].
    #[default]
    Auto,
}

/// The least agreement a mode's embeddings keep with the reference, per input: the cosine
/// similarity, and the largest difference of one component (of L2-normalised vectors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub min_cosine: f64,
    pub max_abs_diff: f32,
}

impl Precision {
    /// What f32 has always promised and what `Auto` keeps.
    pub const DEFAULT_CONTRACT: Tolerance = Tolerance {
        min_cosine: 0.9999,
        max_abs_diff: 1e-4,
    };

    /// The accuracy this mode promises (`Auto` promises the default contract).
    ///
    /// Measured (BENCHMARKS.md), worst input of the fixture against the reference and of the
    /// 4,096-text corpus against f32: f32 2.5e-7 from the reference; bf16x3 2.3e-6 and 2.7e-6;
    /// bf16 a cosine of 0.99997 and 0.99996, differences up to 1.2e-3 and 1.6e-3. The bf16
    /// contract leaves about 3x that room for other inputs.
    pub fn contract(self) -> Tolerance {
        match self {
            Self::F32 | Self::Bf16x3 | Self::Auto => Self::DEFAULT_CONTRACT,
            Self::Bf16 => Tolerance {
                min_cosine: 0.9999,
                max_abs_diff: 5e-3,
            },
        }
    }

    /// The concrete mode to run on `device`: `Auto` resolved, and an explicit mode checked
    /// against what the device can do.
    ///
    /// `Auto` is the fastest mode whose contract is the default one and whose kernels this
    /// machine has: f32 or bf16x3. bf16x3 does three bf16 products for each f32 one, so it wins
    /// only where bf16 runs more than three times faster than f32, which takes AMX (16x16 bf16
    /// tiles); with AVX512-BF16 alone bf16 runs at about twice f32's rate and bf16x3 measured
    /// 0.71-0.77x f32 end to end (BENCHMARKS.md). There is no AMX kernel yet, so `Auto` is f32
    /// on every CPU today; an AMX kernel would make it bf16x3 where the CPU has AMX.
    pub fn resolve(self, device: &Device) -> Result<Precision, PrecisionUnavailable> {
        match self {
            Self::Auto | Self::F32 => Ok(Self::F32),
            Self::Bf16 | Self::Bf16x3 if !device.is_cpu() => Err(PrecisionUnavailable {
                precision: self,
                reason: "the bf16 modes run on the CPU only (the CUDA kernels are f32)".into(),
            }),
            Self::Bf16 | Self::Bf16x3 if !cpu::bf16_supported() => Err(PrecisionUnavailable {
                precision: self,
                reason: "this CPU lacks AVX512-BF16".into(),
            }),
            Self::Bf16 | Self::Bf16x3 => Ok(self),
        }
    }

    /// The kernels' mode for the packed bf16 weights; `None` for f32 (and unresolved `Auto`).
    pub(crate) fn bf16_mode(self) -> Option<Bf16Mode> {
        match self {
            Self::Bf16 => Some(Bf16Mode::Bf16),
            Self::Bf16x3 => Some(Bf16Mode::Bf16x3),
            Self::F32 | Self::Auto => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::Bf16x3 => "bf16x3",
            Self::Auto => "auto",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A precision name other than `f32`, `bf16`, `bf16x3` and `auto`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision {0:?}: expected f32, bf16, bf16x3 or auto")]
pub struct ParsePrecisionError(String);

impl FromStr for Precision {
    type Err = ParsePrecisionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::F32, Self::Bf16, Self::Bf16x3, Self::Auto]
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParsePrecisionError(s.to_owned()))
    }
}

/// A precision asked for explicitly that this machine cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("precision {precision} is not available here: {reason}")]
pub struct PrecisionUnavailable {
    pub precision: Precision,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for p in [
            Precision::F32,
            Precision::Bf16,
            Precision::Bf16x3,
            Precision::Auto,
        ] {
            assert_eq!(p.to_string().parse::<Precision>(), Ok(p));
        }
        assert!("fp16".parse::<Precision>().is_err());
        assert_eq!(Precision::default(), Precision::Auto);
    }

    #[test]
    fn auto_and_f32_resolve_to_f32_on_any_cpu() {
        assert_eq!(Precision::Auto.resolve(&Device::Cpu), Ok(Precision::F32));
        assert_eq!(Precision::F32.resolve(&Device::Cpu), Ok(Precision::F32));
    }

    #[test]
    fn bf16_modes_resolve_exactly_where_the_cpu_has_avx512_bf16() {
        for p in [Precision::Bf16, Precision::Bf16x3] {
            match p.resolve(&Device::Cpu) {
                Ok(got) => {
                    assert!(cpu::bf16_supported());
                    assert_eq!(got, p);
                }
                Err(e) => {
                    assert!(!cpu::bf16_supported());
                    assert!(e.reason.contains("AVX512-BF16"), "{e}");
                }
            }
        }
    }
}
