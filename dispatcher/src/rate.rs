//! Per-tenant token buckets. Each tenant has its own quota, so each gets its own limiter
//! (governor's keyed limiter shares one quota across keys). Tenants and their rates can change
//! while the dispatcher runs (the key store reloads): a tenant's bucket is made on its first job
//! and made anew when its rate or burst changed.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{PoisonError, RwLock},
};

use fleet_keys::TenantPolicy;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

#[derive(Default)]
pub struct TenantRateLimits {
    buckets: RwLock<HashMap<String, Bucket>>,
}

struct Bucket {
    rate_per_second: u32,
    burst: u32,
    limiter: DefaultDirectRateLimiter,
}

impl Bucket {
    fn new(policy: &TenantPolicy) -> Bucket {
        let rate = NonZeroU32::new(policy.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
        Bucket {
            rate_per_second: policy.rate_per_second,
            burst: policy.burst,
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
        }
    }

    fn follows(&self, policy: &TenantPolicy) -> bool {
        self.rate_per_second == policy.rate_per_second && self.burst == policy.burst
    }
}

impl TenantRateLimits {
    /// Takes one job's token from the tenant's bucket, under its current `policy`; false when
    /// the bucket is empty.
    pub fn try_take(&self, tenant: &str, policy: &TenantPolicy) -> bool {
        {
            // A panic elsewhere cannot leave a bucket half made, so a poisoned lock is usable.
            let buckets = self.buckets.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(bucket) = buckets.get(tenant).filter(|b| b.follows(policy)) {
                return bucket.limiter.check().is_ok();
            }
        }
        let mut buckets = self.buckets.write().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets
            .entry(tenant.to_owned())
            .and_modify(|bucket| {
                if !bucket.follows(policy) {
                    *bucket = Bucket::new(policy);
                }
            })
            .or_insert_with(|| Bucket::new(policy));
        bucket.limiter.check().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rate_per_second: u32, burst: u32) -> TenantPolicy {
        TenantPolicy {
            models: vec!["*".into()],
            rate_per_second,
            burst,
        }
    }

    #[test]
    fn a_burst_is_allowed_then_the_bucket_is_empty() {
        let limits = TenantRateLimits::default();
        let policy = policy(1, 3);
        assert!((0..3).all(|_| limits.try_take("acme", &policy)));
        assert!(!limits.try_take("acme", &policy));
        assert!(
            limits.try_take("globex", &policy),
            "each tenant has its own bucket"
        );
    }

    #[test]
    fn a_changed_rate_takes_effect_at_once() {
        let limits = TenantRateLimits::default();
        assert!(limits.try_take("acme", &policy(1, 1)));
        assert!(!limits.try_take("acme", &policy(1, 1)));
        assert!(
            limits.try_take("acme", &policy(1, 5)),
            "a new bucket for the new burst"
        );
    }
}
