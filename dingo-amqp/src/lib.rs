//! The RabbitMQ (AMQP 0-9-1) broker of [dingo](https://docs.rs/dingo) — not implemented yet.
//!
//! This crate will provide `AmqpBroker`, playing all four broker roles
//! ([`Producer`](dingo_core::broker::Producer), [`Consumer`](dingo_core::broker::Consumer),
//! [`Reporter`](dingo_core::broker::Reporter), [`Store`](dingo_core::broker::Store)) over
//! RabbitMQ through `amiquip`: durable queues, publisher confirms, acknowledgement after the
//! final report is confirmed, a reply queue per caller process, dead-letter exchanges and
//! reconnection. It is enabled by the `amqp` feature of the `dingo` crate. Until then the
//! crate is empty.
#![deny(missing_docs)]
