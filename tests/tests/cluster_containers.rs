//! A fleet on a 3-node JetStream cluster of nats-server containers (tests/src/containers.rs),
//! real `dispatcher` and `worker` processes given every node's URL, streams with three replicas:
//! what a node put through `docker pause` does to it. Skipped, loudly, where Docker cannot run,
//! unless `FLEET_REQUIRE_DOCKER=1`.
//!
//! Callers are watched from outside: each call attempt has an inbox of its own
//! (`_INBOX.acme.pause.<job>.<attempt>`), one subscription takes every answer on them, so an
//! inbox answered twice is a caller answered twice, and `FLEET_RESULTS` keeps one result per job
//! while counting every store in its sequence. The test's own connections avoid the paused node:
//! what is measured is the fleet's failover, not the watcher's.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fleet_schemas::{ErrorCode, Job, JobResult, ResultStatus, decode, encode, subject};
use fleet_tests::{
    Process, Streams, TestTenant,
    containers::{ContainerCluster, StreamState},
    eventually, model_dir, write_tenants_file,
};
use futures::StreamExt;

const MODEL: &str = "all-minilm-l6-v2";
const TENANT: &str = "acme";
/// Callers' inboxes: `<prefix>.<job id>.<attempt>`, one per call attempt.
const INBOXES: &str = "_INBOX.acme.pause";
/// Calls in flight at once: a steady load two shared cores carry with room to spare, so that a
/// stall is the cluster's and not the machine's.
const CALLERS: usize = 4;
/// How long one call attempt waits for its answer before the caller tries again under the same
/// job id (the dispatcher relays the stored result of a job it already queued). Short, so that a
/// call lost with the paused node is sent again before the fleet's own failover is over: the
/// silence measured is the fleet's.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a caller keeps trying one job; past it the job counts as unanswered.
const CALL_LIMIT: Duration = Duration::from_secs(120);
/// Load before the pause, and after it, so the woken node catches up under load.
const LOAD_AROUND: Duration = Duration::from_secs(10);
/// How long the node stays paused.
const PAUSED: Duration = Duration::from_secs(30);
/// Longest the fleet may go without an answer while a node is paused: the queue's and the
/// workers' consumer's Raft groups elect new leaders (a follower waits 4-9 s for a lost leader,
/// nats-server's election timeouts, and campaigns for up to 0.8 s) and the processes on the
/// paused node leave it after three missed pings (Fleet's processes ping every 2 s): the limit
/// of tests/tests/chaos.rs's frozen leader, 15 s + 6 s. Shorter than the pause, so a fleet
/// that waits for the node fails (watched: with `--replicas 1` new work was first answered 35 s
/// after the pause).
const SILENCE_LIMIT: Duration = Duration::from_secs(21);
/// Longest the woken node may take to hold what the others hold.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);
/// Longest the jobs may take to be stored and leave the queue once the load stops.
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// Time left after the drain for late damage (a second answer or store) to show.
const SETTLE: Duration = Duration::from_secs(4);

/// An answer seen on a caller's inbox.
#[derive(Clone)]
struct Answer {
    job_id: String,
    status: ResultStatus,
    /// Its error's code, if it is not ok.
    error: Option<ErrorCode>,
    at: Instant,
}

/// Every answer on the callers' inboxes, by inbox.
type Answers = Arc<Mutex<HashMap<String, Vec<Answer>>>>;

fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn inbox(job_id: &str, attempt: u32) -> String {
    format!("{INBOXES}.{job_id}.{attempt}")
}

/// Takes every answer on the callers' inboxes until the task is aborted.
async fn watch_answers(client: &async_nats::Client) -> (Answers, tokio::task::JoinHandle<()>) {
    let mut answers = client
        .subscribe(format!("{INBOXES}.>"))
        .await
        .expect("subscribe to the callers' inboxes");
    client.flush().await.expect("subscription registered");
    let seen: Answers = Arc::default();
    let task = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(message) = answers.next().await {
                let at = Instant::now();
                let Ok(result) = decode::<JobResult>(&message.payload, 1 << 20) else {
                    continue;
                };
                lock(&seen)
                    .entry(message.subject.to_string())
                    .or_default()
                    .push(Answer {
                        job_id: result.job_id,
                        status: result.status,
                        error: result.error.map(|e| e.code),
                        at,
                    });
            }
        }
    });
    (seen, task)
}

/// The first answer on `inbox`, waiting up to `timeout`.
async fn wait_answer(answers: &Answers, inbox: &str, timeout: Duration) -> Option<Answer> {
    let start = Instant::now();
    loop {
        if let Some(answer) = lock(answers).get(inbox).and_then(|a| a.first()) {
            return Some(answer.clone());
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A caller: synchronous calls (`fleet.infer`) one after another until `stop`, each tried
/// again under its job id while unanswered or answered `overloaded`. Returns its jobs, each with
/// when it was first sent.
async fn call(
    client: async_nats::Client,
    answers: Answers,
    caller: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(Job, Instant)> {
    let tenant = TestTenant::new(TENANT);
    let mut jobs = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let id = format!("c{caller}-{}", jobs.len());
        let job = Job::embed(
            id.as_str(),
            TENANT,
            MODEL,
            vec![format!("sentence {id} for the paused node")],
            fleet_schemas::now_ms(),
        );
        let payload = encode(&tenant.key.sign_job(&job).expect("sign")).expect("encode");
        let started = Instant::now();
        for attempt in 0.. {
            let reply = inbox(&id, attempt);
            // A publish to a connection that is reconnecting is buffered; an attempt that is
            // lost anyway is tried again below.
            let _ = client
                .publish_with_reply(subject::infer(MODEL), reply.clone(), payload.clone().into())
                .await;
            let again = wait_answer(&answers, &reply, ATTEMPT_TIMEOUT)
                .await
                .is_none_or(|answer| answer.error.is_some_and(fleet_client::is_retryable));
            if !again || started.elapsed() > CALL_LIMIT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        jobs.push((job, started));
    }
    jobs
}

/// The longest time without an answer from `from` to `to`.
fn longest_silence(answers: &Answers, from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = lock(answers)
        .values()
        .flatten()
        .map(|a| a.at)
        .filter(|&at| at > from && at <= to)
        .collect();
    times.sort();
    let mut last = from;
    let mut longest = Duration::ZERO;
    for at in times {
        longest = longest.max(at - last);
        last = at;
    }
    longest.max(to - last)
}

/// Waits until every replica of `stream` is current with no lag, as the stream's leader sees
/// it; true if it happened within `limit`.
async fn replicas_current(streams: &Streams, stream: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(mut handle) = streams.js.get_stream(stream).await
            && let Ok(info) = handle.info().await
            && let Some(cluster) = &info.cluster
            && cluster.leader.is_some()
            && cluster.replicas.len() == 2
            && cluster
                .replicas
                .iter()
                .all(|peer| peer.current && peer.lag.unwrap_or(0) == 0)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_for_30_s_under_load_catches_up_and_nothing_is_lost_or_answered_twice() {
    let Some(cluster) = ContainerCluster::start_or_skip(3, "docker pause of a cluster node").await
    else {
        return;
    };
    let urls = cluster.urls();
    let tenants = tempfile::tempdir().expect("temporary directory");
    let tenants_file = write_tenants_file(tenants.path(), &[TENANT]);
    let tenants_file = tenants_file.to_string_lossy().into_owned();
    let _dispatcher = Process::spawn_binary(
        "dispatcher",
        &[
            "--nats-url",
            &urls,
            "--tenants",
            &tenants_file,
            "--replicas",
            "3",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "warn")],
    );
    let streams = Streams::connect_client(cluster.client().await);
    eventually(
        Duration::from_secs(30),
        "the dispatcher's streams",
        || async {
            streams
                .js
                .get_stream(subject::JOBS_STREAM)
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    let model = model_dir();
    let _worker = Process::spawn_binary(
        "worker",
        &[
            "--nats-url",
            &urls,
            "--tenants",
            &tenants_file,
            "--model-dir",
            &model.to_string_lossy(),
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "warn")],
    );

    // The node to pause leads the queue: its stream and the workers' consumer lose their leader.
    let paused = cluster
        .stream_leader(&streams.js, subject::JOBS_STREAM)
        .await;
    let others: Vec<usize> = (0..3).filter(|&node| node != paused).collect();
    let callers = cluster.client_of(&others).await;
    let streams = Streams::connect_client(cluster.client_of(&others).await);
    let (answers, watcher) = watch_answers(&callers).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..CALLERS)
        .map(|caller| tokio::spawn(call(callers.clone(), answers.clone(), caller, stop.clone())))
        .collect();
    // The model is loaded and jobs flow.
    eventually(Duration::from_secs(120), "a first answer", || async {
        (!lock(&answers).is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(LOAD_AROUND).await;

    // Who leads what when the node is paused, for the record.
    let leader_of = |group: Option<String>| group.unwrap_or_else(|| "none".to_owned());
    let consumer_leader = streams
        .consumer_info(MODEL)
        .await
        .and_then(|info| info.cluster?.leader);
    let leaders = format!(
        "meta {}, FLEET_JOBS {}, FLEET_RESULTS {}, consumer {}",
        cluster
            .meta_leader()
            .await
            .map_or("none", |node| cluster.name(node)),
        cluster.name(
            cluster
                .stream_leader(&streams.js, subject::JOBS_STREAM)
                .await
        ),
        cluster.name(
            cluster
                .stream_leader(&streams.js, subject::RESULTS_STREAM)
                .await
        ),
        leader_of(consumer_leader)
    );
    let answered_since = |from: Instant| {
        lock(&answers)
            .values()
            .flatten()
            .filter(|a| a.at > from)
            .count()
    };
    let answered_before = answered_since(Instant::now() - LOAD_AROUND);
    cluster.pause(paused).await;
    let paused_at = Instant::now();
    tokio::time::sleep(PAUSED).await;
    let silence = longest_silence(&answers, paused_at, Instant::now());
    let answered_while_paused = answered_since(paused_at);
    cluster.unpause(paused).await;
    let unpaused_at = Instant::now();

    // The woken node is a current replica again, as the leaders see it, under load.
    let jobs_current = replicas_current(&streams, subject::JOBS_STREAM, CATCH_UP_LIMIT).await;
    let results_current = replicas_current(&streams, subject::RESULTS_STREAM, CATCH_UP_LIMIT).await;
    let caught_up = unpaused_at.elapsed();
    tokio::time::sleep(LOAD_AROUND.saturating_sub(caught_up)).await;
    stop.store(true, Ordering::Relaxed);
    let mut jobs = Vec::new();
    for caller in load {
        jobs.extend(caller.await.expect("a caller"));
    }

    // Every job stored and gone from the queue.
    let sent = jobs.len() as u64;
    eventually(DRAIN_LIMIT, "every job stored, the queue empty", || async {
        let results = streams.js.get_stream(subject::RESULTS_STREAM).await.ok();
        let stored = results?.info().await.ok()?.state.messages;
        let queue = streams.js.get_stream(subject::JOBS_STREAM).await.ok();
        let queued = queue?.info().await.ok()?.state.messages;
        (stored == sent && queued == 0).then_some(())
    })
    .await;
    tokio::time::sleep(SETTLE).await;
    watcher.abort();

    // The paused node's own store holds what the others hold, stream by stream.
    let mut views = Vec::new();
    for stream in [subject::JOBS_STREAM, subject::RESULTS_STREAM] {
        let start = Instant::now();
        let states = loop {
            let mut states = Vec::new();
            for node in 0..3 {
                states.push(cluster.node_stream_state(node, stream).await);
            }
            // Caught up: every sequence the others hold; for the queue, stranded jobs aside
            // (below).
            let caught_up = match (states[paused], states[others[0]], states[others[1]]) {
                (Some(woken), Some(kept), Some(other)) => {
                    other == kept
                        && (woken == kept
                            || (stream == subject::JOBS_STREAM && woken.last_seq >= kept.last_seq))
                }
                _ => false,
            };
            if caught_up || start.elapsed() > CATCH_UP_LIMIT {
                break states;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        views.push((stream, states));
    }

    let answers = lock(&answers).clone();
    let answered_twice = answers.values().filter(|a| a.len() > 1).count();
    let answered: HashMap<&str, &Answer> = answers
        .values()
        .flatten()
        .filter(|a| a.status != ResultStatus::Rejected)
        .map(|a| (a.job_id.as_str(), a))
        .collect();
    let unanswered = jobs
        .iter()
        .filter(|(job, _)| !answered.contains_key(job.job_id.as_str()))
        .count();
    // Service for new work: the first answer to a job first sent after the pause began (an
    // answer to an older job may be a stored result the dispatcher relays to a retry, which a
    // stopped fleet gives too), and how many such jobs were answered while the node was paused.
    let mut first_answer: HashMap<&str, Instant> = HashMap::new();
    for answer in answers.values().flatten() {
        if answer.status != ResultStatus::Rejected {
            let at = first_answer
                .entry(answer.job_id.as_str())
                .or_insert(answer.at);
            *at = (*at).min(answer.at);
        }
    }
    let new_work: Vec<Instant> = jobs
        .iter()
        .filter(|(_, sent_at)| *sent_at > paused_at)
        .filter_map(|(job, _)| first_answer.get(job.job_id.as_str()).copied())
        .collect();
    let resumed = new_work.iter().min().map(|&at| at - paused_at);
    let new_done_while_paused = new_work.iter().filter(|&&at| at < unpaused_at).count();
    let not_ok: Vec<(&str, Option<ErrorCode>)> = answered
        .values()
        .filter(|a| a.status != ResultStatus::Ok)
        .map(|a| (a.job_id.as_str(), a.error))
        .collect();
    let retried = answers
        .keys()
        .filter(|inbox| !inbox.ends_with(".0"))
        .count();
    let mut lost = 0;
    for (job, _) in &jobs {
        if streams.stored_result(job).await.is_none() {
            lost += 1;
        }
    }
    let stored_again = streams.results_stored_again().await;
    println!(
        "\ndocker pause of {} for {PAUSED:?} (leaders then: {leaders}): {sent} jobs, \
         {:.1} answers/s before, {:.1} while paused, longest silence {:.1} s; new work \
         answered {resumed:.1?} after the pause, {new_done_while_paused} new jobs answered \
         while paused; \
         replicas current {:.1} s after unpause (jobs {jobs_current}, results \
         {results_current}); lost {lost}, stored again {stored_again}, answered twice \
         {answered_twice}, unanswered {unanswered}, not ok {not_ok:?}, attempts retried \
         {retried}; each node's own {views:?}",
        cluster.name(paused),
        answered_before as f64 / LOAD_AROUND.as_secs_f64(),
        answered_while_paused as f64 / PAUSED.as_secs_f64(),
        silence.as_secs_f64(),
        caught_up.as_secs_f64(),
    );
    for (stream, states) in &views {
        let states: Vec<StreamState> = states
            .iter()
            .map(|state| state.unwrap_or_else(|| panic!("a node does not report {stream}")))
            .collect();
        let (woken, kept) = (states[paused], states[others[0]]);
        assert_eq!(
            states[others[1]], kept,
            "the nodes that were never paused differ on {stream}: {states:?}"
        );
        if *stream == subject::JOBS_STREAM && woken != kept {
            // nats-server 2.9 removes an acked job from each replica of a work queue through that
            // replica's own copy of the consumer: a node frozen while jobs were acked keeps them
            // (stranded) until a leader change or restart (nats-server#5270 and #6140 fix it in
            // 2.10 and 2.11). A leader frozen mid-publish may also keep, past its last sequence,
            // publishes the others never stored (seen once in 14 runs: 4 jobs the dispatcher had
            // answered `overloaded`, so their callers sent them again and the majority stored
            // them once): nats-server 2.9.10's divergence, not Fleet's to repair; the run says so
            // below. What the woken node must have is every job: none that the others hold
            // missing.
            assert!(
                woken.last_seq >= kept.last_seq,
                "the woken node lacks jobs: {states:?}"
            );
            if woken.last_seq > kept.last_seq {
                println!(
                    "the woken node holds {} publishes past the others' last sequence (nats-server \
                     2.9.10 kept a frozen leader's uncommitted publishes): {states:?}",
                    woken.last_seq - kept.last_seq
                );
            }
            assert!(
                woken.messages >= kept.messages && woken.first_seq <= kept.first_seq,
                "the woken node lacks jobs the others hold: {states:?}"
            );
            println!(
                "{} acked jobs stranded on the woken node's copy of {stream} (nats-server 2.9's \
                 work queue replicas); the others hold {}",
                woken.messages - kept.messages,
                kept.messages
            );
        } else {
            assert_eq!(
                woken, kept,
                "the woken node does not hold what the others hold of {stream}: {states:?}"
            );
        }
    }
    assert_eq!(lost, 0, "jobs without a stored result");
    assert_eq!(stored_again, 0, "results stored twice");
    assert_eq!(answered_twice, 0, "call attempts answered twice");
    assert_eq!(unanswered, 0, "jobs never answered");
    assert!(not_ok.is_empty(), "jobs answered with an error: {not_ok:?}");
    assert!(
        jobs_current && results_current,
        "the woken node was not a current replica within {CATCH_UP_LIMIT:?}"
    );
    assert!(
        silence < SILENCE_LIMIT,
        "no answer for {silence:?} while a node was paused (limit {SILENCE_LIMIT:?})"
    );
    assert!(
        resumed.is_some_and(|after| after < SILENCE_LIMIT),
        "the first job sent after the pause was answered {resumed:?} after it \
         (limit {SILENCE_LIMIT:?}): the majority did not go on"
    );
}
