//! A thread that owns the model (and its device) and runs batches for async callers.

use std::future::Future;
use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender, TrySendError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::{EmbeddingModel, ModelError, Precision, Sequence, TextTokenizer};

/// An owned tokenized input, for sending to the runtime thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSequence {
    pub token_ids: Vec<u32>,
    pub normalize: bool,
}

struct Job {
    batch: Vec<OwnedSequence>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, ModelError>>,
    /// Held while the job waits in the channel: the semaphore counts queue places.
    permit: OwnedSemaphorePermit,
}

/// Starts the runtime thread.
pub struct ModelRuntime;

impl ModelRuntime {
    /// Moves `model` onto a new OS thread that runs one batch at a time. At most
    /// `queue_depth` batches (at least 1) wait for it; [`RuntimeHandle::embed`] waits
    /// asynchronously for a place beyond that, so callers feel backpressure without blocking an
    /// async thread. The thread ends when the last handle is dropped.
    ///
    /// If the OS refuses to start the thread, every call on the handle fails with
    /// [`ModelError::RuntimeStopped`] saying why.
    pub fn spawn(model: EmbeddingModel, queue_depth: usize) -> RuntimeHandle {
        let depth = queue_depth.max(1);
        let (tx, rx) = mpsc::sync_channel::<Job>(depth);
        let tokenizer = model.tokenizer();
        let dimension = model.dimension();
        let precision = model.precision();
        let spawned = std::thread::Builder::new()
            .name("fleet-model".into())
            .spawn(move || {
                for job in rx {
                    drop(job.permit);
                    // The caller may have given up (dropped its future) while the job queued.
                    if job.reply.is_closed() {
                        continue;
                    }
                    let batch: Vec<Sequence<'_>> = job
                        .batch
                        .iter()
                        .map(|s| Sequence {
                            token_ids: &s.token_ids,
                            normalize: s.normalize,
                        })
                        .collect();
                    // A closed reply only means the caller is gone; nothing to do about it.
                    let _ = job.reply.send(contain_panic(|| model.embed(&batch)));
                }
            });
        let state = match spawned {
            Ok(_) => Ok(tx),
            Err(e) => Err(format!("cannot start the model thread: {e}")),
        };
        RuntimeHandle {
            inner: Arc::new(Inner {
                state,
                places: Arc::new(Semaphore::new(depth)),
                tokenizer,
                dimension,
                precision,
            }),
        }
    }
}

/// Runs one batch, turning a panic (a bug in a kernel or in candle, met by this batch's
/// shapes) into this batch's error: the thread lives on and serves the next batch, instead of
/// dying and failing every later job of the worker.
fn contain_panic(
    embed: impl FnOnce() -> Result<Vec<Vec<f32>>, ModelError>,
) -> Result<Vec<Vec<f32>>, ModelError> {
    // Embedding only reads the weights; the scratch buffers a panic leaves half-written under
    // a poisoned lock are replaced by the next batch (see `Bert::forward_cpu`).
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(embed)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Err(ModelError::Panicked(message))
    })
}

struct Inner {
    state: Result<SyncSender<Job>, String>,
    places: Arc<Semaphore>,
    tokenizer: Arc<TextTokenizer>,
    dimension: usize,
    precision: Precision,
}

/// A cheap, cloneable handle to the runtime thread.
#[derive(Clone)]
pub struct RuntimeHandle {
    inner: Arc<Inner>,
}

impl RuntimeHandle {
    /// See [`EmbeddingModel::max_tokens`].
    pub fn max_tokens(&self) -> usize {
        self.inner.tokenizer.max_tokens()
    }

    /// See [`EmbeddingModel::dimension`].
    pub fn dimension(&self) -> usize {
        self.inner.dimension
    }

    /// The precision the model's linear layers run in (resolved: never `Auto`); see
    /// [`EmbeddingModel::precision`].
    pub fn precision(&self) -> Precision {
        self.inner.precision
    }

    /// Tokenizes on the calling thread; see [`EmbeddingModel::tokenize`].
    pub fn tokenize(&self, text: &str, truncate: bool) -> Result<Vec<u32>, ModelError> {
        self.inner.tokenizer.tokenize(text, truncate)
    }

    /// Embeds `batch` on the runtime thread; see [`EmbeddingModel::embed`]. The future waits
    /// (without blocking a thread) for a queue place and then for the result.
    pub fn embed(
        &self,
        batch: Vec<OwnedSequence>,
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, ModelError>> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        async move {
            let tx = match &inner.state {
                Ok(tx) => tx,
                Err(why) => return Err(ModelError::RuntimeStopped(why.clone())),
            };
            if batch.is_empty() {
                return Ok(Vec::new());
            }
            let stopped = || ModelError::RuntimeStopped("the model thread has exited".into());
            let permit = Arc::clone(&inner.places)
                .acquire_owned()
                .await
                .map_err(|_| stopped())?;
            let (reply, result) = oneshot::channel();
            // Never full: a job is only sent holding one of `depth` permits, and a permit is
            // released only once its job has left the channel.
            match tx.try_send(Job {
                batch,
                reply,
                permit,
            }) {
                Ok(()) => {}
                Err(TrySendError::Disconnected(_)) => return Err(stopped()),
                Err(TrySendError::Full(_)) => {
                    return Err(ModelError::RuntimeStopped("the model queue is full".into()));
                }
            }
            result.await.map_err(|_| stopped())?
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_batch_becomes_that_batchs_error() {
        let panicked = contain_panic(|| panic!("index out of bounds: the len is 3"));
        match panicked {
            Err(ModelError::Panicked(message)) => {
                assert!(message.contains("index out of bounds"), "{message}")
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
        let formatted = contain_panic(|| panic!("shape {:?}", [2, 3]));
        assert!(matches!(formatted, Err(ModelError::Panicked(m)) if m == "shape [2, 3]"));
        assert_eq!(contain_panic(|| Ok(vec![vec![1.0]])).unwrap(), [[1.0]]);
    }
}
