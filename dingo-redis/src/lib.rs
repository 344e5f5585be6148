//! The Redis broker of [dingo](https://docs.rs/dingo): task transport and report transport
//! over one Redis server, with at-least-once delivery.
//!
//! ```no_run
//! use dingo_core::App;
//! use dingo_redis::{RedisBroker, RedisOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = RedisBroker::connect_with("redis://127.0.0.1:6379", RedisOptions::new().namespace("shop"))?;
//! let worker = App::builder().broker(broker).build()?;
//! worker.register("double", |n: i64| n * 2)?;
//! worker.allocate("double", 4)?;
//!
//! // Another process (or the same one): calls through the same server and namespace.
//! let caller = App::builder().broker(RedisBroker::connect("redis://127.0.0.1:6379")?).build()?;
//! # let caller = App::builder().broker(RedisBroker::connect_with("redis://127.0.0.1:6379", RedisOptions::new().namespace("shop"))?).build()?;
//! let doubled: i64 = caller.call("double", 21i64)?.wait()?;
//! # Ok(())
//! # }
//! ```
//!
//! With the `redis` feature of `dingo`, `App::connect("redis://…")` works too.
//!
//! # Guarantees
//!
//! - **At least once.** A worker takes a task under a lease (a deadline in a sorted set,
//!   renewed every third of the lease while the task runs). Its final report is stored and
//!   the lease released by one Lua script, so a task is never marked done without its
//!   result, nor its result stored twice. A worker process that dies stops renewing; once
//!   its leases expire, any consumer process of the queue returns the tasks to the front of
//!   their queue, marked redelivered ([`Context::redelivered`](dingo_core::Context::redelivered)).
//!   A task redelivered [`max_redeliveries`](RedisOptions::max_redeliveries) times goes to
//!   the dead letters instead.
//! - **Fencing.** A worker whose lease was taken over (it stalled longer than the lease)
//!   cannot complete the task afterwards: its late report is rejected by the script and
//!   counted ([`Stats::rejected_reports`]).
//! - **At most once, per task.** With `CallOptions::at_most_once` (usually a task's default)
//!   tasks wait in a list of their own and are taken without a lease: cheaper, and lost if
//!   the worker dies while running them.
//! - **Reports** go to one reply list per caller process and task, which expires after the
//!   [`result_ttl`](RedisOptions::result_ttl). One listener thread per process waits on all of
//!   them and routes each report to its call's handle by (task name, id); reports that arrive
//!   before the handle waits are kept, and a wait that times out loses nothing.
//! - **Dead letters.** A message that cannot run — it does not decode, names a task the
//!   worker does not have, or has another signature — is moved to its queue's dead-letter
//!   list with the reason; its caller, when it can be identified, gets a failure report.
//! - **Reconnection.** Every connection reconnects with exponential backoff, reported as
//!   `ConnectionLost` / `ConnectionRestored` events; work in flight is recovered by the
//!   lease rules.
//!
//! # Batching
//!
//! Nothing is one round trip per message. Callers queue task messages and go on; a writer
//! thread pushes whatever has accumulated, one script per queue. Consumers fetch up to
//! [`batch`](RedisOptions::batch) tasks per queue per script. Workers queue reports and go
//! on to the next task; a completer thread stores them, one script per queue. Blocking waits
//! (idle consumers, the report listener) use their own connections, with a socket read
//! timeout above the server-side block timeout.
//!
#![doc = include_str!("keys.md")]
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod broker;
mod conn;
mod keys;
mod options;
mod scripts;

pub use broker::{DeadLetter, RedisBroker, Stats};
pub use options::RedisOptions;

use dingo_core::app::{AppBuilder, BrokerScheme};

fn configure(url: &str, builder: AppBuilder) -> Result<AppBuilder, dingo_core::Error> {
    Ok(builder.broker(RedisBroker::connect(url)?))
}

inventory::submit! { BrokerScheme { scheme: "redis", configure } }
inventory::submit! { BrokerScheme { scheme: "rediss", configure } }
inventory::submit! { BrokerScheme { scheme: "redis+unix", configure } }
