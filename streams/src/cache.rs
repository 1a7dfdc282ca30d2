//! The result cache's key-value bucket (`FLEET_CACHE`, stream `KV_FLEET_CACHE`): vectors by
//! content address, each kept for the cache's TTL. Created by the first worker that caches and
//! checked, field by field like the other streams, by every worker after it: workers with
//! another TTL or size refuse to start rather than quietly change it for the others.
//!
//! One copy (no replicas) whatever the fleet's streams have: everything in it can be computed
//! again, so losing it costs time, never a job.

use std::time::Duration;

use async_nats::jetstream::{
    Context,
    context::KeyValueError,
    kv::Store,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};

use crate::{TopologyError, ensure_stream};

/// The bucket's name; its stream is `KV_FLEET_CACHE`, its subjects `$KV.FLEET_CACHE.>`.
pub const CACHE_BUCKET: &str = "FLEET_CACHE";

/// JetStream's own limit on a stream's duplicate window, and what a KV bucket is given.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// What every caching worker must agree on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// How long an entry is kept after it was stored.
    pub ttl: Duration,
    /// Most bytes held; past it the oldest entries go first.
    pub max_bytes: i64,
}

/// The bucket's stream as a KV bucket of one value per key: what `create_key_value` would make,
/// except that a full bucket drops its oldest entries (a cache) instead of refusing new ones.
pub fn cache_stream(limits: &CacheLimits) -> stream::Config {
    stream::Config {
        name: format!("KV_{CACHE_BUCKET}"),
        subjects: vec![format!("$KV.{CACHE_BUCKET}.>")],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        discard: DiscardPolicy::Old,
        max_age: limits.ttl,
        max_bytes: limits.max_bytes,
        max_messages: -1,
        max_messages_per_subject: 1,
        // The server refuses a duplicate window longer than the entries' age.
        duplicate_window: DUPLICATE_WINDOW.min(limits.ttl),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: 1,
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheSetupError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("cannot open bucket {CACHE_BUCKET}: {0}")]
    Open(#[from] KeyValueError),
}

/// Creates the bucket if it is missing, checks that it holds exactly `limits`, and opens it.
pub async fn ensure_cache(js: &Context, limits: &CacheLimits) -> Result<Store, CacheSetupError> {
    ensure_stream(js, cache_stream(limits)).await?;
    Ok(js.get_key_value(CACHE_BUCKET).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::differences;

    #[test]
    fn another_ttl_or_size_is_a_difference() {
        let limits = CacheLimits {
            ttl: Duration::from_secs(3600),
            max_bytes: 1 << 30,
        };
        let wanted = cache_stream(&limits);
        assert!(differences(&wanted, &wanted).is_empty());
        let found = cache_stream(&CacheLimits {
            ttl: Duration::from_secs(60),
            max_bytes: 1 << 20,
        });
        let fields: Vec<_> = differences(&wanted, &found)
            .into_iter()
            .map(|d| d.field)
            .collect();
        assert_eq!(fields, ["max_bytes", "max_age", "duplicate_window"]);
    }
}
