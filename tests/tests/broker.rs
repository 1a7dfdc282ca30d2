//! The shipped broker configuration (`ops/nats/`), rendered as an operator renders it and run
//! by the real nats-server with TLS and auth on: every role can do its job, and what a tenant
//! could do to another tenant or to the fleet's own subjects is refused.
//!
//! The server refuses a subscription or a publish asynchronously: it drops the message (or never
//! registers the subscription) and sends the connection an `-ERR 'Permissions Violation …'`,
//! which async-nats reports to the event callback. Every refusal below is shown both ways: the
//! server says so, and nothing happens (no message arrives, no answer comes, no stream changes).

use std::{path::PathBuf, process::Command, time::Duration};

use async_nats::{
    Client, ConnectErrorKind, ConnectOptions, Event, HeaderMap, ServerError,
    jetstream::{self, consumer, stream::Stream},
};
use fleet_tests::shipped_broker::{ShippedBroker, run, workspace};
use futures::StreamExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};

/// How long a refused action is given to show itself (and an allowed one to be answered).
const WINDOW: Duration = Duration::from_millis(800);

const ACME: &str = "acme";
const BOLT: &str = "bolt";
const MODEL: &str = "embed";
/// The model the real worker serves.
const REAL_MODEL: &str = "all-minilm-l6-v2";

/// The shipped broker with a dispatcher, a worker, an operator and two tenants.
struct Broker(ShippedBroker);

impl std::ops::Deref for Broker {
    type Target = ShippedBroker;

    fn deref(&self) -> &ShippedBroker {
        &self.0
    }
}

impl Broker {
    fn start() -> Broker {
        Broker(ShippedBroker::start(&[
            ("dispatcher", "dispatcher-1"),
            ("worker", "worker-1"),
            ("operator", "ops"),
            ("tenant", ACME),
            ("tenant", BOLT),
        ]))
    }

    /// Starts a broker and has a dispatcher create Fleet's streams, as `dispatcher` does.
    async fn with_streams() -> Broker {
        let broker = Broker::start();
        let dispatcher = broker.connect("dispatcher-1").await;
        fleet_streams::ensure_all(
            &jetstream::new(dispatcher.client.clone()),
            &fleet_streams::StreamLimits::default(),
        )
        .await
        .expect("a dispatcher creates the streams");
        broker
    }

    /// Connects as `name` with its nkey; a tenant uses its own inbox prefix, as WIRE.md says.
    async fn connect(&self, name: &str) -> Conn {
        let (errors_tx, errors) = mpsc::unbounded_channel();
        let mut options = self
            .tls()
            .nkey(self.seed(name))
            .request_timeout(Some(WINDOW))
            .event_callback(move |event| {
                let errors_tx = errors_tx.clone();
                async move {
                    if let Event::ServerError(ServerError::Other(message)) = event {
                        let _ = errors_tx.send(message);
                    }
                }
            });
        // Any request the server answers will do; each role has one it may send.
        let mut answered = "$JS.API.STREAM.INFO.FLEET_JOBS".to_owned();
        if self.is_tenant(name) {
            options = options.custom_inbox_prefix(format!("_INBOX.{name}"));
            answered = format!("$JS.API.DIRECT.GET.FLEET_RESULTS.fleet.results.{name}.none");
        }
        let client = self
            .server
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("{name} cannot connect: {e}"));
        Conn {
            client,
            errors,
            answered,
        }
    }

    /// What an operator sees (operators may do anything).
    async fn operator(&self) -> jetstream::Context {
        jetstream::new(self.connect("ops").await.client)
    }
}

/// A connection and the errors the server sent it.
struct Conn {
    client: Client,
    errors: mpsc::UnboundedReceiver<String>,
    /// A request the server answers this user.
    answered: String,
}

impl Conn {
    /// Returns once the server has handled everything sent before (subscriptions included:
    /// `flush` only empties the client's buffer), by a request it answers on this connection.
    async fn sync(&self) {
        self.client
            .request(self.answered.clone(), "".into())
            .await
            .expect("the server answers");
    }

    /// True when the server reports, within the window, that it refused `verb` ("Publish" or
    /// "Subscription") on exactly `subject`.
    async fn refused(&mut self, verb: &str, subject: &str) -> bool {
        let wanted = format!("permissions violation for {verb} to \"{subject}\"");
        let deadline = tokio::time::Instant::now() + WINDOW;
        loop {
            match tokio::time::timeout_at(deadline, self.errors.recv()).await {
                Ok(Some(message)) if message.to_lowercase() == wanted.to_lowercase() => {
                    return true;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return false,
            }
        }
    }

    /// Subscribes to each subject, which the server must refuse.
    async fn subscribe_refused(&mut self, subjects: &[&str]) -> Vec<async_nats::Subscriber> {
        let mut subscriptions = Vec::new();
        for subject in subjects {
            // The client accepts it; the server does not register it.
            subscriptions.push(self.client.subscribe(subject.to_string()).await.unwrap());
            assert!(
                self.refused("subscription", subject).await,
                "the server did not refuse a subscription to {subject}"
            );
        }
        subscriptions
    }

    /// Sends requests (subject, body) that the server must drop: it says so for each, and no
    /// answer comes (a JetStream API request would have been answered, if only with an error).
    /// All at once, so the file does not wait out one window per request.
    async fn requests_refused(&mut self, requests: &[(&str, &str)]) {
        let answers = futures::future::join_all(requests.iter().map(|(subject, body)| {
            self.client
                .request(subject.to_string(), body.to_string().into())
        }))
        .await;
        for ((subject, _), answer) in requests.iter().zip(answers) {
            assert!(
                answer.is_err(),
                "{subject} was answered: {:?}",
                answer.map(|m| m.payload)
            );
        }
        let mut unreported: Vec<String> = requests
            .iter()
            .map(|(subject, _)| format!("permissions violation for publish to \"{subject}\""))
            .collect();
        while !unreported.is_empty() {
            match tokio::time::timeout(WINDOW, self.errors.recv()).await {
                Ok(Some(message)) => {
                    let message = message.to_lowercase();
                    unreported.retain(|wanted| wanted.to_lowercase() != message);
                }
                Ok(None) | Err(_) => break,
            }
        }
        assert!(
            unreported.is_empty(),
            "not refused by the server: {unreported:?}"
        );
    }
}

/// Asserts that none of the subscriptions receives anything within the window.
async fn nothing_arrives(subscriptions: &mut [async_nats::Subscriber]) {
    let mut all = futures::stream::select_all(subscriptions.iter_mut());
    if let Ok(Some(message)) = tokio::time::timeout(WINDOW, all.next()).await {
        panic!("a refused subscription received {}", message.subject);
    }
}

async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .expect("operator reads the stream")
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// Stores a result the way a worker does, with the worker's credentials.
async fn store_result(broker: &Broker, tenant: &str, job_id: &str, body: &str) -> u64 {
    let worker = broker.connect("worker-1").await;
    let js = jetstream::new(worker.client.clone());
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{tenant}.{job_id}").as_str());
    js.publish_with_headers(
        format!("fleet.results.{tenant}.{job_id}"),
        headers,
        body.to_owned().into(),
    )
    .await
    .expect("worker publishes a result")
    .await
    .expect("the results stream acknowledges it")
    .sequence
}

/// The pull consumer a tenant reads its results with, made by an operator (tenants may not
/// create consumers: a consumer's deliver subject could point stored messages anywhere).
async fn tenant_consumer(operator: &jetstream::Context, tenant: &str) {
    operator
        .create_consumer_on_stream(
            consumer::pull::Config {
                durable_name: Some(tenant.to_owned()),
                filter_subject: format!("fleet.results.{tenant}.*"),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
            "FLEET_RESULTS",
        )
        .await
        .expect("operator creates a tenant's consumer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_valid_credentials_is_refused() {
    let broker = Broker::start();
    let url = broker.server.url().to_owned();

    // Plain text: the server announces TLS as required and answers nothing in plain text.
    // (async-nats would switch to TLS by itself, so this speaks the protocol by hand.)
    let address = url.trim_start_matches("nats://");
    let mut plain = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut info = vec![0; 4096];
    let read = plain.read(&mut info).await.unwrap();
    let info = String::from_utf8_lossy(&info[..read]);
    assert!(info.contains(r#""tls_required":true"#), "{info}");
    plain
        .write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WINDOW, plain.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("PONG"),
        "the server answered in plain text"
    );

    // TLS with a client certificate but no credentials: there is no user to fall back to.
    let anonymous = broker.server.connect_with(broker.tls()).await;
    assert_eq!(
        anonymous.map(|_| ()).unwrap_err().kind(),
        ConnectErrorKind::AuthorizationViolation,
        "a connection without credentials"
    );

    // A well-formed nkey the server does not know.
    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let unknown = broker
        .server
        .connect_with(broker.tls().nkey(stranger))
        .await;
    assert_eq!(
        unknown.map(|_| ()).unwrap_err().kind(),
        ConnectErrorKind::AuthorizationViolation,
        "an unknown nkey"
    );

    // A known nkey without a client certificate (a leaked seed alone does not get in).
    let no_cert = ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(broker.pki("ca.pem"))
        .nkey(broker.seed(ACME))
        .connection_timeout(Duration::from_secs(2))
        .connect(&url)
        .await;
    let no_cert = no_cert.map(|_| ()).unwrap_err().to_string();
    assert!(
        no_cert.to_lowercase().contains("certificate"),
        "a connection without a client certificate: {no_cert}"
    );

    // The same tenant with everything it needs gets in: the refusals above are not a broken
    // setup.
    let acme = broker.connect(ACME).await;
    acme.client
        .flush()
        .await
        .expect("a tenant's connection works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reads_nothing_of_another_tenant_nor_anyone_s_envelopes() {
    let broker = Broker::with_streams().await;
    let operator = broker.operator().await;
    store_result(&broker, BOLT, "job-1", "bolt's result").await;
    tenant_consumer(&operator, BOLT).await;

    let mut acme = broker.connect(ACME).await;
    let mut subscriptions = acme
        .subscribe_refused(&[
            "_INBOX.bolt.>",
            "_INBOX.>",
            "fleet.results.>",
            "fleet.results.bolt.>",
            "fleet.results.*.job-2",
            "fleet.infer.>",
            "fleet.infer.embed",
            "fleet.submit.*",
            "fleet.jobs.>",
            "fleet.dlq.>",
            ">",
        ])
        .await;
    // Traffic on every one of those subjects, sent by those allowed to send it.
    let dispatcher = broker.connect("dispatcher-1").await.client;
    let worker = broker.connect("worker-1").await.client;
    let bolt = broker.connect(BOLT).await.client;
    bolt.publish("fleet.infer.embed", "bolt's envelope".into())
        .await
        .unwrap();
    bolt.publish("fleet.submit.embed", "bolt's envelope".into())
        .await
        .unwrap();
    dispatcher
        .publish("_INBOX.bolt.x", "an answer to bolt".into())
        .await
        .unwrap();
    dispatcher
        .publish("fleet.jobs.embed", "a queued job".into())
        .await
        .unwrap();
    worker
        .publish("fleet.results.bolt.job-2", "bolt's result".into())
        .await
        .unwrap();
    worker
        .publish("fleet.dlq.embed", "a dead letter".into())
        .await
        .unwrap();
    for client in [&dispatcher, &worker, &bolt] {
        client.flush().await.unwrap();
    }
    nothing_arrives(&mut subscriptions).await;

    // Stored results of another tenant: by subject, by wildcard, by sequence, by stream API.
    acme.requests_refused(&[
        (
            "$JS.API.DIRECT.GET.FLEET_RESULTS.fleet.results.bolt.job-1",
            "",
        ),
        ("$JS.API.DIRECT.GET.FLEET_RESULTS.fleet.results.*.job-1", ""),
        ("$JS.API.DIRECT.GET.FLEET_RESULTS.fleet.results.>", ""),
        ("$JS.API.DIRECT.GET.FLEET_RESULTS", r#"{"seq":1}"#),
        ("$JS.API.STREAM.MSG.GET.FLEET_RESULTS", r#"{"seq":1}"#),
        // Stream info with a subjects filter would list every tenant's job ids.
        (
            "$JS.API.STREAM.INFO.FLEET_RESULTS",
            r#"{"subjects_filter":">"}"#,
        ),
        ("$JS.API.STREAM.NAMES", ""),
        ("$JS.API.INFO", ""),
        // Another tenant's consumer: read it, pull from it.
        ("$JS.API.CONSUMER.INFO.FLEET_RESULTS.bolt", ""),
        (
            "$JS.API.CONSUMER.MSG.NEXT.FLEET_RESULTS.bolt",
            r#"{"batch":1,"expires":500000000}"#,
        ),
        // Creating consumers, even on its own results (see tenant_consumer).
        (
            "$JS.API.CONSUMER.CREATE.FLEET_RESULTS.bolt.fleet.results.bolt.*",
            r#"{"stream_name":"FLEET_RESULTS","config":{"name":"bolt","filter_subject":"fleet.results.bolt.*","ack_policy":"explicit"}}"#,
        ),
        (
            "$JS.API.CONSUMER.CREATE.FLEET_RESULTS.acme.fleet.results.acme.*",
            r#"{"stream_name":"FLEET_RESULTS","config":{"name":"acme","filter_subject":"fleet.results.acme.*","ack_policy":"explicit","deliver_subject":"fleet.jobs.embed"}}"#,
        ),
        (
            "$JS.API.CONSUMER.CREATE.FLEET_RESULTS",
            r#"{"stream_name":"FLEET_RESULTS","config":{"ack_policy":"none"}}"#,
        ),
        (
            "$JS.API.CONSUMER.DURABLE.CREATE.FLEET_RESULTS.acme",
            r#"{"stream_name":"FLEET_RESULTS","config":{"durable_name":"acme","ack_policy":"explicit"}}"#,
        ),
    ])
    .await;
    // Nothing was taken from bolt's consumer, and no consumer was made.
    let results = operator.get_stream("FLEET_RESULTS").await.unwrap();
    let mut bolt_consumer = results
        .get_consumer::<consumer::pull::Config>(BOLT)
        .await
        .unwrap();
    let info = bolt_consumer.info().await.unwrap();
    // Nothing delivered to anyone (bolt's job-1 and job-2 wait for bolt).
    assert_eq!(
        (
            info.delivered.stream_sequence,
            info.num_ack_pending,
            info.num_pending
        ),
        (0, 0, 2)
    );
    let consumers: Vec<String> = results
        .consumer_names()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(consumers, [BOLT]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_write_where_only_fleet_processes_write() {
    let broker = Broker::with_streams().await;
    let operator = broker.operator().await;
    let mut acme = broker.connect(ACME).await;
    let js = jetstream::new(acme.client.clone());
    for subject in [
        // Jobs that bypass the dispatcher's checks.
        "fleet.jobs.embed",
        // Results forged for itself or for another tenant.
        "fleet.results.acme.job-1",
        "fleet.results.bolt.job-1",
        "fleet.dlq.embed",
    ] {
        // A JetStream publish that the server drops is never acknowledged.
        let ack = async { js.publish(subject, "forged".into()).await?.await }.await;
        assert!(ack.is_err(), "{subject} was stored: {ack:?}");
        assert!(
            acme.refused("publish", subject).await,
            "the server did not refuse a publish to {subject}"
        );
    }
    for stream in ["FLEET_JOBS", "FLEET_RESULTS", "FLEET_DLQ"] {
        assert_eq!(count(&operator, stream).await, 0, "{stream} changed");
    }

    // Another tenant's inbox (a forged answer), and the streams' own API.
    let bolt = broker.connect(BOLT).await;
    // One inbox subject (bolt's own sync answer goes to another).
    let mut bolt_inbox = bolt.client.subscribe("_INBOX.bolt.x").await.unwrap();
    bolt.sync().await;
    acme.client
        .publish("_INBOX.bolt.x", "a forged answer".into())
        .await
        .unwrap();
    assert!(acme.refused("publish", "_INBOX.bolt.x").await);
    assert!(
        tokio::time::timeout(WINDOW, bolt_inbox.next())
            .await
            .is_err(),
        "a forged answer reached another tenant's inbox"
    );
    acme.requests_refused(&[
        ("$JS.API.STREAM.DELETE.FLEET_RESULTS", ""),
        ("$JS.API.STREAM.PURGE.FLEET_JOBS", "{}"),
        ("$JS.API.STREAM.MSG.DELETE.FLEET_JOBS", r#"{"seq":1}"#),
        ("$JS.API.STREAM.UPDATE.FLEET_RESULTS", "{}"),
        ("$JS.API.CONSUMER.DELETE.FLEET_JOBS.fleet-worker-embed", ""),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_does_everything_a_tenant_does() {
    let broker = Broker::with_streams().await;
    let operator = broker.operator().await;
    let acme = broker.connect(ACME).await;

    // A stand-in dispatcher answers requests as the real one does: in its queue group.
    let dispatcher_conn = broker.connect("dispatcher-1").await;
    let dispatcher = dispatcher_conn.client.clone();
    let mut infer = dispatcher
        .queue_subscribe("fleet.infer.*", "dispatchers".to_owned())
        .await
        .unwrap();
    let mut submit = dispatcher
        .queue_subscribe("fleet.submit.*", "dispatchers".to_owned())
        .await
        .unwrap();
    dispatcher_conn.sync().await;
    let answering = tokio::spawn(async move {
        let mut replies = Vec::new();
        for _ in 0..2 {
            let message = tokio::select! {
                Some(m) = infer.next() => m,
                Some(m) = submit.next() => m,
            };
            let reply = message.reply.clone().expect("a request has a reply inbox");
            dispatcher
                .publish(
                    reply.clone(),
                    format!("answer to {}", message.subject).into(),
                )
                .await
                .unwrap();
            replies.push(reply.to_string());
        }
        dispatcher.flush().await.unwrap();
        replies
    });
    let answer = acme
        .client
        .request("fleet.infer.embed", "acme's envelope".into())
        .await
        .expect("an infer request is answered");
    assert_eq!(answer.payload, "answer to fleet.infer.embed");
    let answer = acme
        .client
        .request("fleet.submit.embed", "acme's envelope".into())
        .await
        .expect("a submit request is answered");
    assert_eq!(answer.payload, "answer to fleet.submit.embed");
    for reply in answering.await.unwrap() {
        assert!(
            reply.starts_with("_INBOX.acme."),
            "the reply subject {reply} is not in acme's inbox prefix"
        );
    }

    // Its stored results: live, by direct get of the subject, and through its consumer.
    let mut live = acme.client.subscribe("fleet.results.acme.*").await.unwrap();
    acme.sync().await;
    let seq = store_result(&broker, ACME, "job-1", "acme's result").await;
    let landed = tokio::time::timeout(WINDOW, live.next())
        .await
        .expect("the result is seen live")
        .unwrap();
    assert_eq!(landed.payload, "acme's result");

    let stored = acme
        .client
        .request(
            "$JS.API.DIRECT.GET.FLEET_RESULTS.fleet.results.acme.job-1",
            "".into(),
        )
        .await
        .expect("a direct get of its own result is answered");
    assert_eq!(stored.payload, "acme's result");
    let headers = stored.headers.expect("a direct get answers with headers");
    assert_eq!(
        headers.get("Nats-Sequence").map(|v| v.as_str().to_owned()),
        Some(seq.to_string())
    );
    // The same with async-nats's own calls (a stream handle without STREAM.INFO, which
    // tenants may not ask).
    let js = jetstream::new(acme.client.clone());
    let results = js.get_stream_no_info("FLEET_RESULTS").await.unwrap();
    let stored = results
        .direct_get_last_for_subject("fleet.results.acme.job-1")
        .await
        .expect("async-nats's direct get works for a tenant");
    assert_eq!(
        (stored.sequence, stored.payload.as_ref()),
        (seq, &b"acme's result"[..])
    );
    assert!(
        results
            .direct_get_last_for_subject("fleet.results.bolt.job-1")
            .await
            .is_err()
    );

    tenant_consumer(&operator, ACME).await;
    let consumer: consumer::PullConsumer = js
        .get_consumer_from_stream(ACME, "FLEET_RESULTS")
        .await
        .expect("a tenant reads its consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(WINDOW)
        .messages()
        .await
        .expect("a tenant pulls from its consumer");
    let message = batch
        .next()
        .await
        .expect("its result is delivered")
        .unwrap();
    assert_eq!(message.payload, "acme's result");
    message.double_ack().await.expect("a tenant acks");
    let info = operator
        .get_stream("FLEET_RESULTS")
        .await
        .unwrap()
        .get_consumer::<consumer::pull::Config>(ACME)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(
        (info.ack_floor.stream_sequence, info.num_ack_pending),
        (seq, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatchers_and_workers_do_their_jobs_and_only_theirs() {
    let broker = Broker::with_streams().await;
    let operator = broker.operator().await;

    // The dispatcher finds the streams as it made them (its check at every start).
    let mut dispatcher = broker.connect("dispatcher-1").await;
    let djs = jetstream::new(dispatcher.client.clone());
    fleet_streams::ensure_all(&djs, &fleet_streams::StreamLimits::default())
        .await
        .expect("a dispatcher verifies the streams");
    // It queues a job and the queue acknowledges it.
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "acme.job-1");
    headers.insert("Fleet-Reply-To", "_INBOX.acme.x");
    let queued = djs
        .publish_with_headers("fleet.jobs.embed", headers, "a job".into())
        .await
        .unwrap()
        .await
        .expect("a dispatcher's job is queued");
    assert_eq!(queued.stream, "FLEET_JOBS");

    // A worker binds its model's consumer, takes the job, stores its result, answers, acks.
    let mut worker = broker.connect("worker-1").await;
    let wjs = jetstream::new(worker.client.clone());
    let mut advisories = worker
        .client
        .queue_subscribe(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.FLEET_JOBS.fleet-worker-embed",
            "fleet-worker-embed-exhausted".to_owned(),
        )
        .await
        .unwrap();
    let jobs: Stream = wjs.get_stream("FLEET_JOBS").await.unwrap();
    let config = consumer::pull::Config {
        durable_name: Some(format!("fleet-worker-{MODEL}")),
        filter_subject: format!("fleet.jobs.{MODEL}"),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_millis(300),
        max_deliver: 2,
        ..Default::default()
    };
    let pull = jobs
        .get_or_create_consumer(&format!("fleet-worker-{MODEL}"), config)
        .await
        .expect("a worker creates its model's consumer");
    let job = pull
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .unwrap()
        .next()
        .await
        .expect("the job is delivered")
        .unwrap();
    assert_eq!(job.payload, "a job");
    let results = wjs.get_stream("FLEET_RESULTS").await.unwrap();
    assert!(
        results
            .get_last_raw_message_by_subject("fleet.results.acme.job-1")
            .await
            .is_err(),
        "no result is stored yet"
    );
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "acme.job-1");
    // Stored only if nothing is stored for the job yet (the worker's compare and set).
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    wjs.publish_with_headers("fleet.results.acme.job-1", headers, "a result".into())
        .await
        .unwrap()
        .await
        .expect("a worker stores a result");
    let stored = results
        .get_last_raw_message_by_subject("fleet.results.acme.job-1")
        .await
        .expect("a worker reads a stored result");
    assert_eq!(stored.payload, "a result");
    job.double_ack().await.expect("a worker acks a job");

    // The dispatcher's relay reads the stored result too.
    let relayed = djs
        .get_stream("FLEET_RESULTS")
        .await
        .unwrap()
        .get_last_raw_message_by_subject("fleet.results.acme.job-1")
        .await
        .expect("a dispatcher reads a stored result");
    assert_eq!(relayed.payload, "a result");

    // A job whose deliveries run out: the server says so, and the worker dead-letters it.
    let queued = djs
        .publish("fleet.jobs.embed", "a job no worker finishes".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for _ in 0..3 {
        // Taken and left unacknowledged until its ack wait passes, twice; the third pull
        // makes the server notice the deliveries are used up.
        let _ = pull
            .fetch()
            .max_messages(1)
            .expires(Duration::from_millis(400))
            .messages()
            .await
            .unwrap()
            .next()
            .await;
        tokio::time::sleep(Duration::from_millis(350)).await;
    }
    let advisory = tokio::time::timeout(Duration::from_secs(3), advisories.next())
        .await
        .expect("a max-deliveries advisory reaches the worker")
        .unwrap();
    let advisory: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap();
    assert_eq!(advisory["stream_seq"], queued.sequence);
    let exhausted = jobs
        .get_raw_message(queued.sequence)
        .await
        .expect("a worker reads a queued job by sequence");
    let next = jobs
        .raw_message_builder()
        .sequence(1)
        .next_by_subject(format!("fleet.jobs.{MODEL}"))
        .send()
        .await
        .expect("a worker reads the next job of its model");
    assert_eq!(next.sequence, queued.sequence);
    wjs.publish("fleet.dlq.embed", exhausted.payload.clone())
        .await
        .unwrap()
        .await
        .expect("a worker dead-letters a job");
    assert!(
        jobs.delete_message(queued.sequence)
            .await
            .expect("a worker removes a settled job")
    );
    pull.clone()
        .info()
        .await
        .expect("a worker reads its consumer");
    assert_eq!(count(&operator, "FLEET_JOBS").await, 0);
    assert_eq!(count(&operator, "FLEET_RESULTS").await, 1);
    assert_eq!(count(&operator, "FLEET_DLQ").await, 1);

    // Neither does the other's work, nor reads the callers' envelopes outside the queue group.
    for subject in ["fleet.results.acme.job-2", "fleet.dlq.embed"] {
        let ack = async { djs.publish(subject, "forged".into()).await?.await }.await;
        assert!(ack.is_err(), "a dispatcher stored on {subject}");
        assert!(dispatcher.refused("publish", subject).await);
    }
    let ack = async {
        wjs.publish("fleet.jobs.embed", "forged".into())
            .await?
            .await
    }
    .await;
    assert!(ack.is_err(), "a worker queued a job");
    assert!(worker.refused("publish", "fleet.jobs.embed").await);
    let mut outside_group = dispatcher
        .subscribe_refused(&["fleet.infer.*", "fleet.submit.>"])
        .await;
    outside_group.extend(
        worker
            .subscribe_refused(&["fleet.infer.*", "fleet.submit.*"])
            .await,
    );
    let acme = broker.connect(ACME).await.client;
    acme.publish("fleet.infer.embed", "acme's envelope".into())
        .await
        .unwrap();
    acme.publish("fleet.submit.embed", "acme's envelope".into())
        .await
        .unwrap();
    acme.flush().await.unwrap();
    nothing_arrives(&mut outside_group).await;
    assert_eq!(count(&operator, "FLEET_JOBS").await, 0);
    assert_eq!(count(&operator, "FLEET_RESULTS").await, 1);
    assert_eq!(count(&operator, "FLEET_DLQ").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_made_by_fleet_tenant_add_connects_once_its_line_is_listed_and_loaded() {
    let broker = Broker::start();
    let conf = broker.conf_dir();
    let seed = broker.dir.path().join("carol.nk");
    let made = Command::new(fleet_tests::binary("fleet"))
        .args(["tenant", "--tenants"])
        .arg(broker.dir.path().join("tenants.toml"))
        .args(["add", "--tenant", "carol", "--out"])
        .arg(broker.dir.path().join("carol-key.toml"))
        .arg("--nats-seed-out")
        .arg(&seed)
        .output()
        .expect("fleet runs");
    assert!(made.status.success(), "{made:?}");
    let line = String::from_utf8(made.stdout).unwrap();
    assert!(line.starts_with("tenant carol U"), "{line}");
    let seed = std::fs::read_to_string(&seed).unwrap();
    let options = || broker.tls().nkey(seed.trim().to_owned());
    assert!(broker.server.connect_with(options()).await.is_err());
    // Still connected after the reload: existing users are not disturbed.
    let acme = broker.connect(ACME).await;

    let mut list = std::fs::read_to_string(conf.join("users.list")).unwrap();
    list.push_str(&line);
    std::fs::write(conf.join("users.list"), list).unwrap();
    run(Command::new(workspace().join("ops/nats/render.sh")).arg(&conf));
    run(Command::new("nats-server")
        .arg("--signal")
        .arg(format!("reload={}", broker.server.pid())));

    let carol = fleet_tests::eventually(Duration::from_secs(5), "carol admitted", || async {
        broker.server.connect_with(options()).await.ok()
    })
    .await;
    carol
        .flush()
        .await
        .expect("the new tenant's connection works");
    acme.client.flush().await.expect("acme stays connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_a_tenant_s_requests_never_land_in_the_fleet_s_streams() {
    // The server answers a request on the reply subject the requester names, with the server's
    // rights. Were tenants in the streams' account, a direct get of a tenant's own result
    // "answered" onto fleet.jobs.* would be queued as a job (nats-server 2.9.10 does that).
    let broker = Broker::with_streams().await;
    let operator = broker.operator().await;
    // Stored without a message id, so no duplicate check would hide a copy.
    let worker = jetstream::new(broker.connect("worker-1").await.client);
    worker
        .publish("fleet.results.acme.job-1", "acme's result".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let acme = broker.connect(ACME).await;
    let own = "$JS.API.DIRECT.GET.FLEET_RESULTS.fleet.results.acme.job-1";
    for reply in [
        "fleet.jobs.embed",
        "fleet.results.bolt.job-9",
        "fleet.results.acme.job-9",
        "fleet.dlq.embed",
    ] {
        acme.client
            .publish_with_reply(own, reply, "".into())
            .await
            .unwrap();
    }
    acme.client.flush().await.unwrap();
    // The same request with its own inbox is answered: the server did serve the ones above.
    let answer = acme.client.request(own, "".into()).await.unwrap();
    assert_eq!(answer.payload, "acme's result");
    tokio::time::sleep(WINDOW).await;
    assert_eq!(count(&operator, "FLEET_JOBS").await, 0);
    assert_eq!(count(&operator, "FLEET_RESULTS").await, 1);
    assert_eq!(count(&operator, "FLEET_DLQ").await, 0);
}

/// The settings a Fleet process connects to the broker with, as user `name`, and its metrics
/// on a free port.
fn process_nats_args(broker: &Broker, name: &str) -> Vec<String> {
    let mut args = broker.process_args(name);
    args.extend(["--metrics-addr".to_owned(), "127.0.0.1:0".to_owned()]);
    args
}

/// Starts the workspace binary `name` with its stdout and stderr in `<name>.log` in the
/// broker's folder; returns the process and the log's path.
fn spawn_logged(
    broker: &Broker,
    name: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> (fleet_tests::Process, PathBuf) {
    let log = broker.dir.path().join(format!("{name}.log"));
    let process = fleet_tests::Process::spawn_binary_logged(name, args, env, &log);
    (process, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_dispatcher_and_worker_serve_a_tenant_under_the_shipped_config() {
    use fleet_schemas::{JobResult, ResultStatus, SubmitStatus};
    use fleet_tests::{TestTenant, eventually, model_dir};

    let broker = Broker::start();
    let acme = TestTenant::new(ACME);
    let tenants = broker.dir.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        format!(
            "[[tenants]]\nname = \"{ACME}\"\nmodels = [\"*\"]\nrate_per_second = 1000\nburst = 1000\n\
             keys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n",
            acme.key.key_id,
            acme.public_key().to_hex()
        ),
    )
    .unwrap();
    let mut dispatcher_args = process_nats_args(&broker, "dispatcher-1");
    dispatcher_args.extend([
        "--tenants".to_owned(),
        tenants.to_string_lossy().into_owned(),
    ]);
    let mut worker_args = process_nats_args(&broker, "worker-1");
    worker_args.extend([
        "--model-dir".to_owned(),
        model_dir().to_string_lossy().into_owned(),
        "--tenants".to_owned(),
        tenants.to_string_lossy().into_owned(),
        // The result cache's bucket is made, read and written under the worker's rights (the
        // same text is embedded several times below).
        "--result-cache".to_owned(),
        "tenant".to_owned(),
    ]);
    // Their logs are kept: a subject the config forgot shows up there as a server error.
    let (mut dispatcher, dispatcher_log) = spawn_logged(
        &broker,
        "dispatcher",
        &dispatcher_args,
        &[("RUST_LOG", "warn")],
    );
    let (mut worker, worker_log) =
        spawn_logged(&broker, "worker", &worker_args, &[("RUST_LOG", "warn")]);

    let client = broker.connect(ACME).await.client;
    let tenant = fleet_client::Tenant {
        name: acme.name.clone(),
        key: acme.key,
    };
    let texts = vec!["NATS permissions per tenant".to_owned()];
    // The first calls may find no dispatcher yet, or a worker still loading the model.
    let result = eventually(Duration::from_secs(120), "an embedding", || {
        let job = tenant.embed_job(REAL_MODEL, texts.clone());
        let (client, tenant) = (client.clone(), &tenant);
        async move {
            fleet_client::infer(&client, tenant, &job, Duration::from_secs(10))
                .await
                .ok()
                .filter(|result| result.status == ResultStatus::Ok)
        }
    })
    .await;
    assert_eq!(result.tenant, ACME);

    // Submitted, then read back by direct get with the tenant's own rights.
    let job = tenant.embed_job(REAL_MODEL, texts.clone());
    let reply = fleet_client::submit(&client, &tenant, &job, Duration::from_secs(10))
        .await
        .expect("submit answered");
    assert_eq!(reply.status, SubmitStatus::Accepted, "{reply:?}");
    let stored = eventually(Duration::from_secs(30), "the stored result", || {
        let (client, job_id) = (client.clone(), job.job_id.clone());
        async move {
            fleet_client::stored_result(&client, ACME, &job_id)
                .await
                .expect("a tenant may read its own results")
        }
    })
    .await;
    assert_eq!(
        (stored.job_id.as_str(), stored.status),
        (job.job_id.as_str(), ResultStatus::Ok)
    );

    // The same job again by infer: the dispatcher relays the stored result.
    let relayed = fleet_client::infer(&client, &tenant, &job, Duration::from_secs(10))
        .await
        .expect("a repeated infer is answered");
    assert_eq!(
        (relayed.job_id.as_str(), relayed.status),
        (job.job_id.as_str(), ResultStatus::Ok)
    );

    // A job placed straight on the queue with a dispatcher's credential (leaked), under acme's
    // key id but signed by another key: the worker dead-letters it with its code; it is never
    // run, stored or answered.
    let operator = broker.operator().await;
    let mut acme_inbox = client
        .subscribe(format!("_INBOX.{ACME}.forged"))
        .await
        .unwrap();
    let forged = tenant.embed_job(REAL_MODEL, texts.clone());
    let mallory = fleet_schemas::SigningKey::generate(tenant.key.key_id.clone());
    let mut headers = HeaderMap::new();
    headers.insert(
        fleet_schemas::subject::REPLY_TO,
        format!("_INBOX.{ACME}.forged").as_str(),
    );
    let leaked = jetstream::new(broker.connect("dispatcher-1").await.client);
    leaked
        .publish_with_headers(
            format!("fleet.jobs.{REAL_MODEL}"),
            headers,
            fleet_schemas::encode(&mallory.sign_job(&forged).unwrap())
                .unwrap()
                .into(),
        )
        .await
        .unwrap()
        .await
        .expect("a dispatcher may queue jobs");
    eventually(
        Duration::from_secs(30),
        "the forged job dead-lettered",
        || {
            let operator = operator.clone();
            async move { (count(&operator, "FLEET_DLQ").await == 1).then_some(()) }
        },
    )
    .await;
    let dead = operator
        .get_stream("FLEET_DLQ")
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    assert_eq!(
        dead.headers
            .get(fleet_schemas::subject::SERVICE_ERROR_CODE)
            .map(|code| code.as_str()),
        Some("bad_signature")
    );
    let forged_result = format!(
        "$JS.API.DIRECT.GET.FLEET_RESULTS.fleet.results.{ACME}.{}",
        forged.job_id
    );
    let answer = client.request(forged_result, "".into()).await.unwrap();
    assert!(
        fleet_schemas::decode::<JobResult>(&answer.payload, usize::MAX).is_err(),
        "a result was stored for the forged job"
    );
    nothing_arrives(std::slice::from_mut(&mut acme_inbox)).await;

    // An envelope over the dispatcher's 1 MiB limit passes the broker (max_payload 2 MiB) and
    // gets the dispatcher's typed answer, not a protocol error.
    let big = tenant.embed_job(REAL_MODEL, vec!["x".repeat(30_000); 40]);
    assert!(tenant.sign(&big).unwrap().len() > 1 << 20);
    let refused = fleet_client::infer(&client, &tenant, &big, Duration::from_secs(10))
        .await
        .expect("an oversized envelope is answered");
    assert_eq!(refused.status, ResultStatus::Rejected);
    assert_eq!(
        refused.error.map(|error| error.code),
        Some(fleet_schemas::ErrorCode::TooLarge)
    );

    assert!(dispatcher.is_running() && worker.is_running());
    for log in [dispatcher_log, worker_log] {
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(
            !log.to_lowercase().contains("permissions violation"),
            "a Fleet process was refused a subject: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_log_line_of_a_fleet_run_at_debug_level() {
    use fleet_tests::{eventually, model_dir, openbao::OpenBao};

    // Every secret a fleet holds: nkey seeds (files), the tenant's signing key (a key file, and
    // in Vault), the Vault token (environment), the TLS client key (a file).
    let broker = Broker::start();
    let bao = OpenBao::start();
    let vault_env = [
        ("VAULT_ADDR", bao.addr()),
        ("VAULT_TOKEN", bao.token()),
        ("RUST_LOG", "debug"),
    ];
    let key_file = broker.dir.path().join("acme-key.toml");
    let (mut tenant_add, tenant_add_log) = spawn_logged(
        &broker,
        "fleet",
        &[
            "tenant".to_owned(),
            "--tenants-from-vault".to_owned(),
            "add".to_owned(),
            "--tenant".to_owned(),
            ACME.to_owned(),
            "--out".to_owned(),
            key_file.to_string_lossy().into_owned(),
        ],
        &vault_env,
    );
    assert_eq!(tenant_add.wait_exit(Duration::from_secs(30)), Some(0));
    let tenant_add_log = std::fs::read_to_string(tenant_add_log).unwrap();

    let from_vault = ["--tenants-from-vault".to_owned()];
    let mut dispatcher_args = process_nats_args(&broker, "dispatcher-1");
    dispatcher_args.extend(from_vault.clone());
    let mut worker_args = process_nats_args(&broker, "worker-1");
    worker_args.extend(from_vault);
    worker_args.extend([
        "--model-dir".to_owned(),
        model_dir().to_string_lossy().into_owned(),
    ]);
    let (mut dispatcher, dispatcher_log) =
        spawn_logged(&broker, "dispatcher", &dispatcher_args, &vault_env);
    let (mut worker, worker_log) = spawn_logged(&broker, "worker", &worker_args, &vault_env);

    // The `fleet` command, as a user calls it, until the fleet answers.
    let mut infer_args = process_nats_args(&broker, ACME);
    infer_args.truncate(infer_args.len() - 2); // `fleet` serves no metrics
    infer_args.extend(
        [
            "--key",
            &key_file.to_string_lossy(),
            "--model",
            REAL_MODEL,
            "--timeout",
            "10s",
            "--text",
            "secrets stay out of logs",
        ]
        .map(str::to_owned),
    );
    let mut infer_logs = String::new();
    let answer = eventually(Duration::from_secs(120), "an embedding", || {
        let output = Command::new(fleet_tests::binary("fleet"))
            .arg("infer")
            .args(&infer_args)
            .env("RUST_LOG", "debug")
            .output()
            .expect("fleet runs");
        infer_logs.push_str(&String::from_utf8_lossy(&output.stderr));
        let answer: Option<fleet_schemas::JobResult> = serde_json::from_slice(&output.stdout).ok();
        std::future::ready(answer.filter(|result| result.status == fleet_schemas::ResultStatus::Ok))
    })
    .await;
    // Lines written after the answer (the worker's ack, the stored result) count too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(dispatcher.is_running() && worker.is_running());

    let seeds: Vec<String> = ["dispatcher-1", "worker-1", ACME]
        .iter()
        .map(|name| broker.seed(name))
        .collect();
    let signing_key = fleet_client::Tenant::from_key_file(&key_file)
        .unwrap()
        .key
        .secret_hex();
    let tls_key = std::fs::read_to_string(broker.pki("client-client-key.pem")).unwrap();
    let mut secrets: Vec<(&str, String)> = vec![
        ("the Vault token", bao.token().to_owned()),
        ("the signing key", signing_key.clone()),
        ("half the signing key", signing_key[..32].to_owned()),
    ];
    secrets.extend(seeds.iter().map(|seed| ("an nkey seed", seed.clone())));
    secrets.extend(
        tls_key
            .lines()
            .filter(|line| !line.starts_with("-----"))
            .map(|line| ("the TLS client key", line.to_owned())),
    );
    let seed_like = |line: &str| {
        // An nkey seed: 'S', its type, then base32 (58 characters in all).
        line.as_bytes().windows(58).any(|w| {
            w[0] == b'S'
                && b"UAONC".contains(&w[1])
                && w[2..]
                    .iter()
                    .all(|c| matches!(c, b'A'..=b'Z' | b'2'..=b'7'))
        })
    };

    let logs = [
        ("fleet tenant add", tenant_add_log),
        (
            "dispatcher",
            std::fs::read_to_string(dispatcher_log).unwrap(),
        ),
        ("worker", std::fs::read_to_string(worker_log).unwrap()),
        ("fleet infer", infer_logs),
    ];
    let mut debug_lines = 0;
    for (process, log) in &logs {
        for line in log.lines() {
            debug_lines += usize::from(line.contains("DEBUG"));
            for (what, secret) in &secrets {
                assert!(
                    !line.contains(secret.as_str()),
                    "{what} in {process}'s log: {line}"
                );
            }
            assert!(!seed_like(line), "an nkey seed in {process}'s log: {line}");
        }
    }
    // The scan read real debug output, the job's own lines among them.
    assert!(debug_lines > 100, "only {debug_lines} debug lines");
    for (process, log) in &logs[1..3] {
        assert!(
            log.contains(&answer.job_id),
            "{process} never logged the job"
        );
    }
}
