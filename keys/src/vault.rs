//! Tenants in Vault (or OpenBao) KV version 2.

use std::{error::Error, fmt, path::PathBuf, time::Duration};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use vaultrs::{
    api::kv2::requests::SetSecretRequestOptions,
    client::{VaultClient, VaultClientSettingsBuilder},
    error::ClientError,
    kv2,
};

use crate::{
    AdminError, Change, StoreError, TenantAdmin, TenantSource,
    model::{KeySpec, TenantDef, TenantPolicy, Tenants, TenantsError, TimeText},
};

/// How to reach Vault. The token comes from the environment or a file, never from a command
/// line, and `Debug` does not show it.
#[derive(Clone)]
pub struct VaultConfig {
    /// `http(s)://host:port`.
    pub addr: String,
    token: String,
    /// The KV v2 mount.
    pub mount: String,
    /// The folder under the mount holding one secret per tenant.
    pub prefix: String,
    /// PEM bundle of the CAs to trust for an `https` address (besides the system's).
    pub ca_cert: Option<PathBuf>,
    /// Bound on each request, so a Vault that hangs delays a refresh by at most this much.
    pub timeout: Duration,
}

impl fmt::Debug for VaultConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultConfig")
            .field("addr", &self.addr)
            .field("token", &"<redacted>")
            .field("mount", &self.mount)
            .field("prefix", &self.prefix)
            .field("ca_cert", &self.ca_cert)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl VaultConfig {
    pub const DEFAULT_MOUNT: &'static str = "secret";
    pub const DEFAULT_PREFIX: &'static str = "fleet/tenants";

    /// The default layout (mount `secret`, prefix `fleet/tenants`), a 5 s request bound.
    pub fn new(addr: impl Into<String>, token: impl Into<String>) -> VaultConfig {
        VaultConfig {
            addr: addr.into(),
            token: token.into(),
            mount: Self::DEFAULT_MOUNT.to_owned(),
            prefix: Self::DEFAULT_PREFIX.to_owned(),
            ca_cert: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// Vault's own variables: `VAULT_ADDR`; the token from `VAULT_TOKEN`, or else from the file
    /// named by `VAULT_TOKEN_FILE`; `VAULT_CACERT` for the CA bundle.
    pub fn from_env() -> Result<VaultConfig, StoreError> {
        Self::from_vars(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<VaultConfig, StoreError> {
        let addr =
            var("VAULT_ADDR").ok_or_else(|| StoreError::Config("VAULT_ADDR is not set".into()))?;
        let token = match (var("VAULT_TOKEN"), var("VAULT_TOKEN_FILE")) {
            (Some(token), _) => token,
            (None, Some(path)) => std::fs::read_to_string(&path)
                .map_err(|e| {
                    StoreError::Config(format!("cannot read VAULT_TOKEN_FILE {path}: {e}"))
                })?
                .trim()
                .to_owned(),
            (None, None) => {
                return Err(StoreError::Config(
                    "neither VAULT_TOKEN nor VAULT_TOKEN_FILE is set".into(),
                ));
            }
        };
        if token.is_empty() {
            return Err(StoreError::Config("the Vault token is empty".into()));
        }
        let mut config = VaultConfig::new(addr, token);
        config.ca_cert = var("VAULT_CACERT").map(PathBuf::from);
        Ok(config)
    }
}

/// Tenants in a KV v2 mount, one secret per tenant at `<mount>/<prefix>/<tenant>` (by default
/// `secret/fleet/tenants/acme`), whose data is the tenant's policy and keys:
///
/// ```json
/// {
///   "models": ["all-minilm-l6-v2"],
///   "rate_per_second": 100,
///   "burst": 200,
///   "keys": [
///     {"key_id": "acme-1", "public_key": "<64 hex>"},
///     {"key_id": "acme-2", "public_key": "<64 hex>", "not_before": "2027-01-01T00:00:00Z",
///      "not_after": "2027-07-01T00:00:00Z", "revoked": false}
///   ]
/// }
/// ```
///
/// `not_before`, `not_after` (RFC 3339 with an offset) and `revoked` are optional. A tenant is
/// removed by deleting its secret. Written by hand, nested JSON goes in from a file:
/// `bao kv put -mount=secret fleet/tenants/acme @acme.json` (or `vault kv put ...`).
///
/// What the serving token (dispatcher, workers) needs, as a policy:
///
/// ```hcl
/// path "secret/metadata/fleet/tenants" { capabilities = ["list"] }
/// path "secret/data/fleet/tenants/*"   { capabilities = ["read"] }
/// ```
///
/// The management operations also need `create` and `update` on `secret/data/fleet/tenants/*`
/// and `read` on `secret/metadata/fleet/tenants/*` (writes are check-and-set on the version).
pub struct VaultSource {
    config: VaultConfig,
    client: VaultClient,
}

/// One tenant's secret data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantDoc {
    models: Vec<String>,
    rate_per_second: u32,
    burst: u32,
    #[serde(default)]
    keys: Vec<KeySpec>,
}

impl TenantDoc {
    fn def(self, name: &str) -> TenantDef {
        TenantDef {
            name: name.to_owned(),
            policy: TenantPolicy {
                models: self.models,
                rate_per_second: self.rate_per_second,
                burst: self.burst,
            },
            keys: self.keys,
        }
    }
}

/// Reads at most this many tenants at once during a refresh.
const PARALLEL_READS: usize = 8;

impl VaultSource {
    /// Prepares the client; nothing is sent until the first load.
    pub fn new(config: VaultConfig) -> Result<VaultSource, StoreError> {
        // The HTTP client takes the process-wide rustls provider. Installing fails only when the
        // program installed one already, which then serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
        url::Url::parse(&config.addr)
            .map_err(|e| StoreError::Config(format!("VAULT_ADDR {:?}: {e}", config.addr)))?;
        let mut settings = VaultClientSettingsBuilder::default();
        // Every field is set here, so none is taken from the environment behind our back.
        settings
            .address(&config.addr)
            .token(config.token.clone())
            .ca_certs(
                config
                    .ca_cert
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect(),
            )
            .verify(true)
            .timeout(Some(config.timeout))
            .namespace(None);
        let settings = settings
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        let client = VaultClient::new(settings).map_err(|e| StoreError::Config(chain(&e)))?;
        Ok(VaultSource { config, client })
    }

    fn path(&self, tenant: &str) -> String {
        format!("{}/{tenant}", self.config.prefix.trim_end_matches('/'))
    }

    fn error(&self, action: String, e: ClientError) -> StoreError {
        use rustify::errors::ClientError as Http;
        let addr = self.config.addr.clone();
        match e {
            ClientError::APIError { code, errors } => StoreError::Refused {
                addr,
                action,
                status: code,
                errors,
            },
            ClientError::RestClientError {
                source: Http::ServerResponseError { code, content },
            } => StoreError::Refused {
                addr,
                action,
                status: code,
                errors: content.into_iter().collect(),
            },
            ClientError::RestClientError {
                source: Http::RequestError { .. } | Http::ResponseError { .. },
            } => StoreError::Unreachable {
                addr,
                detail: chain(&e),
            },
            other => StoreError::Vault {
                addr,
                action,
                detail: chain(&other),
            },
        }
    }

    async fn tenant_names(&self) -> Result<Vec<String>, StoreError> {
        match kv2::list(&self.client, &self.config.mount, &self.config.prefix).await {
            // Sub-folders end in '/': they are not tenants.
            Ok(names) => Ok(names.into_iter().filter(|n| !n.ends_with('/')).collect()),
            // Nothing was ever written under the prefix.
            Err(e) if not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(self.error(
                format!("list {}/{}", self.config.mount, self.config.prefix),
                e,
            )),
        }
    }

    /// The tenant's current data, in one request (what a refresh reads); None when it does not
    /// exist or its latest version is deleted.
    async fn read_tenant(&self, name: &str) -> Result<Option<TenantDoc>, StoreError> {
        let path = self.path(name);
        match kv2::read(&self.client, &self.config.mount, &path).await {
            Ok(value) => Ok(Some(parse_doc(name, value)?)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(self.error(format!("read {}/{path}", self.config.mount), e)),
        }
    }

    /// The tenant's current data and version, for a check-and-set write; None as above.
    async fn read_versioned(&self, name: &str) -> Result<Option<(TenantDoc, u64)>, StoreError> {
        let path = self.path(name);
        let action = || format!("read {}/{path}", self.config.mount);
        let version = match kv2::read_metadata(&self.client, &self.config.mount, &path).await {
            Ok(meta) => meta.current_version,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(self.error(action(), e)),
        };
        match kv2::read_version(&self.client, &self.config.mount, &path, version).await {
            Ok(value) => Ok(Some((parse_doc(name, value)?, version))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(self.error(action(), e)),
        }
    }

    /// Writes the tenant if its version is still `version` (0: if it does not exist), so two
    /// operators changing one tenant at once cannot lose either change silently.
    async fn write_tenant(
        &self,
        name: &str,
        doc: &TenantDoc,
        version: u64,
    ) -> Result<(), AdminError> {
        Tenants::build(vec![doc.clone().def(name)]).map_err(AdminError::Invalid)?;
        let path = self.path(name);
        let conflict = || AdminError::Conflict(format!("tenant {name:?}"));
        // Versions count writes; none reaches 2^32. Should one, the check-and-set fails safe.
        let cas = u32::try_from(version).map_err(|_| conflict())?;
        let written = kv2::set_with_options(
            &self.client,
            &self.config.mount,
            &path,
            doc,
            SetSecretRequestOptions { cas },
        )
        .await;
        match written {
            Ok(_) => Ok(()),
            Err(ClientError::APIError { code: 400, errors })
                if errors.iter().any(|e| e.contains("check-and-set")) =>
            {
                Err(conflict())
            }
            Err(e) => Err(self
                .error(format!("write {}/{path}", self.config.mount), e)
                .into()),
        }
    }

    /// Reads a tenant that must exist, changes it and writes it back.
    async fn update_tenant(
        &self,
        name: &str,
        change: impl FnOnce(&mut TenantDoc),
    ) -> Result<(), AdminError> {
        let (mut doc, version) = self
            .read_versioned(name)
            .await?
            .ok_or_else(|| AdminError::UnknownTenant(name.to_owned()))?;
        change(&mut doc);
        self.write_tenant(name, &doc, version).await
    }
}

/// Nothing stored there: never written, or its latest version deleted (Vault answers that 404
/// without an `errors` list, which vaultrs reports differently).
fn not_found(e: &ClientError) -> bool {
    match e {
        ClientError::APIError { code, .. } => *code == 404,
        ClientError::RestClientError {
            source: rustify::errors::ClientError::ServerResponseError { code, .. },
        } => *code == 404,
        ClientError::ResponseDataEmptyError => true,
        _ => false,
    }
}

fn parse_doc(name: &str, value: serde_json::Value) -> Result<TenantDoc, StoreError> {
    serde_json::from_value(value).map_err(|e| {
        StoreError::Invalid(TenantsError::BadDocument {
            tenant: name.to_owned(),
            reason: e.to_string(),
        })
    })
}

fn set_on_key(doc: &mut TenantDoc, key_id: &str, change: impl FnOnce(&mut KeySpec)) {
    if let Some(key) = doc.keys.iter_mut().find(|k| k.key_id == key_id) {
        change(key);
    }
}

/// An error with its causes, as vaultrs's own messages say little ("An error occurred with the
/// request").
fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl TenantSource for VaultSource {
    fn describe(&self) -> String {
        format!(
            "Vault {} {}/{}",
            self.config.addr, self.config.mount, self.config.prefix
        )
    }

    async fn load(&self) -> Result<Tenants, StoreError> {
        let names = self.tenant_names().await?;
        let reads: Vec<_> = futures::stream::iter(names)
            .map(|name| async move {
                let doc = self.read_tenant(&name).await;
                (name, doc)
            })
            .buffer_unordered(PARALLEL_READS)
            .collect()
            .await;
        let mut defs = Vec::with_capacity(reads.len());
        for (name, doc) in reads {
            if let Some(doc) = doc? {
                defs.push(doc.def(&name));
            }
        }
        Ok(Tenants::build(defs)?)
    }
}

impl TenantAdmin for VaultSource {
    async fn apply(&self, change: Change) -> Result<(), AdminError> {
        let current = self.load().await?;
        change.check(&current)?;
        let owner = |key_id: &str| {
            current
                .key(key_id)
                .map(|k| k.tenant.clone())
                .ok_or_else(|| AdminError::UnknownKey(key_id.to_owned()))
        };
        match change {
            Change::AddTenant {
                tenant,
                policy,
                key,
            } => {
                let doc = TenantDoc {
                    models: policy.models,
                    rate_per_second: policy.rate_per_second,
                    burst: policy.burst,
                    keys: vec![KeySpec::new(&key)],
                };
                // A tenant deleted earlier keeps its version history: write over that.
                let version =
                    match kv2::read_metadata(&self.client, &self.config.mount, &self.path(&tenant))
                        .await
                    {
                        Ok(meta) => meta.current_version,
                        Err(e) if not_found(&e) => 0,
                        Err(e) => {
                            let action =
                                format!("read {}/{}", self.config.mount, self.path(&tenant));
                            return Err(self.error(action, e).into());
                        }
                    };
                self.write_tenant(&tenant, &doc, version).await
            }
            Change::AddKey {
                tenant,
                key,
                retire,
            } => {
                self.update_tenant(&tenant, |doc| {
                    if let Some(retire) = &retire {
                        set_on_key(doc, &retire.key_id, |k| {
                            k.not_after = Some(TimeText::from_ms(retire.not_after_ms));
                        });
                    }
                    doc.keys.push(KeySpec::new(&key));
                })
                .await
            }
            Change::Retire(retire) => {
                self.update_tenant(&owner(&retire.key_id)?, |doc| {
                    set_on_key(doc, &retire.key_id, |k| {
                        k.not_after = Some(TimeText::from_ms(retire.not_after_ms));
                    });
                })
                .await
            }
            Change::Revoke { key_id } => {
                self.update_tenant(&owner(&key_id)?, |doc| {
                    set_on_key(doc, &key_id, |k| k.revoked = true);
                })
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(vars: &[(&str, &str)]) -> Result<VaultConfig, StoreError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        VaultConfig::from_vars(|name| vars.get(name).cloned())
    }

    #[test]
    fn settings_come_from_vaults_variables_and_the_token_never_shows() {
        let config = from(&[
            ("VAULT_ADDR", "https://vault:8200"),
            ("VAULT_TOKEN", "s.secret-token"),
            ("VAULT_CACERT", "/etc/ca.pem"),
        ])
        .unwrap();
        assert_eq!(config.addr, "https://vault:8200");
        assert_eq!(config.token, "s.secret-token");
        assert_eq!(config.ca_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            (config.mount.as_str(), config.prefix.as_str()),
            ("secret", "fleet/tenants")
        );
        assert!(!format!("{config:?}").contains("secret-token"));
    }

    #[test]
    fn the_token_may_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s.from-file\n").unwrap();
        let path = path.to_str().unwrap();
        let config = from(&[("VAULT_ADDR", "http://v"), ("VAULT_TOKEN_FILE", path)]).unwrap();
        assert_eq!(config.token, "s.from-file");
        // The variable wins over the file.
        let config = from(&[
            ("VAULT_ADDR", "http://v"),
            ("VAULT_TOKEN", "s.var"),
            ("VAULT_TOKEN_FILE", path),
        ])
        .unwrap();
        assert_eq!(config.token, "s.var");
    }

    #[test]
    fn missing_settings_are_refused_with_what_is_missing() {
        let no_addr = from(&[("VAULT_TOKEN", "t")]).unwrap_err();
        assert!(no_addr.to_string().contains("VAULT_ADDR"), "{no_addr}");
        let no_token = from(&[("VAULT_ADDR", "http://v")]).unwrap_err();
        assert!(no_token.to_string().contains("VAULT_TOKEN"), "{no_token}");
        let unreadable = from(&[
            ("VAULT_ADDR", "http://v"),
            ("VAULT_TOKEN_FILE", "/nonexistent/token"),
        ])
        .unwrap_err();
        assert!(matches!(unreadable, StoreError::Config(_)));
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("token");
        std::fs::write(&empty, "\n").unwrap();
        let empty = from(&[
            ("VAULT_ADDR", "http://v"),
            ("VAULT_TOKEN_FILE", empty.to_str().unwrap()),
        ]);
        assert!(matches!(empty, Err(StoreError::Config(_))));
    }
}
