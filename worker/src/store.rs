//! The results store: one result per job, stored by a compare-and-set so that however many
//! deliveries of a job run (a worker frozen past its ack wait wakes up, a publish ack is lost
//! in a broker restart), exactly one store wins, and only its worker answers the caller.
//!
//! A store reads the last result on the job's subject, then publishes with
//! `Nats-Expected-Last-Subject-Sequence` set to what it read: the server refuses the publish if
//! anything was stored on the subject in between. Each store carries a random token, so a store
//! whose outcome is unknown (a timed-out publish ack, a duplicate) is settled by reading the
//! subject back: the token there says whether this store is the one that landed.

use async_nats::{
    HeaderMap,
    header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
    jetstream::{
        self,
        context::{PublishError, PublishErrorKind},
        message::StreamMessage,
        stream::{LastRawMessageError, LastRawMessageErrorKind, Stream},
    },
};
use bytes::Bytes;
use fleet_schemas::subject;

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

    /// Stores `payload` as the result of `key`'s job unless one is stored already.
    pub async fn store(
        &self,
        key: JobKey<'_>,
        mut headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Stored, StoreError> {
        let subject = key.subject();
        let token = format!("{:016x}", rand::random::<u64>());
        headers.insert(subject::JOB_SEQ, key.job_seq.to_string().as_str());
        headers.insert(
            subject::MSG_ID,
            subject::result_msg_id(key.tenant, key.job_id, key.job_seq).as_str(),
        );
        headers.insert(subject::STORE_TOKEN, token.as_str());
        // A result of an older job under the same id may be replaced; one of this job may not.
        // Two rounds: a store that raced with another job's result under the same id reads
        // again once.
        for _ in 0..2 {
            let expected = match self.last(&subject).await? {
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
                        Ok(Some(stored))
                            if header_is(&stored.headers, subject::STORE_TOKEN, &token) =>
                        {
                            Ok(Stored::Won)
                        }
                        Ok(Some(stored)) if key.answered_by(&stored) => Ok(Stored::AlreadyStored),
                        _ => Err(StoreError::Publish { subject, source }),
                    };
                }
            }
            match self.last(&subject).await? {
                Some(stored) if header_is(&stored.headers, subject::STORE_TOKEN, &token) => {
                    return Ok(Stored::Won);
                }
                Some(stored) if key.answered_by(&stored) => return Ok(Stored::AlreadyStored),
                _ => {}
            }
        }
        Err(StoreError::Contended { subject })
    }
}
