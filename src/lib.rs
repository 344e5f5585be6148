//! dingo is a distributed task framework: a function annotated with `#[dingo::task]` becomes
//! a task that callers invoke through a generated, compile-time-checked stub and that a pool
//! of worker threads runs — in the same process on the embedded [`LocalBroker`] (no server
//! needed), or in other processes through Redis or RabbitMQ. Callers get typed results,
//! progress reports and failures back. It ports Go's dingo (itself after Celery) and goes
//! beyond it.
//!
//! ```
//! use std::time::Duration;
//!
//! /// A task: the function stays callable as it is; `add::call` is its typed stub.
//! #[dingo::task]
//! fn add(a: i64, b: i64) -> i64 {
//!     a + b
//! }
//!
//! /// A task that can fail: an `Err` reaches the caller as a failure carrying the value.
//! #[dingo::task(name = "math.checked_div")]
//! fn checked_div(a: i64, b: i64) -> Result<i64, String> {
//!     if b == 0 { Err("division by zero".to_string()) } else { Ok(a / b) }
//! }
//!
//! /// The context is injected by the worker, not sent by the caller.
//! #[dingo::task]
//! fn count_words(ctx: &dingo::Context, text: String) -> usize {
//!     ctx.progress("counting");
//!     text.split_whitespace().count()
//! }
//!
//! fn main() -> Result<(), dingo::Error> {
//!     let app = dingo::App::local()?;           // in-process broker
//!     app.allocate(add, 2)?;                    // two worker threads for `add`
//!     app.allocate_all(2)?;                     // two more serving every task
//!
//!     let sum = add::call(&app, 2, 3)?.wait()?; // typed: `add::call(&app, "2", 3)` does not compile
//!     assert_eq!(sum, 5);
//!
//!     let err = checked_div::call(&app, 1, 0)?.wait().unwrap_err();
//!     let payload: String = err.task_error().unwrap().payload().unwrap().unwrap();
//!     assert_eq!(payload, "division by zero");
//!
//!     let mut words = count_words::call(&app, "a b c".to_string())?;
//!     assert_eq!(words.wait_timeout(Duration::from_secs(5))?, 3);
//!
//!     app.close()
//! }
//! ```
//!
//! # Defining tasks
//!
//! Arguments, results and error values travel through serde. A program that depends on dingo
//! alone derives through `dingo::serde`, and tells the derives where serde is with
//! `#[serde(crate = "dingo::serde")]` on each type (without it they look for a crate named
//! `serde`: `error[E0463]: can't find crate for serde`). A program that depends on serde
//! itself derives as usual.
//!
//! ```
//! use dingo::serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! #[serde(crate = "dingo::serde")]
//! struct Order {
//!     id: u64,
//!     cents: Vec<u64>,
//! }
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! #[serde(crate = "dingo::serde")]
//! enum Invoice {
//!     Empty,
//!     Due { order: u64, total_cents: u64 },
//! }
//!
//! #[dingo::task(name = "shop.invoice")]
//! fn invoice(order: Order) -> Invoice {
//!     match order.cents.iter().sum() {
//!         0 => Invoice::Empty,
//!         total_cents => Invoice::Due { order: order.id, total_cents },
//!     }
//! }
//!
//! fn main() -> Result<(), dingo::Error> {
//!     let app = dingo::App::builder().broker(dingo::LocalBroker::serialized()).build()?;
//!     app.allocate(invoice, 1)?;
//!     let due = invoice::call(&app, Order { id: 7, cents: vec![250, 450] })?.wait()?;
//!     assert_eq!(due, Invoice::Due { order: 7, total_cents: 700 });
//!     // By name (a program that does not link the task's code): one argument is sent as
//!     // itself, as a stub sends it; `(order,)` works too.
//!     let empty: Invoice = app.call("shop.invoice", Order { id: 8, cents: vec![] })?.wait()?;
//!     assert_eq!(empty, Invoice::Empty);
//!     app.close()
//! }
//! ```
//!
//! `#[dingo::task]` functions register themselves when they are linked into the program, and
//! Rust links a dependency only if the code refers to it. Tasks defined in a crate of their
//! own that the worker's binary never names are therefore not registered, and `allocate`,
//! `allocate_all` and calls by name fail with an error that says so. Name the crate once in
//! the binary — `use my_tasks as _;` in its `main.rs` — and its tasks are registered.
//!
//! # Delays, expiry and retries
//!
//! A call can wait ([`CallOptions::countdown`], [`CallOptions::eta`]: the broker keeps the
//! task until then), expire ([`CallOptions::expires_in`]: not started by then, it fails with
//! [`TaskErrorKind::Expired`]) and retry ([`CallOptions::retries`] and
//! [`CallOptions::backoff`], or the task attribute `retries = n`): a task that returns `Err`
//! runs again under the same id after a backoff, exponential with full jitter by default
//! (see [`retry`] for what retries and what never does).
//!
//! ```
//! use std::time::Duration;
//! use dingo::{Backoff, CallOptions, Report};
//!
//! #[dingo::task(retries = 2, retry_backoff = "10ms", retry_jitter = false)]
//! fn flaky(ctx: &dingo::Context, n: u32) -> Result<u32, String> {
//!     if ctx.attempt() < 3 { Err(format!("attempt {} failed", ctx.attempt())) } else { Ok(n) }
//! }
//!
//! fn main() -> Result<(), dingo::Error> {
//!     let app = dingo::App::local()?;
//!     app.allocate(flaky, 1)?;
//!     let options = CallOptions::new().countdown(Duration::from_millis(20)).monitor_progress(true);
//!     let reports: Vec<Report<u32>> = flaky::call_with(&app, &options, 7)?.reports().collect();
//!     let waits: Vec<Duration> = reports
//!         .iter()
//!         .filter_map(|r| match r {
//!             Report::Retrying { after, .. } => Some(*after),
//!             _ => None,
//!         })
//!         .collect();
//!     assert_eq!(waits, [Duration::from_millis(10), Duration::from_millis(20)]);
//!     assert_eq!(reports.last(), Some(&Report::Success(7)));
//!
//!     // One more retry than the attribute allows, for this call only, with its own backoff.
//!     let more = CallOptions::new().retries(1).backoff(Backoff::fixed(Duration::from_millis(5)));
//!     let error = flaky::call_with(&app, &more, 7)?.wait().unwrap_err();
//!     assert_eq!(error.task_error().map(|e| e.attempts()), Some(2));
//!     app.close()
//! }
//! ```
//!
//! # Time limits, cancellation and dead letters
//!
//! A task may be bounded ([`CallOptions::soft_time_limit`]: [`Context::is_cancelled`] turns
//! true; [`CallOptions::time_limit`]: the call fails with [`TaskErrorKind::TimeLimit`] and
//! the thread still running it is written off and replaced — see [`TimeLimits`] for the
//! trade-off), cancelled by key ([`Handle::cancel`], [`App::cancel`]: a call not started
//! never starts, a running one sees `is_cancelled`), and what the broker gave up on is
//! listed, replayed and purged through one API on every broker ([`App::dead_letters`],
//! [`App::replay_dead`], [`App::purge_dead`], [`App::purge`]; the [`broker::Admin`] role).
//!
//! ```
//! use std::time::Duration;
//! use dingo::{CallOptions, TaskErrorKind};
//!
//! #[dingo::task(soft_time_limit = "50ms")]
//! fn poll(ctx: &dingo::Context, every_ms: u64) -> Result<u32, String> {
//!     let mut polls = 0;
//!     while !ctx.is_cancelled() {
//!         polls += 1;
//!         std::thread::sleep(Duration::from_millis(every_ms));
//!     }
//!     Err(format!("gave up after {polls} polls"))
//! }
//!
//! fn main() -> Result<(), dingo::Error> {
//!     let app = dingo::App::local()?;
//!     app.allocate(poll, 1)?;
//!     let error = poll::call(&app, 5)?.wait().unwrap_err();
//!     assert_eq!(error.task_kind(), Some(TaskErrorKind::TimeLimit));
//!
//!     let later = CallOptions::new().countdown(Duration::from_millis(50));
//!     let handle = poll::call_with(&app, &later, 5)?;
//!     handle.cancel()?;
//!     assert_eq!(handle.wait().unwrap_err().task_kind(), Some(TaskErrorKind::Cancelled));
//!     app.close()
//! }
//! ```
//!
//! # Async
//!
//! A [`Handle`] is `IntoFuture`: `handle.await` on any executor, no thread blocking while
//! the task runs; [`Handle::report_stream`] gives the reports as a `Stream`, and the stubs'
//! `call_async` (like [`App::call_async`]) a call that never blocks even when the broker
//! pushes back. A task may be an `async fn`: a pool's threads drive many at once
//! ([`App::allocate_concurrent`]), and a hard time limit or a cancel drops its future. With
//! the `tokio` feature, [`AppBuilder::tokio_runtime`] runs them on a tokio runtime.
//!
//! ```
//! use std::time::Duration;
//!
//! /// An async task (the future must be `Send`).
//! #[dingo::task]
//! async fn slow_double(ctx: &dingo::Context, n: u64) -> u64 {
//!     ctx.progress("thinking");
//!     std::future::ready(()).await; // any `.await`: a timer, a client, …
//!     n * 2
//! }
//!
//! fn main() -> Result<(), dingo::Error> {
//!     let app = dingo::App::local()?;
//!     app.allocate_concurrent(slow_double, 1, 100)?; // 1 thread, up to 100 calls at once
//!     let doubled = futures::executor::block_on(async {
//!         let now = slow_double::call(&app, 21)?.await?;        // awaiting a handle
//!         let later = slow_double::call_async(&app, 4).await?;   // a call that never blocks
//!         Ok::<_, dingo::Error>((now, later.await?))
//!     })?;
//!     assert_eq!(doubled, (42, 8));
//!
//!     let mut handle = slow_double::call(&app, 5)?;
//!     assert_eq!(handle.wait_timeout(Duration::from_secs(5))?, 10); // blocking works too
//!     app.close()
//! }
//! ```
//!
//! # Where to go next
//! - [`task`]: the macro, its attribute keys and what it generates.
//! - [`App`]: allocating workers, registering closures, calling by name, shutting down.
//! - [`Handle`]: waiting, timeouts, report iterators, callbacks.
//! - [`broker`]: the broker roles (the four, and [`broker::Admin`]), for mixing transports
//!   or writing a broker.
//! - [`event`]: subscribing to what happens inside the app.
//!
//! # Features
//! | feature | default | what |
//! | --- | --- | --- |
//! | `json` | yes | the JSON codec ([`codec::Json`]); MessagePack is always there and the default |
//! | `redis` | no | the Redis broker (`dingo::redis`, `redis://` URLs) |
//! | `redis-tls` | no | `rediss://` URLs (TLS through the system's OpenSSL) |
//! | `amqp` | no | the RabbitMQ broker (`dingo::amqp`, `amqp://` URLs) |
//! | `amqp-tls` | no | `amqps://` URLs (TLS through the system's OpenSSL) |
//! | `tokio` | no | async tasks on a tokio runtime ([`AppBuilder::tokio_runtime`]) |
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use dingo_core::{
    App, AppBuilder, Backoff, BrokerError, BrokerErrorKind, CallFuture, CallKey, CallOptions, Codec, CodecError,
    Context, DeadLetter, Encoded, Error, Event, EventFilter, EventKind, Events, Handle, HandleFuture, HandleFutureMut,
    IdMaker, Level, LocalBroker, LocalOptions, Origin, Origins, Progress, Report, ReportStream, Reports, RetryPolicy,
    Role, Sequential, Task, TaskError, TaskErrorKind, TaskId, TaskName, TaskOptions, TaskRef, TimeLimits, UuidV7, When,
};
pub use dingo_core::{broker, codec, error, event, id, message, registry, retry};

/// Turns a function, plain or `async`, into a task (attribute keys, generated items,
/// accepted signatures and `async fn` tasks are described below).
pub use dingo_macros::task;

/// The Redis broker (feature `redis`).
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use dingo_redis as redis;

/// The RabbitMQ broker (feature `amqp`).
#[cfg(feature = "amqp")]
#[cfg_attr(docsrs, doc(cfg(feature = "amqp")))]
pub use dingo_amqp as amqp;

#[doc(hidden)]
pub use dingo_core::__private;

/// The serde version dingo uses, for `#[serde(crate = "dingo::serde")]` in programs that
/// do not depend on serde themselves.
pub use dingo_core::__private::serde;
