//! Fleet dispatcher.
