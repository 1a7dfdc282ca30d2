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

use fleet_schemas::{SigningKey, VerifyingKey};
use nix::{sys::signal, unistd::Pid};

pub mod openbao;

/// A `nats-server` with JetStream and a temporary store, on a random loopback port.
pub struct NatsServer {
    process: Process,
    url: String,
    _store: tempfile::TempDir,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        let store = tempfile::tempdir().expect("temporary JetStream store");
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
            .arg(store.path())
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
        NatsServer {
            process,
            url: format!("nats://{addr}"),
            _store: store,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url)
            .await
            .expect("connect to the test nats-server")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
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
        let child = Command::new(binary(name))
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

/// The workspace's target directory of the profile the tests were built with: test binaries
/// live in `<target>/<profile>/deps/`, the workspace's binaries in `<target>/<profile>/`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in <target>/<profile>/deps");
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
    pub fn new(name: &str) -> TestTenant {
        TestTenant {
            name: name.to_owned(),
            key: SigningKey::generate(format!("{name}-key")),
        }
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }
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
