//! Wiring for the `payos-workflows` binary: the embedded runtime and the demo seed.
//!
//! `main` only parses the command line and calls into here; tests start the same embedded runtime
//! in process to drive the real HTTP API end to end.

pub mod allocator;
pub mod bench;
pub mod config;
pub mod demo;
pub mod distributed;
pub mod embedded;
pub mod sandbox_ledger;
