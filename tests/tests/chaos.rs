//! Chaos: the faults a fleet meets in production, on real processes (`nats-server`,
//! `dispatcher`, `worker` on the real model). Each scenario ends in one row of what became of
//! its jobs: sent, stored once, lost, stored twice, callers answered twice, left on the queue,
//! time to drain after the last fault; every row must show nothing lost, stored twice, answered
//! twice or left behind.
//!
//! What the processes do is watched from outside, as an operator would: one subscription takes
//! every answer (each call attempt has an inbox of its own, so an answer counted twice is a
//! caller answered twice), another every delivery of a job to a worker (the ack subject says
//! which delivery it is), and `FLEET_RESULTS` keeps one result per job while counting every
//! store in its sequence.
//!
//! Short by default (it runs in `cargo test`, so in ops/test.sh); `FLEET_CHAOS_LONG=1` (what
//! ops/chaos.sh sets) sends more jobs through more rounds of faults. Scenarios run one at a
//! time: they measure time on a machine they would otherwise share.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::Message;
use fleet_schemas::{Job, JobResult, ResultStatus, decode, encode, now_ms, subject};
use fleet_tests::{
    NatsServer, Process, Signal, Streams, TestTenant, binary, cluster::NatsCluster, model_dir,
};
use futures::StreamExt;
use tokio::task::JoinHandle;

const MODEL: &str = "all-minilm-l6-v2";
const TENANT: &str = "acme";
/// Callers' inboxes: `<prefix>.<job id>.<attempt>`, one per call attempt.
const INBOXES: &str = "_INBOX.acme.chaos";
/// Settings every chaos worker gets, through the environment: a worker built from an older
/// commit (ops/chaos.sh can run one) ignores variables it does not know, where it would refuse
/// an unknown flag. The ack wait is explicit so that a fleet whose default is longer still
/// finishes in bounded time; the reconciler runs often enough to clear orphans within a row.
const WORKER_ENV: [(&str, &str); 3] = [
    ("FLEET_ACK_WAIT", "3s"),
    ("FLEET_RECONCILE_EVERY", "5s"),
    ("FLEET_SHUTDOWN_TIMEOUT", "20s"),
];
/// Longest a row waits for its jobs after the last fault before counting what is missing.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// Time left after the drain for late damage (a woken worker's second answer or store) to
/// show before counting.
const SETTLE: Duration = Duration::from_secs(4);

/// Scenarios share the machine's cores and measure time: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Short (in `cargo test`) or long (`FLEET_CHAOS_LONG=1`).
fn long() -> bool {
    std::env::var("FLEET_CHAOS_LONG").is_ok_and(|v| v == "1")
}

fn pick<T>(short: T, long_run: T) -> T {
    if long() { long_run } else { short }
}

/// What the watcher saw: answers per caller inbox and every delivery of a job.
#[derive(Default)]
struct Seen {
    answers: HashMap<String, Vec<Answer>>,
    deliveries: Vec<Delivery>,
}

#[derive(Clone)]
struct Answer {
    job_id: String,
    status: ResultStatus,
    worker: String,
    at: Instant,
}

#[derive(Clone)]
struct Delivery {
    job_id: String,
    /// 1 for the first delivery, 2 for the first redelivery...
    count: u64,
    at: Instant,
}

/// Watches answers and deliveries from its own connection (which reconnects through server
/// restarts) until dropped.
struct Observer {
    seen: Arc<Mutex<Seen>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Observer {
    async fn start(client: async_nats::Client) -> Observer {
        let mut answers = client
            .subscribe(format!("{INBOXES}.>"))
            .await
            .expect("subscribe to the callers' inboxes");
        // Pull consumers take their jobs on inboxes of the worker's connection.
        let mut deliveries = client
            .subscribe("_INBOX.>")
            .await
            .expect("subscribe to deliveries");
        client.flush().await.expect("subscriptions registered");
        let seen = Arc::new(Mutex::new(Seen::default()));
        let answers_task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(message) = answers.next().await {
                    let at = Instant::now();
                    let Ok(result) = decode::<JobResult>(&message.payload, 1 << 20) else {
                        continue;
                    };
                    let answer = Answer {
                        job_id: result.job_id,
                        status: result.status,
                        worker: result.worker,
                        at,
                    };
                    lock(&seen)
                        .answers
                        .entry(message.subject.to_string())
                        .or_default()
                        .push(answer);
                }
            }
        });
        let deliveries_task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Some(message) = deliveries.next().await {
                    if let Some(delivery) = delivery(&message) {
                        lock(&seen).deliveries.push(delivery);
                    }
                }
            }
        });
        // The client lives as long as its subscriptions' tasks.
        drop(client);
        Observer {
            seen,
            tasks: vec![answers_task, deliveries_task],
        }
    }

    fn all_answers(&self) -> HashMap<String, Vec<Answer>> {
        lock(&self.seen).answers.clone()
    }

    fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.seen).deliveries.clone()
    }

    /// When each answer came, earliest first.
    fn answer_times(&self) -> Vec<Instant> {
        let mut times: Vec<Instant> = lock(&self.seen)
            .answers
            .values()
            .flatten()
            .map(|a| a.at)
            .collect();
        times.sort();
        times
    }

    /// Workers that have answered at least once.
    fn answering_workers(&self) -> HashSet<String> {
        lock(&self.seen)
            .answers
            .values()
            .flatten()
            .map(|a| a.worker.clone())
            .collect()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// The first answer on `inbox`, waiting up to `timeout`.
async fn wait_answer(seen: &Mutex<Seen>, inbox: &str, timeout: Duration) -> Option<Answer> {
    let start = Instant::now();
    loop {
        if let Some(answer) = lock(seen).answers.get(inbox).and_then(|a| a.first()) {
            return Some(answer.clone());
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A delivery of one of this suite's jobs: its reply subject is
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`.
fn delivery(message: &Message) -> Option<Delivery> {
    let reply = message.reply.as_ref()?;
    let mut tokens = reply.split('.');
    let prefix = [tokens.next()?, tokens.next()?, tokens.next()?];
    if prefix != ["$JS", "ACK", subject::JOBS_STREAM] {
        return None;
    }
    let count = tokens.nth(1)?.parse().ok()?;
    let msg_id = message.headers.as_ref()?.get(subject::MSG_ID)?.as_str();
    let job_id = msg_id.strip_prefix(TENANT)?.strip_prefix('.')?;
    Some(Delivery {
        job_id: job_id.to_owned(),
        count,
        at: Instant::now(),
    })
}

fn inbox(job_id: &str, attempt: u32) -> String {
    format!("{INBOXES}.{job_id}.{attempt}")
}

/// `count` jobs of two short inputs each.
fn make_jobs(prefix: &str, count: usize) -> Vec<Job> {
    (0..count)
        .map(|i| {
            let inputs = vec![
                format!("chaos sentence {i} of the {prefix} scenario"),
                format!("a second, slightly longer input for job {i}, to batch"),
            ];
            Job::embed(format!("{prefix}-{i}"), TENANT, MODEL, inputs, now_ms())
        })
        .collect()
}

/// Where a scenario's fleet finds NATS: one server, or a JetStream cluster.
enum Broker {
    Server(NatsServer),
    Cluster(NatsCluster),
}

impl Broker {
    /// What processes are given as `--nats-url`: every node of a cluster.
    fn url(&self) -> &str {
        match self {
            Broker::Server(server) => server.url(),
            Broker::Cluster(cluster) => cluster.urls(),
        }
    }

    async fn client(&self) -> async_nats::Client {
        match self {
            Broker::Server(server) => server.client().await,
            Broker::Cluster(cluster) => cluster.client().await,
        }
    }

    fn server(&mut self) -> &mut NatsServer {
        match self {
            Broker::Server(server) => server,
            Broker::Cluster(_) => panic!("this scenario runs on one server"),
        }
    }

    fn cluster(&mut self) -> &mut NatsCluster {
        match self {
            Broker::Cluster(cluster) => cluster,
            Broker::Server(_) => panic!("this scenario runs on a cluster"),
        }
    }
}

/// One scenario's fleet: a server, its streams, the watcher, workers in numbered slots (a
/// killed worker's replacement takes its slot with a new name), and the jobs sent.
struct Chaos {
    name: &'static str,
    broker: Broker,
    streams: Streams,
    observer: Observer,
    model_dir: PathBuf,
    worker_env: Vec<(&'static str, String)>,
    worker_program: PathBuf,
    workers: Vec<Option<(String, Process)>>,
    started: usize,
    /// Every job sent, whoever sent it (the test, a feeder, callers).
    jobs: Arc<Mutex<Vec<Job>>>,
    /// The tenants file the workers verify jobs against (given as `FLEET_TENANTS`, which a
    /// worker of another build ignores).
    tenants: tempfile::TempDir,
}

impl Chaos {
    /// A scenario on one nats-server.
    async fn start(name: &'static str) -> Chaos {
        Chaos::on(
            name,
            Broker::Server(NatsServer::start()),
            &fleet_streams::StreamLimits::default(),
        )
        .await
    }

    /// A scenario on `broker`, Fleet's streams made with `limits`.
    async fn on(name: &'static str, broker: Broker, limits: &fleet_streams::StreamLimits) -> Chaos {
        let streams = Streams::create_with(broker.client().await, limits).await;
        let observer = Observer::start(broker.client().await).await;
        let tenants = tempfile::tempdir().expect("temporary directory");
        fleet_tests::write_tenants_file(tenants.path(), &[TENANT]);
        Chaos {
            name,
            broker,
            streams,
            observer,
            model_dir: model_dir(),
            worker_env: WORKER_ENV
                .iter()
                .map(|(k, v)| (*k, (*v).to_owned()))
                .collect(),
            // ops/chaos.sh --worker: another build's worker, to compare.
            worker_program: std::env::var_os("FLEET_CHAOS_WORKER")
                .map_or_else(|| binary("worker"), PathBuf::from),
            workers: Vec::new(),
            started: 0,
            jobs: Arc::default(),
            tenants,
        }
    }

    fn jobs(&self) -> Vec<Job> {
        lock(&self.jobs).clone()
    }

    /// Workers of this scenario run with the fleet's defaults, not the suite's settings.
    fn with_default_settings(mut self) -> Chaos {
        self.worker_env.clear();
        self
    }

    /// Starts a worker in `slot`, named after the slot and how many workers came before.
    fn start_worker(&mut self, slot: usize) -> String {
        let name = format!("w{slot}-{}", self.started);
        self.started += 1;
        let model_dir = self.model_dir.to_string_lossy().into_owned();
        let log = std::env::var("FLEET_CHAOS_LOG").unwrap_or_else(|_| "error".to_owned());
        let tenants = self.tenants.path().join("tenants.toml");
        let tenants = tenants.to_string_lossy().into_owned();
        let mut env: Vec<(&str, &str)> = vec![("RUST_LOG", &log), ("FLEET_TENANTS", &tenants)];
        env.extend(self.worker_env.iter().map(|(k, v)| (*k, v.as_str())));
        let process = Process::spawn(
            "worker",
            &self.worker_program,
            &[
                "--nats-url",
                self.broker.url(),
                "--model-dir",
                &model_dir,
                "--worker-name",
                &name,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &env,
        );
        if self.workers.len() <= slot {
            self.workers.resize_with(slot + 1, || None);
        }
        self.workers[slot] = Some((name.clone(), process));
        name
    }

    fn worker(&mut self, slot: usize) -> &mut Process {
        &mut self.workers[slot]
            .as_mut()
            .expect("a worker in this slot")
            .1
    }

    fn worker_name(&self, slot: usize) -> String {
        self.workers[slot]
            .as_ref()
            .expect("a worker in this slot")
            .0
            .clone()
    }

    /// SIGKILLs the worker in `slot` and starts a replacement there.
    fn kill_and_replace(&mut self, slot: usize) {
        let worker = self.worker(slot);
        worker.signal(Signal::SIGKILL);
        worker.wait_exit(Duration::from_secs(10));
        self.start_worker(slot);
    }

    /// Keeps `backlog` jobs waiting for a worker until the feeder is stopped, so faults land
    /// on a fleet under full load however fast this machine is. Publishes that fail (the
    /// server is restarting) are repeated with the same job id, which the queue stores once.
    fn feed(&self, backlog: u64) -> Feeder {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (streams, jobs) = (self.streams.clone(), self.jobs.clone());
        let task = tokio::spawn(async move {
            let mut batch = 0;
            while stopped.try_recv().is_err() {
                let waiting = match waiting_jobs(&streams).await {
                    Some(waiting) if waiting < backlog => waiting,
                    _ => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                batch += 1;
                for job in make_jobs(&format!("f{batch}"), (backlog - waiting) as usize) {
                    let reply_to = inbox(&job.job_id, 0);
                    let start = Instant::now();
                    while let Err(error) = streams.try_enqueue(&job, Some(&reply_to)).await {
                        assert!(
                            start.elapsed() < Duration::from_secs(30),
                            "cannot queue {} for 30 s: {error}",
                            job.job_id
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    lock(&jobs).push(job);
                }
            }
        });
        Feeder { stop, task }
    }

    /// Waits until some worker has answered a job: the model is loaded and jobs flow.
    async fn wait_started(&self) {
        fleet_tests::eventually(Duration::from_secs(120), "a first answer", || async {
            (!self.observer.answering_workers().is_empty()).then_some(())
        })
        .await;
    }

    /// Waits until each of `workers` has answered a job: they run and hold work.
    async fn wait_answering(&self, workers: &[String]) {
        fleet_tests::eventually(Duration::from_secs(120), "workers answering", || async {
            let answering = self.observer.answering_workers();
            workers.iter().all(|w| answering.contains(w)).then_some(())
        })
        .await;
    }

    /// Messages in a stream, None while the server is away (restarting).
    async fn count(&self, stream: &str) -> Option<u64> {
        let mut stream = self.streams.js.get_stream(stream).await.ok()?;
        Some(stream.info().await.ok()?.state.messages)
    }

    /// Waits until every job has a stored result and the queue is empty; returns how long
    /// that took after `faults_over`, or None past the limit.
    async fn drain(&self, faults_over: Instant) -> Option<Duration> {
        let sent = lock(&self.jobs).len() as u64;
        loop {
            let stored = self.count(subject::RESULTS_STREAM).await;
            let queued = self.count(subject::JOBS_STREAM).await;
            if stored == Some(sent) && queued == Some(0) {
                return Some(faults_over.elapsed());
            }
            if faults_over.elapsed() > DRAIN_LIMIT {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Drains, lets late damage show, and counts: the scenario's row.
    async fn finish(&self, faults_over: Instant) -> Row {
        let drain = self.drain(faults_over).await;
        tokio::time::sleep(SETTLE).await;
        let jobs = self.jobs();
        let mut stored = 0;
        // Why results are not ok, by error code and message, for the log.
        let mut failures: HashMap<String, usize> = HashMap::new();
        for job in &jobs {
            if let Some(result) = self.streams.stored_result(job).await {
                stored += 1;
                if result.status != ResultStatus::Ok {
                    let why = result.error.map_or_else(String::new, |e| {
                        format!("{}: {}", e.code.as_str(), e.message)
                    });
                    *failures.entry(why).or_default() += 1;
                }
            }
        }
        let answers = self.observer.all_answers();
        let answered_twice = answers.values().filter(|a| a.len() > 1).count();
        let answered: HashSet<&str> = answers
            .values()
            .flatten()
            .filter(|a| a.status != ResultStatus::Rejected)
            .map(|a| a.job_id.as_str())
            .collect();
        let row = Row {
            scenario: self.name,
            sent: jobs.len(),
            stored,
            stored_again: self.streams.results_stored_again().await as usize,
            failed: failures.values().sum(),
            answered_twice,
            unanswered: jobs
                .iter()
                .filter(|j| !answered.contains(j.job_id.as_str()))
                .count(),
            left_on_queue: self.streams.messages_in(subject::JOBS_STREAM).await as usize,
            drain,
        };
        // Rows go to stdout, each on a line of its own (after libtest's "test ... "), for
        // ops/chaos.sh's table, even when an assertion fails.
        println!("\n{row}");
        if row.left_on_queue > 0 {
            println!("{}: {}", self.name, self.leftovers().await);
        }
        for (why, count) in &failures {
            println!("{}: {count} results not ok: {why}", self.name);
        }
        row
    }

    /// What is left on the queue after the drain, for the failure message: the consumer's
    /// state and the first jobs left, with whether each has a stored result.
    async fn leftovers(&self) -> String {
        let consumer = self.streams.consumer_info(MODEL).await.map(|info| {
            format!(
                "consumer delivered {}, ack floor {}, {} pending, {} held",
                info.delivered.stream_sequence,
                info.ack_floor.stream_sequence,
                info.num_pending,
                info.num_ack_pending
            )
        });
        let queue = self.streams.stream(subject::JOBS_STREAM).await;
        let mut left = Vec::new();
        let mut next = 1;
        while left.len() < 5 {
            let Ok(message) = queue
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject::jobs(MODEL))
                .send()
                .await
            else {
                break;
            };
            next = message.sequence + 1;
            let id = message
                .headers
                .get(subject::MSG_ID)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            let job_id = id.strip_prefix("acme.").unwrap_or(&id);
            let stored = self
                .streams
                .stream(subject::RESULTS_STREAM)
                .await
                .get_last_raw_message_by_subject(&subject::results(TENANT, job_id))
                .await
                .is_ok();
            left.push(format!(
                "seq {} (result stored: {stored})",
                message.sequence
            ));
        }
        format!("{consumer:?}; left: {}", left.join(", "))
    }
}

/// Jobs on the queue that no worker has taken yet (all of them before a worker made the
/// consumer); None while the server is away.
async fn waiting_jobs(streams: &Streams) -> Option<u64> {
    let mut queue = streams.js.get_stream(subject::JOBS_STREAM).await.ok()?;
    match queue
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&format!(
            "fleet-worker-{MODEL}"
        ))
        .await
    {
        Ok(mut consumer) => Some(consumer.info().await.ok()?.num_pending),
        Err(_) => Some(queue.info().await.ok()?.state.messages),
    }
}

/// A task keeping a backlog queued.
struct Feeder {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Feeder {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("the feeder queued every job");
    }
}

/// What became of a scenario's jobs.
#[derive(Debug)]
struct Row {
    scenario: &'static str,
    sent: usize,
    /// Jobs with a stored result.
    stored: usize,
    /// Stores over a result already stored for the same job.
    stored_again: usize,
    /// Stored results that are not `ok` (a job out of deliveries is answered `internal`).
    failed: usize,
    /// Call attempts (inboxes) answered more than once.
    answered_twice: usize,
    /// Jobs whose caller got no answer from a worker (a caller that retries gets the stored
    /// result from the dispatcher).
    unanswered: usize,
    left_on_queue: usize,
    /// After the last fault; None when the jobs did not drain within the limit.
    drain: Option<Duration>,
}

impl Row {
    fn lost(&self) -> usize {
        self.sent - self.stored
    }

    /// Nothing lost, stored twice, answered twice or left on the queue, drained in time.
    fn assert_clean(&self) {
        assert_eq!(self.lost(), 0, "jobs lost: {self}");
        assert_eq!(self.stored_again, 0, "results stored twice: {self}");
        assert_eq!(self.answered_twice, 0, "callers answered twice: {self}");
        assert_eq!(self.left_on_queue, 0, "jobs left on the queue: {self}");
        assert!(
            self.drain.is_some(),
            "not drained within {DRAIN_LIMIT:?}: {self}"
        );
    }
}

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let drain = self.drain.map_or_else(
            || "> limit".to_owned(),
            |d| format!("{:.1}", d.as_secs_f64()),
        );
        write!(
            f,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.sent,
            self.stored.saturating_sub(self.stored_again),
            self.lost(),
            self.stored_again,
            self.answered_twice,
            self.unanswered,
            self.failed,
            self.left_on_queue,
            drain
        )
    }
}

/// Backlog the feeder keeps queued beyond what workers hold.
const BACKLOG: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_worker_sigkills_loses_nothing_and_stores_each_result_once() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut chaos = Chaos::start("worker SIGKILL storm").await;
    for slot in 0..3 {
        chaos.start_worker(slot);
    }
    let feeder = chaos.feed(BACKLOG);
    chaos.wait_started().await;
    for round in 0..pick(4, 20) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        chaos.kill_and_replace(round % 3);
    }
    let faults_over = Instant::now();
    feeder.stop().await;
    chaos.finish(faults_over).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_frozen_past_its_ack_wait_neither_answers_nor_stores_twice() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut chaos = Chaos::start("worker SIGSTOP past the ack wait").await;
    let frozen = chaos.start_worker(0);
    chaos.start_worker(1);
    let feeder = chaos.feed(BACKLOG);
    chaos.wait_answering(&[frozen]).await;
    // Longer than the ack wait (3 s); the long run also stalls past the queue's 120 s
    // duplicate window, after which only the results store itself can refuse a second copy.
    let stalls: &[u64] = pick(&[10], &[10, 40, 130]);
    for &stall in stalls {
        // A worker that woke to find a batch past its time bound may have stopped (its
        // watchdog cannot tell a frozen process from a hung model): freeze a fresh one.
        if !chaos.worker(0).is_running() {
            let fresh = chaos.start_worker(0);
            chaos.wait_answering(&[fresh]).await;
        }
        // Under load the worker holds its most jobs (256) when it stops.
        tokio::time::sleep(Duration::from_secs(2)).await;
        chaos.worker(0).signal(Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_secs(stall)).await;
        chaos.worker(0).signal(Signal::SIGCONT);
    }
    let faults_over = Instant::now();
    feeder.stop().await;
    chaos.finish(faults_over).await.assert_clean();
}

/// Restarts the server under load, stopping it with `signal` each round.
async fn server_restarts(name: &'static str, signal: Signal) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut chaos = Chaos::start(name).await;
    for slot in 0..2 {
        chaos.start_worker(slot);
    }
    let feeder = chaos.feed(BACKLOG);
    chaos.wait_started().await;
    for _ in 0..pick(3, 10) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        chaos.broker.server().stop(signal);
        tokio::time::sleep(Duration::from_secs(1)).await;
        chaos.broker.server().restart();
    }
    let faults_over = Instant::now();
    feeder.stop().await;
    chaos.finish(faults_over).await.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_stopped_and_restarted_under_load_loses_nothing() {
    server_restarts("nats-server SIGTERM + restart", Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_killed_and_restarted_under_load_loses_nothing() {
    server_restarts("nats-server SIGKILL + restart", Signal::SIGKILL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_finish_their_jobs_and_exit_zero() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut chaos = Chaos::start("worker SIGTERM drains").await;
    for slot in 0..2 {
        chaos.start_worker(slot);
    }
    let feeder = chaos.feed(BACKLOG);
    chaos.wait_started().await;
    let mut exits = Vec::new();
    for round in 0..pick(3, 12) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let worker = chaos.worker(round % 2);
        worker.signal(Signal::SIGTERM);
        exits.push(worker.wait_exit(Duration::from_secs(30)));
        chaos.start_worker(round % 2);
    }
    let faults_over = Instant::now();
    feeder.stop().await;
    chaos.finish(faults_over).await.assert_clean();
    assert!(
        exits.iter().all(|code| *code == Some(0)),
        "a drained worker exited with {exits:?}"
    );
}

/// A caller that retries: each attempt sends the same signed job on an inbox of its own and
/// waits for an answer; no answer in time (its dispatcher died, no dispatcher listened) or a
/// refusal to retry later means another attempt, until the job is too old to be admitted.
/// Returns the answers it took.
async fn call_with_retries(
    client: async_nats::Client,
    seen: Arc<Mutex<Seen>>,
    job: Job,
    payload: Vec<u8>,
) -> Option<Answer> {
    // The dispatcher admits a job for 60 s after its creation; later attempts would be refused.
    let give_up = Duration::from_secs(50);
    let created = Instant::now();
    for attempt in 0.. {
        let inbox = inbox(&job.job_id, attempt);
        if client
            .publish_with_reply(subject::infer(MODEL), inbox.clone(), payload.clone().into())
            .await
            .is_ok()
            && let Some(answer) = wait_answer(&seen, &inbox, Duration::from_secs(5)).await
            && answer.status != ResultStatus::Rejected
        {
            return Some(answer);
        }
        if created.elapsed() > give_up {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_retrying_through_killed_dispatchers_are_each_answered_once_per_call() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut chaos = Chaos::start("dispatcher SIGKILL, callers retry").await;
    let tenant = Arc::new(TestTenant::new(TENANT));
    let dir = tempfile::tempdir().expect("temporary folder");
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        format!(
            "[[tenants]]\nname = \"{TENANT}\"\nmodels = [\"*\"]\nrate_per_second = 100000\n\
             burst = 100000\nkeys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n",
            tenant.key.key_id,
            tenant.public_key().to_hex()
        ),
    )
    .expect("tenants file");
    let tenants = tenants.to_string_lossy().into_owned();
    let url = chaos.broker.url().to_owned();
    let dispatcher = |name: &str| {
        Process::spawn_binary(
            "dispatcher",
            &[
                "--nats-url",
                &url,
                "--tenants",
                &tenants,
                "--name",
                name,
                "--metrics-addr",
                "127.0.0.1:0",
            ],
            &[("RUST_LOG", "error")],
        )
    };
    let mut dispatchers = [dispatcher("d0"), dispatcher("d1")];
    (0..2).for_each(|slot| {
        chaos.start_worker(slot);
    });

    let client = chaos.broker.server().tenant_client(TENANT).await;
    // Callers, each sending a new job once its last is answered, until the faults are over.
    let (calling, stop_calling) = tokio::sync::watch::channel(true);
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..32 {
        let (client, seen, jobs) = (
            client.clone(),
            chaos.observer.seen.clone(),
            chaos.jobs.clone(),
        );
        let tenant = tenant.clone();
        let calling = stop_calling.clone();
        callers.spawn(async move {
            let mut unanswered = 0;
            for call in 0.. {
                if !*calling.borrow() {
                    break;
                }
                let job = make_jobs(&format!("c{caller}x{call}"), 1).remove(0);
                let payload = encode(&tenant.key.sign_job(&job).expect("sign")).expect("encode");
                lock(&jobs).push(job.clone());
                if call_with_retries(client.clone(), seen.clone(), job, payload)
                    .await
                    .is_none()
                {
                    unanswered += 1;
                }
            }
            unanswered
        });
    }
    chaos.wait_started().await;
    for round in 0..pick(4, 15) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let slot = round % 2;
        dispatchers[slot].signal(Signal::SIGKILL);
        dispatchers[slot].wait_exit(Duration::from_secs(10));
        dispatchers[slot] = dispatcher(&format!("d{slot}-{round}"));
    }
    let faults_over = Instant::now();
    calling.send(false).expect("callers listen");
    let mut unanswered = 0;
    while let Some(caller) = callers.join_next().await {
        unanswered += caller.expect("caller task");
    }
    let row = chaos.finish(faults_over).await;
    row.assert_clean();
    assert_eq!(unanswered, 0, "callers that gave up retrying: {row}");
}

/// When a killed worker's jobs went to another worker, after its SIGKILL.
struct Failover {
    /// Per job the killed worker held: until another worker took it.
    redelivered: Vec<Duration>,
    /// Per job the killed worker held and had not answered: until another worker answered.
    answered: Vec<Duration>,
    /// Redeliveries of jobs whose worker was alive.
    false_redeliveries: usize,
}

/// Reads failovers from the deliveries the observer saw. A job delivered before a kill and
/// redelivered after it was the killed worker's (the live workers' jobs are not redelivered:
/// what a full load without kills shows, since every redelivery before the first kill counts
/// as false); any other redelivery is false.
fn failovers(observer: &Observer, kills: &[(String, Instant)]) -> Failover {
    let deliveries = observer.deliveries();
    let answers: Vec<Answer> = observer.all_answers().into_values().flatten().collect();
    let mut failover = Failover {
        redelivered: Vec::new(),
        answered: Vec::new(),
        false_redeliveries: 0,
    };
    let mut previous: HashMap<&str, Instant> = HashMap::new();
    for delivery in &deliveries {
        let taken_before = previous.insert(&delivery.job_id, delivery.at);
        if delivery.count == 1 {
            continue;
        }
        let kill = kills
            .iter()
            .rev()
            .find(|(_, at)| *at < delivery.at)
            .filter(|(_, at)| taken_before.is_some_and(|taken| taken < *at));
        let Some((killed, at)) = kill else {
            failover.false_redeliveries += 1;
            continue;
        };
        failover.redelivered.push(delivery.at - *at);
        if let Some(answer) = answers
            .iter()
            .filter(|a| a.job_id == delivery.job_id && a.at > *at && a.worker != *killed)
            .min_by_key(|a| a.at)
        {
            failover.answered.push(answer.at - *at);
        }
    }
    failover
}

/// The median and the largest, in seconds.
fn p50_max(times: &mut [Duration]) -> (f64, f64) {
    times.sort();
    let p50 = times.get(times.len() / 2).copied().unwrap_or_default();
    let max = times.last().copied().unwrap_or_default();
    (p50.as_secs_f64(), max.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_jobs_go_to_another_worker_within_seconds_and_no_earlier() {
    let _one = ONE_AT_A_TIME.lock().await;
    // The fleet's own defaults: the ack wait and progress acks that failover rests on.
    let mut chaos = Chaos::start("failover after SIGKILL, defaults")
        .await
        .with_default_settings();
    let first: Vec<String> = (0..2).map(|slot| chaos.start_worker(slot)).collect();
    // A full batch load: more queued than both workers hold, so each holds its most jobs
    // (held ones waiting for the model on progress acks) and runs full batches.
    let feeder = chaos.feed(BACKLOG);
    chaos.wait_answering(&first).await;
    let mut kills = Vec::new();
    for round in 0..pick(1, 6) {
        // Longer than two ack waits (3 s): held jobs must not be redelivered meanwhile.
        tokio::time::sleep(Duration::from_secs(8)).await;
        // The older worker: the last round's replacement holds that round's failovers.
        let slot = round % 2;
        let killed = chaos.worker_name(slot);
        chaos.worker(slot).signal(Signal::SIGKILL);
        kills.push((killed, Instant::now()));
        chaos.worker(slot).wait_exit(Duration::from_secs(10));
        // As a supervisor would; it loads its model while the survivor takes over.
        chaos.start_worker(slot);
    }
    // The last kill's jobs go over under load too.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let faults_over = Instant::now();
    feeder.stop().await;
    let row = chaos.finish(faults_over).await;
    let mut failover = failovers(&chaos.observer, &kills);
    let (redelivered_p50, redelivered_max) = p50_max(&mut failover.redelivered);
    let (answered_p50, answered_max) = p50_max(&mut failover.answered);
    // ops/chaos.sh copies this line into RELIABILITY.md.
    println!(
        "\nfailover: {} kills, {} jobs held by the killed workers; taken by another worker after \
         p50 {redelivered_p50:.1} s, max {redelivered_max:.1} s; answered after p50 \
         {answered_p50:.1} s, max {answered_max:.1} s; false redeliveries {}",
        kills.len(),
        failover.redelivered.len(),
        failover.false_redeliveries
    );
    row.assert_clean();
    assert!(
        !failover.redelivered.is_empty(),
        "the killed worker held no jobs: nothing was measured"
    );
    assert_eq!(
        failover.false_redeliveries, 0,
        "jobs of live workers redelivered"
    );
    assert!(
        redelivered_max < 10.0,
        "failover took {redelivered_max:.1} s"
    );
}

/// The longest time without an answer from `from` to `to`: how long the fleet stood still.
fn longest_silence(answers: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &at in answers.iter().filter(|&&at| at > from && at <= to) {
        longest = longest.max(at - last);
        last = at;
    }
    longest.max(to - last)
}

/// Longest the fleet may stand still after a node of its cluster dies: the stream's and the
/// workers' consumer's Raft groups elect new leaders (in parallel; a follower waits 4-9 s for a
/// lost leader before it campaigns, nats-server's minElectionTimeoutDefault and
/// maxElectionTimeoutDefault, and campaigns for up to 0.8 s), clients reconnect to another node
/// and the workers pull again. A bound of 10 s, below the server's own worst case, failed a CI
/// run at 10.3 s.
const CLUSTER_FAILOVER_LIMIT: Duration = Duration::from_secs(15);

/// How long a node stays down: twice the limit, so a fleet that cannot go on without the node
/// (streams with one replica) stands still past the limit and fails the scenario.
const CLUSTER_NODE_DOWN: Duration = Duration::from_secs(30);

/// What befalls the node leading `FLEET_JOBS` in a cluster scenario.
#[derive(Clone, Copy)]
enum NodeFault {
    /// SIGKILLed, restarted `down` later on its store.
    Killed,
    /// SIGSTOPped (to the other nodes and the clients it is cut off, as in a partition), then
    /// SIGCONTed `down` later: it must catch up.
    Frozen,
}

impl NodeFault {
    /// Longest the fleet may stand still after the fault. A killed node's connections close at
    /// once; a frozen node's stay open until its clients have missed three pings (Fleet's
    /// processes ping every 2 s), which adds 6 s to the failover.
    fn silence_limit(self) -> Duration {
        match self {
            NodeFault::Killed => CLUSTER_FAILOVER_LIMIT,
            NodeFault::Frozen => CLUSTER_FAILOVER_LIMIT + 3 * Duration::from_secs(2),
        }
    }
}

/// On a 3-node cluster with R3 streams under load, the node leading `FLEET_JOBS` meets `fault`
/// for `down`, `rounds` times: nothing may be lost, stored twice or answered twice, and the
/// fleet may not stand still for the fault's [`NodeFault::silence_limit`].
async fn cluster_leader_fault(name: &'static str, fault: NodeFault, down: Duration, rounds: usize) {
    let _one = ONE_AT_A_TIME.lock().await;
    let limits = fleet_streams::StreamLimits {
        replicas: 3,
        ..Default::default()
    };
    let broker = Broker::Cluster(NatsCluster::start(3).await);
    let mut chaos = Chaos::on(name, broker, &limits).await;
    for slot in 0..2 {
        chaos.start_worker(slot);
    }
    let feeder = chaos.feed(BACKLOG);
    chaos.wait_started().await;
    let mut silences = Vec::new();
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let js = chaos.streams.js.clone();
        let cluster = chaos.broker.cluster();
        let leader = cluster.stream_leader(&js, subject::JOBS_STREAM).await;
        let struck = Instant::now();
        match fault {
            NodeFault::Killed => cluster.stop(leader, Signal::SIGKILL),
            NodeFault::Frozen => cluster.signal(leader, Signal::SIGSTOP),
        }
        // The two nodes left are a majority: the fleet goes on without the third.
        tokio::time::sleep(down).await;
        silences.push(longest_silence(
            &chaos.observer.answer_times(),
            struck,
            Instant::now(),
        ));
        let cluster = chaos.broker.cluster();
        match fault {
            NodeFault::Killed => cluster.restart(leader),
            NodeFault::Frozen => cluster.signal(leader, Signal::SIGCONT),
        }
    }
    let faults_over = Instant::now();
    feeder.stop().await;
    let row = chaos.finish(faults_over).await;
    let shown: Vec<String> = silences
        .iter()
        .map(|s| format!("{:.1} s", s.as_secs_f64()))
        .collect();
    eprintln!("{name}: longest time without an answer after each fault: {shown:?}");
    row.assert_clean();
    let limit = fault.silence_limit();
    for silence in silences {
        assert!(
            silence < limit,
            "no answer for {silence:?} after the leader's node failed (limit {limit:?}): {row}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_queues_leader_killed_on_a_3_node_cluster_loses_nothing_and_the_fleet_goes_on() {
    cluster_leader_fault(
        "FLEET_JOBS leader SIGKILL, 3-node cluster",
        NodeFault::Killed,
        CLUSTER_NODE_DOWN,
        pick(2, 6),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_queues_leader_frozen_for_30_s_loses_nothing_and_catches_up() {
    cluster_leader_fault(
        "FLEET_JOBS leader SIGSTOP 30 s, 3-node cluster",
        NodeFault::Frozen,
        Duration::from_secs(30),
        pick(1, 3),
    )
    .await;
}
