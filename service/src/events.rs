//! What the NATS client reports about a connection: messages it dropped because the process
//! read a subscription too slowly, disconnections and reconnections. None of it reaches the code
//! reading the subscriptions, so without this a dropped message would leave no trace.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{ConnectOptions, Event, ServerError};
use prometheus_client::metrics::counter::Counter;

/// At most one log line per interval for drops, which come in bursts of thousands.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Counts and logs a connection's events; cheap to clone into the client's callback
/// ([`ConnectionEvents::options`]).
#[derive(Clone)]
pub struct ConnectionEvents {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    /// What the log line about drops tells the operator to do.
    remedy: &'static str,
    dropped: Counter,
    started: Instant,
    /// Drops counted since the last drop log line.
    unlogged: AtomicU64,
    /// When the next drop log line may be written, in ms since `started`.
    next_log_ms: AtomicU64,
}

impl ConnectionEvents {
    /// `url` is shown in logs, so it must already be free of credentials ([`crate::redact_url`]);
    /// `dropped` counts the messages the client dropped; `remedy` ends the log line about them.
    pub fn new(url: String, dropped: Counter, remedy: &'static str) -> Self {
        ConnectionEvents {
            inner: Arc::new(Inner {
                url,
                remedy,
                dropped,
                started: Instant::now(),
                unlogged: AtomicU64::new(0),
                next_log_ms: AtomicU64::new(0),
            }),
        }
    }

    /// `options` reporting to these events.
    pub fn options(&self, options: ConnectOptions) -> ConnectOptions {
        let events = self.clone();
        options.event_callback(move |event| {
            let events = events.clone();
            async move { events.on_event(event) }
        })
    }

    pub fn on_event(&self, event: Event) {
        let url = &self.inner.url;
        match event {
            // One event per message the client could not queue for a subscription.
            Event::SlowConsumer(_) | Event::ServerError(ServerError::SlowConsumer(_)) => {
                self.dropped()
            }
            Event::Disconnected => {
                tracing::warn!(nats_url = %url, "lost the connection to NATS; reconnecting")
            }
            Event::Connected => tracing::info!(nats_url = %url, "connected to NATS"),
            Event::LameDuckMode => {
                tracing::warn!(nats_url = %url, "the NATS server is shutting down (lame duck mode)")
            }
            Event::ServerError(error) => {
                tracing::warn!(nats_url = %url, %error, "NATS server error")
            }
            Event::ClientError(error) => {
                tracing::warn!(nats_url = %url, %error, "NATS client error")
            }
            Event::Draining | Event::Closed => {}
        }
    }

    fn dropped(&self) {
        let inner = &self.inner;
        inner.dropped.inc();
        inner.unlogged.fetch_add(1, Ordering::Relaxed);
        let now_ms = u64::try_from(inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = inner.next_log_ms.load(Ordering::Relaxed);
        let interval = DROP_LOG_INTERVAL.as_millis() as u64;
        if now_ms >= next
            && inner
                .next_log_ms
                .compare_exchange(
                    next,
                    now_ms + interval,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            let since = inner.unlogged.swap(0, Ordering::Relaxed);
            tracing::error!(
                dropped = since,
                dropped_total = inner.dropped.get(),
                nats_url = %inner.url,
                remedy = inner.remedy,
                "NATS messages dropped unread: this process reads a subscription too slowly and \
                 the client's buffer for it is full"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slow_consumer_event_counts_one_drop() {
        let counter = Counter::default();
        let events = ConnectionEvents::new("nats://h:4222".into(), counter.clone(), "none");
        for _ in 0..5 {
            events.on_event(Event::SlowConsumer(7));
        }
        events.on_event(Event::ServerError(ServerError::SlowConsumer(7)));
        events.on_event(Event::Disconnected);
        assert_eq!(counter.get(), 6);
    }
}
