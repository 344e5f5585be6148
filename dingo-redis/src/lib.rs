//! The Redis broker of [dingo](https://docs.rs/dingo) — not implemented yet.
//!
//! This crate will provide `RedisBroker`, playing all four broker roles
//! ([`Producer`](dingo_core::broker::Producer), [`Consumer`](dingo_core::broker::Consumer),
//! [`Reporter`](dingo_core::broker::Reporter), [`Store`](dingo_core::broker::Store)) over Redis
//! with at-least-once delivery: leases renewed while a task runs, acknowledgement and report
//! storage in one Lua script, dead-letter lists, reconnection, and batching at every hop.
//! It is enabled by the `redis` feature of the `dingo` crate. Until then the crate is empty.
#![deny(missing_docs)]
