//! One small harness for every test that needs real servers: it starts them on loopback
//! ports of their own choosing with temporary state, and stops them when dropped, so no test
//! depends on anything a previous run left behind.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap,
    jetstream::{self, consumer, consumer::PullConsumer, message::StreamMessage, stream::Stream},
};
use fleet_schemas::{Job, JobResult, SigningKey, VerifyingKey, decode, encode, subject};
use nix::{sys::signal, unistd::Pid};

pub mod cluster;
pub mod containers;
pub mod elasticsearch;
pub mod http;
pub mod openbao;
pub mod openmetrics;
pub mod prometheus;
pub mod shipped_broker;

/// A `nats-server` with JetStream and a temporary store, on a random loopback port. It can be
/// stopped (a clean SIGTERM or a crash by SIGKILL) and started again on the same port and store,
/// as nats.rs's own test server does, so clients reconnect to the same URL and find their
/// streams.
pub struct NatsServer {
    process: Process,
    port: u16,
    url: String,
    store: tempfile::TempDir,
    /// The configuration file it runs with ([`NatsServer::start_with_config`]), if any.
    config: Option<PathBuf>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let store = tempfile::tempdir().expect("temporary JetStream store");
        // Port -1: the server picks a free one and says which in its log.
        let (process, port) = NatsServer::spawn(store.path(), -1, None);
        NatsServer {
            process,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            store,
            config: None,
        }
    }

    /// Starts `nats-server` with a configuration file (such as the broker configuration
    /// `ops/nats/render.sh` writes, TLS and auth on), still on a free loopback port (the
    /// command line overrides the file's listen address). The file must set JetStream's
    /// store_dir (a temporary one): nats-server refuses a reload when `-sd` gave it instead.
    /// [`NatsServer::client`] cannot connect to it; pass credentials with
    /// [`NatsServer::connect_with`].
    pub fn start_with_config(config: &Path) -> NatsServer {
        let store = tempfile::tempdir().expect("temporary JetStream store");
        let (process, port) = NatsServer::spawn(store.path(), -1, Some(config));
        NatsServer {
            process,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            store,
            config: Some(config.to_owned()),
        }
    }

    /// Connects with `options` (credentials, TLS, inbox prefix), for a server started with
    /// [`NatsServer::start_with_config`]; a refusal is the test's to judge.
    pub async fn connect_with(
        &self,
        options: async_nats::ConnectOptions,
    ) -> Result<async_nats::Client, async_nats::ConnectError> {
        options.connect(&self.url).await
    }

    /// Starts `nats-server` on `port` with its JetStream store in `store`, and returns once it
    /// listens (JetStream has recovered its streams by then) with the port it listens on.
    fn spawn(store: &Path, port: i32, config: Option<&Path>) -> (Process, u16) {
        let mut command = Command::new("nats-server");
        command.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"]);
        match config {
            Some(config) => command.arg("-c").arg(config),
            None => command.arg("-sd").arg(store),
        };
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server is not installed: run ops/install-deps.sh");
        let stderr = child.stderr.take().expect("piped stderr");
        let (port_tx, port_rx) = mpsc::channel();
        // Keeps draining the log after the port is known so the server never blocks on it.
        std::thread::spawn(move || {
            let marker = "Listening for client connections on ";
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split(marker).nth(1) {
                    let _ = port_tx.send(addr.trim().to_owned());
                }
            }
        });
        let process = Process::adopt("nats-server", child);
        let addr = port_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("nats-server did not start listening within 20 s");
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("nats-server listens on {addr:?}, not host:port"));
        (process, port)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url)
            .await
            .expect("connect to the test nats-server")
    }

    /// A client whose requests take their answers on `tenant`'s inboxes (`_INBOX.<tenant>.…`),
    /// as a tenant's clients must: workers answer no other inbox.
    pub async fn tenant_client(&self, tenant: &str) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .custom_inbox_prefix(subject::inbox_prefix(tenant))
            .connect(&self.url)
            .await
            .expect("connect to the test nats-server")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops the server with `signal` (SIGTERM: a clean shutdown; SIGKILL: a crash) and waits
    /// until it has exited. Its store is kept for [`NatsServer::restart`].
    pub fn stop(&mut self, signal: Signal) {
        self.process.signal(signal);
        self.process.wait_exit(Duration::from_secs(30));
    }

    /// Starts the server again on the same port with the same store (after [`NatsServer::stop`]
    /// or a crash), and returns once it listens.
    pub fn restart(&mut self) {
        if self.process.is_running() {
            self.stop(Signal::SIGTERM);
        }
        let (process, port) = NatsServer::spawn(
            self.store.path(),
            i32::from(self.port),
            self.config.as_deref(),
        );
        assert_eq!(port, self.port, "nats-server restarted on another port");
        self.process = process;
    }
}

/// What a test needs of Fleet's JetStream side: the streams as Fleet creates them, and what
/// workers and dispatchers leave in them (queued jobs, stored results, the workers' consumer).
#[derive(Clone)]
pub struct Streams {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl Streams {
    /// Connects to `server` and creates Fleet's streams with their default limits.
    pub async fn create(server: &NatsServer) -> Streams {
        Streams::create_with(server.client().await, &Default::default()).await
    }

    /// Creates Fleet's streams with `limits` (a cluster's replicas, say) through `client`.
    pub async fn create_with(
        client: async_nats::Client,
        limits: &fleet_streams::StreamLimits,
    ) -> Streams {
        let js = jetstream::new(client.clone());
        fleet_streams::ensure_all(&js, limits)
            .await
            .expect("Fleet's streams");
        Streams { client, js }
    }

    /// Connects to `server`, leaving the streams to whoever creates them (a dispatcher).
    pub async fn connect(server: &NatsServer) -> Streams {
        Streams::connect_client(server.client().await)
    }

    /// The streams through `client` (of a cluster, say), made by whoever makes them.
    pub fn connect_client(client: async_nats::Client) -> Streams {
        let js = jetstream::new(client.clone());
        Streams { client, js }
    }

    pub async fn stream(&self, name: &str) -> Stream {
        self.js.get_stream(name).await.expect("stream exists")
    }

    pub async fn messages_in(&self, name: &str) -> u64 {
        self.stream(name)
            .await
            .info()
            .await
            .expect("stream info")
            .state
            .messages
    }

    /// Queues a job as the dispatcher does: the envelope signed by its tenant's [`TestTenant`]
    /// key (workers verify it), the job's `Nats-Msg-Id`, and the caller's inbox (if any) as
    /// `Fleet-Reply-To`. Returns the job's sequence on `FLEET_JOBS`.
    pub async fn enqueue(&self, job: &Job, reply_to: Option<&str>) -> u64 {
        self.try_enqueue(job, reply_to)
            .await
            .unwrap_or_else(|error| panic!("cannot queue {}: {error}", job.job_id))
    }

    /// [`Streams::enqueue`] that reports a failed publish (a server restarting) instead of
    /// panicking. Sending the same job again is safe: the queue stores its `Nats-Msg-Id` once.
    pub async fn try_enqueue(&self, job: &Job, reply_to: Option<&str>) -> Result<u64, String> {
        let envelope = TestTenant::new(&job.tenant)
            .key
            .sign_job(job)
            .expect("sign");
        let mut headers = HeaderMap::new();
        headers.insert(
            subject::MSG_ID,
            subject::msg_id(&job.tenant, &job.job_id).as_str(),
        );
        if let Some(reply_to) = reply_to {
            headers.insert(subject::REPLY_TO, reply_to);
        }
        let payload = encode(&envelope).expect("encode");
        let ack = self
            .js
            .publish_with_headers(subject::jobs(&job.model), headers, payload.into())
            .await
            .map_err(|e| e.to_string())?;
        Ok(ack.await.map_err(|e| e.to_string())?.sequence)
    }

    /// Queues any payload on `fleet.jobs.<model>`; returns its sequence.
    pub async fn enqueue_raw(&self, model: &str, payload: Vec<u8>, headers: HeaderMap) -> u64 {
        self.js
            .publish_with_headers(subject::jobs(model), headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("publish ack")
            .sequence
    }

    /// The job's stored result, if there is one.
    pub async fn stored_result(&self, job: &Job) -> Option<JobResult> {
        let message = self.stored_result_message(job).await?;
        Some(decode(&message.payload, 1 << 20).expect("a JobResult"))
    }

    pub async fn stored_result_message(&self, job: &Job) -> Option<StreamMessage> {
        self.stream(subject::RESULTS_STREAM)
            .await
            .get_last_raw_message_by_subject(&subject::results(&job.tenant, &job.job_id))
            .await
            .ok()
    }

    /// Waits for the job's stored result.
    pub async fn wait_result(&self, job: &Job, timeout: Duration) -> JobResult {
        eventually(timeout, &format!("stored result of {}", job.job_id), || {
            self.stored_result(job)
        })
        .await
    }

    /// Results in `FLEET_RESULTS` (it keeps one per job).
    pub async fn stored_results(&self) -> u64 {
        self.messages_in(subject::RESULTS_STREAM).await
    }

    /// Results stored over one already stored for the same job. `FLEET_RESULTS` keeps one
    /// message per subject, but every store takes a sequence: each store beyond a job's first
    /// shows as a sequence with no message left (nothing else deletes results).
    pub async fn results_stored_again(&self) -> u64 {
        let state = self
            .stream(subject::RESULTS_STREAM)
            .await
            .info()
            .await
            .expect("stream info")
            .state
            .clone();
        state.last_sequence - state.messages
    }

    /// Waits until every job has been settled and left the work queue.
    pub async fn wait_queue_empty(&self, timeout: Duration) {
        eventually(
            timeout,
            "jobs settled and gone from the work queue",
            || async { (self.messages_in(subject::JOBS_STREAM).await == 0).then_some(()) },
        )
        .await;
    }

    /// The workers' shared consumer of `model`; None until a worker has created it.
    pub async fn consumer_info(&self, model: &str) -> Option<consumer::Info> {
        let mut consumer: PullConsumer = self
            .stream(subject::JOBS_STREAM)
            .await
            .get_consumer(&format!("fleet-worker-{model}"))
            .await
            .ok()?;
        Some(consumer.info().await.expect("consumer info").clone())
    }

    /// Jobs of `model` that workers hold unacknowledged; None until a worker has created the
    /// consumer.
    pub async fn held(&self, model: &str) -> Option<usize> {
        Some(self.consumer_info(model).await?.num_ack_pending)
    }

    /// Waits until workers of `model` hold exactly `count` jobs unacknowledged.
    pub async fn wait_held(&self, model: &str, count: usize, timeout: Duration) {
        eventually(timeout, &format!("{count} jobs held"), || async {
            (self.held(model).await? == count).then_some(())
        })
        .await;
    }
}

/// A child process that is killed when dropped.
pub struct Process {
    name: String,
    child: Child,
}

impl Process {
    pub fn adopt(name: &str, child: Child) -> Process {
        Process {
            name: name.to_owned(),
            child,
        }
    }

    /// Starts one of this workspace's binaries with the given arguments and environment.
    pub fn spawn_binary(name: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn(name, &binary(name), args, env)
    }

    /// Starts one of this workspace's binaries with its stdout and stderr written to `log`, for
    /// a test that reads what the process logged.
    pub fn spawn_binary_logged<A: AsRef<std::ffi::OsStr>>(
        name: &str,
        args: &[A],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Process {
        let file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let stderr = file.try_clone().expect("a second handle on the log file");
        let child = Command::new(binary(name))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process::adopt(name, child)
    }

    /// Starts `program` (called `name` in messages) with the given arguments and environment.
    pub fn spawn(name: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Process {
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process::adopt(name, child)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: signal::Signal) {
        let pid = Pid::from_raw(self.child.id() as i32);
        signal::kill(pid, sig).unwrap_or_else(|e| panic!("cannot signal {}: {e}", self.name));
    }

    /// Waits for the process to exit and returns its exit code (None when killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if start.elapsed() > timeout {
                panic!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The directory test binaries were built in: `<target>/<profile>/deps/`, where the
/// workspace's binaries are in `<target>/<profile>/` and the servers the install scripts put in
/// virtual environments are in `<target>/`.
fn test_binary_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    exe.parent()
        .expect("test executable lives in <target>/<profile>/deps")
        .to_owned()
}

/// The target directory the tests were built in (`CARGO_TARGET_DIR` or `target/`), where
/// `ops/install-*.sh` put the servers they install.
pub fn target_dir() -> PathBuf {
    test_binary_dir()
        .ancestors()
        .nth(2)
        .expect("test executable lives in <target>/<profile>/deps")
        .to_owned()
}

/// A loopback port free now, for a server that cannot pick its own (or whose port others must
/// know before it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A workspace binary of the profile the tests were built with.
pub fn binary(name: &str) -> PathBuf {
    let profile_dir = test_binary_dir()
        .parent()
        .expect("test executable lives in <target>/<profile>/deps")
        .to_owned();
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`, \
         with the same profile as the tests)",
        path.display()
    );
    path
}

/// The real all-MiniLM-L6-v2: `FLEET_MODEL_DIR`, or `models/all-MiniLM-L6-v2` in the workspace.
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("FLEET_MODEL_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2"),
        PathBuf::from,
    );
    assert!(
        dir.join("model.safetensors").exists(),
        "the model is missing at {}: run ops/fetch-model.sh",
        dir.display()
    );
    dir
}

/// A tenant with a fresh key pair, and the files a dispatcher and a client read.
pub struct TestTenant {
    pub name: String,
    pub key: SigningKey,
}

impl TestTenant {
    /// The tenant `name` with its key `<name>-key`, derived from the name, so every test (and
    /// [`Streams::enqueue`]) signs a tenant's jobs with the same key.
    pub fn new(name: &str) -> TestTenant {
        let seed: [u8; 32] = std::array::from_fn(|i| {
            name.bytes()
                .fold(i as u8, |sum, byte| sum.wrapping_mul(31).wrapping_add(byte))
        });
        TestTenant {
            name: name.to_owned(),
            key: SigningKey::from_secret_bytes(format!("{name}-key"), &seed),
        }
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The tenant's entry in a tenants file: every model, a rate no test reaches.
    pub fn tenants_entry(&self) -> String {
        format!(
            "[[tenants]]\nname = \"{}\"\nmodels = [\"*\"]\nrate_per_second = 100000\n\
             burst = 100000\nkeys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n\n",
            self.name,
            self.key.key_id,
            self.public_key().to_hex()
        )
    }
}

/// Writes a tenants file for `tenants` (see [`TestTenant`]) into `dir`; the dispatcher and
/// the workers of a test read the same one. Returns its path.
pub fn write_tenants_file(dir: &Path, tenants: &[&str]) -> PathBuf {
    let path = dir.join("tenants.toml");
    let text: String = tenants
        .iter()
        .map(|name| TestTenant::new(name).tenants_entry())
        .collect();
    std::fs::write(&path, text).expect("write the tenants file");
    path
}

/// Polls `check` until it returns Some or the timeout passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub use nix::sys::signal::Signal;
