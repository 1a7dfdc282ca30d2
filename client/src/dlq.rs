//! The dead-letter stream (`FLEET_DLQ`) as an operator reads it: what was dead-lettered, why,
//! for whom, and a way to run a dead letter's job again.
//!
//! A dead letter is the job's message as it was queued (the tenant's signed envelope), with the
//! error code, the reason and the job's queue id in its headers. Reading it needs the fleet's
//! rights (an operator's, under the shipped broker configuration): tenants never see it.

use async_nats::{
    Client,
    jetstream::{self, message::StreamMessage},
};
use fleet_schemas::{Job, SignedJob, SubmitReply, decode, subject};
use serde_json::{Value, json};

use crate::{ClientError, Tenant, new_job_id, submit};

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("cannot read {stream}: {reason}")]
    Stream { stream: String, reason: String },
    #[error("no dead letter at sequence {0}")]
    NoSuchLetter(u64),
    #[error("dead letter {seq} holds no readable job ({reason}): nothing to replay")]
    Unreadable { seq: u64, reason: String },
    #[error(
        "dead letter {seq} is tenant {tenant:?}'s job; the key given speaks for {key_tenant:?}"
    )]
    OtherTenant {
        seq: u64,
        tenant: String,
        key_tenant: String,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// The dead-letter stream of the fleet `client` is connected to.
pub struct DeadLetters {
    stream: jetstream::stream::Stream,
}

impl DeadLetters {
    pub async fn open(client: &Client) -> Result<Self, DlqError> {
        let stream = jetstream::new(client.clone())
            .get_stream(subject::DLQ_STREAM)
            .await
            .map_err(|error| DlqError::Stream {
                stream: subject::DLQ_STREAM.into(),
                reason: error.to_string(),
            })?;
        Ok(DeadLetters { stream })
    }

    /// Up to `limit` dead letters from sequence `from` on, each summed up (no input texts).
    pub async fn list(&mut self, from: u64, limit: usize) -> Result<Vec<Value>, DlqError> {
        let info = self.stream.info().await.map_err(|error| DlqError::Stream {
            stream: subject::DLQ_STREAM.into(),
            reason: error.to_string(),
        })?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut listed = Vec::new();
        for seq in from.max(first)..=last {
            if listed.len() == limit {
                break;
            }
            // A gap is a dead letter an operator deleted.
            if let Ok(message) = self.stream.get_raw_message(seq).await {
                listed.push(describe(&message, false));
            }
        }
        Ok(listed)
    }

    /// One dead letter in full, its job's texts included.
    pub async fn show(&self, seq: u64) -> Result<Value, DlqError> {
        Ok(describe(&self.get(seq).await?, true))
    }

    /// Runs a dead letter's job again: the same task under a new id, made now and signed with
    /// `tenant`'s key (which must be the job's tenant's), sent to `fleet.submit.<model>`. The dead
    /// letter stays where it is, as the record of what happened.
    pub async fn replay(
        &self,
        client: &Client,
        tenant: &Tenant,
        seq: u64,
        timeout: std::time::Duration,
    ) -> Result<(Job, SubmitReply), DlqError> {
        let message = self.get(seq).await?;
        let old =
            read_job(&message.payload).map_err(|reason| DlqError::Unreadable { seq, reason })?;
        if old.tenant != tenant.name {
            return Err(DlqError::OtherTenant {
                seq,
                tenant: old.tenant,
                key_tenant: tenant.name.clone(),
            });
        }
        let mut job = old;
        job.job_id = new_job_id();
        job.created_at_ms = fleet_schemas::now_ms();
        // The old deadline has passed; a replay is run whenever the queue gets to it.
        job.deadline_ms = None;
        let reply = submit(client, tenant, &job, timeout).await?;
        Ok((job, reply))
    }

    async fn get(&self, seq: u64) -> Result<StreamMessage, DlqError> {
        self.stream
            .get_raw_message(seq)
            .await
            .map_err(|_| DlqError::NoSuchLetter(seq))
    }
}

/// The job inside a dead letter's envelope (its signature is not checked: the envelope is
/// only read, and a replay is signed anew).
fn read_job(payload: &[u8]) -> Result<Job, String> {
    let envelope: SignedJob = decode(payload, usize::MAX).map_err(|error| error.to_string())?;
    decode(&envelope.body, usize::MAX).map_err(|error| error.to_string())
}

fn describe(message: &StreamMessage, with_texts: bool) -> Value {
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map(|value| value.as_str().to_owned())
    };
    let mut described = json!({
        "seq": message.sequence,
        "subject": message.subject.as_str(),
        "time": message.time.to_string(),
        "code": header(subject::SERVICE_ERROR_CODE),
        "reason": header(subject::DLQ_REASON),
        "queued_as": header(subject::MSG_ID),
    });
    match read_job(&message.payload) {
        Ok(job) => {
            let inputs = job.task.inputs();
            described["tenant"] = json!(job.tenant);
            described["job_id"] = json!(job.job_id);
            described["model"] = json!(job.model);
            described["inputs"] = json!(inputs.len());
            if with_texts {
                described["texts"] = json!(inputs);
            }
        }
        Err(reason) => described["unreadable"] = json!(reason),
    }
    described
}
