//! The queue's state as JetStream reports it, read by every worker at a bounded rate (one
//! consumer info and one stream info per stream every `--queue-metrics-every`, never per job):
//! the model's consumer lag, what an autoscaler such as KEDA scales on, and the size of Fleet's
//! streams. Each worker reports what it read, labelled with its name.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer};
use fleet_schemas::subject;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::MissedTickBehavior;

use crate::metrics::{ConsumerLabels, QueueMetrics, StreamLabels};

const STREAMS: [&str; 3] = [
    subject::JOBS_STREAM,
    subject::RESULTS_STREAM,
    subject::DLQ_STREAM,
];

/// What one worker reads and where it reports it.
pub struct QueueReader {
    pub consumer: PullConsumer,
    pub js: jetstream::Context,
    pub model: String,
    pub worker: String,
    pub gauges: QueueMetrics,
}

/// Reads the queue's state now and then every `every`, until the task is aborted.
pub async fn read_every(reader: QueueReader, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    // After a slow read (a server under load) the next waits a whole interval, not less.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        match reader.read_once().await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("reading the queue's state again");
            }
            Ok(()) => {}
            Err(error) => {
                reader.gauges.reads_failed.inc();
                // Once per outage, not once per interval; the counter counts every failure.
                if !failing {
                    failing = true;
                    tracing::warn!(%error, "cannot read the queue's state; its gauges keep their last values");
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("consumer info: {0}")]
    Consumer(#[from] jetstream::context::ConsumerInfoError),
    #[error("stream {stream} info: {source}")]
    Stream {
        stream: &'static str,
        source: jetstream::context::GetStreamError,
    },
}

impl QueueReader {
    async fn read_once(&self) -> Result<(), ReadError> {
        let info = self.consumer.get_info().await?;
        let labels = ConsumerLabels {
            model: self.model.clone(),
            worker: self.worker.clone(),
        };
        let gauges = &self.gauges;
        let ack_pending = info.num_ack_pending as u64;
        set(&gauges.consumer_pending, &labels, info.num_pending);
        set(&gauges.consumer_ack_pending, &labels, ack_pending);
        set(
            &gauges.consumer_lag,
            &labels,
            info.num_pending.saturating_add(ack_pending),
        );
        set(
            &gauges.consumer_redelivered,
            &labels,
            info.num_redelivered as u64,
        );
        for stream in STREAMS {
            let found = self
                .js
                .get_stream(stream)
                .await
                .map_err(|source| ReadError::Stream { stream, source })?;
            let state = &found.cached_info().state;
            let labels = StreamLabels {
                stream: stream.to_owned(),
                worker: self.worker.clone(),
            };
            set(&gauges.stream_messages, &labels, state.messages);
            set(&gauges.stream_bytes, &labels, state.bytes);
        }
        Ok(())
    }
}

fn set<L>(family: &prometheus_client::metrics::family::Family<L, Gauge>, labels: &L, value: u64)
where
    L: Clone + std::hash::Hash + Eq + prometheus_client::encoding::EncodeLabelSet,
{
    family
        .get_or_create(labels)
        .set(i64::try_from(value).unwrap_or(i64::MAX));
}
