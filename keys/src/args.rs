//! Where a binary reads its tenants from: the flags the dispatcher and the workers share, so
//! both read the same store the same way.

use std::{path::PathBuf, time::Duration};

use crate::{FileSource, KeyStore, StoreError, StoreOptions, VaultConfig, VaultSource};

#[derive(Debug, Clone, clap::Args)]
pub struct KeyStoreArgs {
    /// Tenants file (TOML): each tenant's policy and public keys. Read again when it changes,
    /// on SIGHUP and every --tenants-refresh.
    #[arg(long, env = "FLEET_TENANTS", default_value = "tenants.toml")]
    pub tenants: PathBuf,

    /// Read tenants from Vault KV v2 instead of the file: `VAULT_ADDR`, `VAULT_TOKEN` (or
    /// `VAULT_TOKEN_FILE`) and `VAULT_CACERT` say where and how.
    #[arg(long, env = "FLEET_TENANTS_FROM_VAULT")]
    pub tenants_from_vault: bool,

    /// How often tenants and keys are read again; a revoked or rotated key takes effect within
    /// it (e.g. `30s`).
    #[arg(long, env = "FLEET_TENANTS_REFRESH", default_value = "30s", value_parser = humantime::parse_duration)]
    pub tenants_refresh: Duration,
}

impl KeyStoreArgs {
    /// Loads the tenants (refusing to start, with the reason, when that fails) and keeps them
    /// fresh; SIGHUP reloads them.
    pub async fn start(&self) -> Result<KeyStore, StoreError> {
        let options = StoreOptions {
            refresh_interval: self.tenants_refresh,
            ..StoreOptions::default()
        };
        let store = if self.tenants_from_vault {
            KeyStore::start(VaultSource::new(VaultConfig::from_env()?)?, options).await?
        } else {
            KeyStore::start(FileSource::new(&self.tenants), options).await?
        };
        store
            .reload_on_sighup()
            .map_err(|e| StoreError::Config(format!("cannot watch for SIGHUP: {e}")))?;
        Ok(store)
    }
}
