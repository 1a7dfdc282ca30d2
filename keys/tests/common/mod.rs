//! Shared by the key store's tests.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fleet_keys::{Stamp, StoreError, TenantSource, Tenants};
use fleet_schemas::SigningKey;

/// Wraps a source and counts its loads, to see how often the store reads it.
pub struct Counting<S> {
    pub inner: S,
    pub loads: Arc<AtomicU64>,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> (Counting<S>, Arc<AtomicU64>) {
        let loads = Arc::new(AtomicU64::new(0));
        (
            Counting {
                inner,
                loads: loads.clone(),
            },
            loads,
        )
    }
}

impl<S: TenantSource> TenantSource for Counting<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn load(&self) -> Result<Tenants, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load().await
    }

    fn stamp(&self) -> Option<Stamp> {
        self.inner.stamp()
    }
}

pub fn public_hex(key: &SigningKey) -> String {
    key.verifying_key().to_hex()
}

/// Polls `check` every 20 ms until it holds; returns how long that took, or panics after
/// `timeout`.
pub async fn within(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: not seen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
