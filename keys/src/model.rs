//! Tenants, their policies and keys: the validated snapshot every lookup reads, and the
//! serialized shapes both backends share.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
};

use fleet_schemas::{InvalidName, KeyError, VerifyingKey, validate_name};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// What one tenant may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
        let set = |p: &TenantPolicy| {
            p.models
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
        };
        set(self) == set(other)
            && self.rate_per_second == other.rate_per_second
            && self.burst == other.burst
    }
}

impl fmt::Display for TenantPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "models {:?}, rate_per_second {}, burst {}",
            self.models, self.rate_per_second, self.burst
        )
    }
}

/// A registered public key: the tenant it speaks for and when it may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub tenant: String,
    pub public_key: VerifyingKey,
    /// Unix ms from which the key may be used.
    pub not_before_ms: Option<u64>,
    /// Unix ms from which jobs created by the key are refused.
    pub not_after_ms: Option<u64>,
    /// A revoked key is refused for everything, at once.
    pub revoked: bool,
}

/// Why a registered key may not be used for a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefusal {
    #[error("key {key_id:?} is revoked")]
    Revoked { key_id: String },
    #[error("key {key_id:?} is not valid before {}", Millis(*not_before_ms))]
    NotYetValid { key_id: String, not_before_ms: u64 },
    #[error(
        "key {key_id:?} expired at {}; the job was created at {}",
        Millis(*not_after_ms),
        Millis(*created_at_ms)
    )]
    Expired {
        key_id: String,
        not_after_ms: u64,
        created_at_ms: u64,
    },
}

impl KeyRecord {
    /// May this key sign a job created at `created_at_ms` (the job's own `created_at_ms`) that is
    /// checked at `now_ms`? The dispatcher asks at admission, a worker again before running it.
    ///
    /// - Revoked: refused for every job, including those already queued: revocation says the key
    ///   may be in other hands, so nothing it signed can be trusted, whenever it was signed.
    /// - `not_before`: the key may not be used before it, judged by both the job's creation time
    ///   and now, so a job dated in the future cannot bring a key in early.
    /// - `not_after`: judged by the job's creation time only. That is what rotation needs: a job
    ///   signed while the key was current stays valid while it waits on the queue. The
    ///   dispatcher's age bound (jobs older than `max_job_age` are refused) limits how long after
    ///   `not_after` a job stamped just before it can still be admitted; to cut a key off at once,
    ///   revoke it.
    pub fn check(&self, created_at_ms: u64, now_ms: u64) -> Result<(), KeyRefusal> {
        if self.revoked {
            return Err(KeyRefusal::Revoked {
                key_id: self.key_id.clone(),
            });
        }
        if let Some(not_before_ms) = self.not_before_ms
            && (created_at_ms < not_before_ms || now_ms < not_before_ms)
        {
            return Err(KeyRefusal::NotYetValid {
                key_id: self.key_id.clone(),
                not_before_ms,
            });
        }
        if let Some(not_after_ms) = self.not_after_ms
            && created_at_ms >= not_after_ms
        {
            return Err(KeyRefusal::Expired {
                key_id: self.key_id.clone(),
                not_after_ms,
                created_at_ms,
            });
        }
        Ok(())
    }
}

/// One tenant: its policy and every key registered to it, in the order they were registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub policy: TenantPolicy,
    pub keys: Vec<Arc<KeyRecord>>,
}

/// Every tenant and key, validated: what lookups are served from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tenants {
    keys: HashMap<String, Arc<KeyRecord>>,
    tenants: BTreeMap<String, Arc<Tenant>>,
}

impl Tenants {
    pub fn key(&self, key_id: &str) -> Option<&Arc<KeyRecord>> {
        self.keys.get(key_id)
    }

    pub fn tenant(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(name)
    }

    pub fn policy(&self, tenant: &str) -> Option<&TenantPolicy> {
        self.tenants.get(tenant).map(|t| &t.policy)
    }

    /// Every tenant, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.tenants.values()
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// Builds the snapshot from tenant definitions, refusing anything a lookup could not trust.
    /// A tenant defined twice is merged when both definitions give it the same policy.
    pub(crate) fn build(defs: Vec<TenantDef>) -> Result<Tenants, TenantsError> {
        let mut merged: BTreeMap<String, TenantDef> = BTreeMap::new();
        for def in defs {
            match merged.get_mut(&def.name) {
                None => {
                    merged.insert(def.name.clone(), def);
                }
                Some(existing) if existing.policy.same_as(&def.policy) => {
                    existing.keys.extend(def.keys);
                }
                Some(existing) => {
                    return Err(TenantsError::ConflictingTenant {
                        tenant: def.name,
                        first: existing.policy.clone(),
                        second: def.policy,
                    });
                }
            }
        }
        let mut tenants = Tenants::default();
        for (name, def) in merged {
            validate_name("tenant", &name).map_err(|source| TenantsError::BadName {
                tenant: name.clone(),
                source,
            })?;
            if def.policy.rate_per_second == 0 || def.policy.burst == 0 {
                return Err(TenantsError::ZeroRate(name));
            }
            let mut keys = Vec::with_capacity(def.keys.len());
            for spec in def.keys {
                let record = Arc::new(spec.record(&name)?);
                if tenants
                    .keys
                    .insert(record.key_id.clone(), record.clone())
                    .is_some()
                {
                    return Err(TenantsError::DuplicateKey(record.key_id.clone()));
                }
                keys.push(record);
            }
            let tenant = Tenant {
                name: name.clone(),
                policy: def.policy,
                keys,
            };
            tenants.tenants.insert(name, Arc::new(tenant));
        }
        Ok(tenants)
    }
}

/// A tenant as a backend stores it, before validation.
#[derive(Debug, Clone)]
pub(crate) struct TenantDef {
    pub name: String,
    pub policy: TenantPolicy,
    pub keys: Vec<KeySpec>,
}

/// A key as both backends store it: times are RFC 3339 text with an offset
/// (`2027-01-31T00:00:00Z`); in the TOML file a TOML date-time with an offset works too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeySpec {
    pub key_id: String,
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<TimeText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<TimeText>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
}

impl KeySpec {
    pub fn new(key: &NewKey) -> KeySpec {
        KeySpec {
            key_id: key.key_id.clone(),
            public_key: key.public_key.to_hex(),
            not_before: key.not_before_ms.map(TimeText::from_ms),
            not_after: key.not_after_ms.map(TimeText::from_ms),
            revoked: false,
        }
    }

    fn record(self, tenant: &str) -> Result<KeyRecord, TenantsError> {
        let key_id = self.key_id;
        validate_name("key_id", &key_id).map_err(|source| TenantsError::BadKeyId {
            tenant: tenant.to_owned(),
            source,
        })?;
        let public_key =
            VerifyingKey::from_hex(&self.public_key).map_err(|source| TenantsError::BadKey {
                tenant: tenant.to_owned(),
                key_id: key_id.clone(),
                source,
            })?;
        let time = |field: &'static str, text: Option<TimeText>| {
            text.map(|t| {
                t.to_ms().map_err(|reason| TenantsError::BadTime {
                    key_id: key_id.clone(),
                    field,
                    value: t.0.clone(),
                    reason,
                })
            })
            .transpose()
        };
        let not_before_ms = time("not_before", self.not_before)?;
        let not_after_ms = time("not_after", self.not_after)?;
        if let (Some(from), Some(until)) = (not_before_ms, not_after_ms)
            && from >= until
        {
            return Err(TenantsError::EmptyWindow { key_id });
        }
        Ok(KeyRecord {
            key_id,
            tenant: tenant.to_owned(),
            public_key,
            not_before_ms,
            not_after_ms,
            revoked: self.revoked,
        })
    }
}

/// A key to register, for the management operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    pub key_id: String,
    pub public_key: VerifyingKey,
    pub not_before_ms: Option<u64>,
    pub not_after_ms: Option<u64>,
}

impl NewKey {
    /// A key valid from now on, with no end.
    pub fn new(key_id: impl Into<String>, public_key: VerifyingKey) -> NewKey {
        NewKey {
            key_id: key_id.into(),
            public_key,
            not_before_ms: None,
            not_after_ms: None,
        }
    }
}

/// A time as the files hold it: RFC 3339 text. Deserializes from a string or, in TOML, from a
/// date-time value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub(crate) struct TimeText(pub String);

impl TimeText {
    pub fn from_ms(ms: u64) -> TimeText {
        TimeText(format_ms(ms))
    }

    fn to_ms(&self) -> Result<u64, String> {
        let at = OffsetDateTime::parse(&self.0, &Rfc3339).map_err(|e| {
            format!("{e}; write RFC 3339 with an offset, like 2027-01-31T00:00:00Z")
        })?;
        u64::try_from(at.unix_timestamp_nanos() / 1_000_000)
            .map_err(|_| "times before 1970 are not accepted".to_owned())
    }
}

impl<'de> Deserialize<'de> for TimeText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "an RFC 3339 time with an offset, like \"2027-01-31T00:00:00Z\""
        )]
        enum Either {
            Text(String),
            Toml(toml::value::Datetime),
        }
        Ok(match Either::deserialize(deserializer)? {
            Either::Text(text) => TimeText(text),
            // A TOML date-time without an offset or a bare date prints as such and is refused by
            // the RFC 3339 parser with a reason.
            Either::Toml(datetime) => TimeText(datetime.to_string()),
        })
    }
}

/// Unix ms as RFC 3339 UTC text (`2027-01-31T00:00:00.250Z`).
pub(crate) fn format_ms(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms after 1970"))
}

/// Displays Unix ms as RFC 3339.
struct Millis(u64);

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_ms(self.0))
    }
}

/// Tenants or keys that cannot be trusted as written.
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
    #[error("tenant {tenant:?} in Vault is invalid: {reason}")]
    BadDocument { tenant: String, reason: String },
    #[error("tenant {tenant:?}: {source}")]
    BadName { tenant: String, source: InvalidName },
    #[error("tenant {tenant:?}: {source}")]
    BadKeyId { tenant: String, source: InvalidName },
    #[error("tenant {tenant:?}, key {key_id:?}: {source}")]
    BadKey {
        tenant: String,
        key_id: String,
        source: KeyError,
    },
    #[error("key {key_id:?}: {field} {value:?} is not a time: {reason}")]
    BadTime {
        key_id: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("key {key_id:?}: not_before must be earlier than not_after")]
    EmptyWindow { key_id: String },
    #[error("key id {0:?} is registered twice")]
    DuplicateKey(String),
    #[error(
        "tenant {tenant:?} is defined twice with different policies (first {first}; then {second}); \
         keep one [[tenants]] block and add further keys as [[keys]] entries with \
         tenant = {tenant:?} (or repeat the block with the same policy)"
    )]
    ConflictingTenant {
        tenant: String,
        first: TenantPolicy,
        second: TenantPolicy,
    },
    #[error("key {key_id:?} names tenant {tenant:?}, which no [[tenants]] block defines")]
    UnknownTenant { key_id: String, tenant: String },
    #[error("tenant {0:?}: rate_per_second and burst must be at least 1")]
    ZeroRate(String),
}
