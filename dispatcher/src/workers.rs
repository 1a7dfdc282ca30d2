//! Which models have a live worker, so an `infer` for a model nobody serves is refused at once
//! (`no_worker`) instead of waiting out its caller's timeout with its job left on the queue.
//!
//! Known from NATS service discovery, not from the models' consumers: every worker registers as
//! `fleet-worker` with its model in the metadata (`fleet_service::Discovery`) from its start
//! (while its model loads too) until its drain begins, and answers `$SRV.PING.fleet-worker` from
//! the NATS client's own task, however busy its model is. A consumer says less: it outlives its
//! workers (it is durable), and its waiting pull requests (`num_waiting`) are 0 whenever every
//! worker is busy with as many jobs as it may hold, the very moment a refusal would be wrong.
//!
//! The dispatcher asks every `--worker-check-every` in the background, one request for all
//! models, and reads the answers as they come. A model is refused only on evidence: no worker of
//! it answered for `--no-worker-after` while the dispatcher heard answers to every one of its
//! asks throughout (from other workers, or the server's "no responders", which it sends when no
//! worker at all is subscribed). A dispatcher that has just started or reconnected, whose asks go
//! unanswered (a broker blip, a frozen node, a broker that does not let it ask), or whose
//! workers are all too slow to answer, refuses nothing: it does not know.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::{StatusCode, Subscriber};
use fleet_service::WORKER_SERVICE;
use futures::StreamExt;
use serde::Deserialize;

/// What the dispatcher knows of a model's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    /// A worker of the model answered recently.
    Served,
    /// No worker of the model answered for the whole window, while answers kept coming.
    Unserved,
    /// Not known (just started, asks unanswered, or not watching): nothing is refused.
    Unknown,
}

/// How often to ask, and how long a model goes unseen before it counts as unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerWatchSettings {
    pub check_every: Duration,
    pub no_worker_after: Duration,
}

/// The answers heard so far. Pure: every method takes the time, so tests state the rules
/// exactly.
#[derive(Debug)]
struct Heard {
    no_worker_after: Duration,
    /// When a worker of each model last answered.
    models: HashMap<String, Instant>,
    /// Since when every ask has been answered (by any worker, or by "no responders").
    answered_since: Option<Instant>,
    /// Whether anything answered since the last ask went out.
    answered_last_ask: bool,
}

impl Heard {
    fn new(no_worker_after: Duration) -> Heard {
        Heard {
            no_worker_after,
            models: HashMap::new(),
            answered_since: None,
            // The first ask has nothing before it to miss.
            answered_last_ask: true,
        }
    }

    /// An ask goes out: if the one before it got no answer at all, what follows is a new run.
    fn asking(&mut self) {
        if !self.answered_last_ask {
            self.answered_since = None;
        }
        self.answered_last_ask = false;
    }

    /// Something answered: a worker of `model`, or (None) the server saying nobody listens.
    fn answered(&mut self, model: Option<&str>, now: Instant) {
        self.answered_last_ask = true;
        self.answered_since.get_or_insert(now);
        if let Some(model) = model {
            self.models.insert(model.to_owned(), now);
        }
    }

    fn availability(&self, model: &str, now: Instant) -> Availability {
        let within = |at: Instant| now.saturating_duration_since(at) < self.no_worker_after;
        if self.models.get(model).is_some_and(|&seen| within(seen)) {
            Availability::Served
        } else if self.answered_since.is_some_and(|since| !within(since)) {
            Availability::Unserved
        } else {
            Availability::Unknown
        }
    }
}

/// The dispatcher's view of the workers, shared by its request tasks; [`Workers::watch`] keeps
/// it fresh.
#[derive(Clone, Default)]
pub struct Workers {
    heard: Arc<Mutex<Option<Heard>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for workers' discovery answers: {0}")]
pub struct WatchError(#[from] async_nats::SubscribeError);

/// A worker's PING answer, as much of it as tells its model.
#[derive(Deserialize)]
struct PingAnswer {
    #[serde(default)]
    metadata: HashMap<String, String>,
}

/// The discovery subject every worker answers.
fn ping_subject() -> String {
    format!("$SRV.PING.{WORKER_SERVICE}")
}

impl Workers {
    /// What is known of `model`'s workers now; [`Availability::Unknown`] until watched.
    pub fn availability(&self, model: &str) -> Availability {
        match &*self.lock() {
            Some(heard) => heard.availability(model, Instant::now()),
            None => Availability::Unknown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Heard>> {
        // A panic while holding the lock leaves plain data behind, still worth reading.
        self.heard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts asking in the background through `client`, until the task returned is aborted.
    pub async fn watch(
        &self,
        client: async_nats::Client,
        settings: WorkerWatchSettings,
    ) -> Result<tokio::task::JoinHandle<()>, WatchError> {
        let inbox = client.new_inbox();
        let answers = client.subscribe(inbox.clone()).await?;
        *self.lock() = Some(Heard::new(settings.no_worker_after));
        let workers = self.clone();
        Ok(tokio::spawn(async move {
            workers
                .ask_and_listen(client, inbox, answers, settings.check_every)
                .await
        }))
    }

    async fn ask_and_listen(
        &self,
        client: async_nats::Client,
        inbox: String,
        mut answers: Subscriber,
        every: Duration,
    ) {
        let subject = ping_subject();
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if let Some(heard) = self.lock().as_mut() {
                        heard.asking();
                    }
                    if let Err(error) = client
                        .publish_with_reply(subject.clone(), inbox.clone(), "".into())
                        .await
                    {
                        tracing::debug!(%error, "cannot ask which workers are live");
                    }
                }
                answer = answers.next() => {
                    let Some(answer) = answer else { return };
                    let model = match answer.status {
                        // No worker at all is subscribed: an answer too.
                        Some(StatusCode::NO_RESPONDERS) => None,
                        Some(_) => continue,
                        None => match serde_json::from_slice::<PingAnswer>(&answer.payload) {
                            Ok(ping) => ping.metadata.get("model").cloned(),
                            Err(error) => {
                                tracing::debug!(%error, "unreadable discovery answer");
                                continue;
                            }
                        },
                    };
                    if let Some(heard) = self.lock().as_mut() {
                        heard.answered(model.as_deref(), Instant::now());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(5);
    const SECOND: Duration = Duration::from_secs(1);

    /// Asks once a second from `start` for `seconds`, each answered by workers of `models`.
    fn answered_every_second(heard: &mut Heard, start: Instant, seconds: u32, models: &[&str]) {
        for second in 0..seconds {
            let at = start + SECOND * second;
            heard.asking();
            if models.is_empty() {
                heard.answered(None, at);
            }
            for model in models {
                heard.answered(Some(model), at);
            }
        }
    }

    #[test]
    fn a_model_is_unserved_only_after_a_whole_window_of_answers_without_it() {
        let start = Instant::now();
        let mut heard = Heard::new(WINDOW);
        assert_eq!(heard.availability("m", start), Availability::Unknown);
        // "No responders" every second: not known until the answers span the window.
        answered_every_second(&mut heard, start, 5, &[]);
        assert_eq!(
            heard.availability("m", start + SECOND * 4),
            Availability::Unknown
        );
        answered_every_second(&mut heard, start + SECOND * 5, 1, &[]);
        assert_eq!(
            heard.availability("m", start + SECOND * 5),
            Availability::Unserved
        );
        // A worker of the model answers: served at once.
        heard.asking();
        heard.answered(Some("m"), start + SECOND * 6);
        assert_eq!(
            heard.availability("m", start + SECOND * 6),
            Availability::Served
        );
        assert_eq!(
            heard.availability("other", start + SECOND * 6),
            Availability::Unserved
        );
    }

    #[test]
    fn a_worker_that_stops_answering_is_gone_after_the_window() {
        let start = Instant::now();
        let mut heard = Heard::new(WINDOW);
        answered_every_second(&mut heard, start, 3, &["m", "n"]);
        // m's worker stops; n's keeps answering.
        answered_every_second(&mut heard, start + SECOND * 3, 10, &["n"]);
        assert_eq!(
            heard.availability("m", start + SECOND * 6),
            Availability::Served
        );
        assert_eq!(
            heard.availability("m", start + SECOND * 7),
            Availability::Unserved
        );
    }

    #[test]
    fn an_unanswered_ask_starts_the_window_again() {
        let start = Instant::now();
        let mut heard = Heard::new(WINDOW);
        answered_every_second(&mut heard, start, 10, &[]);
        assert_eq!(
            heard.availability("m", start + SECOND * 10),
            Availability::Unserved
        );
        // A blip: one ask goes unanswered. Nothing is known until answers span a window again.
        heard.asking();
        answered_every_second(&mut heard, start + SECOND * 11, 3, &[]);
        assert_eq!(
            heard.availability("m", start + SECOND * 13),
            Availability::Unknown
        );
        answered_every_second(&mut heard, start + SECOND * 14, 3, &[]);
        assert_eq!(
            heard.availability("m", start + SECOND * 16),
            Availability::Unserved
        );
    }

    #[test]
    fn asks_never_answered_refuse_nothing() {
        let start = Instant::now();
        let mut heard = Heard::new(WINDOW);
        for _ in 0..30 {
            heard.asking();
        }
        assert_eq!(
            heard.availability("m", start + SECOND * 30),
            Availability::Unknown
        );
        assert_eq!(Workers::default().availability("m"), Availability::Unknown);
    }
}
