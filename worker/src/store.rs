//! The results store: one result per job, stored by a compare-and-set so that however many
//! deliveries of a job run (a worker frozen past its ack wait wakes up, a publish ack is lost
//! in a broker restart), exactly one store wins, and only its worker answers the caller.
//!
//! A store reads the last result on the job's subject, then publishes with
//! `Nats-Expected-Last-Subject-Sequence` set to what it read: the server refuses the publish if
//! anything was stored on the subject in between. Each store carries a random token, so a store
//! whose outcome is unknown (a timed-out publish ack, a duplicate) is settled by reading the
//! subject back: the token there says whether this store is the one that landed. A store tried
//! again with the same [`StoreToken`] (the broker could not answer the first time) is settled
//! the same way: if the first try landed after all, the second finds its own token and wins.

use async_nats::{
    HeaderMap,
    header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
    jetstream::{
        self,
        context::{PublishError, PublishErrorKind, RequestError, RequestErrorKind},
        message::StreamMessage,
        stream::{LastRawMessageError, LastRawMessageErrorKind, Stream},
    },
};
use bytes::Bytes;
use fleet_schemas::subject;

use fleet_streams::transient;

/// How a result's store ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// This store is the job's result; its worker answers the caller.
    Won,
    /// The job's result was stored before, by another delivery of the job; nothing is answered
    /// again.
    AlreadyStored,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot read the stored result on {subject}: {source}")]
    Lookup {
        subject: String,
        source: LastRawMessageError,
    },
    #[error("cannot store result on {subject}: {source}")]
    Publish {
        subject: String,
        source: PublishError,
    },
    #[error("result on {subject} changed while storing, twice; giving up for now")]
    Contended { subject: String },
}

impl StoreError {
    /// True when the broker could not answer for now (a request timed out, a connection was
    /// lost, the results stream has no leader yet), so the same store may well succeed later;
    /// false for a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Lookup { source, .. } => match source.kind() {
                LastRawMessageErrorKind::JetStream(error) => transient::jetstream(&error),
                // The worker found the results stream at start: no responder now means the
                // nodes that answer for it cannot be reached for the moment.
                LastRawMessageErrorKind::Other => std::error::Error::source(source)
                    .and_then(|inner| inner.downcast_ref::<RequestError>())
                    .is_some_and(|request| {
                        transient::request(request)
                            || request.kind() == RequestErrorKind::NoResponders
                    }),
                LastRawMessageErrorKind::NoMessageFound
                | LastRawMessageErrorKind::InvalidSubject => false,
            },
            StoreError::Publish { source, .. } => match source.kind() {
                // No ack, or the connection dropped while waiting for one.
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => true,
                // No responder for the results subject, though the stream was just read: its
                // leader is gone for the moment.
                PublishErrorKind::StreamNotFound => true,
                PublishErrorKind::Other => std::error::Error::source(source)
                    .and_then(|inner| inner.downcast_ref::<jetstream::Error>())
                    .is_some_and(transient::jetstream),
                _ => false,
            },
            StoreError::Contended { .. } => false,
        }
    }
}

/// Which job a result belongs to: its tenant, its id, and its sequence on `FLEET_JOBS` (a job
/// id may come back as a new job once the queue's duplicate window has passed).
#[derive(Debug, Clone, Copy)]
pub struct JobKey<'a> {
    pub tenant: &'a str,
    pub job_id: &'a str,
    pub job_seq: u64,
}

impl JobKey<'_> {
    fn subject(&self) -> String {
        subject::results(self.tenant, self.job_id)
    }

    fn answered_by(&self, stored: &StreamMessage) -> bool {
        header_is(&stored.headers, subject::JOB_SEQ, &self.job_seq.to_string())
    }
}

fn header_is(headers: &HeaderMap, name: &str, value: &str) -> bool {
    headers.get(name).is_some_and(|v| v.as_str() == value)
}

/// What marks one store of a result, however many times it is tried: the subject read back
/// after an unknown outcome says whether this store is the one that landed.
#[derive(Debug, Clone)]
pub struct StoreToken(String);

impl StoreToken {
    pub fn new() -> StoreToken {
        StoreToken(format!("{:016x}", rand::random::<u64>()))
    }

    fn marks(&self, stored: &StreamMessage) -> bool {
        header_is(&stored.headers, subject::STORE_TOKEN, &self.0)
    }
}

impl Default for StoreToken {
    fn default() -> StoreToken {
        StoreToken::new()
    }
}

#[derive(Clone)]
pub struct ResultStore {
    js: jetstream::Context,
    results: Stream,
}

impl ResultStore {
    pub fn new(js: jetstream::Context, results: Stream) -> ResultStore {
        ResultStore { js, results }
    }

    /// The stored result of this very job, if any.
    pub async fn find(&self, key: JobKey<'_>) -> Result<Option<StreamMessage>, StoreError> {
        Ok(self
            .last(&key.subject())
            .await?
            .filter(|m| key.answered_by(m)))
    }

    async fn last(&self, subject: &str) -> Result<Option<StreamMessage>, StoreError> {
        match self.results.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(Some(message)),
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(source) => Err(StoreError::Lookup {
                subject: subject.to_owned(),
                source,
            }),
        }
    }

    /// Stores `payload` as the result of `key`'s job unless one is stored already. A store
    /// tried again after an error must carry the same `token`.
    pub async fn store(
        &self,
        key: JobKey<'_>,
        token: &StoreToken,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Stored, StoreError> {
        let subject = key.subject();
        headers.insert(subject::JOB_SEQ, key.job_seq.to_string().as_str());
        headers.insert(
            subject::MSG_ID,
            subject::result_msg_id(key.tenant, key.job_id, key.job_seq).as_str(),
        );
        headers.insert(subject::STORE_TOKEN, token.0.as_str());
        // A result of an older job under the same id may be replaced; one of this job may not.
        // Two rounds: a store that raced with another job's result under the same id reads
        // again once.
        for _ in 0..2 {
            let expected = match self.last(&subject).await? {
                // An earlier try of this store, whose outcome was unknown, landed.
                Some(stored) if token.marks(&stored) => return Ok(Stored::Won),
                Some(stored) if key.answered_by(&stored) => return Ok(Stored::AlreadyStored),
                Some(older) => older.sequence,
                None => 0,
            };
            let mut conditional = headers.clone();
            conditional.insert(
                NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                expected.to_string().as_str(),
            );
            let published = async {
                self.js
                    .publish_with_headers(subject.clone(), conditional, payload.clone())
                    .await?
                    .await
            }
            .await;
            match published {
                Ok(ack) if !ack.duplicate => return Ok(Stored::Won),
                // A duplicate, a refused expectation, or no ack: what the subject holds now
                // says which store won.
                Ok(_) => {}
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {}
                Err(source) => {
                    return match self.last(&subject).await {
                        Ok(Some(stored)) if token.marks(&stored) => Ok(Stored::Won),
                        Ok(Some(stored)) if key.answered_by(&stored) => Ok(Stored::AlreadyStored),
                        _ => Err(StoreError::Publish { subject, source }),
                    };
                }
            }
            match self.last(&subject).await? {
                Some(stored) if token.marks(&stored) => return Ok(Stored::Won),
                Some(stored) if key.answered_by(&stored) => return Ok(Stored::AlreadyStored),
                _ => {}
            }
        }
        Err(StoreError::Contended { subject })
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::RequestErrorKind;

    use super::*;

    const SUBJECT: &str = "fleet.results.acme.job-1";

    fn answered(status: u16, code: u64) -> jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": status,
            "err_code": code,
            "description": "as the server words it",
        }))
        .expect("a JetStream API error")
    }

    fn lookup(kind: LastRawMessageErrorKind) -> StoreError {
        StoreError::Lookup {
            subject: SUBJECT.to_owned(),
            source: LastRawMessageError::new(kind),
        }
    }

    fn lookup_requested(kind: RequestErrorKind) -> StoreError {
        StoreError::Lookup {
            subject: SUBJECT.to_owned(),
            source: LastRawMessageError::with_source(
                LastRawMessageErrorKind::Other,
                RequestError::new(kind),
            ),
        }
    }

    fn publish(source: PublishError) -> StoreError {
        StoreError::Publish {
            subject: SUBJECT.to_owned(),
            source,
        }
    }

    #[test]
    fn a_broker_that_cannot_answer_for_now_is_asked_again() {
        for code in [10008, 10009, 10004, 10005] {
            let error = lookup(LastRawMessageErrorKind::JetStream(answered(503, code)));
            assert!(error.is_transient(), "lookup {code}");
            let error = publish(PublishError::with_source(
                PublishErrorKind::Other,
                answered(503, code),
            ));
            assert!(error.is_transient(), "publish {code}");
        }
        for kind in [
            RequestErrorKind::TimedOut,
            RequestErrorKind::Other,
            RequestErrorKind::NoResponders,
        ] {
            assert!(lookup_requested(kind).is_transient(), "{kind:?}");
        }
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::StreamNotFound,
        ] {
            assert!(publish(PublishError::new(kind)).is_transient(), "{kind:?}");
        }
    }

    #[test]
    fn a_refusal_goes_to_the_job_s_retries() {
        // Stream not found, a store refused by the stream's limits.
        for code in [10059, 10077] {
            let error = lookup(LastRawMessageErrorKind::JetStream(answered(404, code)));
            assert!(!error.is_transient(), "lookup {code}");
            let error = publish(PublishError::with_source(
                PublishErrorKind::Other,
                answered(400, code),
            ));
            assert!(!error.is_transient(), "publish {code}");
        }
        assert!(!lookup(LastRawMessageErrorKind::InvalidSubject).is_transient());
        for kind in [
            PublishErrorKind::WrongLastSequence,
            PublishErrorKind::MaxPayloadExceeded,
        ] {
            assert!(!publish(PublishError::new(kind)).is_transient(), "{kind:?}");
        }
        let contended = StoreError::Contended {
            subject: SUBJECT.to_owned(),
        };
        assert!(!contended.is_transient());
    }
}
