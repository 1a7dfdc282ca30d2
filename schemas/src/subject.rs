//! Subjects, streams and headers. Every name that crosses the wire is built here.

/// Queue group every dispatcher joins, so several share `infer` and `submit` traffic.
pub const DISPATCHER_QUEUE_GROUP: &str = "dispatchers";

pub const JOBS_STREAM: &str = "FLEET_JOBS";
pub const RESULTS_STREAM: &str = "FLEET_RESULTS";
pub const DLQ_STREAM: &str = "FLEET_DLQ";

pub const JOBS_WILDCARD: &str = "fleet.jobs.*";
pub const RESULTS_WILDCARD: &str = "fleet.results.*.*";
pub const DLQ_WILDCARD: &str = "fleet.dlq.*";
pub const INFER_WILDCARD: &str = "fleet.infer.*";
pub const SUBMIT_WILDCARD: &str = "fleet.submit.*";

/// JetStream deduplication key, as built by [`msg_id`].
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The synchronous caller's reply inbox, carried with the queued job to the worker.
pub const REPLY_TO: &str = "Fleet-Reply-To";
/// Error code of a failed or rejected answer (the NATS services convention).
pub const SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
/// Human-readable error of a failed or rejected answer.
pub const SERVICE_ERROR: &str = "Nats-Service-Error";
/// On a stored result: the sequence of its job on `FLEET_JOBS`. A job id may come back after
/// the duplicate window as a new job; the sequence tells which job a result answers.
pub const JOB_SEQ: &str = "Fleet-Job-Seq";
/// On a stored result: a random token of the store that wrote it, so a worker whose store
/// ended in doubt (a lost publish ack) can read back whether its own store is the one kept.
pub const STORE_TOKEN: &str = "Fleet-Store-Token";
/// W3C Trace Context: `00-<trace id>-<parent id>-<flags>`, sent by the client, carried by the
/// dispatcher onto the queued job and by the worker onto the stored result, so one job's log
/// lines share a `trace_id` across processes.
pub const TRACEPARENT: &str = "traceparent";
/// Why a job went to the dead-letter stream.
pub const DLQ_REASON: &str = "Fleet-Dlq-Reason";

/// `text` made fit for a header value: a header cannot hold a line break (the NATS protocol
/// is line-based, and clients refuse or panic on one), while error messages may quote input
/// or span lines. Line breaks become spaces; other text is kept as is.
pub fn header_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains(['\r', '\n']) {
        text.replace(['\r', '\n'], " ").into()
    } else {
        text.into()
    }
}

pub fn infer(model: &str) -> String {
    format!("fleet.infer.{model}")
}

pub fn submit(model: &str) -> String {
    format!("fleet.submit.{model}")
}

pub fn jobs(model: &str) -> String {
    format!("fleet.jobs.{model}")
}

pub fn results(tenant: &str, job_id: &str) -> String {
    format!("fleet.results.{tenant}.{job_id}")
}

pub fn dlq(model: &str) -> String {
    format!("fleet.dlq.{model}")
}

/// The `Nats-Msg-Id` of a job and of its result: `<tenant>.<job_id>`. JetStream deduplicates
/// across a whole stream, and job ids are chosen by tenants, so the bare job id would let one
/// tenant's job shadow another's that happens to use the same id (row numbers from two ETL
/// pipelines, say): the second would be called a duplicate and never run.
pub fn msg_id(tenant: &str, job_id: &str) -> String {
    format!("{tenant}.{job_id}")
}

/// The `Nats-Msg-Id` of a stored result: `<tenant>.<job_id>.<job_seq>`. The job's queue
/// sequence is part of it, so a job id reused once the queue's duplicate window has passed gets
/// its own result instead of being deduplicated against the older job's.
pub fn result_msg_id(tenant: &str, job_id: &str, job_seq: u64) -> String {
    format!("{tenant}.{job_id}.{job_seq}")
}

/// The inbox prefix a tenant's clients use (`custom_inbox_prefix` in async-nats, `inbox_prefix`
/// in other clients): `_INBOX.<tenant>`. A job is answered only on a subject under its own
/// tenant's prefix, so no tenant can make Fleet write to a subject of its choosing (another
/// tenant's inbox, a results subject), and broker permissions can give each tenant its inboxes
/// alone.
pub fn inbox_prefix(tenant: &str) -> String {
    format!("_INBOX.{tenant}")
}

/// True when `reply` is an inbox of `tenant`: `_INBOX.<tenant>.` and at least one more token.
pub fn is_tenant_inbox(tenant: &str, reply: &str) -> bool {
    reply
        .strip_prefix("_INBOX.")
        .and_then(|rest| rest.strip_prefix(tenant))
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| {
            !rest.is_empty()
                && !rest.split('.').any(str::is_empty)
                && !rest.contains([' ', '\t', '\r', '\n'])
        })
}

/// What an incoming request asks for, read from its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress<'a> {
    Infer { model: &'a str },
    Submit { model: &'a str },
}

/// Parses `fleet.infer.<model>` or `fleet.submit.<model>`.
pub fn parse_ingress(subject: &str) -> Option<Ingress<'_>> {
    let rest = subject.strip_prefix("fleet.")?;
    let (kind, model) = rest.split_once('.')?;
    if model.is_empty() || model.contains('.') {
        return None;
    }
    match kind {
        "infer" => Some(Ingress::Infer { model }),
        "submit" => Some(Ingress::Submit { model }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_text_has_no_line_breaks() {
        assert_eq!(super::header_text("plain: text"), "plain: text");
        assert_eq!(
            super::header_text("unknown field `x\r\ny`\nat line 2"),
            "unknown field `x  y` at line 2"
        );
    }

    use super::*;

    #[test]
    fn only_a_tenants_own_inboxes_take_its_answers() {
        assert!(is_tenant_inbox("acme", "_INBOX.acme.x1y2"));
        assert!(is_tenant_inbox("acme", "_INBOX.acme.x1.y2"));
        for bad in [
            "_INBOX.acmecorp.x",
            "_INBOX.globex.x",
            "_INBOX.acme",
            "_INBOX.acme.",
            "_INBOX.acme..x",
            "_INBOX.x",
            "fleet.results.globex.job-1",
            "_INBOX.acme.x y",
        ] {
            assert!(!is_tenant_inbox("acme", bad), "{bad}");
        }
    }

    #[test]
    fn ingress_subjects_round_trip() {
        assert_eq!(
            parse_ingress(&infer("minilm")),
            Some(Ingress::Infer { model: "minilm" })
        );
        assert_eq!(
            parse_ingress(&submit("minilm")),
            Some(Ingress::Submit { model: "minilm" })
        );
        for bad in [
            "fleet.infer.",
            "fleet.jobs.m",
            "fleet.infer.a.b",
            "other.infer.m",
        ] {
            assert_eq!(parse_ingress(bad), None, "{bad}");
        }
    }
}
