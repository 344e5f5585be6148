//! Tasks shared by the Redis and RabbitMQ examples. Caller and worker are separate programs built from
//! this one file, so each task has an explicit name (module paths differ per program).

use std::sync::atomic::{AtomicU64, Ordering};

use dingo::serde::{Deserialize, Serialize};

/// Tasks this process has run (for the worker's bounded mode).
pub(crate) static RUN: AtomicU64 = AtomicU64::new(0);

/// An order, to show that structs travel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
pub(crate) struct Order {
    pub(crate) id: u32,
    pub(crate) items: Vec<String>,
    pub(crate) cents_each: u64,
}

/// What `total` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
pub(crate) struct Invoice {
    pub(crate) order: u32,
    pub(crate) total_cents: u64,
}

#[dingo::task(name = "example.add")]
pub(crate) fn add(a: i64, b: i64) -> i64 {
    RUN.fetch_add(1, Ordering::SeqCst);
    a + b
}

#[dingo::task(name = "example.total")]
pub(crate) fn total(order: Order) -> Result<Invoice, String> {
    RUN.fetch_add(1, Ordering::SeqCst);
    if order.items.is_empty() {
        return Err(format!("order {} has no items", order.id));
    }
    Ok(Invoice { order: order.id, total_cents: order.items.len() as u64 * order.cents_each })
}

/// Sleeps, then returns its input: a task that takes time (for the fault tests).
#[dingo::task(name = "example.slow_echo")]
pub(crate) fn slow_echo(ctx: &dingo::Context, n: u64, millis: u64) -> u64 {
    std::thread::sleep(std::time::Duration::from_millis(millis));
    RUN.fetch_add(1, Ordering::SeqCst);
    if ctx.redelivered() {
        // Another worker took it first and died (or stalled) before finishing.
        eprintln!("task {} was redelivered", ctx.id());
    }
    n
}

/// Returns `n`, or aborts the process that runs it when `crash` is set: a task that kills its
/// worker, as an abort or the kernel's OOM killer would (for the fault tests).
#[dingo::task(name = "example.crash_if")]
pub(crate) fn crash_if(n: u64, crash: bool) -> u64 {
    if crash {
        eprintln!("example.crash_if aborts this process");
        std::process::abort();
    }
    RUN.fetch_add(1, Ordering::SeqCst);
    n
}

/// The Redis broker of the examples: `DINGO_REDIS_URL` (default `redis://127.0.0.1:6379`),
/// namespace `DINGO_NAMESPACE` (default `dingo-example`), lease `DINGO_LEASE_MS`; a server
/// that is not up yet is waited for `DINGO_CONNECT_RETRY_S` seconds (default 30).
#[cfg(feature = "redis")]
pub(crate) fn redis_broker() -> Result<dingo::redis::RedisBroker, Connecting> {
    let (var, url) = ("DINGO_REDIS_URL", env_or("DINGO_REDIS_URL", "redis://127.0.0.1:6379"));
    let mut options = dingo::redis::RedisOptions::new().namespace(namespace()).connect_retry(connect_retry());
    if let Some(ms) = std::env::var("DINGO_LEASE_MS").ok().and_then(|v| v.parse().ok()) {
        options =
            options.lease(std::time::Duration::from_millis(ms)).reap_interval(std::time::Duration::from_millis(ms / 4));
    }
    connecting(var, &url, options.connect_retry);
    dingo::redis::RedisBroker::connect_with(&url, options).map_err(|error| Connecting { var, error })
}

/// The RabbitMQ broker of the examples: `DINGO_AMQP_URL` (default
/// `amqp://guest:guest@127.0.0.1:5672/%2f`), namespace `DINGO_NAMESPACE` (default
/// `dingo-example`); a server that is not up yet is waited for `DINGO_CONNECT_RETRY_S`
/// seconds (default 30).
#[cfg(feature = "amqp")]
pub(crate) fn amqp_broker() -> Result<dingo::amqp::AmqpBroker, Connecting> {
    let (var, url) = ("DINGO_AMQP_URL", env_or("DINGO_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"));
    let options = dingo::amqp::AmqpOptions::new().namespace(namespace()).connect_retry(connect_retry());
    connecting(var, &url, options.connect_retry);
    dingo::amqp::AmqpBroker::connect_with(&url, options).map_err(|error| Connecting { var, error })
}

/// A broker the examples could not connect to, and the variable its URL came from: the
/// error the programs print (`connecting to the server of DINGO_REDIS_URL: cannot reach
/// redis at …: connection refused (…)`).
#[derive(Debug)]
pub(crate) struct Connecting {
    var: &'static str,
    error: dingo::BrokerError,
}

impl std::fmt::Display for Connecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connecting to the server of {}", self.var)
    }
}

impl std::error::Error for Connecting {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Says what the program waits for (the wait itself is logged through `tracing`, which these
/// programs do not print).
fn connecting(var: &str, url: &str, patience: std::time::Duration) {
    let url = dingo::broker::support::redact_url(url);
    eprintln!("connecting to {url} (from {var}; waiting up to {patience:?} for it)");
}

fn connect_retry() -> std::time::Duration {
    let seconds = std::env::var("DINGO_CONNECT_RETRY_S").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    std::time::Duration::from_secs(seconds)
}

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_owned())
}

fn namespace() -> String {
    env_or("DINGO_NAMESPACE", "dingo-example")
}
