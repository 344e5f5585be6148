//! Shared test support of the dingo workspace (not published): the conformance suite every
//! broker and every pairing of task and report transport must pass, written once and
//! instantiated per broker, plus helpers.
//!
//! - [`transport`]: the task transport rules (byte-exact delivery, FIFO per queue, exactly
//!   once under competing consumers).
//! - [`reports`]: the report transport rules (reports kept until read, in order, keyed by
//!   (task name, id)).
//! - [`app`]: App-level scenarios (progress reports, many names with the same ids, panics,
//!   fire-and-forget, shutdown, unknown tasks, signature mismatches, bad payloads, several
//!   caller and worker apps on one broker), each waiting through a [`awaiting::Waiter`]:
//!   blocking, and `.await` on a current-thread and a multi-thread tokio runtime and on
//!   `futures::executor::block_on`.
//! - helpers for fault tests: [`faults`], a TCP [`proxy`] that cuts connections, example
//!   programs as child [`process`]es, a private [`redis_server`] to kill and restart (or
//!   serving TLS only, with a throwaway CA from [`certs`]), a private [`rabbitmq_node`]
//!   with a TLS listener.
//!
//! Instantiate with the macros: `dingo_test_support::transport_suite!(setup)` and friends
//! expand to one `#[test]` per rule, each with a fresh `setup` (evaluated per test, so each
//! test gets its own broker or namespace). `setup` is an `Option`: `None` skips the test (a
//! server that is not there, see [`service_url`]). A rule is a `pub fn` taking the suite's
//! setup, and each must be listed in its macro: a unit test of this crate fails on one that
//! is not.

// Test helpers are not printed; Debug on every helper type would be noise.
#![allow(missing_debug_implementations)]

pub mod app;
pub mod async_tasks;
pub mod awaiting;
pub mod certs;
pub mod control;
pub mod faults;
pub mod lifecycle;
pub mod process;
pub mod proxy;
pub mod rabbitmq_node;
pub mod redis_server;
pub mod reports;
pub mod transport;

#[cfg(test)]
mod suite_lists;

use std::time::Duration;

/// How long a conformance test waits for anything before it fails (never hangs).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Whether tests that need a server must fail (not skip) when it is absent:
/// `DINGO_REQUIRE_SERVICES=1`, set by `.ci/run`.
pub fn services_required() -> bool {
    std::env::var("DINGO_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Skips (loudly) or fails a test whose server is unreachable; `Some(url)` when it is up.
pub fn service_url(env: &str, default: &str, probe: impl Fn(&str) -> bool) -> Option<String> {
    let url = std::env::var(env).unwrap_or_else(|_| default.to_owned());
    if probe(&url) {
        return Some(url);
    }
    if services_required() {
        panic!("{url} (from {env}) is unreachable and DINGO_REQUIRE_SERVICES=1");
    }
    eprintln!("SKIPPED: {url} (from {env}) is unreachable; set DINGO_REQUIRE_SERVICES=1 to fail instead");
    None
}

/// A name unique to this process and call, for isolating tests that share a server.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}.{}.{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Instantiates the [`transport`] suite: one `#[test]` per rule.
///
/// `$setup` is an expression of type `Option<S>` where `S` implements
/// [`transport::TransportSetup`], evaluated anew for every test; `None` skips.
#[macro_export]
macro_rules! transport_suite {
    ($setup:expr) => {
        $crate::__suite!(
            $setup,
            $crate::transport,
            byte_exact_delivery,
            fifo_per_queue_256_over_5,
            competing_consumers_exactly_once
        );
    };
}

/// Instantiates the [`reports`] suite: one `#[test]` per rule (see [`transport_suite`]).
#[macro_export]
macro_rules! reports_suite {
    ($setup:expr) => {
        $crate::__suite!(
            $setup,
            $crate::reports,
            report_before_wait_is_kept,
            order_of_100_interleaved_calls,
            same_ids_under_10_names
        );
    };
}

/// Instantiates the [`app`] suite for apps on one shared broker (see [`transport_suite`]),
/// once per way of waiting: a module per [`awaiting::Waiter`] (`blocking`, `current_thread`,
/// `multi_thread`, `block_on`), each with one `#[test]` per rule.
///
/// `app_suite!(setup, waiters = [blocking])` instantiates only the waiters listed: for setups
/// whose report transport (what wakes a waiter) another instantiation already covers awaited.
#[macro_export]
macro_rules! app_suite {
    ($setup:expr) => {
        $crate::app_suite!($setup, waiters = [blocking, current_thread, multi_thread, block_on]);
    };
    ($setup:expr, waiters = [$($waiter:ident),+ $(,)?]) => {
        $(
            mod $waiter {
                #[allow(unused_imports)]
                use super::*;

                $crate::__suite!(
                    $setup,
                    $crate::app,
                    waiter = $waiter,
                    sent_progress_success,
                    same_ids_under_12_names,
                    panic_is_reported_and_worker_survives,
                    ignore_report_gives_no_handle_and_no_report,
                    shutdown_fails_pending_calls,
                    a_timed_out_wait_loses_nothing,
                    unknown_task_fails,
                    signature_mismatch_fails,
                    one_argument_calls_agree,
                    bad_payload_fails_and_worker_goes_on,
                    three_callers_three_workers,
                );
            }
        )+
    };
}

/// Instantiates the [`lifecycle`] suite (delays, expiry, retries) for apps on one shared
/// broker (see [`transport_suite`]).
#[macro_export]
macro_rules! lifecycle_suite {
    ($setup:expr) => {
        $crate::__suite!(
            $setup,
            $crate::lifecycle,
            countdown_runs_after_its_delay,
            eta_waits_and_a_past_eta_runs_at_once,
            random_delays_run_once_in_due_order,
            an_expired_task_is_not_run,
            a_started_task_outlives_its_expiry,
            a_failing_task_retries_then_succeeds,
            retries_run_out_into_the_dead_letters,
            backoff_grows_and_stays_under_its_cap,
            a_task_can_ask_for_its_retry_wait,
            a_panic_is_not_retried,
            a_bad_payload_is_not_retried,
            a_timed_out_wait_on_a_delayed_call_loses_nothing,
        );
    };
}

/// Instantiates the control rules (time limits, cancellation, dead letters) for a setup
/// expression (an `Option` of an [`app::AppSetup`]).
#[macro_export]
macro_rules! control_suite {
    ($setup:expr) => {
        $crate::__suite!(
            $setup,
            $crate::control,
            a_soft_limit_lets_the_task_return,
            an_err_after_the_soft_limit_is_a_time_limit,
            a_hard_limit_fails_the_call_and_keeps_the_pool,
            a_task_attribute_sets_the_hard_limit,
            cancelled_queued_calls_never_run,
            a_cancelled_delayed_call_never_runs,
            a_cancel_stops_retries,
            a_running_task_sees_its_cancel,
            cancelling_unknown_or_finished_calls_changes_nothing,
            dead_letters_are_listed_replayed_and_purged,
            purge_empties_a_queue,
        );
    };
}

/// Instantiates the rules of `async fn` tasks for a setup expression (an `Option` of an
/// [`app::AppSetup`]).
#[macro_export]
macro_rules! async_task_suite {
    ($setup:expr) => {
        $crate::__suite!(
            $setup,
            $crate::async_tasks,
            a_thousand_sleeping_tasks_share_two_threads,
            concurrency_is_bounded_per_pool,
            a_panicking_async_task_fails_and_the_pool_goes_on,
            async_tasks_finish_out_of_order,
            an_async_task_retries_then_succeeds,
            progress_from_an_async_task,
            a_hard_limit_drops_the_future,
            an_async_task_sees_its_soft_limit,
            a_cancel_drops_the_running_future,
            close_waits_for_running_async_tasks,
        );
    };
}

/// Instantiates the rules of one suite module (with `waiter = NAME`: rules that also take
/// the [`awaiting::Waiter`] of that name).
#[doc(hidden)]
#[macro_export]
macro_rules! __suite {
    ($setup:expr, $module:path, waiter = $waiter:ident, $($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                use $module as suite;
                if let Some(setup) = $setup {
                    suite::$test(&setup, &$crate::awaiting::Waiter::$waiter());
                }
            }
        )+
    };
    ($setup:expr, $module:path, $($test:ident),+ $(,)?) => {
        $(
            #[test]
            fn $test() {
                use $module as suite;
                if let Some(setup) = $setup {
                    suite::$test(&setup);
                }
            }
        )+
    };
}

pub mod local {
    //! Setups for the embedded [`dingo::LocalBroker`]: one fresh broker per test.

    use std::sync::Arc;

    use dingo::broker::Reporter;
    use dingo::{App, AppBuilder, LocalBroker};

    use crate::app::AppSetup;
    use crate::reports::{ReportSetup, ReportTransport};
    use crate::transport::{TaskTransport, TransportSetup};

    /// A fresh local broker; every connection and app shares it.
    pub struct Local {
        broker: LocalBroker,
    }

    impl Local {
        /// In-memory mode (values moved, nothing serialized).
        pub fn memory() -> Local {
            Local { broker: LocalBroker::new() }
        }

        /// Serialized mode (every message through the codec and the wire format).
        pub fn serialized() -> Local {
            Local { broker: LocalBroker::serialized() }
        }
    }

    impl TransportSetup for Local {
        fn connect(&self) -> TaskTransport {
            TaskTransport::of(self.broker.clone())
        }
    }

    impl ReportSetup for Local {
        fn connect(&self) -> ReportTransport {
            ReportTransport::of(self.broker.clone())
        }
    }

    impl AppSetup for Local {
        fn builder(&self) -> AppBuilder {
            App::builder().broker(self.broker.clone())
        }

        fn reporter(&self) -> Arc<dyn Reporter> {
            Arc::new(self.broker.clone())
        }
    }
}

#[cfg(feature = "redis")]
pub mod redis {
    //! Setups for the Redis broker: a unique namespace per test on the server of
    //! `DINGO_REDIS_URL` (default `redis://127.0.0.1:6379`), deleted afterwards.

    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use dingo::broker::Reporter;
    use dingo::redis::{RedisBroker, RedisOptions};
    use dingo::{App, AppBuilder};

    use crate::app::AppSetup;
    use crate::reports::{ReportSetup, ReportTransport};
    use crate::transport::{TaskTransport, TransportSetup};

    /// Runs `redis-cli` against `url` (for looking at Redis behind a broker's back); its
    /// output, trimmed.
    pub fn redis_cli(url: &str, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .arg("-u")
            .arg(url)
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .expect("redis-cli must be installed for this test");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs `redis-cli -x` against `url`: `bytes` (binary-safe) become the command's last
    /// argument. Its output, trimmed.
    pub fn redis_cli_with(url: &str, args: &[&str], bytes: &[u8]) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("redis-cli")
            .arg("-u")
            .arg(url)
            .arg("-x")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-cli must be installed for this test");
        child.stdin.take().expect("stdin").write_all(bytes).expect("write to redis-cli");
        let out = child.wait_with_output().expect("redis-cli");
        assert!(out.status.success(), "redis-cli -x {args:?} failed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Messages taken by workers and not settled, left in a task's queue: those in the
    /// processing lists of its consumers (0 once every task taken was done).
    pub fn held(url: &str, namespace: &str, task: &str) -> u64 {
        let pattern = format!("{namespace}:{{{task}}}:processing:*");
        redis_cli(url, &["--scan", "--pattern", &pattern])
            .lines()
            .filter(|key| !key.is_empty())
            .map(|key| redis_cli(url, &["LLEN", key]).parse::<u64>().expect("LLEN"))
            .sum()
    }

    /// A command's counts in `INFO commandstats`.
    #[derive(Debug, PartialEq)]
    pub struct CommandStat {
        /// Calls run.
        pub calls: u64,
        /// Calls refused (`rejected_calls`: ACL, arity, …).
        pub rejected: u64,
    }

    /// `INFO commandstats` of the server at `url`, by command (`client|kill`, …).
    pub fn command_stats(url: &str) -> BTreeMap<String, CommandStat> {
        let info = redis_cli(url, &["INFO", "commandstats"]);
        let mut stats = BTreeMap::new();
        for line in info.lines() {
            let Some((command, fields)) = line.strip_prefix("cmdstat_").and_then(|line| line.split_once(':')) else {
                continue;
            };
            let field = |name: &str| {
                fields.split(',').find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.trim().parse::<u64>().ok())
            };
            let stat =
                CommandStat { calls: field("calls").unwrap_or(0), rejected: field("rejected_calls").unwrap_or(0) };
            stats.insert(command.to_owned(), stat);
        }
        stats
    }

    /// The server's URL, or `None` (the test is skipped, loudly) when it does not answer.
    pub fn url() -> Option<String> {
        // One attempt: an absent server skips the test at once instead of after the
        // start-up retry.
        crate::service_url("DINGO_REDIS_URL", "redis://127.0.0.1:6379", |url| {
            RedisBroker::connect_with(url, RedisOptions::new().connect_retry(Duration::ZERO)).is_ok()
        })
    }

    /// A fresh namespace on the test server; every broker of one setup shares it. Or, from
    /// [`Redis::restricted`], a private server whose brokers connect as a least-privilege user.
    pub struct Redis {
        url: String,
        options: RedisOptions,
        /// The URL of a user who may do anything (for looking behind the brokers' back).
        admin: String,
        /// The setup's own server, if it has one (it goes with the setup).
        server: Option<crate::redis_server::Server>,
    }

    /// The password of [`Redis::restricted`]'s user, `dingo`.
    pub const RESTRICTED_PASSWORD: &str = "dingo-test-secret";

    impl Redis {
        /// A setup with test-friendly options (a short lease), or `None` to skip.
        pub fn setup() -> Option<Redis> {
            Redis::with_options(RedisOptions::new().lease(Duration::from_secs(2)))
        }

        /// A setup with these options (the namespace is replaced by a unique one).
        pub fn with_options(options: RedisOptions) -> Option<Redis> {
            let url = url()?;
            Some(Redis {
                admin: url.clone(),
                url,
                options: options.namespace(crate::unique("dingo-test")),
                server: None,
            })
        }

        /// A setup on a private `redis-server` of its own (see [`Server::start_with_users`]),
        /// where brokers connect as user `dingo` with [`dingo::redis::acl_rules`] for the
        /// setup's namespace: nothing in `@dangerous`, no key outside the namespace. Test-
        /// friendly options (a short lease); `None` to skip.
        ///
        /// [`Server::start_with_users`]: crate::redis_server::Server::start_with_users
        pub fn restricted() -> Option<Redis> {
            Redis::restricted_with_options(RedisOptions::new().lease(Duration::from_secs(2)))
        }

        /// [`restricted`](Redis::restricted) with these options (the namespace is replaced).
        pub fn restricted_with_options(options: RedisOptions) -> Option<Redis> {
            let namespace = crate::unique("dingo-acl");
            let users = format!(
                "user default on nopass ~* &* +@all\nuser dingo on >{RESTRICTED_PASSWORD} {}\n",
                dingo::redis::acl_rules(&namespace)
            );
            let server = crate::redis_server::Server::start_with_users(&users, &[])?;
            Some(Redis {
                url: format!("redis://dingo:{RESTRICTED_PASSWORD}@127.0.0.1:{}", server.port()),
                admin: server.url(),
                options: options.namespace(namespace),
                server: Some(server),
            })
        }

        /// A new broker (its own connections) on this setup's namespace.
        pub fn broker(&self) -> RedisBroker {
            RedisBroker::connect_with(&self.url, self.options.clone()).expect("connect to redis")
        }

        /// The server URL, with the user brokers connect as.
        pub fn url(&self) -> &str {
            &self.url
        }

        /// The server URL of a user who may do anything (the same as [`url`](Redis::url)
        /// but for [`restricted`](Redis::restricted) setups): for `redis-cli` behind the
        /// brokers' back.
        pub fn admin_url(&self) -> &str {
            &self.admin
        }

        /// The options (with the namespace) brokers of this setup use.
        pub fn options(&self) -> &RedisOptions {
            &self.options
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            // A server of its own goes with the setup.
            if self.server.is_some() {
                return;
            }
            if let Ok(broker) = RedisBroker::connect_with(&self.url, self.options.clone()) {
                let _ = broker.purge_namespace();
                broker.shutdown();
            }
        }
    }

    impl TransportSetup for Redis {
        fn connect(&self) -> TaskTransport {
            TaskTransport::of(self.broker())
        }
    }

    impl ReportSetup for Redis {
        fn connect(&self) -> ReportTransport {
            ReportTransport::of(self.broker())
        }
    }

    impl AppSetup for Redis {
        fn builder(&self) -> AppBuilder {
            App::builder().broker(self.broker())
        }

        fn reporter(&self) -> Arc<dyn Reporter> {
            Arc::new(self.broker())
        }
    }

    /// Which role Redis plays in a [`Mixed`] setup; the serialized local broker plays the other.
    #[derive(Clone, Copy)]
    pub enum Role {
        /// Tasks travel through Redis, reports through the serialized local broker.
        Tasks,
        /// Tasks travel through the serialized local broker, reports through Redis.
        Reports,
    }

    /// Apps whose task transport and report transport are different brokers: the roles
    /// are independent, so any pairing must pass the App-level suite.
    pub struct Mixed {
        redis: Redis,
        local: dingo::LocalBroker,
        role: Role,
    }

    impl Mixed {
        /// Redis in `role`, a fresh serialized local broker in the other; `None` to skip.
        pub fn setup(role: Role) -> Option<Mixed> {
            Some(Mixed { redis: Redis::setup()?, local: dingo::LocalBroker::serialized(), role })
        }

        /// Like [`setup`](Mixed::setup), Redis [`restricted`](Redis::restricted).
        pub fn restricted(role: Role) -> Option<Mixed> {
            Some(Mixed { redis: Redis::restricted()?, local: dingo::LocalBroker::serialized(), role })
        }
    }

    impl AppSetup for Mixed {
        fn builder(&self) -> AppBuilder {
            match self.role {
                Role::Tasks => App::builder().tasks(self.redis.broker()).reports(self.local.clone()),
                Role::Reports => App::builder().tasks(self.local.clone()).reports(self.redis.broker()),
            }
        }

        fn reporter(&self) -> Arc<dyn Reporter> {
            match self.role {
                Role::Tasks => Arc::new(self.local.clone()),
                Role::Reports => Arc::new(self.redis.broker()),
            }
        }
    }
}

#[cfg(feature = "amqp")]
pub mod amqp {
    //! Setups for the RabbitMQ broker: a unique namespace per test on the server of
    //! `DINGO_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`); the queues its
    //! brokers declared are deleted afterwards.

    use std::sync::{Arc, Mutex};

    use dingo::amqp::{AmqpBroker, AmqpOptions};
    use dingo::broker::Reporter;
    use dingo::{App, AppBuilder};

    use crate::app::AppSetup;
    use crate::reports::{ReportSetup, ReportTransport};
    use crate::transport::{TaskTransport, TransportSetup};

    /// The server's URL, or `None` (the test is skipped, loudly) when it does not answer.
    pub fn url() -> Option<String> {
        // One attempt, as for Redis.
        crate::service_url("DINGO_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f", |url| {
            AmqpBroker::connect_with(url, AmqpOptions::new().connect_retry(std::time::Duration::ZERO)).is_ok()
        })
    }

    /// A fresh namespace on the test server; every broker of one setup shares it.
    pub struct Amqp {
        url: String,
        options: AmqpOptions,
        /// Every broker handed out, for deleting what they declared.
        brokers: Mutex<Vec<AmqpBroker>>,
    }

    impl Amqp {
        /// A setup with default options (transient queues: tests need no disk), or `None`
        /// to skip.
        pub fn setup() -> Option<Amqp> {
            Amqp::with_options(AmqpOptions::new().durable(false))
        }

        /// A setup with these options (the namespace is replaced by a unique one).
        pub fn with_options(options: AmqpOptions) -> Option<Amqp> {
            let url = url()?;
            Some(Amqp { url, options: options.namespace(crate::unique("dingo-test")), brokers: Mutex::default() })
        }

        /// A new broker (its own connection) on this setup's namespace.
        pub fn broker(&self) -> AmqpBroker {
            let broker = AmqpBroker::connect_with(&self.url, self.options.clone()).expect("connect to RabbitMQ");
            self.brokers.lock().expect("brokers").push(broker.clone());
            broker
        }

        /// Takes a broker made elsewhere (through a proxy, say) into the cleanup.
        pub fn adopt(&self, broker: AmqpBroker) {
            self.brokers.lock().expect("brokers").push(broker);
        }

        /// The server URL.
        pub fn url(&self) -> &str {
            &self.url
        }

        /// The options (with the namespace) brokers of this setup use.
        pub fn options(&self) -> &AmqpOptions {
            &self.options
        }
    }

    impl Drop for Amqp {
        fn drop(&mut self) {
            let brokers = std::mem::take(&mut *dingo::broker::kit::lock(&self.brokers));
            let mut tasks: Vec<String> = brokers.iter().flat_map(AmqpBroker::known_tasks).collect();
            tasks.sort();
            tasks.dedup();
            let replies: Vec<String> = brokers.iter().map(|b| b.reply_queue().to_owned()).collect();
            for broker in &brokers {
                broker.shutdown();
            }
            if let Ok(cleaner) = AmqpBroker::connect_with(&self.url, self.options.clone()) {
                let _ = cleaner.delete_topology(&tasks, &replies);
                cleaner.shutdown();
            }
        }
    }

    impl TransportSetup for Amqp {
        fn connect(&self) -> TaskTransport {
            TaskTransport::of(self.broker())
        }
    }

    impl ReportSetup for Amqp {
        fn connect(&self) -> ReportTransport {
            ReportTransport::of(self.broker())
        }
    }

    impl AppSetup for Amqp {
        fn builder(&self) -> AppBuilder {
            App::builder().broker(self.broker())
        }

        fn reporter(&self) -> Arc<dyn Reporter> {
            Arc::new(self.broker())
        }
    }

    /// Tasks through RabbitMQ, reports through Redis: the pairing the two transports are
    /// split for.
    #[cfg(feature = "redis")]
    pub struct WithRedisReports {
        amqp: Amqp,
        redis: crate::redis::Redis,
    }

    #[cfg(feature = "redis")]
    impl WithRedisReports {
        /// `None` to skip (either server absent).
        pub fn setup() -> Option<WithRedisReports> {
            Some(WithRedisReports { amqp: Amqp::setup()?, redis: crate::redis::Redis::setup()? })
        }
    }

    #[cfg(feature = "redis")]
    impl AppSetup for WithRedisReports {
        fn builder(&self) -> AppBuilder {
            App::builder().tasks(self.amqp.broker()).reports(self.redis.broker())
        }

        fn reporter(&self) -> Arc<dyn Reporter> {
            Arc::new(self.redis.broker())
        }
    }
}
