//! Connecting to NATS as every Fleet process does (`NatsArgs`), against real nats-servers that
//! demand credentials or TLS: each way of authenticating works, secrets come from files, and
//! every failure says where and why without showing a secret.

use std::{
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use fleet_service::{NatsArgs, NatsError};

/// A nats-server run with a configuration file, on a free loopback port, killed when dropped.
/// (The shared harness in `tests/` always turns JetStream on and reads no config text, which
/// these tests need.)
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(config: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&path)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is not installed: run ops/install-deps.sh");
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "nats-server did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The config file's own flag, as every binary declares it.
#[derive(Parser)]
struct Flags {
    #[arg(long, env = "FLEET_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    nats: NatsArgs,
}

fn args(flags: &[&str]) -> NatsArgs {
    Flags::try_parse_from(std::iter::once("test").chain(flags.iter().copied()))
        .expect("valid flags")
        .nats
}

fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{text}\n")).unwrap();
    path
}

/// Connects and proves the connection works (a round trip to the server).
async fn connect(args: &NatsArgs) -> Result<(), NatsError> {
    let client = args.connect(async_nats::ConnectOptions::new()).await?;
    client.flush().await.expect("round trip");
    Ok(())
}

#[tokio::test]
async fn user_and_password_from_a_file_or_the_url_are_accepted_and_a_wrong_one_is_refused_unshown()
{
    let server =
        Server::start(r#"authorization { users = [ { user: "fleet", password: "pa55-w0rd" } ] }"#);
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let good = secret_file(dir.path(), "good", "pa55-w0rd");
    let path = good.to_str().unwrap();
    connect(&args(&[
        "--nats-url",
        &url,
        "--nats-user",
        "fleet",
        "--nats-password-file",
        path,
    ]))
    .await
    .expect("password from a file");
    let in_url = format!("nats://fleet:pa55-w0rd@127.0.0.1:{}", server.port);
    connect(&args(&["--nats-url", &in_url]))
        .await
        .expect("user and password in the URL");

    let wrong = format!("nats://fleet:not-it-42@127.0.0.1:{}", server.port);
    let err = connect(&args(&["--nats-url", &wrong])).await.unwrap_err();
    assert!(matches!(err, NatsError::Refused { .. }), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("not-it-42"), "{shown}");
    assert!(shown.contains(&url), "{shown}");

    let err = connect(&args(&["--nats-url", &url])).await.unwrap_err();
    assert!(
        matches!(err, NatsError::Refused { .. }),
        "no credentials: {err}"
    );
}

#[tokio::test]
async fn a_token_and_an_nkey_seed_from_files_are_accepted() {
    let user = nkeys::KeyPair::new_user();
    let server = Server::start(&format!(
        r#"authorization {{ users = [ {{ nkey: "{}" }} ] }}"#,
        user.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let url = server.url();
    let seed = secret_file(dir.path(), "seed", &user.seed().unwrap());
    connect(&args(&[
        "--nats-url",
        &url,
        "--nats-nkey-file",
        seed.to_str().unwrap(),
    ]))
    .await
    .expect("nkey seed from a file");
    let other = secret_file(
        dir.path(),
        "other",
        &nkeys::KeyPair::new_user().seed().unwrap(),
    );
    let err = connect(&args(&[
        "--nats-url",
        &url,
        "--nats-nkey-file",
        other.to_str().unwrap(),
    ]))
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::Refused { .. }), "{err}");
    let not_a_seed = secret_file(dir.path(), "bad", "SUNOTASEED");
    let err = connect(&args(&[
        "--nats-url",
        &url,
        "--nats-nkey-file",
        not_a_seed.to_str().unwrap(),
    ]))
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::BadSecret { .. }), "{err}");
    assert!(!err.to_string().contains("SUNOTASEED"), "{err}");

    let server = Server::start(r#"authorization { token: "t0k3n-s3cret" }"#);
    let token = secret_file(dir.path(), "token", "t0k3n-s3cret");
    connect(&args(&[
        "--nats-url",
        &server.url(),
        "--nats-token-file",
        token.to_str().unwrap(),
    ]))
    .await
    .expect("token from a file");
}

#[test]
fn two_ways_of_authenticating_at_once_are_refused_up_front() {
    for flags in [
        &["--nats-user", "u", "--nats-token", "t"][..],
        &["--nats-creds", "c", "--nats-nkey-file", "n"],
        &["--nats-password-file", "p"],
        &["--nats-tls-cert", "c"],
    ] {
        let parsed = Flags::try_parse_from(std::iter::once("test").chain(flags.iter().copied()));
        assert!(parsed.is_err(), "{flags:?} accepted");
    }
}

/// A config file's values reach clap as defaults, which its conflict rules do not check.
#[tokio::test]
async fn two_ways_of_authenticating_from_a_config_file_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleet.toml");
    std::fs::write(&config, "nats_token = \"t\"\nnats_user = \"u\"\n").unwrap();
    let flags: Flags = fleet_service::load_config(
        ["test", "--nats-url", "nats://127.0.0.1:1", "--config"]
            .into_iter()
            .map(Into::into)
            .chain([config.clone().into_os_string()]),
    )
    .unwrap();
    let err = connect(&flags.nats).await.unwrap_err();
    assert!(matches!(err, NatsError::TwoAuthMethods), "{err}");
    std::fs::write(&config, "nats_password = \"p\"\n").unwrap();
    let flags: Flags = fleet_service::load_config(
        ["test", "--nats-url", "nats://127.0.0.1:1", "--config"]
            .into_iter()
            .map(Into::into)
            .chain([config.into_os_string()]),
    )
    .unwrap();
    let err = connect(&flags.nats).await.unwrap_err();
    assert!(matches!(err, NatsError::PasswordWithoutUser), "{err}");
}

#[tokio::test]
async fn credentials_in_the_url_and_by_option_are_refused() {
    let err = connect(&args(&[
        "--nats-url",
        "nats://u:p@127.0.0.1:1",
        "--nats-token",
        "t",
    ]))
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::CredentialsTwice { .. }), "{err}");
}

#[tokio::test]
async fn an_unreachable_server_is_named_without_its_credentials() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://alice:hunter2@127.0.0.1:{port}");
    let err = connect(&args(&["--nats-url", &url])).await.unwrap_err();
    assert!(matches!(err, NatsError::Unreachable { .. }), "{err}");
    let shown = err.to_string();
    assert!(
        shown.contains(&format!("cannot reach NATS at nats://127.0.0.1:{port}")),
        "{shown}"
    );
    assert!(
        !shown.contains("hunter2") && !shown.contains("alice"),
        "{shown}"
    );
}

#[tokio::test]
async fn a_server_without_jetstream_is_named_as_such() {
    let server = Server::start("");
    let client = args(&["--nats-url", &server.url()])
        .connect(async_nats::ConnectOptions::new())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let err = fleet_streams::existing_stream(&js, "FLEET_JOBS")
        .await
        .expect_err("no stream without JetStream");
    assert!(
        matches!(err, fleet_streams::TopologyError::JetStreamDisabled),
        "{err}"
    );
    assert!(err.to_string().contains("-js"), "{err}");
}

/// A development CA, a server certificate for 127.0.0.1 and a client certificate, by openssl.
fn pki(dir: &Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(status.success(), "openssl {args:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=fleet test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    ]
    .concat());
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN=fleet test {name}"),
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

#[tokio::test]
async fn tls_with_a_ca_file_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let file = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let server = Server::start(&format!(
        r#"tls {{ cert_file: "{}", key_file: "{}", ca_file: "{}", verify: true }}"#,
        file("server.pem"),
        file("server.key"),
        file("ca.pem")
    ));
    let url = server.url();
    connect(&args(&[
        "--nats-url",
        &url,
        "--nats-tls-ca",
        &file("ca.pem"),
        "--nats-tls-cert",
        &file("client.pem"),
        "--nats-tls-key",
        &file("client.key"),
    ]))
    .await
    .expect("TLS with the CA and a client certificate");

    // The server verifies clients: without a certificate the handshake fails.
    let err = connect(&args(&[
        "--nats-url",
        &url,
        "--nats-tls-ca",
        &file("ca.pem"),
    ]))
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::Tls { .. }), "{err}");
    // A server whose certificate does not chain to the CA given is refused.
    let other = tempfile::tempdir().unwrap();
    pki(other.path());
    let err = connect(&args(&[
        "--nats-url",
        &url,
        "--nats-tls-ca",
        other.path().join("ca.pem").to_str().unwrap(),
        "--nats-tls-cert",
        &file("client.pem"),
        "--nats-tls-key",
        &file("client.key"),
    ]))
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::Tls { .. }), "{err}");
}

#[tokio::test]
async fn a_missing_or_malformed_credentials_file_is_named_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.creds");
    let err = connect(&args(&[
        "--nats-url",
        "nats://127.0.0.1:1",
        "--nats-creds",
        missing.to_str().unwrap(),
    ]))
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::ReadSecret { .. }), "{err}");
    assert!(err.to_string().contains("none.creds"), "{err}");
    let garbled = secret_file(dir.path(), "bad.creds", "not a creds file");
    let err = connect(&args(&[
        "--nats-url",
        "nats://127.0.0.1:1",
        "--nats-creds",
        garbled.to_str().unwrap(),
    ]))
    .await
    .unwrap_err();
    assert!(matches!(err, NatsError::BadSecret { .. }), "{err}");
    assert!(!err.to_string().contains("not a creds file"), "{err}");
}

/// A JWT as nsc writes one: `header.claims.signature`, signed by the issuer's nkey.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        // The claims' id; the server does not check how it was made.
        "jti": format!("fleet-test-{subject}"),
        "iat": 1_700_000_000,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": "fleet-test",
        "nats": nats,
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{claims}");
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(signed.as_bytes()).unwrap());
    format!("{signed}.{signature}")
}

/// Operator mode (decentralized JWT auth): an operator signs an account, the account signs a
/// user, and the user connects with the `.creds` file holding its JWT and nkey seed.
#[tokio::test]
async fn a_credentials_file_with_a_user_jwt_is_accepted() {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        serde_json::json!({"type": "account", "version": 2, "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1}}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        serde_json::json!({"type": "user", "version": 2, "subs": -1, "data": -1, "payload": -1}),
    );
    let server = Server::start(&format!(
        "operator: {operator_jwt}\nresolver: MEMORY\nresolver_preload: {{ {}: {account_jwt} }}\n",
        account.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let creds = secret_file(
        dir.path(),
        "user.creds",
        &format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    );
    let url = server.url();
    connect(&args(&[
        "--nats-url",
        &url,
        "--nats-creds",
        creds.to_str().unwrap(),
    ]))
    .await
    .expect("a user JWT and its seed from a credentials file");
    let err = connect(&args(&["--nats-url", &url])).await.unwrap_err();
    assert!(
        matches!(err, NatsError::Refused { .. }),
        "no credentials: {err}"
    );
}
