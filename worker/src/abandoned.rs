//! Job messages the server will never deliver again although the work queue keeps them:
//!
//! - **out of deliveries**: the last delivery of a job was never settled (its worker was killed,
//!   or every ack wait ran out). The server publishes a max-deliveries advisory, which one
//!   worker of the model (a queue group) takes at once.
//! - **orphans**: nats-server 2.9 killed with SIGKILL can lose acks of messages it then keeps
//!   below the consumer's ack floor, never redelivered, never removed.
//!
//! Advisories are core NATS, at most once: one fired while no worker was connected, or whose
//! handling failed, is gone. So every worker also reconciles at start and then periodically:
//! every message of its model at or below the consumer's ack floor (or delivered at all, while
//! nothing is outstanding) is one the server has finished delivering, and is settled here. An orphan's result is stored (it is only removed);
//! any other is dead-lettered, answered and removed ([`Responder::settle_abandoned`]). Several
//! workers may settle the same message at once: the dead letter is deduplicated, the result is
//! a compare-and-set, and only one delete succeeds.
//!
//! Under a steady backlog the ack floor can stay below an exhausted message for a while (the
//! server moves it on acks in order), so there the advisory is the fast path and the sweep
//! catches up once nothing is outstanding.

use std::{sync::Arc, time::Duration};

use async_nats::{
    Client, SubscribeError, Subscriber,
    jetstream::stream::{LastRawMessageErrorKind, Stream},
};
use fleet_schemas::subject;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::oneshot;

use crate::respond::Responder;

/// Most messages one sweep settles, so a sweep over a huge backlog of orphans stays bounded.
const SWEEP_LIMIT: usize = 1000;

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

/// What the watcher needs to find and settle abandoned messages.
pub struct Watch {
    pub advisories: Subscriber,
    pub responder: Arc<Responder>,
    pub jobs: Stream,
    pub durable: String,
    pub filter_subject: String,
    pub sweep_every: Duration,
}

/// Settles the job of every advisory, and sweeps below the ack floor at start and every
/// `sweep_every`, until `stop` fires; then unsubscribes and handles the advisories already
/// delivered to this worker, which no other worker will see. A job is never left half handled
/// (stored on the dead-letter stream but still queued).
pub async fn watch(mut watch: Watch, stop: oneshot::Receiver<()>) {
    tokio::pin!(stop);
    let mut sweeps = tokio::time::interval(watch.sweep_every);
    sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            message = watch.advisories.next() => match message {
                Some(message) => handle(&message.payload, &watch).await,
                None => return,
            },
            _ = sweeps.tick() => sweep(&watch).await,
        }
    }
    if let Err(error) = watch.advisories.drain().await {
        tracing::warn!(%error, "cannot unsubscribe from max-deliveries advisories");
        return;
    }
    // The subscription ends once the server confirms the unsubscribe; bounded, since with the
    // connection gone no confirmation comes (and a stopping worker must still exit).
    let delivered = async {
        while let Some(message) = watch.advisories.next().await {
            handle(&message.payload, &watch).await;
        }
    };
    if tokio::time::timeout(ADVISORIES_DRAIN_WAIT, delivered)
        .await
        .is_err()
    {
        tracing::warn!("max-deliveries advisories not all taken before the stop");
    }
}

/// How long a stopping worker waits for the advisories delivered before its unsubscribe.
const ADVISORIES_DRAIN_WAIT: Duration = Duration::from_secs(5);

async fn handle(payload: &[u8], watch: &Watch) {
    let advisory = match serde_json::from_slice::<MaxDeliveries>(payload) {
        Ok(advisory) => advisory,
        Err(error) => {
            tracing::warn!(%error, "unreadable max-deliveries advisory");
            return;
        }
    };
    let message = match watch.jobs.get_raw_message(advisory.stream_seq).await {
        Ok(message) => message,
        // Settled meanwhile (a late ack), or taken by another worker's sweep.
        Err(error) => {
            tracing::debug!(sequence = advisory.stream_seq, %error, "exhausted job no longer queued");
            return;
        }
    };
    let reason = format!(
        "delivered {} times and never settled (its worker stopped or ran out of time)",
        advisory.deliveries
    );
    watch.responder.settle_abandoned(message, &reason).await;
}

/// Settles every message of the model the server has finished delivering that is still
/// queued: those at or below the consumer's ack floor, or, while no delivery is outstanding,
/// every one delivered so far (the server moves the floor past an exhausted message only at a
/// later ack, which an idle queue never sees).
async fn sweep(watch: &Watch) {
    let floor = match watch.jobs.consumer_info(&watch.durable).await {
        Ok(info) if info.num_ack_pending == 0 => info.delivered.stream_sequence,
        Ok(info) => info.ack_floor.stream_sequence,
        Err(error) => {
            tracing::warn!(%error, "cannot read the consumer's ack floor; sweep skipped");
            return;
        }
    };
    let mut next = 1;
    for _ in 0..SWEEP_LIMIT {
        let found = watch
            .jobs
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(watch.filter_subject.clone())
            .send()
            .await;
        let message = match found {
            Ok(message) if message.sequence <= floor => message,
            Ok(_) => return,
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => return,
            Err(error) => {
                tracing::warn!(%error, "cannot read the queue; sweep stopped");
                return;
            }
        };
        next = message.sequence + 1;
        tracing::warn!(
            sequence = message.sequence,
            ack_floor = floor,
            "job below the ack floor is still queued; settling it"
        );
        watch
            .responder
            .settle_abandoned(
                message,
                "the server stopped delivering it before it was settled",
            )
            .await;
    }
}
