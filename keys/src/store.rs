//! The shared handle: lookups from an in-memory snapshot, refreshed in the background.

use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::{Registry, Unit},
};
use tokio::{
    sync::{Notify, watch},
    time::MissedTickBehavior,
};

use crate::{KeyRecord, Stamp, StoreError, Tenant, TenantSource, Tenants};

/// When a [`KeyStore`] reloads.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Reload this often, whatever else happens; also the least time between two reloads caused
    /// by lookups of unknown key ids. Revocations and rotations take effect within it.
    pub refresh_interval: Duration,
    /// How often to check whether the source changed (a file's metadata; one `stat` each time).
    pub watch_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            refresh_interval: Duration::from_secs(30),
            watch_interval: Duration::from_secs(1),
        }
    }
}

/// What a [`KeyStore`] counts; register it with [`KeyStoreMetrics::register`]. The values are
/// shared with the store, so they can be registered any time after it started.
#[derive(Debug, Clone, Default)]
pub struct KeyStoreMetrics {
    /// Loads that succeeded, the first one included.
    pub reloads: Counter,
    /// Loads that failed (source unreachable or content invalid); the last snapshot stays.
    pub reload_failures: Counter,
    /// 1 while the last load succeeded, 0 while the store serves an older snapshot.
    pub source_up: Gauge,
    /// Unix time in seconds of the last load that succeeded.
    pub last_reload_seconds: Gauge,
    /// Lookups of a key id the snapshot does not hold.
    pub unknown_keys: Counter,
    /// Reloads started by such lookups (at most one per refresh interval).
    pub unknown_key_reloads: Counter,
    /// Tenants and keys in the snapshot served.
    pub tenants: Gauge,
    pub keys: Gauge,
}

impl KeyStoreMetrics {
    /// Registers every metric with the prefix `fleet_keys`.
    pub fn register(&self, registry: &mut Registry) {
        let keys = registry.sub_registry_with_prefix("fleet_keys");
        keys.register(
            "reloads",
            "Tenant key loads that succeeded",
            self.reloads.clone(),
        );
        keys.register(
            "reload_failures",
            "Tenant key loads that failed; the last good snapshot is still served",
            self.reload_failures.clone(),
        );
        keys.register(
            "source_up",
            "1 while the last load of the tenant keys succeeded, else 0",
            self.source_up.clone(),
        );
        keys.register_with_unit(
            "last_reload_timestamp",
            "Unix time of the last load of the tenant keys that succeeded",
            Unit::Seconds,
            self.last_reload_seconds.clone(),
        );
        keys.register(
            "unknown_key_lookups",
            "Lookups of key ids that are not registered",
            self.unknown_keys.clone(),
        );
        keys.register(
            "unknown_key_reloads",
            "Reloads started by lookups of unregistered key ids (at most one per interval)",
            self.unknown_key_reloads.clone(),
        );
        keys.register("tenants", "Tenants served", self.tenants.clone());
        keys.register("keys", "Keys served", self.keys.clone());
    }
}

/// A cheaply cloneable handle on the tenants: lookups read an in-memory snapshot without locks;
/// a background task replaces the snapshot every refresh interval, when the source's stamp
/// changes (the file backend), on [`KeyStore::trigger_reload`] (wire SIGHUP to it, or call
/// [`KeyStore::reload_on_sighup`]) and when an unknown key id is looked up (at most once per
/// interval). A load that fails keeps the last snapshot, and is counted and logged. The task
/// stops when the last handle is dropped.
#[derive(Clone)]
pub struct KeyStore {
    shared: Arc<Shared>,
    /// None for a store of fixed tenants, which never reloads.
    refresher: Option<Arc<Refresher>>,
}

struct Shared {
    snapshot: ArcSwap<Tenants>,
    describe: String,
    refresh_interval: Duration,
    epoch: Instant,
    /// Milliseconds after `epoch`, plus one, of the last reload an unknown key id started; 0
    /// for never.
    last_unknown_reload: AtomicU64,
    trigger: Notify,
    progress: watch::Sender<Progress>,
    /// Bumped each time the snapshot's content changes.
    changes: watch::Sender<u64>,
    metrics: KeyStoreMetrics,
}

/// Loads started and finished, and how the last one ended, so a caller can wait for a load
/// that began after its request.
#[derive(Debug, Default)]
struct Progress {
    started: u64,
    finished: u64,
    last_error: Option<Arc<StoreError>>,
}

struct Refresher(tokio::task::JoinHandle<()>);

impl Drop for Refresher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KeyStore {
    /// Loads the tenants once, and refuses to start (with the reason) when that fails; then
    /// keeps them fresh in a task on the current Tokio runtime.
    pub async fn start<S: TenantSource>(
        source: S,
        options: StoreOptions,
    ) -> Result<KeyStore, StoreError> {
        let stamp = source.stamp();
        let tenants = source.load().await?;
        let shared = Shared::new(source.describe(), options.refresh_interval, tenants);
        let task = tokio::spawn(refresh(source, shared.clone(), options, stamp));
        Ok(KeyStore {
            shared,
            refresher: Some(Arc::new(Refresher(task))),
        })
    }

    /// A store of fixed tenants that never reloads: for a program (or a benchmark) that is
    /// handed its tenants whole. Needs no runtime.
    pub fn fixed(tenants: Tenants) -> KeyStore {
        let shared = Shared::new("fixed tenants".to_owned(), Duration::MAX, tenants);
        KeyStore {
            shared,
            refresher: None,
        }
    }

    /// The key registered as `key_id`, if any: a signature it verifies is trusted only after
    /// [`KeyStore::authorize`] (or [`KeyRecord::check`]) accepted the job. An unknown id starts a
    /// background reload, at most once per refresh interval, and returns None at once.
    pub fn key(&self, key_id: &str) -> Option<Arc<KeyRecord>> {
        let found = self.shared.snapshot.load().key(key_id).cloned();
        if found.is_none() && self.shared.claim_unknown_reload() {
            self.shared.trigger.notify_one();
        }
        found
    }

    /// Like [`KeyStore::key`], but when the unknown id starts a reload (at most once per
    /// interval), waits for it and looks again, so a key registered moments ago is found. Other
    /// unknown ids return None at once: random ids cannot make the store hammer its source.
    pub async fn key_or_reload(&self, key_id: &str) -> Option<Arc<KeyRecord>> {
        if let Some(found) = self.shared.snapshot.load().key(key_id) {
            return Some(found.clone());
        }
        if !self.shared.claim_unknown_reload() {
            return None;
        }
        // A failed reload is counted and logged by the refresher; the old snapshot answers.
        let _ = self.reload().await;
        self.shared.snapshot.load().key(key_id).cloned()
    }

    /// The tenant's policy and keys.
    pub fn tenant(&self, name: &str) -> Option<Arc<Tenant>> {
        self.shared.snapshot.load().tenant(name).cloned()
    }

    /// The whole snapshot now served: read a key and its tenant's policy from one snapshot to
    /// see them consistent.
    pub fn snapshot(&self) -> Arc<Tenants> {
        self.shared.snapshot.load_full()
    }

    /// Changes each time the snapshot's content changes (e.g. to rebuild rate limiters when a
    /// policy changed).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Asks for a reload as soon as possible and returns at once (what SIGHUP does).
    pub fn trigger_reload(&self) {
        self.shared.trigger.notify_one();
    }

    /// Reloads and waits for a load that started after this call; returns how it ended.
    pub async fn reload(&self) -> Result<(), Arc<StoreError>> {
        if self.refresher.is_none() {
            return Ok(());
        }
        let mut progress = self.shared.progress.subscribe();
        let started = progress.borrow().started;
        self.shared.trigger.notify_one();
        match progress.wait_for(|p| p.finished > started).await {
            Ok(done) => done.last_error.clone().map_or(Ok(()), Err),
            // The sender lives in `shared`, which this handle holds.
            Err(_) => unreachable!("the progress sender outlives every handle"),
        }
    }

    /// Reloads on every SIGHUP, for as long as the store lives.
    pub fn reload_on_sighup(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = signal(SignalKind::hangup())?;
        let shared: Weak<Shared> = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                tracing::info!(source = %shared.describe, "SIGHUP: reloading tenant keys");
                shared.trigger.notify_one();
            }
        });
        Ok(())
    }

    pub fn metrics(&self) -> &KeyStoreMetrics {
        &self.shared.metrics
    }

    /// The source, as its logs name it.
    pub fn describe(&self) -> &str {
        &self.shared.describe
    }
}

impl Shared {
    /// True for the one caller that may start a reload for an unknown key id in this interval.
    /// Shared state serving `tenants` from the start.
    fn new(describe: String, refresh_interval: Duration, tenants: Tenants) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Tenants::default()),
            describe,
            refresh_interval,
            epoch: Instant::now(),
            last_unknown_reload: AtomicU64::new(0),
            trigger: Notify::new(),
            progress: watch::Sender::new(Progress::default()),
            changes: watch::Sender::new(0),
            metrics: KeyStoreMetrics::default(),
        });
        shared.install(tenants, true);
        shared
    }

    fn claim_unknown_reload(&self) -> bool {
        self.metrics.unknown_keys.inc();
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_unknown_reload.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.refresh_interval.as_millis() as u64 {
            return false;
        }
        let claimed = self
            .last_unknown_reload
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if claimed {
            self.metrics.unknown_key_reloads.inc();
        }
        claimed
    }

    async fn reload<S: TenantSource>(&self, source: &S) {
        self.progress.send_modify(|p| p.started += 1);
        let error = match source.load().await {
            Ok(tenants) => {
                if self.metrics.source_up.get() == 0 {
                    tracing::info!(source = %self.describe, "tenant keys load again");
                }
                self.install(tenants, false);
                None
            }
            Err(error) => {
                self.metrics.reload_failures.inc();
                self.metrics.source_up.set(0);
                let snapshot = self.snapshot.load();
                tracing::error!(
                    source = %self.describe,
                    %error,
                    tenants = snapshot.tenant_count(),
                    keys = snapshot.key_count(),
                    "cannot reload tenant keys; serving the last ones loaded"
                );
                Some(Arc::new(error))
            }
        };
        self.progress.send_modify(|p| {
            p.finished += 1;
            p.last_error = error;
        });
    }

    /// Serves `tenants`; `first` for the load at start, which is announced even when empty.
    fn install(&self, tenants: Tenants, first: bool) {
        let m = &self.metrics;
        m.reloads.inc();
        m.source_up.set(1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        m.last_reload_seconds.set(now);
        m.tenants.set(tenants.tenant_count() as i64);
        m.keys.set(tenants.key_count() as i64);
        if !first && **self.snapshot.load() == tenants {
            return;
        }
        tracing::info!(
            source = %self.describe,
            tenants = tenants.tenant_count(),
            keys = tenants.key_count(),
            "tenant keys loaded"
        );
        if tenants.is_empty() {
            tracing::warn!(
                source = %self.describe,
                "no tenants are registered: every job will be refused"
            );
        }
        self.snapshot.store(Arc::new(tenants));
        self.changes.send_modify(|generation| *generation += 1);
    }
}

async fn refresh<S: TenantSource>(
    source: S,
    shared: Arc<Shared>,
    options: StoreOptions,
    mut stamp: Option<Stamp>,
) {
    let start = tokio::time::Instant::now();
    let mut periodic =
        tokio::time::interval_at(start + options.refresh_interval, options.refresh_interval);
    periodic.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut watch =
        tokio::time::interval_at(start + options.watch_interval, options.watch_interval);
    watch.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = periodic.tick() => {}
            _ = shared.trigger.notified() => {}
            _ = watch.tick() => {
                if source.stamp() == stamp {
                    continue;
                }
            }
        }
        // Taken before reading, so a change made during the read is seen at the next check.
        stamp = source.stamp();
        shared.reload(&source).await;
    }
}
