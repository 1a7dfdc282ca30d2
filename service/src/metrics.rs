//! What the metrics of every Fleet process share: label values spelled in snake_case, as
//! Prometheus label values conventionally are, and as the wire spells error codes.

use fleet_schemas::ErrorCode;
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

/// A wire error code as a label value (`bad_signature`, `rate_limited`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodeLabel(pub ErrorCode);

impl EncodeLabelValue for CodeLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.as_str(), encoder)
    }
}

/// Implements `EncodeLabelValue` for a fieldless enum, each variant written as the text given
/// (prometheus-client's derive writes the variant's Rust name, `DeadLettered`).
#[macro_export]
macro_rules! label_values {
    ($enum:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $enum {
            /// Every value, so each labelled series can be made at 0 before its first event.
            pub const ALL: &'static [$enum] = &[$($enum::$variant),+];

            /// The value as labels and logs spell it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($enum::$variant => $text,)+
                }
            }
        }

        impl ::prometheus_client::encoding::EncodeLabelValue for $enum {
            fn encode(
                &self,
                encoder: &mut ::prometheus_client::encoding::LabelValueEncoder,
            ) -> ::std::result::Result<(), ::std::fmt::Error> {
                ::prometheus_client::encoding::EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        encoding::{EncodeLabelSet, text::encode},
        metrics::{counter::Counter, family::Family},
        registry::Registry,
    };

    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct Labels {
        code: Option<CodeLabel>,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Fate {
        Ok,
        DeadLettered,
    }

    label_values!(Fate {
        Ok => "ok",
        DeadLettered => "dead_lettered",
    });

    #[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
    struct FateLabels {
        fate: Fate,
    }

    #[test]
    fn every_value_is_listed() {
        assert_eq!(Fate::ALL, [Fate::Ok, Fate::DeadLettered]);
    }

    #[test]
    fn an_enum_is_written_as_its_label_text() {
        let family = Family::<FateLabels, Counter>::default();
        let mut registry = Registry::default();
        registry.register("jobs", "test", family.clone());
        family
            .get_or_create(&FateLabels {
                fate: Fate::DeadLettered,
            })
            .inc();
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("jobs_total{fate=\"dead_lettered\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn a_code_is_written_as_on_the_wire_and_no_code_as_empty() {
        let family = Family::<Labels, Counter>::default();
        let mut registry = Registry::default();
        registry.register("answers", "test", family.clone());
        family
            .get_or_create(&Labels {
                code: Some(CodeLabel(ErrorCode::BadSignature)),
            })
            .inc();
        family.get_or_create(&Labels { code: None }).inc();
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("answers_total{code=\"bad_signature\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("answers_total{code=\"\"} 1\n"), "{text}");
    }
}
