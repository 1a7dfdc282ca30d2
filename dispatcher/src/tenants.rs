//! Who may send what: tenants, their public keys, the models they may use and their rates.

use std::{collections::HashMap, path::Path};

use fleet_schemas::{KeyError, VerifyingKey, validate_name};
use serde::Deserialize;

/// A registered public key and the tenant it speaks for.
#[derive(Debug, Clone)]
pub struct TenantKey {
    pub tenant: String,
    pub public_key: VerifyingKey,
}

/// What one tenant may do.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantPolicy {
    /// Models the tenant may use; `*` allows every served model.
    pub models: Vec<String>,
    /// Sustained jobs per second.
    pub rate_per_second: u32,
    /// Jobs accepted at once above the sustained rate.
    pub burst: u32,
}

impl TenantPolicy {
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == "*" || m == model)
    }

    /// Same rights, whatever the order or repetition of the models.
    fn same_as(&self, other: &TenantPolicy) -> bool {
        fn models(p: &TenantPolicy) -> std::collections::BTreeSet<&str> {
            p.models.iter().map(String::as_str).collect()
        }
        models(self) == models(other)
            && self.rate_per_second == other.rate_per_second
            && self.burst == other.burst
    }
}

/// Where the dispatcher looks up keys and tenants. The TOML file is the default (and so far
/// only) source; a Vault-backed store would implement the same lookups.
pub trait TenantStore: Send + Sync + 'static {
    fn key(&self, key_id: &str) -> Option<&TenantKey>;
    fn policy(&self, tenant: &str) -> Option<&TenantPolicy>;
    fn tenants(&self) -> Vec<(String, TenantPolicy)>;
}

#[derive(Debug, thiserror::Error)]
pub enum TenantsError {
    #[error("cannot read tenants file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("tenants file {path} is invalid: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("tenant {tenant:?}: {source}")]
    BadName {
        tenant: String,
        source: fleet_schemas::InvalidName,
    },
    #[error("tenant {tenant:?}, key {key_id:?}: {source}")]
    BadKey {
        tenant: String,
        key_id: String,
        source: KeyError,
    },
    #[error("key id {0:?} is registered twice")]
    DuplicateKey(String),
    #[error(
        "tenant {0:?} is defined twice with different models, rate_per_second or burst; to give \
         it another key, add the key to the `keys` list of its first block (a repeated block with \
         the same settings, as a second `fleet keygen --tenant` prints, adds its keys)"
    )]
    DuplicateTenant(String),
    #[error(
        "tenants file {path} defines no tenant, so every job would be refused; add one with \
         `fleet keygen --tenant <name> >> {path}`"
    )]
    Empty { path: String },
    #[error("tenant {0:?}: rate_per_second and burst must be at least 1")]
    ZeroRate(String),
}

/// The tenants file:
///
/// ```toml
/// [[tenants]]
/// name = "acme"
/// models = ["all-minilm-l6-v2"]
/// rate_per_second = 100
/// burst = 200
/// keys = [{ key_id = "acme-1", public_key = "<64 hex>" }]
/// ```
///
/// A block repeated with the same models, rate and burst adds its keys to the tenant, so the
/// output of a second `fleet keygen --tenant acme` can be appended as it is; a repeated block
/// with other settings is refused, since either could be meant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenants: Vec<TenantEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    name: String,
    models: Vec<String>,
    rate_per_second: u32,
    burst: u32,
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key_id: String,
    public_key: String,
}

/// Tenants held in memory, loaded once at start.
#[derive(Debug, Default)]
pub struct StaticTenants {
    keys: HashMap<String, TenantKey>,
    policies: HashMap<String, TenantPolicy>,
}

impl StaticTenants {
    pub fn from_file(path: &Path) -> Result<Self, TenantsError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TenantsError::Read {
            path: shown.clone(),
            source,
        })?;
        let tenants = Self::from_toml(&text).map_err(|err| match err {
            TenantsError::Parse { source, .. } => TenantsError::Parse {
                path: shown.clone(),
                source,
            },
            other => other,
        })?;
        if tenants.policies.is_empty() {
            return Err(TenantsError::Empty { path: shown });
        }
        Ok(tenants)
    }

    pub fn from_toml(text: &str) -> Result<Self, TenantsError> {
        let file: TenantsFile = toml::from_str(text).map_err(|source| TenantsError::Parse {
            path: "<inline>".into(),
            source,
        })?;
        let mut tenants = StaticTenants::default();
        for entry in file.tenants {
            validate_name("tenant", &entry.name).map_err(|source| TenantsError::BadName {
                tenant: entry.name.clone(),
                source,
            })?;
            if entry.rate_per_second == 0 || entry.burst == 0 {
                return Err(TenantsError::ZeroRate(entry.name));
            }
            for key in entry.keys {
                let public_key = VerifyingKey::from_hex(&key.public_key).map_err(|source| {
                    TenantsError::BadKey {
                        tenant: entry.name.clone(),
                        key_id: key.key_id.clone(),
                        source,
                    }
                })?;
                let registered = TenantKey {
                    tenant: entry.name.clone(),
                    public_key,
                };
                if tenants
                    .keys
                    .insert(key.key_id.clone(), registered)
                    .is_some()
                {
                    return Err(TenantsError::DuplicateKey(key.key_id));
                }
            }
            let policy = TenantPolicy {
                models: entry.models,
                rate_per_second: entry.rate_per_second,
                burst: entry.burst,
            };
            match tenants.policies.get(&entry.name) {
                None => {
                    tenants.policies.insert(entry.name, policy);
                }
                Some(defined) if defined.same_as(&policy) => {}
                Some(_) => return Err(TenantsError::DuplicateTenant(entry.name)),
            }
        }
        Ok(tenants)
    }
}

impl TenantStore for StaticTenants {
    fn key(&self, key_id: &str) -> Option<&TenantKey> {
        self.keys.get(key_id)
    }

    fn policy(&self, tenant: &str) -> Option<&TenantPolicy> {
        self.policies.get(tenant)
    }

    fn tenants(&self) -> Vec<(String, TenantPolicy)> {
        self.policies
            .iter()
            .map(|(name, policy)| (name.clone(), policy.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use fleet_schemas::SigningKey;

    use super::*;

    fn file_with(public_key: &str, extra: &str) -> String {
        format!(
            "[[tenants]]\nname = \"acme\"\nmodels = [\"m\"]\nrate_per_second = 5\nburst = 10\n\
             keys = [{{ key_id = \"acme-1\", public_key = \"{public_key}\" }}]\n{extra}"
        )
    }

    #[test]
    fn loads_keys_and_policies() {
        let key = SigningKey::generate("acme-1");
        let tenants = StaticTenants::from_toml(&file_with(&key.verifying_key().to_hex(), ""))
            .expect("valid file");
        let registered = tenants.key("acme-1").expect("key registered");
        assert_eq!(registered.tenant, "acme");
        assert_eq!(registered.public_key, key.verifying_key());
        let policy = tenants.policy("acme").expect("policy");
        assert!(policy.allows_model("m"));
        assert!(!policy.allows_model("other"));
        assert!(tenants.key("nope").is_none());
    }

    /// What a user gets by running `fleet keygen --tenant acme >> tenants.toml` twice.
    #[test]
    fn a_repeated_block_with_the_same_settings_adds_its_keys() {
        let first = SigningKey::generate("acme-1");
        let second = SigningKey::generate("acme-2");
        let text = format!(
            "{}{}",
            file_with(&first.verifying_key().to_hex(), ""),
            file_with(&second.verifying_key().to_hex(), "").replace("acme-1", "acme-2")
        );
        let tenants = StaticTenants::from_toml(&text).expect("the tenant gains a key");
        for key in [&first, &second] {
            let registered = tenants.key(&key.key_id).expect("both keys registered");
            assert_eq!(registered.tenant, "acme");
            assert_eq!(registered.public_key, key.verifying_key());
        }
        assert_eq!(tenants.tenants().len(), 1);
        let other_rate = text.replacen("rate_per_second = 5", "rate_per_second = 6", 1);
        let err = StaticTenants::from_toml(&other_rate).unwrap_err();
        assert!(matches!(err, TenantsError::DuplicateTenant(ref t) if t == "acme"));
        assert!(err.to_string().contains("keys"), "{err}");
    }

    #[test]
    fn a_file_without_tenants_is_refused_saying_how_to_add_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tenants.toml");
        std::fs::write(&path, "# nobody yet\n").unwrap();
        let err = StaticTenants::from_file(&path).unwrap_err();
        assert!(matches!(err, TenantsError::Empty { .. }));
        assert!(err.to_string().contains("fleet keygen --tenant"), "{err}");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let good = SigningKey::generate("k").verifying_key().to_hex();
        assert!(matches!(
            StaticTenants::from_toml(&file_with("abcd", "")),
            Err(TenantsError::BadKey { .. })
        ));
        let twice = file_with(&good, &file_with(&good, "").replace("acme\"", "other\""));
        assert!(matches!(
            StaticTenants::from_toml(&twice),
            Err(TenantsError::DuplicateKey(_))
        ));
        assert!(matches!(
            StaticTenants::from_toml(&file_with(&good, "").replace("burst = 10", "burst = 0")),
            Err(TenantsError::ZeroRate(_))
        ));
        assert!(matches!(
            StaticTenants::from_toml(&file_with(&good, "").replace("\"acme\"", "\"a.b\"")),
            Err(TenantsError::BadName { .. })
        ));
        assert!(matches!(
            StaticTenants::from_toml("[[tenants]]\nname = 1\n"),
            Err(TenantsError::Parse { .. })
        ));
    }
}
