//! Fleet worker: pulls jobs of one model from JetStream through the model's shared durable
//! consumer, runs their inputs in dynamic batches, stores and sends the results, and only then
//! acknowledges. See `pipeline` for the flow and `batcher` for the batching rules.

mod abandoned;
pub mod batcher;
pub mod cache;
pub mod config;
pub mod consumer;
pub mod embedder;
pub mod job;
pub mod metrics;
pub mod model;
pub mod pipeline;
mod queue_metrics;
pub mod respond;
pub mod store;

pub use config::{DeviceSpec, WorkerArgs, WorkerConfig};
pub use embedder::Embedder;
pub use metrics::Metrics;
pub use pipeline::{PipelineError, run, run_with_readiness};
