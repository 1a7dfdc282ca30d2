//! Fleet's tenant key store: who may sign jobs, for which tenant, until when, and what the
//! tenant may do. The dispatcher checks every job against it at admission and every worker again
//! before running the job, so both read the same store.
//!
//! - [`Tenants`] is one validated snapshot: [`KeyRecord`]s by key id (several per tenant may be
//!   valid at once, each with an optional validity window and a revoked flag; see
//!   [`KeyRecord::check`]) and each tenant's [`TenantPolicy`].
//! - A [`TenantSource`] produces snapshots: [`FileSource`] (a TOML file, the default) or
//!   [`VaultSource`] (Vault or OpenBao KV v2). The layouts are documented on each.
//! - [`KeyStore`] is the shared handle: lookups from an in-memory snapshot swapped atomically,
//!   refreshed in the background (every interval, on file change, on demand), surviving a source
//!   that fails later by keeping the last snapshot; see [`KeyStoreMetrics`] for what it counts.
//! - [`KeyStore::verify`] and [`KeyStore::authorize`] are the checks a job passes under its key
//!   (signature, validity, tenant, model), the same for the dispatcher and the workers.
//! - [`TenantAdmin`] writes: add a tenant, add a key (rotation), retire or revoke a key.

mod args;
mod authorize;
mod file;
mod model;
mod store;
mod vault;

use std::future::Future;

pub use args::KeyStoreArgs;
pub use authorize::Denied;
pub use file::FileSource;
pub use model::{KeyRecord, KeyRefusal, NewKey, Tenant, TenantPolicy, Tenants, TenantsError};
pub use store::{KeyStore, KeyStoreMetrics, StoreOptions};
pub use vault::{VaultConfig, VaultSource};

/// Where a [`KeyStore`] reads its tenants from.
pub trait TenantSource: Send + Sync + 'static {
    /// Names the source in logs and errors, e.g. `file /etc/fleet/tenants.toml`.
    fn describe(&self) -> String;

    /// Reads and validates every tenant and key.
    fn load(&self) -> impl Future<Output = Result<Tenants, StoreError>> + Send;

    /// Something cheap to read that changes whenever the content may have changed, polled by the
    /// store to reload early. Sources that cannot tell return None and are reloaded on their
    /// refresh interval only.
    fn stamp(&self) -> Option<Stamp> {
        None
    }
}

/// A file's identity, size and change times: see [`TenantSource::stamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(pub(crate) [i64; 6]);

/// The management operations `fleet tenant add|rotate|revoke|list` use. Each change is checked
/// against the current tenants and the result validated as a load would before anything is
/// written, so a write can never leave a store that the dispatcher or workers would refuse.
pub trait TenantAdmin: TenantSource {
    fn apply(&self, change: Change) -> impl Future<Output = Result<(), AdminError>> + Send;
}

/// One management operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new tenant with its first key.
    AddTenant {
        tenant: String,
        policy: TenantPolicy,
        key: NewKey,
    },
    /// Another key for an existing tenant; `retire` also ends one of its keys (rotation), in
    /// the same write.
    AddKey {
        tenant: String,
        key: NewKey,
        retire: Option<Retire>,
    },
    /// Ends a key: jobs created from `not_after_ms` on are refused.
    Retire(Retire),
    /// Refuses a key for everything, at once (see [`KeyRecord::check`]).
    Revoke { key_id: String },
}

/// Sets a key's `not_after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retire {
    pub key_id: String,
    pub not_after_ms: u64,
}

impl Change {
    /// Refuses a change that does not fit the current tenants, with the reason.
    fn check(&self, current: &Tenants) -> Result<(), AdminError> {
        let key_is_new = |key: &NewKey| match current.key(&key.key_id) {
            Some(existing) => Err(AdminError::KeyExists {
                key_id: key.key_id.clone(),
                tenant: existing.tenant.clone(),
            }),
            None => Ok(()),
        };
        let key_of = |key_id: &str, tenant: Option<&str>| match current.key(key_id) {
            None => Err(AdminError::UnknownKey(key_id.to_owned())),
            Some(found) if tenant.is_some_and(|t| t != found.tenant) => {
                Err(AdminError::WrongTenant {
                    key_id: key_id.to_owned(),
                    owner: found.tenant.clone(),
                })
            }
            Some(_) => Ok(()),
        };
        match self {
            Change::AddTenant { tenant, key, .. } => {
                if current.tenant(tenant).is_some() {
                    return Err(AdminError::TenantExists(tenant.clone()));
                }
                key_is_new(key)
            }
            Change::AddKey {
                tenant,
                key,
                retire,
            } => {
                if current.tenant(tenant).is_none() {
                    return Err(AdminError::UnknownTenant(tenant.clone()));
                }
                key_is_new(key)?;
                match retire {
                    Some(retire) => key_of(&retire.key_id, Some(tenant)),
                    None => Ok(()),
                }
            }
            Change::Retire(retire) => key_of(&retire.key_id, None),
            Change::Revoke { key_id } => key_of(key_id, None),
        }
    }
}

/// A source that cannot be read, or whose content cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Invalid(#[from] TenantsError),
    #[error("cannot reach Vault at {addr}: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("Vault at {addr} refused to {action} (HTTP {status}): {}", errors.join("; "))]
    Refused {
        addr: String,
        action: String,
        status: u16,
        errors: Vec<String>,
    },
    #[error("Vault at {addr}: cannot {action}: {detail}")]
    Vault {
        addr: String,
        action: String,
        detail: String,
    },
    #[error("Vault settings: {0}")]
    Config(String),
}

/// A management operation that was refused or failed; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("tenant {0:?} already exists; add a key to it instead")]
    TenantExists(String),
    #[error("tenant {0:?} does not exist")]
    UnknownTenant(String),
    #[error("key id {key_id:?} is already registered (to tenant {tenant:?})")]
    KeyExists { key_id: String, tenant: String },
    #[error("no key is registered as {0:?}")]
    UnknownKey(String),
    #[error("key {key_id:?} belongs to tenant {owner:?}")]
    WrongTenant { key_id: String, owner: String },
    #[error("the change would leave the tenants invalid: {0}")]
    Invalid(TenantsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot edit {path}: {reason}")]
    Unsupported { path: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    /// The tenant (Vault) or the file was changed by someone else meanwhile.
    #[error("{0} was changed by someone else meanwhile; nothing was written, try again")]
    Conflict(String),
}
