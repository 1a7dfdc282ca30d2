//! The background task that sends: index templates first, then batches with `_bulk`, by count
//! (a full batch wakes it) and by time (the flush interval), each retried with jittered
//! exponential backoff while the server is down, slow (429, 5xx) or refuses some lines for
//! a while. Lines refused for good are dropped and counted; nothing here blocks a logger.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use elasticsearch::{
    BulkParts, Elasticsearch, http::StatusCode, indices::IndicesPutIndexTemplateParts,
};
use rand::Rng;
use serde_json::Value;
use tokio::sync::watch;

use crate::{
    Index,
    buffer::{Buffer, Line},
    metrics::{BulkFailure, DropReason, ShippingMetrics},
};

/// The first pause after a failed request; each further failure doubles it, up to the last.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Short enough that shipping resumes within seconds of the server's return.
const LAST_BACKOFF: Duration = Duration::from_secs(5);
/// The pause between tries once the process is stopping (its deadline bounds them).
const STOPPING_PAUSE: Duration = Duration::from_millis(100);

/// The index templates shipped in `ops/observability/elasticsearch/` (patterns `fleet-…-*`,
/// rewritten for the configured prefix).
const LOGS_TEMPLATE: &str =
    include_str!("../../ops/observability/elasticsearch/fleet-logs.template.json");
const AUDIT_TEMPLATE: &str =
    include_str!("../../ops/observability/elasticsearch/fleet-audit.template.json");

/// The template for `index`'s daily indices under `prefix`: its name and body.
pub fn index_template(prefix: &str, index: Index) -> (String, Value) {
    let text = match index {
        Index::Logs => LOGS_TEMPLATE,
        Index::Audit => AUDIT_TEMPLATE,
    };
    // The file is part of the build and checked by a unit test.
    let mut body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let base = format!("{prefix}-{}", index.as_str());
    if let Some(body) = body.as_object_mut() {
        body.insert(
            "index_patterns".into(),
            serde_json::json!([format!("{base}-*")]),
        );
    }
    (base, body)
}

/// What the sender is given.
pub(crate) struct Sender {
    pub client: Elasticsearch,
    pub buffer: Arc<Buffer>,
    pub metrics: ShippingMetrics,
    pub index_prefix: String,
    pub batch_lines: usize,
    pub flush_interval: Duration,
    /// Shown in warnings (never with credentials).
    pub shown_url: String,
}

impl Sender {
    /// Runs until `stop` turns true; then sends what is buffered and returns (the caller bounds
    /// how long that may take).
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut health = Health::new(self.shown_url.clone());
        self.put_templates(&mut health, &mut stop).await;
        let mut next_flush = tokio::time::Instant::now() + self.flush_interval;
        loop {
            if !told_to_stop(&stop) {
                tokio::select! {
                    _ = self.buffer.ready.notified() => {}
                    _ = tokio::time::sleep_until(next_flush) => {}
                    _ = stop.changed() => {}
                }
            }
            let stopping = told_to_stop(&stop);
            loop {
                let batch = self.buffer.take(self.batch_lines);
                if batch.is_empty() {
                    break;
                }
                let full = batch.len() == self.batch_lines;
                self.send(batch, &mut health, &mut stop).await;
                // A partial batch was all there was; a full one may have more behind it.
                if !full && !stopping {
                    break;
                }
            }
            next_flush = tokio::time::Instant::now() + self.flush_interval;
            if stopping {
                return;
            }
        }
    }

    /// Puts both index templates before the first line is sent, so the first daily index is
    /// made with them; retried while the server cannot be reached. A template the server
    /// refuses is reported and shipping goes on (its indices get dynamic mappings).
    async fn put_templates(&self, health: &mut Health, stop: &mut watch::Receiver<bool>) {
        for index in Index::ALL {
            let (name, body) = index_template(&self.index_prefix, index);
            let mut backoff = Backoff::default();
            loop {
                let sent = self
                    .client
                    .indices()
                    .put_index_template(IndicesPutIndexTemplateParts::Name(&name))
                    .body(&body)
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status_code().is_success() => {
                        health.reached();
                        break;
                    }
                    Ok(response) if retriable(response.status_code()) => {
                        health.failed(&format!("HTTP {}", response.status_code()));
                    }
                    Ok(response) => {
                        let status = response.status_code();
                        let text = response.text().await.unwrap_or_default();
                        tracing::warn!(template = %name, %status, response = %text,
                            "the index template was refused; its indices get dynamic mappings");
                        break;
                    }
                    Err(error) => health.failed(&error.to_string()),
                }
                if told_to_stop(stop) {
                    return;
                }
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }

    /// Sends one batch until every line is stored or dropped. While stopping it keeps trying
    /// (the caller's deadline ends it).
    async fn send(
        &self,
        mut lines: Vec<Line>,
        health: &mut Health,
        stop: &mut watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::default();
        let mut actions = bulk_actions(&self.index_prefix, &lines);
        let mut lost = false;
        loop {
            // A server that was unreachable may come back as a new one, without the templates:
            // put them again before the first line that could create a daily index.
            if lost && !told_to_stop(stop) {
                self.put_templates(health, stop).await;
                lost = false;
            }
            let body: Vec<&str> = actions
                .iter()
                .zip(&lines)
                .flat_map(|(action, line)| [action.as_str(), line.json.as_str()])
                .collect();
            let started = Instant::now();
            let sent = self
                .client
                .bulk(BulkParts::None)
                // Only what is needed to tell each line's fate.
                .filter_path(&["errors", "items.*.status", "items.*.error.type"])
                .body(body)
                .send()
                .await;
            let answer = match sent {
                Ok(response) => {
                    let status = response.status_code();
                    let json = response.json::<Value>().await;
                    Ok((status, json))
                }
                Err(error) => Err(error),
            };
            self.metrics
                .bulk_seconds
                .observe(started.elapsed().as_secs_f64());
            match answer {
                Err(error) => {
                    self.metrics.bulk_failed(BulkFailure::Unreachable);
                    health.failed(&error.to_string());
                    lost = true;
                }
                Ok((status, _)) if retriable(status) => {
                    self.metrics.bulk_failed(BulkFailure::Retried);
                    health.failed(&format!("HTTP {status}"));
                }
                Ok((status, Ok(answer))) if status.is_success() => {
                    health.reached();
                    lines = self.settle(lines, &answer);
                    if lines.is_empty() {
                        return;
                    }
                    actions = bulk_actions(&self.index_prefix, &lines);
                    self.metrics.bulk_failed(BulkFailure::Retried);
                }
                Ok((status, answer)) => {
                    self.metrics.bulk_failed(BulkFailure::Refused);
                    self.metrics
                        .dropped(DropReason::Rejected, lines.len() as u64);
                    tracing::warn!(%status, lines = lines.len(), answer = ?answer.ok(),
                        "Elasticsearch refused a bulk request; its lines are dropped");
                    return;
                }
            }
            // Stopping cuts a long backoff short: the caller's deadline is near.
            let stopping = told_to_stop(stop);
            let pause = if stopping {
                STOPPING_PAUSE
            } else {
                backoff.next()
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = wait_for_stop(stop.clone()), if !stopping => {}
            }
        }
    }

    /// Counts the stored lines and drops the refused ones; returns those to send again (429,
    /// 5xx).
    fn settle(&self, lines: Vec<Line>, answer: &Value) -> Vec<Line> {
        let items = answer["items"].as_array();
        let mut again = Vec::new();
        let mut stored = [0u64; 2];
        let mut rejected = 0u64;
        let mut reasons = Vec::new();
        for (i, line) in lines.into_iter().enumerate() {
            let item = items.and_then(|items| items.get(i));
            // Every item has one key, its action ("create").
            let result = item.and_then(|item| item.as_object()?.values().next());
            let status = result
                .and_then(|result| result["status"].as_u64())
                .and_then(|status| u16::try_from(status).ok())
                .and_then(|status| StatusCode::from_u16(status).ok());
            match status {
                Some(status) if status.is_success() => stored[line.index as usize] += 1,
                Some(status) if retriable(status) => again.push(line),
                _ => {
                    rejected += 1;
                    if let Some(kind) = result.and_then(|r| r["error"]["type"].as_str()) {
                        reasons.push(kind.to_owned());
                    }
                }
            }
        }
        for index in Index::ALL {
            self.metrics.shipped(index, stored[index as usize]);
        }
        if rejected > 0 {
            self.metrics.dropped(DropReason::Rejected, rejected);
            reasons.dedup();
            tracing::warn!(lines = rejected, errors = ?reasons,
                "Elasticsearch refused some lines; they are dropped");
        }
        again
    }
}

/// The `create` action line of each line, naming its daily index.
fn bulk_actions(prefix: &str, lines: &[Line]) -> Vec<String> {
    lines
        .iter()
        .map(|line| {
            format!(
                "{{\"create\":{{\"_index\":\"{prefix}-{}-{}\"}}}}",
                line.index.as_str(),
                line.day.as_str()
            )
        })
        .collect()
}

/// Told to stop, or its [`crate::Shipper`] dropped without being told (also a stop: nobody
/// can tell it any more).
fn told_to_stop(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    // An error means the Shipper is gone: stopping as well.
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// Throttled (429), timed out (408) or failing (5xx): worth sending again later.
fn retriable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || status.is_server_error()
}

/// Jittered exponential backoff: each wait is drawn between half and all of the current step,
/// so many processes that lost the same server do not return to it in step.
struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            step: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(LAST_BACKOFF);
        let half = step / 2;
        half + half.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next()).await;
    }
}

/// Says once when the server is lost and once when it is back, not at every retry.
struct Health {
    shown_url: String,
    failing: bool,
}

impl Health {
    fn new(shown_url: String) -> Health {
        Health {
            shown_url,
            failing: false,
        }
    }

    fn failed(&mut self, why: &str) {
        if !self.failing {
            self.failing = true;
            tracing::warn!(url = %self.shown_url, error = why,
                "cannot ship logs to Elasticsearch; retrying with backoff, the oldest lines are \
                 dropped when the buffer fills");
        }
    }

    fn reached(&mut self) {
        if self.failing {
            self.failing = false;
            tracing::info!(url = %self.shown_url, "shipping logs to Elasticsearch again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_its_last_step() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..8).map(|_| backoff.next()).collect();
        assert!(
            waits[0] >= FIRST_BACKOFF / 2 && waits[0] <= FIRST_BACKOFF,
            "{waits:?}"
        );
        assert!(
            waits[1] >= FIRST_BACKOFF && waits[1] <= FIRST_BACKOFF * 2,
            "{waits:?}"
        );
        for wait in &waits[5..] {
            assert!(
                *wait >= LAST_BACKOFF / 2 && *wait <= LAST_BACKOFF,
                "{waits:?}"
            );
        }
    }

    #[test]
    fn templates_match_their_prefixed_daily_indices_and_map_ids_as_keywords() {
        for index in Index::ALL {
            let (name, body) = index_template("acme-fleet", index);
            assert_eq!(name, format!("acme-fleet-{}", index.as_str()));
            assert_eq!(
                body["index_patterns"],
                serde_json::json!([format!("acme-fleet-{}-*", index.as_str())])
            );
            let properties = &body["template"]["mappings"]["properties"];
            assert_eq!(properties["@timestamp"]["type"], "date", "{body}");
            for id in ["job_id", "tenant", "model", "key_id", "trace_id", "service"] {
                assert_eq!(properties[id]["type"], "keyword", "{id} in {body}");
            }
        }
        let (_, audit) = index_template("fleet", Index::Audit);
        let properties = &audit["template"]["mappings"]["properties"];
        for field in ["action", "outcome", "code"] {
            assert_eq!(properties[field]["type"], "keyword", "{field} in {audit}");
        }
    }

    #[test]
    fn throttling_timeouts_and_server_errors_are_retried_and_nothing_else() {
        for status in [429, 408, 500, 502, 503] {
            assert!(
                retriable(StatusCode::from_u16(status).expect("status")),
                "{status}"
            );
        }
        for status in [200, 400, 401, 403, 404, 413] {
            assert!(
                !retriable(StatusCode::from_u16(status).expect("status")),
                "{status}"
            );
        }
    }
}
