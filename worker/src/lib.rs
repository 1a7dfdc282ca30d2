//! Fleet worker.
