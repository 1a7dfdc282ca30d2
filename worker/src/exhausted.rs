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
use tokio::sync::oneshot;

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

/// Dead-letters the job of every advisory until `stop` fires; then unsubscribes and handles
/// the advisories already delivered to this worker, which no other worker will see. A job is
/// never left half handled (stored on the dead-letter stream but still queued).
pub async fn watch(
    mut advisories: Subscriber,
    responder: Arc<Responder>,
    stop: oneshot::Receiver<()>,
) {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            message = advisories.next() => match message {
                Some(message) => handle(&message.payload, &responder).await,
                None => return,
            },
        }
    }
    if let Err(error) = advisories.drain().await {
        tracing::warn!(%error, "cannot unsubscribe from max-deliveries advisories");
        return;
    }
    while let Some(message) = advisories.next().await {
        handle(&message.payload, &responder).await;
    }
}

async fn handle(payload: &[u8], responder: &Responder) {
    match serde_json::from_slice::<MaxDeliveries>(payload) {
        Ok(advisory) => {
            responder
                .dead_letter_exhausted(advisory.stream_seq, advisory.deliveries)
                .await
        }
        Err(error) => tracing::warn!(%error, "unreadable max-deliveries advisory"),
    }
}
