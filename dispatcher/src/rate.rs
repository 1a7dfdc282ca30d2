//! Per-tenant token buckets. Each tenant has its own quota, so each gets its own limiter
//! (governor's keyed limiter shares one quota across keys).

use std::{collections::HashMap, num::NonZeroU32};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::tenants::TenantPolicy;

pub struct TenantRateLimits {
    limiters: HashMap<String, DefaultDirectRateLimiter>,
}

impl TenantRateLimits {
    pub fn new(tenants: impl IntoIterator<Item = (String, TenantPolicy)>) -> Self {
        let limiters = tenants
            .into_iter()
            .map(|(tenant, policy)| {
                let rate = NonZeroU32::new(policy.rate_per_second).unwrap_or(NonZeroU32::MIN);
                let burst = NonZeroU32::new(policy.burst).unwrap_or(NonZeroU32::MIN);
                let quota = Quota::per_second(rate).allow_burst(burst);
                (tenant, RateLimiter::direct(quota))
            })
            .collect();
        TenantRateLimits { limiters }
    }

    /// Takes one job's token from the tenant's bucket; false when the bucket is empty.
    /// A tenant without a policy has no bucket and is never admitted this far.
    pub fn try_take(&self, tenant: &str) -> bool {
        self.limiters
            .get(tenant)
            .is_some_and(|limiter| limiter.check().is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_the_bucket_is_empty() {
        let policy = TenantPolicy {
            models: vec!["*".into()],
            rate_per_second: 1,
            burst: 3,
        };
        let limits = TenantRateLimits::new([("acme".to_string(), policy)]);
        assert!((0..3).all(|_| limits.try_take("acme")));
        assert!(!limits.try_take("acme"));
        assert!(!limits.try_take("unknown"));
    }
}
