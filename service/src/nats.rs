//! How every Fleet process connects to NATS: one set of flags (server URLs, authentication, TLS)
//! flattened into each binary's config, so the four binaries agree on names and behaviour, and
//! connection errors that say where and why without showing a secret.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use async_nats::{ConnectErrorKind, ConnectOptions, ServerAddr};

/// A secret taken from the environment, a flag or a config file. Its `Debug` and `Display`
/// never show it, so a config struct can be logged or printed whole.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Where a Fleet process finds NATS and how it proves who it is. Each secret can come from a
/// file or an environment variable, so none needs to be on a command line (where every user of
/// the host can read it). At most one way of authenticating may be given.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL, or several separated by commas. `user:password@` or `token@` in a URL are
    /// understood but visible to every user of the host: prefer the options below.
    #[arg(long, env = "NATS_URL", default_value = fleet_schemas::DEFAULT_NATS_URL)]
    pub nats_url: String,
    #[command(flatten)]
    pub auth: NatsAuthArgs,
}

/// Authentication, TLS and liveness checks, without the URL (for binaries whose URL flag is
/// declared elsewhere).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NatsAuthArgs {
    /// How often to ping the NATS server. One that misses three pings in a row (frozen, or cut
    /// off by a network partition while the connection looks open) is left for another server
    /// of the list; the client library's own default, a minute, would keep a worker on a dead
    /// node for three. 0 turns pings off.
    #[arg(long, env = "FLEET_NATS_PING_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub nats_ping_interval: std::time::Duration,
    /// NATS credentials file (user JWT and nkey seed, as `nsc` writes it).
    #[arg(long, env = "NATS_CREDS", conflicts_with_all = ["nats_nkey_file", "nats_user", "nats_token", "nats_token_file"])]
    pub nats_creds: Option<PathBuf>,
    /// File holding an nkey seed (`SU...`) to authenticate with.
    #[arg(long, env = "NATS_NKEY_FILE", conflicts_with_all = ["nats_user", "nats_token", "nats_token_file"])]
    pub nats_nkey_file: Option<PathBuf>,
    /// User name; the password comes from --nats-password-file or NATS_PASSWORD.
    #[arg(long, env = "NATS_USER", conflicts_with_all = ["nats_token", "nats_token_file"])]
    pub nats_user: Option<String>,
    /// File holding the password of --nats-user.
    #[arg(
        long,
        env = "NATS_PASSWORD_FILE",
        requires = "nats_user",
        conflicts_with = "nats_password"
    )]
    pub nats_password_file: Option<PathBuf>,
    /// Password of --nats-user. Prefer the environment variable or --nats-password-file.
    #[arg(
        long,
        env = "NATS_PASSWORD",
        requires = "nats_user",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub nats_password: Option<Secret>,
    /// File holding an authentication token.
    #[arg(long, env = "NATS_TOKEN_FILE", conflicts_with = "nats_token")]
    pub nats_token_file: Option<PathBuf>,
    /// Authentication token. Prefer the environment variable or --nats-token-file.
    #[arg(
        long,
        env = "NATS_TOKEN",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub nats_token: Option<Secret>,
    /// CA certificate (PEM) the server's certificate must chain to; turns TLS on.
    #[arg(long, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients; needs --nats-tls-key.
    #[arg(long, env = "NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --nats-tls-cert.
    #[arg(long, env = "NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Require TLS (implied by --nats-tls-ca, a client certificate or a `tls://` URL); without
    /// --nats-tls-ca the server is checked against the system's roots.
    #[arg(long, env = "NATS_TLS")]
    pub nats_tls: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("invalid NATS server URL {url}: {source}")]
    BadUrl { url: String, source: std::io::Error },
    #[error("no NATS server URL given")]
    NoUrl,
    #[error(
        "NATS credentials are given twice: in the URL {url} and by an option; use one (the options)"
    )]
    CredentialsTwice { url: String },
    #[error("cannot read {what} from {path}: {source}")]
    ReadSecret {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    EmptySecret { what: &'static str, path: PathBuf },
    #[error("{what} in {path} is not usable: {reason}")]
    BadSecret {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("--nats-user {user:?} needs a password (--nats-password-file or NATS_PASSWORD)")]
    NoPassword { user: String },
    #[error("a NATS password is given without --nats-user")]
    PasswordWithoutUser,
    #[error(
        "more than one way to authenticate to NATS is given (credentials file, nkey seed, user, \
         token); give one"
    )]
    TwoAuthMethods,
    #[error("cannot reach NATS at {url}: {reason} (is nats-server running there?)")]
    Unreachable {
        url: String,
        reason: async_nats::ConnectError,
    },
    #[error(
        "NATS at {url} refused this connection's credentials ({reason}); check --nats-creds, \
         --nats-nkey-file, --nats-user or --nats-token"
    )]
    Refused {
        url: String,
        reason: async_nats::ConnectError,
    },
    #[error(
        "TLS with NATS at {url} failed: {reason}; check --nats-tls-ca and the server's certificate"
    )]
    Tls {
        url: String,
        reason: async_nats::ConnectError,
    },
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        url: String,
        reason: async_nats::ConnectError,
    },
}

/// A URL (or a comma-separated list) with any `user:password@` or `token@` removed, fit to be
/// shown or logged. Text that does not parse as a URL is not shown at all: it could hold a
/// secret in a place the parser did not recognise.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| match split_credentials(url.trim()) {
            Ok((addr, _)) => display(&addr),
            Err(_) => "<unparsable URL>".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Credentials written into a URL, taken out of it.
#[derive(PartialEq, Eq)]
enum UrlCredentials {
    None,
    Token(Secret),
    UserPassword(String, Secret),
}

fn split_credentials(url: &str) -> Result<(ServerAddr, UrlCredentials), std::io::Error> {
    let addr: ServerAddr = url.parse()?;
    let mut inner = addr.into_inner();
    let credentials = match (inner.username(), inner.password()) {
        ("", None) => UrlCredentials::None,
        (token, None) => UrlCredentials::Token(Secret(decode(token))),
        (user, Some(password)) => {
            UrlCredentials::UserPassword(decode(user), Secret(decode(password)))
        }
    };
    // Url refuses these only for URLs without a host, which no NATS server has; such a URL is
    // refused rather than shown with what might be a secret.
    inner
        .set_username("")
        .and_then(|()| inner.set_password(None))
        .map_err(|()| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no host"))?;
    Ok((ServerAddr::from_url(inner)?, credentials))
}

/// URL userinfo is percent-encoded; the server compares the decoded text.
fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

fn display(addr: &ServerAddr) -> String {
    addr.as_url_str().trim_end_matches('/').to_owned()
}

impl NatsArgs {
    /// The server URLs as they may be shown: without credentials.
    pub fn shown_url(&self) -> String {
        redact_url(&self.nats_url)
    }

    /// Connects with `options` (name, inbox prefix, callbacks: what the caller wants) plus the
    /// authentication and TLS these flags give. Errors say which server and why, never a
    /// secret.
    pub async fn connect(&self, options: ConnectOptions) -> Result<async_nats::Client, NatsError> {
        connect(&self.nats_url, &self.auth, options).await
    }
}

impl NatsAuthArgs {
    fn any_auth(&self) -> bool {
        self.auth_methods() > 0
    }

    /// How many ways of authenticating are given. Clap refuses two on the command line, but
    /// values from a config file are defaults, which its conflict rules do not see.
    fn auth_methods(&self) -> usize {
        [
            self.nats_creds.is_some(),
            self.nats_nkey_file.is_some(),
            self.nats_user.is_some(),
            self.nats_token.is_some() || self.nats_token_file.is_some(),
        ]
        .into_iter()
        .filter(|given| *given)
        .count()
    }

    /// `options` with these flags' authentication and TLS, every secret read now, so a missing
    /// or bad file is reported before the first connection attempt.
    async fn apply(
        &self,
        mut options: ConnectOptions,
        from_url: UrlCredentials,
    ) -> Result<ConnectOptions, NatsError> {
        if self.auth_methods() > 1 {
            return Err(NatsError::TwoAuthMethods);
        }
        if self.nats_user.is_none()
            && (self.nats_password.is_some() || self.nats_password_file.is_some())
        {
            return Err(NatsError::PasswordWithoutUser);
        }
        if let Some(path) = &self.nats_creds {
            // Read as written: the parser needs the newline after the last marker line.
            let text = std::fs::read_to_string(path).map_err(|source| NatsError::ReadSecret {
                what: "NATS credentials",
                path: path.clone(),
                source,
            })?;
            options = options
                .credentials(&text)
                .map_err(|e| NatsError::BadSecret {
                    what: "NATS credentials",
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
        } else if let Some(path) = &self.nats_nkey_file {
            let seed = read_secret("nkey seed", path)?;
            nkeys::KeyPair::from_seed(&seed).map_err(|e| NatsError::BadSecret {
                what: "nkey seed",
                path: path.clone(),
                reason: e.to_string(),
            })?;
            options = options.nkey(seed);
        } else if let Some(user) = &self.nats_user {
            let password = match (&self.nats_password_file, &self.nats_password) {
                (Some(path), _) => read_secret("NATS password", path)?,
                (None, Some(password)) => password.expose().to_owned(),
                (None, None) => return Err(NatsError::NoPassword { user: user.clone() }),
            };
            options = options.user_and_password(user.clone(), password);
        } else if let Some(path) = &self.nats_token_file {
            options = options.token(read_secret("NATS token", path)?);
        } else if let Some(token) = &self.nats_token {
            options = options.token(token.expose().to_owned());
        } else {
            // async-nats reads no credentials from a URL; Fleet takes them from there as a
            // last resort, so `nats://user:password@host` works as users expect.
            options = match from_url {
                UrlCredentials::None => options,
                UrlCredentials::Token(token) => options.token(token.0),
                UrlCredentials::UserPassword(user, password) => {
                    options.user_and_password(user, password.0)
                }
            };
        }
        if let Some(ca) = &self.nats_tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.nats_tls_cert, &self.nats_tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let tls = self.nats_tls || self.nats_tls_ca.is_some() || self.nats_tls_cert.is_some();
        Ok(options.require_tls(tls))
    }
}

/// Reads a secret from a file, without its surrounding whitespace (files end in a newline).
fn read_secret(what: &'static str, path: &PathBuf) -> Result<String, NatsError> {
    let text = std::fs::read_to_string(path).map_err(|source| NatsError::ReadSecret {
        what,
        path: path.clone(),
        source,
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(NatsError::EmptySecret {
            what,
            path: path.clone(),
        });
    }
    Ok(text.to_owned())
}

/// How long one attempt to reach a server may take before it counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the servers in `urls` with `auth`; see [`NatsArgs::connect`].
pub async fn connect(
    urls: &str,
    auth: &NatsAuthArgs,
    options: ConnectOptions,
) -> Result<async_nats::Client, NatsError> {
    let mut servers = Vec::new();
    let mut from_url = UrlCredentials::None;
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (addr, credentials) = split_credentials(url).map_err(|source| NatsError::BadUrl {
            url: redact_url(url),
            source,
        })?;
        if credentials != UrlCredentials::None {
            if auth.any_auth() {
                return Err(NatsError::CredentialsTwice {
                    url: display(&addr),
                });
            }
            from_url = credentials;
        }
        servers.push(addr);
    }
    if servers.is_empty() {
        return Err(NatsError::NoUrl);
    }
    let shown = servers.iter().map(display).collect::<Vec<_>>().join(",");
    let mut options = options.connection_timeout(CONNECT_TIMEOUT);
    if !auth.nats_ping_interval.is_zero() {
        options = options.ping_interval(auth.nats_ping_interval);
    }
    let options = auth.apply(options, from_url).await?;
    // The reason is part of each message, not a `source`, so it is shown once, not again as
    // a cause.
    options.connect(servers).await.map_err(|reason| {
        let url = shown.clone();
        match reason.kind() {
            ConnectErrorKind::Io if tls_refused(&reason) => NatsError::Tls { url, reason },
            ConnectErrorKind::Io | ConnectErrorKind::TimedOut | ConnectErrorKind::Dns => {
                NatsError::Unreachable { url, reason }
            }
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                NatsError::Refused { url, reason }
            }
            ConnectErrorKind::Tls => NatsError::Tls { url, reason },
            ConnectErrorKind::ServerParse | ConnectErrorKind::MaxReconnects => {
                NatsError::Connect { url, reason }
            }
        }
    })
}

/// async-nats reports a failed TLS handshake (a certificate refused by either side) as an I/O
/// error; rustls gives such errors the kind `InvalidData`, which a plain connection failure
/// (refused, reset, unreachable) never has.
fn tls_refused(error: &async_nats::ConnectError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_survive_redaction() {
        for (url, shown) in [
            ("nats://alice:s3cret@10.0.0.1:4222", "nats://10.0.0.1:4222"),
            ("nats://t0ken@host:4222", "nats://host:4222"),
            ("bob:pw@host", "nats://host"),
            ("tls://a:b@h1:1,nats://h2:2", "tls://h1:1,nats://h2:2"),
            ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
            ("nats://u:p@[::1", "<unparsable URL>"),
        ] {
            let redacted = redact_url(url);
            assert_eq!(redacted, shown, "{url}");
            for secret in ["alice", "s3cret", "t0ken", "bob", "pw"] {
                assert!(!redacted.contains(secret), "{url} -> {redacted}");
            }
        }
    }

    #[test]
    fn url_credentials_are_taken_out_and_decoded() {
        let (addr, credentials) = split_credentials("nats://al%40ce:p%3Ass@host:4222").unwrap();
        assert_eq!(display(&addr), "nats://host:4222");
        assert!(
            matches!(credentials, UrlCredentials::UserPassword(ref u, ref p)
            if u == "al@ce" && p.expose() == "p:ss")
        );
        let (_, credentials) = split_credentials("nats://tok@host").unwrap();
        assert!(matches!(credentials, UrlCredentials::Token(ref t) if t.expose() == "tok"));
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let args = NatsAuthArgs {
            nats_password: Some("hunter2".parse().unwrap()),
            nats_token: Some("tok-123".parse().unwrap()),
            ..Default::default()
        };
        let shown = format!("{args:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-123"),
            "{shown}"
        );
    }
}
