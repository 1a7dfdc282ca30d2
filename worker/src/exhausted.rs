//! Jobs out of deliveries. When the last delivery of a job is never settled (the worker holding
//! it was killed, or every ack wait ran out), the server stops redelivering it and publishes a
//! max-deliveries advisory, but a work-queue stream keeps the message: without this watcher
//! the job would sit on `FLEET_JOBS` for good, unanswered. One worker of the model (a queue
//! group) takes each advisory and dead-letters the job ([`Responder::dead_letter_exhausted`]).

use std::sync::Arc;

use async_nats::{Client, SubscribeError, Subscriber};
use fleet_schemas::subject;
use futures::StreamExt;
use serde::Deserialize;

use crate::respond::Responder;

/// The fields Fleet reads of `io.nats.jetstream.advisory.v1.max_deliver`.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// Subscribes (before the first pull, so no advisory is missed) to the advisories of the
/// consumer `durable`, shared by the model's workers.
pub async fn subscribe(client: &Client, durable: &str) -> Result<Subscriber, SubscribeError> {
    client
        .queue_subscribe(
            format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{durable}",
                subject::JOBS_STREAM
            ),
            format!("{durable}-exhausted"),
        )
        .await
}

/// Dead-letters the job of every advisory until the subscription ends.
pub async fn watch(mut advisories: Subscriber, responder: Arc<Responder>) {
    while let Some(message) = advisories.next().await {
        match serde_json::from_slice::<MaxDeliveries>(&message.payload) {
            Ok(advisory) => {
                responder
                    .dead_letter_exhausted(advisory.stream_seq, advisory.deliveries)
                    .await
            }
            Err(error) => tracing::warn!(%error, "unreadable max-deliveries advisory"),
        }
    }
}
