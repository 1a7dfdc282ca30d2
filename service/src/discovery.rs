//! NATS service discovery: every dispatcher and worker registers with the NATS service API
//! (`async_nats::service`, the `nats micro` convention), so `$SRV.PING`, `$SRV.INFO` and
//! `$SRV.STATS` (also `.<service>` and `.<service>.<id>`) list each live process: its service
//! name, a per-process id, the version and metadata saying what it is (name, models or model,
//! subjects, the address of its HTTP endpoints).
//!
//! Registered for discovery only, with no service-API endpoints: the library's endpoints do not
//! fit Fleet's request handling (the dispatcher says why, in its `service` module), and workers
//! take no requests. The STATS answer therefore lists no endpoints and carries no counts (the
//! library fills them only for endpoints it serves itself); counts are on `/metrics`, whose
//! address is in the metadata.

use std::collections::HashMap;

use async_nats::service::{Service, ServiceExt};

/// The service name of every dispatcher.
pub const DISPATCHER_SERVICE: &str = "fleet-dispatcher";
/// The service name of every worker.
pub const WORKER_SERVICE: &str = "fleet-worker";

#[derive(Debug, thiserror::Error)]
#[error("cannot register with NATS service discovery as {service}: {source}")]
pub struct DiscoveryError {
    service: &'static str,
    source: async_nats::Error,
}

/// A process registered for discovery; it answers PING, INFO and STATS until stopped.
pub struct Discovery {
    service: Service,
    id: String,
}

impl Discovery {
    /// Registers this process as an instance of `service`. `version` is the binary's (semver);
    /// `metadata` is answered as is by PING and INFO for the life of the process, so it holds
    /// only what does not change.
    pub async fn register(
        client: &async_nats::Client,
        service: &'static str,
        version: &str,
        description: &str,
        metadata: HashMap<String, String>,
    ) -> Result<Discovery, DiscoveryError> {
        let registered = client
            .service_builder()
            .description(description)
            .metadata(metadata)
            .start(service, version)
            .await
            .map_err(|source| DiscoveryError { service, source })?;
        let id = registered.info().await.id;
        tracing::info!(service, id = %id, "registered for NATS service discovery");
        Ok(Discovery {
            service: registered,
            id,
        })
    }

    /// Stops answering: the process leaves discovery. Called when a process starts draining,
    /// so every process listed takes work.
    pub async fn stop(self) {
        // The library's stop cannot fail (it ends its own task, whose subscriptions go with it).
        let _ = self.service.stop().await;
        tracing::info!(id = %self.id, "left NATS service discovery");
    }
}
