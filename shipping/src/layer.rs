//! The tracing layer: each event, with the fields of the spans it was written in, becomes one
//! JSON document pushed into the buffer. Audit events (target [`AUDIT_TARGET`]) go to the audit
//! index, every other event to the logs index.

use std::{sync::Arc, time::SystemTime};

use serde_json::{Map, Value};
use tracing::{
    Event, Subscriber,
    field::{Field, Visit},
    span,
};
use tracing_subscriber::{layer::Context, registry::LookupSpan};

use crate::{
    AUDIT_TARGET, Index,
    buffer::{Buffer, Day, Line},
};

/// Targets whose events are never shipped: shipping's own (its summary and warnings), and the
/// HTTP stack it sends with, so sending a batch never writes lines that need another batch.
const NOT_SHIPPED: [&str; 8] = [
    "fleet_shipping",
    "elasticsearch",
    "reqwest",
    "hyper",
    "hyper_util",
    "h2",
    "rustls",
    "tower",
];

/// The fields lifted to the top of a document, from the event or else from its spans, so one
/// term query on `job_id` (or `trace_id`) finds a job's lines in either index.
const LIFTED: [&str; 5] = ["job_id", "tenant", "model", "key_id", "trace_id"];

fn shipped(target: &str) -> bool {
    !NOT_SHIPPED.iter().any(|crate_name| {
        target
            .strip_prefix(crate_name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// A span's fields as JSON, kept in the span's extensions.
struct SpanFields(Map<String, Value>);

/// Feeds the buffer; see the crate's documentation for the document's shape.
pub struct ShippingLayer {
    buffer: Arc<Buffer>,
    service: Value,
}

impl ShippingLayer {
    pub(crate) fn new(buffer: Arc<Buffer>, service: &str) -> ShippingLayer {
        ShippingLayer {
            buffer,
            service: Value::String(service.to_owned()),
        }
    }
}

impl<S> tracing_subscriber::Layer<S> for ShippingLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(SpanFields(fields)) = extensions.get_mut::<SpanFields>() {
            values.record(&mut JsonVisitor(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let metadata = event.metadata();
        let target = metadata.target();
        if !shipped(target) {
            return;
        }
        let index = if target == AUDIT_TARGET {
            Index::Audit
        } else {
            Index::Logs
        };
        let timestamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        let Some(day) = Day::of_rfc3339(&timestamp) else {
            return;
        };
        // The spans' fields, the outermost first so an inner span's value wins.
        let mut span_fields = Map::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(SpanFields(fields)) = span.extensions().get::<SpanFields>() {
                    span_fields.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
        }
        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        let mut doc = Map::new();
        doc.insert("@timestamp".into(), Value::String(timestamp));
        doc.insert("service".into(), self.service.clone());
        doc.insert("level".into(), Value::String(metadata.level().to_string()));
        doc.insert("target".into(), Value::String(target.to_owned()));
        if let Some(message) = fields.remove("message") {
            doc.insert("message".into(), message);
        }
        for key in LIFTED {
            let value = fields.get(key).or_else(|| span_fields.get(key));
            // A span field declared Empty and never recorded is absent; an empty one (a job id
            // not read) says nothing either.
            if let Some(value) = value.filter(|v| v.as_str() != Some("")) {
                doc.insert(key.to_owned(), value.clone());
            }
        }
        match index {
            // An audit event's fields are fixed by its writer: they are the document.
            Index::Audit => {
                for (key, value) in fields {
                    doc.entry(key).or_insert(value);
                }
            }
            Index::Logs => {
                if !fields.is_empty() {
                    doc.insert("fields".into(), Value::Object(fields));
                }
                if !span_fields.is_empty() {
                    doc.insert("span".into(), Value::Object(span_fields));
                }
            }
        }
        // A map of JSON values always serialises.
        let Ok(json) = serde_json::to_string(&doc) else {
            return;
        };
        self.buffer.push(Line { index, day, json });
    }
}

/// Records tracing fields as JSON values: numbers and booleans as such, the rest as text.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let value = serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number);
        self.0.insert(field.name().to_owned(), value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::metrics::ShippingMetrics;

    fn capture(f: impl FnOnce()) -> Vec<(Index, Value)> {
        let buffer = Arc::new(Buffer::new(100, 1 << 16, 100, ShippingMetrics::default()));
        let layer = ShippingLayer::new(buffer.clone(), "test");
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f);
        buffer
            .take(100)
            .into_iter()
            .map(|line| {
                let doc = serde_json::from_str(&line.json).expect("a JSON document");
                (line.index, doc)
            })
            .collect()
    }

    #[test]
    fn a_line_carries_its_spans_fields_and_the_job_ids_on_top() {
        let docs = capture(|| {
            let outer =
                tracing::info_span!("job", job_id = "j-1", tenant = "acme", trace_id = "t1");
            let _outer = outer.enter();
            let inner = tracing::info_span!("step", model = "m", tenant = "inner");
            let _inner = inner.enter();
            // (This module's own target is shipping's, never shipped.)
            tracing::info!(target: "fleet_dispatcher", seq = 7, "job queued");
        });
        assert_eq!(docs.len(), 1);
        let (index, doc) = &docs[0];
        assert_eq!(*index, Index::Logs);
        assert_eq!(doc["message"], "job queued");
        assert_eq!(doc["level"], "INFO");
        assert_eq!(doc["service"], "test");
        assert_eq!(doc["job_id"], "j-1");
        assert_eq!(doc["trace_id"], "t1");
        assert_eq!(doc["model"], "m");
        assert_eq!(doc["tenant"], "inner", "the innermost span wins");
        assert_eq!(doc["fields"]["seq"], 7);
        assert_eq!(doc["span"]["job_id"], "j-1");
        let day = Day::of_rfc3339(doc["@timestamp"].as_str().expect("a timestamp"));
        assert!(day.is_some(), "{doc}");
    }

    #[test]
    fn audit_events_go_to_the_audit_index_with_their_fields_on_top() {
        let docs = capture(|| {
            let span = tracing::info_span!("job", job_id = "j-2", key_id = "k1");
            let _span = span.enter();
            tracing::info!(target: AUDIT_TARGET, action = "admission", outcome = "rejected",
                code = "expired", tenant = "acme", "job admission");
        });
        let (index, doc) = &docs[0];
        assert_eq!(*index, Index::Audit);
        assert_eq!(doc["action"], "admission");
        assert_eq!(doc["code"], "expired");
        assert_eq!(doc["tenant"], "acme");
        assert_eq!(doc["job_id"], "j-2", "from the span");
        assert_eq!(doc["key_id"], "k1");
    }

    #[test]
    fn shippings_own_lines_and_its_http_stacks_are_not_shipped() {
        let docs = capture(|| {
            tracing::warn!(target: "fleet_shipping", "dropped lines");
            tracing::warn!(target: "fleet_shipping::sender", "server down");
            tracing::debug!(target: "hyper_util::client", "connecting");
            tracing::info!(target: "hyperion", "shipped: only a prefix in common");
        });
        let targets: Vec<_> = docs.iter().map(|(_, doc)| doc["target"].clone()).collect();
        assert_eq!(targets, [Value::from("hyperion")]);
    }

    #[test]
    fn an_empty_job_id_is_not_lifted() {
        let docs = capture(|| {
            let span = tracing::info_span!("job", job_id = "", tenant = tracing::field::Empty);
            let _span = span.enter();
            tracing::warn!(target: "fleet_dispatcher", "job rejected");
        });
        let doc = &docs[0].1;
        assert!(doc.get("job_id").is_none(), "{doc}");
        assert!(doc.get("tenant").is_none(), "{doc}");
    }
}
