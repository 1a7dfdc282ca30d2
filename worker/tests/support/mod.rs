//! For tests of the worker pipeline in-process: a deterministic stand-in for the model, and a
//! worker running on it against a real nats-server.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use clap::Parser;
use fleet_keys::{FileSource, KeyStore, StoreOptions};
use fleet_schemas::Job;
use fleet_worker::{
    Metrics, PipelineError, WorkerArgs, WorkerConfig,
    embedder::{EmbedError, Embedder, FailureKind, TokenizeError, TokenizedInput},
};
use futures::future::BoxFuture;
use prometheus_client::registry::Registry;
use tokio::{sync::oneshot, task::JoinHandle};

/// A deterministic stand-in for a model, for tests of the pipeline: a token is a word, its id a
/// hash of the word, and a vector counts token ids into `dimension` buckets. Equal texts get
/// equal vectors; it records every batch it is asked to embed. Clones share that record.
#[derive(Clone)]
pub struct FakeEmbedder {
    inner: Arc<FakeInner>,
}

struct FakeInner {
    dimension: usize,
    max_tokens: usize,
    delay: Mutex<Duration>,
    batches: Mutex<Vec<Vec<TokenizedInput>>>,
    failures_left: AtomicUsize,
    poison: Mutex<Option<u32>>,
    freeze: Mutex<Duration>,
}

impl FakeEmbedder {
    pub fn new(dimension: usize, max_tokens: usize) -> FakeEmbedder {
        FakeEmbedder {
            inner: Arc::new(FakeInner {
                dimension,
                max_tokens,
                delay: Mutex::new(Duration::ZERO),
                batches: Mutex::new(Vec::new()),
                failures_left: AtomicUsize::new(0),
                poison: Mutex::new(None),
                freeze: Mutex::new(Duration::ZERO),
            }),
        }
    }

    /// From now on every `embed` takes this long, like a slow model would.
    pub fn set_delay(&self, delay: Duration) {
        if let Ok(mut current) = self.inner.delay.lock() {
            *current = delay;
        }
    }

    /// The next `count` calls to `embed` fail, like a model runtime in trouble.
    pub fn fail_next(&self, count: usize) {
        self.inner.failures_left.store(count, Ordering::SeqCst);
    }

    /// From now on every batch holding an input with `word` fails deterministically, like a
    /// kernel that cannot take some input.
    pub fn poison(&self, word: &str) {
        if let Ok(mut poison) = self.inner.poison.lock() {
            *poison = word_ids(word).first().copied();
        }
    }

    /// The next `embed` blocks the thread that calls it for `duration`: on a single-threaded
    /// runtime the whole worker stands still, as a process stopped with SIGSTOP or stalled by
    /// a slow disk does, in-progress acks included.
    pub fn freeze_next(&self, duration: Duration) {
        if let Ok(mut freeze) = self.inner.freeze.lock() {
            *freeze = duration;
        }
    }

    /// The batches embedded so far, in call order.
    pub fn batches(&self) -> Vec<Vec<TokenizedInput>> {
        self.inner
            .batches
            .lock()
            .map(|batches| batches.clone())
            .unwrap_or_default()
    }

    /// The vector this embedder gives `text` (untruncated).
    pub fn expected_vector(&self, text: &str, normalize: bool) -> Vec<f32> {
        self.vector(&word_ids(text), normalize)
    }

    fn vector(&self, token_ids: &[u32], normalize: bool) -> Vec<f32> {
        let dimension = self.inner.dimension;
        let mut vector = vec![0.0f32; dimension];
        for id in token_ids {
            vector[*id as usize % dimension] += 1.0;
        }
        if normalize {
            let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                vector.iter_mut().for_each(|x| *x /= norm);
            }
        }
        vector
    }
}

fn word_ids(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .map(|word| {
            // FNV-1a: stable across runs and platforms, unlike the std hasher.
            word.bytes().fold(0x811c_9dc5u32, |hash, byte| {
                (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
            })
        })
        .collect()
}

impl Embedder for FakeEmbedder {
    fn max_tokens(&self) -> usize {
        self.inner.max_tokens
    }

    fn tokenize(&self, text: &str, truncate: bool) -> Result<Vec<u32>, TokenizeError> {
        let mut ids = word_ids(text);
        let max = self.inner.max_tokens;
        if ids.len() > max {
            if !truncate {
                return Err(TokenizeError::TooLong {
                    tokens: ids.len(),
                    max,
                });
            }
            ids.truncate(max);
        }
        Ok(ids)
    }

    fn embed(
        &self,
        batch: Vec<TokenizedInput>,
    ) -> BoxFuture<'static, Result<Vec<Vec<f32>>, EmbedError>> {
        let this = self.clone();
        let freeze = self
            .inner
            .freeze
            .lock()
            .map(|mut freeze| std::mem::take(&mut *freeze))
            .unwrap_or_default();
        Box::pin(async move {
            std::thread::sleep(freeze);
            if let Ok(mut batches) = this.inner.batches.lock() {
                batches.push(batch.clone());
            }
            let delay = this.inner.delay.lock().map(|d| *d).unwrap_or_default();
            tokio::time::sleep(delay).await;
            let fail = this
                .inner
                .failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                return Err(EmbedError {
                    kind: FailureKind::Transient,
                    source: "injected failure".into(),
                });
            }
            let poison = this.inner.poison.lock().map(|p| *p).unwrap_or_default();
            if let Some(poison) = poison
                && batch.iter().any(|input| input.token_ids.contains(&poison))
            {
                return Err(EmbedError {
                    kind: FailureKind::Deterministic,
                    source: "poison input".into(),
                });
            }
            Ok(batch
                .iter()
                .map(|input| this.vector(&input.token_ids, input.normalize))
                .collect())
        })
    }
}

/// The model the in-process workers of these tests serve.
pub const MODEL: &str = "fake-model";
/// How long a running worker is given to stop.
const STOP_WAIT: Duration = Duration::from_secs(15);

/// A worker's configuration for these tests, against `nats_url`: a short ack wait and retry
/// delay, 4,096-token batches, a 10 s shutdown; `extra` flags come last and win.
pub fn config(nats_url: &str, extra: &[&str]) -> WorkerConfig {
    let args = ["worker", "--nats-url", nats_url, "--model", MODEL]
        .into_iter()
        .chain(["--ack-wait", "2s", "--retry-delay", "200ms"])
        .chain(["--max-batch-tokens", "4096", "--shutdown-timeout", "10s"])
        .chain(extra.iter().copied());
    WorkerConfig::from_args(WorkerArgs::try_parse_from(args).expect("arguments")).expect("config")
}

/// The tenants file in `dir` (`fleet_tests::write_tenants_file`), as a worker reads it.
pub async fn key_store(dir: &std::path::Path) -> KeyStore {
    let file = FileSource::new(dir.join("tenants.toml"));
    KeyStore::start(file, StoreOptions::default())
        .await
        .expect("key store")
}

/// A worker pipeline running in this test's process on the fake model, with its metrics and
/// the registry they are read from.
pub struct RunningWorker {
    stop: oneshot::Sender<()>,
    /// Ends when the pipeline does, by a stop or by itself (a model fault).
    pub task: JoinHandle<Result<(), PipelineError>>,
    pub metrics: Metrics,
    pub registry: Registry,
}

impl RunningWorker {
    pub async fn start(
        client: async_nats::Client,
        keys: KeyStore,
        config: WorkerConfig,
        embedder: FakeEmbedder,
    ) -> RunningWorker {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry, MODEL);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let metrics = metrics.clone();
            async move {
                fleet_worker::run(&config, client, embedder, keys, metrics, async {
                    let _ = stopped.await;
                })
                .await
            }
        });
        RunningWorker {
            stop,
            task,
            metrics,
            registry,
        }
    }

    /// Stops it as SIGTERM would; its result once it has drained.
    pub async fn stop(self) -> Result<(), PipelineError> {
        let _ = self.stop.send(());
        tokio::time::timeout(STOP_WAIT, self.task)
            .await
            .expect("worker stops in time")
            .expect("worker task does not panic")
    }
}

/// An embedding job of tenant acme for [`MODEL`].
pub fn job(id: &str, inputs: &[&str]) -> Job {
    let inputs = inputs.iter().map(|s| (*s).to_owned()).collect();
    Job::embed(id, "acme", MODEL, inputs, 0)
}
