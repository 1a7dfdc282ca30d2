//! The shipped broker configuration (`ops/nats/`) as an operator sets it up: a development PKI
//! (`ops/make-dev-pki.sh`), a `users.list` of nkey users, `ops/nats/render.sh`, checked by
//! `nats-server -t`, then run with TLS and auth on, on a free loopback port.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use async_nats::ConnectOptions;
use nkeys::KeyPair;

use crate::NatsServer;

/// One user of `users.list`: its role (`dispatcher`, `worker`, `operator`, `tenant`), its name
/// (a tenant's is the tenant's name) and its nkey.
struct User {
    role: &'static str,
    name: &'static str,
    key: KeyPair,
}

pub struct ShippedBroker {
    pub server: NatsServer,
    /// Holds `pki/`, `conf/` (users.list and the rendered config), the JetStream store and
    /// whatever a test writes beside them.
    pub dir: tempfile::TempDir,
    users: Vec<User>,
}

/// The repository's root, where the shipped scripts are.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a shipped script (or nats-server); fails the test with its stderr if it fails.
pub fn run(command: &mut Command) {
    let output = command.output().expect("run a shipped script");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl ShippedBroker {
    /// Starts a broker whose users are `(role, name)`, each with a fresh nkey.
    pub fn start(users: &[(&'static str, &'static str)]) -> ShippedBroker {
        let dir = tempfile::tempdir().expect("temporary directory");
        run(Command::new(workspace().join("ops/make-dev-pki.sh"))
            .arg("--out")
            .arg(dir.path().join("pki"))
            .arg("client"));
        let users: Vec<User> = users
            .iter()
            .map(|&(role, name)| User {
                role,
                name,
                key: KeyPair::new_user(),
            })
            .collect();
        let conf = dir.path().join("conf");
        std::fs::create_dir(&conf).expect("config directory");
        let list: String = users
            .iter()
            .map(|user| format!("{} {} {}\n", user.role, user.name, user.key.public_key()))
            .collect();
        std::fs::write(conf.join("users.list"), list).expect("users.list");
        run(Command::new(workspace().join("ops/nats/render.sh"))
            .arg(&conf)
            .arg("--pki")
            .arg(dir.path().join("pki"))
            .arg("--store")
            .arg(dir.path().join("jetstream")));
        // nats-server's own check of the rendered files, with its message if they are wrong.
        run(Command::new("nats-server")
            .arg("-t")
            .arg("-c")
            .arg(conf.join("fleet.conf")));
        let server = NatsServer::start_with_config(&conf.join("fleet.conf"));
        ShippedBroker { server, dir, users }
    }

    /// The folder with `users.list` and the rendered configuration.
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    /// A file of the development PKI (`ca.pem`, `client-client.pem`, ...).
    pub fn pki(&self, file: &str) -> PathBuf {
        self.dir.path().join("pki").join(file)
    }

    /// TLS with the development CA and a client certificate, as the config demands.
    pub fn tls(&self) -> ConnectOptions {
        ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(self.pki("ca.pem"))
            .add_client_certificate(
                self.pki("client-client.pem"),
                self.pki("client-client-key.pem"),
            )
            .connection_timeout(Duration::from_secs(5))
    }

    fn user(&self, name: &str) -> &User {
        self.users
            .iter()
            .find(|user| user.name == name)
            .unwrap_or_else(|| panic!("no user {name}"))
    }

    /// The nkey seed of user `name`.
    pub fn seed(&self, name: &str) -> String {
        self.user(name)
            .key
            .seed()
            .expect("a generated key has a seed")
    }

    pub fn is_tenant(&self, name: &str) -> bool {
        self.user(name).role == "tenant"
    }

    /// Writes `name`'s nkey seed to a file only its owner reads, as the processes are given it.
    pub fn seed_file(&self, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join(format!("{name}.nk"));
        std::fs::write(&path, self.seed(name)).expect("seed file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("seed file mode");
        path
    }

    /// The settings a Fleet process connects to the broker with, as user `name`: its nkey seed
    /// from a file, TLS with the development CA and a client certificate.
    pub fn process_args(&self, name: &str) -> Vec<String> {
        let path = |path: PathBuf| path.to_string_lossy().into_owned();
        vec![
            "--nats-url".to_owned(),
            self.server.url().to_owned(),
            "--nats-nkey-file".to_owned(),
            path(self.seed_file(name)),
            "--nats-tls-ca".to_owned(),
            path(self.pki("ca.pem")),
            "--nats-tls-cert".to_owned(),
            path(self.pki("client-client.pem")),
            "--nats-tls-key".to_owned(),
            path(self.pki("client-client-key.pem")),
        ]
    }
}
