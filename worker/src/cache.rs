//! The result cache: vectors already computed, found by content address in a JetStream
//! key-value bucket (`fleet_streams::cache`), so a text seen before skips the model. A job with
//! some hits sends only the rest to the batcher; its answer puts the cached vectors back in
//! their places.
//!
//! A key is the SHA-256 of a length-prefixed encoding of everything that decides a vector: the
//! scope (the job's tenant, or "shared"), the model's name and version (a digest of its files
//! and the device kind they run on), the task's options (`normalize`, `truncate`) and the
//! text. The bucket holds no text: a key tells nothing of its text but to someone who already
//! has the text. In `tenant` mode the tenant is in the hash and in the key's prefix, so one
//! tenant's job never finds what another embedded (a hit would tell it that the other sent the
//! text); `shared` mode shares hits between tenants, and must be asked for.
//!
//! Values are the vector's `f32`s, little-endian, as computed: a hit is bit for bit the vector
//! the model gave. The cache never fails a job: a lookup that fails is a miss, a store that
//! fails is only counted.

use std::{io::Read, path::Path, time::Duration};

use async_nats::jetstream::{self, kv::Store};
use bytes::Bytes;
use fleet_model::Precision;
use fleet_schemas::{Job, Task};
use fleet_streams::cache::{CacheLimits, CacheSetupError, ensure_cache};
use futures::future::join_all;
use sha2::{Digest, Sha256};

use crate::{
    DeviceSpec,
    metrics::{CacheLookup, CacheStore, Metrics},
};

/// Whether, and for whom, results are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheMode {
    /// No cache: every text goes to the model.
    Off,
    /// Each tenant's texts apart: a hit comes only from the same tenant's jobs.
    Tenant,
    /// One cache for all tenants: a hit may come from another tenant's job.
    Shared,
}

/// The cache's settings, as given to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    pub mode: CacheMode,
    pub limits: CacheLimits,
    /// What identifies the model's outputs beyond its name ([`model_version`]); set by the
    /// binary from the model's files.
    pub model_version: String,
}

/// How long one lookup or store may take: a cache slower than that is worth less than the
/// model it saves.
const CACHE_TIMEOUT: Duration = Duration::from_millis(500);

/// Files that decide the model's vectors (those the model loads).
const MODEL_FILES: [&str; 5] = [
    "config.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "tokenizer.json",
    "model.safetensors",
];

/// The model's version for cache keys: a digest of its files, the kind of device it runs on
/// and the precision of its linear layers (kernels differ between devices and precisions, and
/// so do the vectors, in their last bits or more). A missing file is part of the version too
/// (the model then runs without it).
pub fn model_version(
    dir: &Path,
    device: DeviceSpec,
    precision: Precision,
) -> std::io::Result<String> {
    let mut hash = Sha256::new();
    let device_kind = match device {
        DeviceSpec::Cpu => "cpu",
        DeviceSpec::Cuda(_) => "cuda",
    };
    field(&mut hash, device_kind.as_bytes());
    field(&mut hash, precision.to_string().as_bytes());
    let mut buffer = vec![0u8; 1 << 20];
    for name in MODEL_FILES {
        field(&mut hash, name.as_bytes());
        match std::fs::File::open(dir.join(name)) {
            Ok(mut file) => {
                hash.update([1u8]);
                loop {
                    let read = file.read(&mut buffer)?;
                    if read == 0 {
                        break;
                    }
                    hash.update(&buffer[..read]);
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => hash.update([0u8]),
            Err(error) => return Err(error),
        }
    }
    Ok(hex(&hash.finalize()[..16]))
}

/// One field of a key's encoding: its length, then its bytes, so no two different sequences of
/// fields encode alike.
fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_le_bytes());
    hash.update(bytes);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Vectors found in the cache for a job, by input index; empty when nothing was looked up.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Hits(Vec<Option<Vec<f32>>>);

impl Hits {
    /// Whether input `index` still needs the model.
    pub fn is_miss(&self, index: usize) -> bool {
        self.0.get(index).is_none_or(Option::is_none)
    }

    /// The job's vectors in input order: each hit in its place, the model's `computed` vectors
    /// (one per miss, in input order) in the others. Also says which were computed.
    pub fn merge(self, computed: Vec<Vec<f32>>) -> (Vec<Vec<f32>>, Vec<bool>) {
        if self.0.is_empty() {
            let fresh = vec![true; computed.len()];
            return (computed, fresh);
        }
        let mut computed = computed.into_iter();
        self.0
            .into_iter()
            .map(|hit| match hit {
                Some(vector) => (vector, false),
                // The batcher returns one vector per input it took: one per miss.
                None => (computed.next().unwrap_or_default(), true),
            })
            .unzip()
    }
}

/// The cache as a worker uses it. Cheap to clone.
#[derive(Clone)]
pub struct ResultCache {
    store: Store,
    shared: bool,
    model: String,
    version: String,
    metrics: Metrics,
}

impl ResultCache {
    /// Creates or checks the bucket and opens it; None when the cache is off.
    pub async fn open(
        client: &async_nats::Client,
        settings: &CacheSettings,
        model: &str,
        metrics: Metrics,
    ) -> Result<Option<ResultCache>, CacheSetupError> {
        let shared = match settings.mode {
            CacheMode::Off => return Ok(None),
            CacheMode::Tenant => false,
            CacheMode::Shared => true,
        };
        let mut js = jetstream::new(client.clone());
        js.set_timeout(CACHE_TIMEOUT);
        let store = ensure_cache(&js, &settings.limits).await?;
        tracing::info!(mode = ?settings.mode, version = %settings.model_version, "result cache on");
        Ok(Some(ResultCache {
            store,
            shared,
            model: model.to_owned(),
            version: settings.model_version.clone(),
            metrics,
        }))
    }

    /// The key of `text` in `job`'s context. Keys are `t.<tenant>.<hash>` (tenant mode: one
    /// tenant's entries can be listed or purged together) or `s.<hash>` (shared).
    fn key(&self, job: &Job, normalize: bool, truncate: bool, text: &str) -> String {
        let mut hash = Sha256::new();
        field(&mut hash, b"fleet-result-cache/1");
        if self.shared {
            field(&mut hash, b"shared");
        } else {
            field(&mut hash, b"tenant");
            field(&mut hash, job.tenant.as_bytes());
        }
        field(&mut hash, self.model.as_bytes());
        field(&mut hash, self.version.as_bytes());
        field(&mut hash, &[u8::from(normalize), u8::from(truncate)]);
        field(&mut hash, text.as_bytes());
        let digest = hex(&hash.finalize());
        if self.shared {
            format!("s.{digest}")
        } else {
            format!("t.{}.{digest}", job.tenant)
        }
    }

    /// Looks every input of `job` up at once.
    pub async fn lookup(&self, job: &Job) -> Hits {
        let Task::Embed {
            inputs,
            normalize,
            truncate,
        } = &job.task;
        let lookups = inputs.iter().map(|text| async move {
            let key = self.key(job, *normalize, *truncate, text);
            match self.store.get(key).await {
                Ok(Some(value)) => match vector_from(&value) {
                    Some(vector) => {
                        self.metrics.cache_lookup(CacheLookup::Hit);
                        Some(vector)
                    }
                    None => {
                        tracing::warn!(len = value.len(), "cached value is not a vector; ignored");
                        self.metrics.cache_lookup(CacheLookup::Error);
                        None
                    }
                },
                Ok(None) => {
                    self.metrics.cache_lookup(CacheLookup::Miss);
                    None
                }
                Err(error) => {
                    tracing::debug!(%error, "result cache lookup failed; running the text");
                    self.metrics.cache_lookup(CacheLookup::Error);
                    None
                }
            }
        });
        Hits(join_all(lookups).await)
    }

    /// Stores the vectors the model computed for `job` (`fresh[i]`: input `i` was computed).
    pub async fn store(&self, job: &Job, vectors: &[Vec<f32>], fresh: &[bool]) {
        let Task::Embed {
            inputs,
            normalize,
            truncate,
        } = &job.task;
        let stores = inputs
            .iter()
            .zip(vectors)
            .zip(fresh)
            .filter(|(_, fresh)| **fresh)
            .map(|((text, vector), _)| async move {
                let key = self.key(job, *normalize, *truncate, text);
                match self.store.put(key, bytes_of(vector)).await {
                    Ok(_) => self.metrics.cache_store(CacheStore::Stored),
                    Err(error) => {
                        tracing::debug!(%error, "cannot store a result in the cache");
                        self.metrics.cache_store(CacheStore::Failed);
                    }
                }
            });
        join_all(stores).await;
    }
}

fn bytes_of(vector: &[f32]) -> Bytes {
    vector
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

fn vector_from(bytes: &[u8]) -> Option<Vec<f32>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_comes_back_bit_for_bit() {
        let vector = vec![0.1f32, -0.0, f32::MIN_POSITIVE, 1e-40, f32::MAX, -3.5];
        let back = vector_from(&bytes_of(&vector)).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back), bits(&vector));
        assert_eq!(vector_from(&[1, 2, 3]), None);
        assert_eq!(vector_from(&[]), None);
    }

    #[test]
    fn hits_go_back_in_their_places_between_the_computed_vectors() {
        let hits = Hits(vec![None, Some(vec![1.0]), None, Some(vec![3.0])]);
        assert!(hits.is_miss(0) && !hits.is_miss(1) && hits.is_miss(2));
        let (vectors, fresh) = hits.merge(vec![vec![0.0], vec![2.0]]);
        assert_eq!(vectors, [[0.0], [1.0], [2.0], [3.0]]);
        assert_eq!(fresh, [true, false, true, false]);
        // Nothing looked up: every vector is the model's.
        let (vectors, fresh) = Hits::default().merge(vec![vec![5.0]]);
        assert_eq!((vectors, fresh), (vec![vec![5.0]], vec![true]));
    }

    #[test]
    fn the_model_version_changes_with_its_files_device_kind_and_precision() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let version = |device| model_version(dir.path(), device, Precision::F32).unwrap();
        let first = version(DeviceSpec::Cpu);
        assert_eq!(first, version(DeviceSpec::Cpu));
        assert_eq!(version(DeviceSpec::Cuda(0)), version(DeviceSpec::Cuda(1)));
        assert_ne!(first, version(DeviceSpec::Cuda(0)));
        let in_bf16 = model_version(dir.path(), DeviceSpec::Cpu, Precision::Bf16).unwrap();
        assert_ne!(first, in_bf16);
        std::fs::write(dir.path().join("config.json"), "{ }").unwrap();
        assert_ne!(first, version(DeviceSpec::Cpu));
    }
}
