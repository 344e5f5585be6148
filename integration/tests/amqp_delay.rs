//! Delayed tasks and retries on the RabbitMQ broker (its delay chain of TTL'd queues): many
//! random delays each run once and never early; a long delay does not hold up a short one
//! behind it; worker processes killed while tasks wait in the chain, or during a retry's
//! backoff, lose nothing and add no attempt; quorum queues.
//!
//! The worker processes are this test binary itself, started again to run only
//! [`worker_process`] (an ignored test that serves the tasks until it is killed), so the
//! tasks need no example program. They log each run to a file (`name id attempt` a line),
//! which the test reads to count runs across processes.
#![cfg(feature = "amqp")]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use dingo::amqp::{AmqpBroker, AmqpOptions};
use dingo::broker::Admin as _;
use dingo::{App, Backoff, CallOptions, Report, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::amqp::Amqp;
use dingo_test_support::faults::{lock, wait_until};

/// When each call of `stamp` started, by id (this process's runs).
static STARTS: Mutex<BTreeMap<String, Vec<SystemTime>>> = Mutex::new(BTreeMap::new());

/// The file worker processes log their runs to (`DINGO_DELAY_LOG`), if set.
fn log_run(name: &str, id: &str, attempt: u32) {
    if let Ok(path) = std::env::var("DINGO_DELAY_LOG") {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open the run log");
        // One write per line, appended: lines of several processes never mix.
        file.write_all(format!("{name} {id} {attempt}\n").as_bytes()).expect("log the run");
    }
}

/// Records when it started; returns its argument.
#[dingo::task(name = "amqp_delay.stamp")]
fn stamp(ctx: &dingo::Context, n: u64) -> u64 {
    lock(&STARTS).entry(ctx.id().to_string()).or_default().push(SystemTime::now());
    log_run("stamp", ctx.id().as_str(), ctx.attempt());
    n
}

/// Fails its first `failures` attempts, then returns the attempt that succeeded.
#[dingo::task(name = "amqp_delay.flaky")]
fn flaky(ctx: &dingo::Context, failures: u32) -> Result<u32, String> {
    log_run("flaky", ctx.id().as_str(), ctx.attempt());
    if ctx.attempt() <= failures { Err(format!("attempt {} fails", ctx.attempt())) } else { Ok(ctx.attempt()) }
}

/// A small deterministic generator (xorshift), so a failing run can be repeated.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The p-th percentile of sorted `values`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// 1,000 calls with random countdowns of 0–2 s to one in-process worker: each runs exactly
/// once, none before its due time, and the chain's lateness stays small (printed; the
/// assertion allows for a loaded machine, the benchmark measures it).
#[test]
fn a_thousand_random_delays_run_once_and_never_early() {
    const CALLS: u64 = 1000;
    let Some(setup) = Amqp::setup() else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    worker.allocate(stamp, 4).expect("allocate");
    let mut random = Random(0x2545_f491_4f6c_dd1d);
    let mut calls = Vec::new();
    for n in 0..CALLS {
        let wait = Duration::from_millis(random.below(2001));
        let before = SystemTime::now();
        let handle = stamp::call_with(&caller, &CallOptions::new().countdown(wait), n).expect("call");
        calls.push((n, before + wait, handle));
    }
    let mut lateness = Vec::new();
    for (n, due, mut handle) in calls {
        assert_eq!(handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n}: {e:?}")), n);
        let starts = lock(&STARTS).get(handle.id().as_str()).cloned().unwrap_or_default();
        assert_eq!(starts.len(), 1, "call {n} ran {} times", starts.len());
        let late = starts[0].duration_since(due).unwrap_or_else(|e| panic!("call {n} ran {:?} early", e.duration()));
        lateness.push(late);
    }
    lateness.sort();
    let (p50, p99, max) = (percentile(&lateness, 0.5), percentile(&lateness, 0.99), lateness[lateness.len() - 1]);
    eprintln!("lateness of {CALLS} delays of 0-2 s: p50 {p50:?}, p99 {p99:?}, max {max:?}");
    // Sent as one burst: on a loaded 2-core CI machine RabbitMQ falls behind (p99 1.4 s
    // seen once); the lateness targets are the benchmark's (paced), not this test's.
    assert!(p99 < Duration::from_secs(3), "p99 lateness {p99:?}");
    let stats = caller_broker.stats();
    assert!(stats.delayed >= CALLS * 9 / 10, "most calls went through the delay queues: {stats:?}");
    assert_eq!(caller_broker.delayed_len().expect("delayed length"), 0);
    assert_eq!(caller_broker.queue_len(stamp::NAME).expect("queue length"), 0);
    // The hops through the delay queues are not redeliveries.
    let stats = worker_broker.stats();
    assert_eq!((stats.fetched, stats.redelivered, stats.requeued), (CALLS, 0, 0), "{stats:?}");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Fails every attempt (its argument is only there to be large).
#[dingo::task(name = "amqp_delay.fails")]
fn fails(ctx: &dingo::Context, padding: String) -> Result<u32, String> {
    Err(format!("attempt {} of a {}-byte call fails", ctx.attempt(), padding.len()))
}

/// A call larger than what dingo copies of every delivery for the dead letters (64 KiB;
/// RabbitMQ dead-letters larger ones itself) fails its last attempt after a retry through
/// the delay queues: RabbitMQ would route it to the dead letters by the delay's routing key,
/// so to none, and dingo dead-letters it itself, whole, with its reason.
#[test]
fn a_large_delayed_message_reaches_the_dead_letters() {
    let Some(setup) = Amqp::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    worker.allocate(fails, 1).expect("allocate");
    let options = CallOptions::new().retries(1).backoff(Backoff::fixed(Duration::from_millis(50)).jitter(false));
    let error = fails::call_with(&caller, &options, "x".repeat(100 << 10))
        .expect("call")
        .wait_timeout(PATIENCE)
        .expect_err("every attempt fails");
    let dingo::Error::Task(error) = error else { panic!("not a task failure: {error:?}") };
    assert_eq!(error.attempts(), 2, "{error:?}");
    wait_until("the dead letter is there", || {
        !caller_broker.dead_letters(&dingo::TaskName::from(fails::NAME), usize::MAX).expect("dead letters").is_empty()
    });
    let letters = caller_broker.dead_letters(&dingo::TaskName::from(fails::NAME), usize::MAX).expect("dead letters");
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].reason.contains("after 2 attempt(s): attempt 2 of a 102400-byte call fails"),
        "{:?}",
        letters[0].reason
    );
    assert!(letters[0].bytes.len() > 100 << 10, "the whole message");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// A call delayed by an hour, then one delayed by 300 ms behind it (in the same delay
/// queues, as 1 h has bits in common with 300 ms): the short one runs on time, the long one
/// still waits. One queue with per-message TTLs would hold the short one behind the long.
#[test]
fn a_long_delay_does_not_hold_up_a_short_one() {
    let Some(setup) = Amqp::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    worker.allocate(stamp, 1).expect("allocate");
    let hour = stamp::call_with(&caller, &CallOptions::new().countdown(Duration::from_secs(3600)), 1).expect("call");
    // Every level the hour's delay passes through holds it first.
    for wait in [300, 310, 2570] {
        let before = SystemTime::now();
        let started = Instant::now();
        let mut short =
            stamp::call_with(&caller, &CallOptions::new().countdown(Duration::from_millis(wait)), 2).expect("call");
        assert_eq!(short.wait_timeout(PATIENCE).expect("the short delay runs"), 2);
        let took = started.elapsed();
        let start = lock(&STARTS)[short.id().as_str()][0];
        let due = before + Duration::from_millis(wait);
        assert!(start >= due, "a {wait} ms delay ran early");
        assert!(took < Duration::from_millis(wait + 700), "a {wait} ms delay took {took:?}");
    }
    assert!(!lock(&STARTS).contains_key(hour.id().as_str()), "the hour's delay has not passed");
    assert_eq!(caller_broker.delayed_len().expect("delayed length"), 1, "the hour's call still waits");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// At-most-once calls (published without confirms) go through the delay queues too: each
/// runs once, not before its due time.
#[test]
fn at_most_once_calls_can_be_delayed() {
    let Some(setup) = Amqp::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    worker.allocate(stamp, 2).expect("allocate");
    let calls: Vec<_> = (0..20u64)
        .map(|n| {
            let wait = Duration::from_millis(100 + n * 20);
            let options = CallOptions::new().at_most_once(true).countdown(wait);
            let due = SystemTime::now() + wait;
            (n, due, stamp::call_with(&caller, &options, n).expect("call"))
        })
        .collect();
    for (n, due, mut handle) in calls {
        assert_eq!(handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n}: {e:?}")), n);
        let starts = lock(&STARTS)[handle.id().as_str()].clone();
        assert_eq!(starts.len(), 1, "call {n} ran once");
        assert!(starts[0] >= due, "call {n} ran early");
    }
    assert_eq!(caller_broker.stats().delayed, 20);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Quorum task queues (beside quorum delay queues, as in every durable namespace): a
/// delayed call, and a retry through the chain, each run once.
#[test]
fn delays_and_retries_on_quorum_queues() {
    let Some(setup) = Amqp::with_options(AmqpOptions::new().quorum(true)) else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    worker.allocate(stamp, 1).expect("allocate");
    worker.allocate(flaky, 1).expect("allocate");
    let before = SystemTime::now();
    let mut delayed =
        stamp::call_with(&caller, &CallOptions::new().countdown(Duration::from_millis(400)), 7).expect("call");
    let retry = CallOptions::new().retries(2).backoff(Backoff::fixed(Duration::from_millis(300)).jitter(false));
    let mut retried = flaky::call_with(&caller, &retry, 1).expect("call");
    assert_eq!(delayed.wait_timeout(PATIENCE).expect("the delayed call runs"), 7);
    let starts = lock(&STARTS)[delayed.id().as_str()].clone();
    assert_eq!(starts.len(), 1);
    assert!(starts[0] >= before + Duration::from_millis(400), "ran early");
    assert_eq!(retried.wait_timeout(PATIENCE).expect("the second attempt succeeds"), 2);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Flaky's runs in this process, by (id, attempt).
static FLAKY_RUNS: Mutex<BTreeMap<(String, u32), u32>> = Mutex::new(BTreeMap::new());

/// As `flaky`, counting its runs in this process.
#[dingo::task(name = "amqp_delay.counted_flaky")]
fn counted_flaky(ctx: &dingo::Context, failures: u32) -> Result<u32, String> {
    *lock(&FLAKY_RUNS).entry((ctx.id().to_string(), ctx.attempt())).or_default() += 1;
    if ctx.attempt() <= failures { Err(format!("attempt {} fails", ctx.attempt())) } else { Ok(ctx.attempt()) }
}

/// A RabbitMQ policy, cleared on drop (even if the test fails).
struct Policy(String);

impl Policy {
    fn set(name: &str, pattern: &str, definition: &str) -> Policy {
        let out = Command::new("rabbitmqctl")
            .args(["set_policy", name, pattern, definition, "--apply-to", "queues", "--priority", "10"])
            .output()
            .expect("rabbitmqctl must be installed for this test");
        assert!(out.status.success(), "set_policy failed: {}", String::from_utf8_lossy(&out.stderr));
        Policy(name.to_owned())
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["clear_policy", &self.0]).output();
    }
}

/// RabbitMQ refuses the next attempt of a failed call (a policy makes the delay queues
/// full, `reject-publish`): the failed attempt's delivery is not acknowledged, it comes back
/// and runs again as the same attempt; once the delay queues take messages again the retry
/// goes through and the call succeeds on its second attempt.
#[test]
fn a_refused_retry_leaves_the_failed_attempt_to_come_back() {
    // Each refusal brings the attempt back as a redelivery: more than the default 5 may pass
    // before the policy is cleared.
    let Some(setup) = Amqp::with_options(AmqpOptions::new().durable(false).max_redeliveries(10_000)) else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let mut seen = dingo_test_support::faults::Seen::watch(&worker);
    worker.allocate(counted_flaky, 1).expect("allocate");
    // The delay queues exist before the policy, as they do once any delay was sent.
    let mut warm =
        counted_flaky::call_with(&caller, &CallOptions::new().countdown(Duration::from_millis(10)), 0).expect("call");
    assert_eq!(warm.wait_timeout(PATIENCE).expect("a delayed call"), 1);
    let namespace = setup.options().namespace.replace('.', "\\.");
    let full = Policy::set(
        &setup.options().namespace,
        &format!("^{namespace}\\.delay\\."),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    // Policies apply asynchronously: wait until one is in force.
    std::thread::sleep(Duration::from_millis(500));
    let options = CallOptions::new().retries(1).backoff(Backoff::fixed(Duration::from_millis(100)).jitter(false));
    let mut handle = counted_flaky::call_with(&caller, &options, 1).expect("call");
    let id = handle.id().to_string();
    wait_until("the first attempt ran again", || lock(&FLAKY_RUNS).get(&(id.clone(), 1)).is_some_and(|&n| n >= 2));
    assert!(!lock(&FLAKY_RUNS).contains_key(&(id.clone(), 2)), "no second attempt while its message is refused");
    drop(full);
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the retry goes through"), 2);
    assert_eq!(lock(&FLAKY_RUNS)[&(id.clone(), 2)], 1, "the second attempt ran once");
    let refused = seen.of_kind(dingo::EventKind::SendFailed);
    assert!(refused.iter().any(|e| e.message.contains("goes back to its queue")), "{refused:?}");
    assert!(worker_broker.stats().redelivered >= 1, "the refused attempt came back");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// A delayed call sent while its caller's connection is partitioned (bytes dropped, no
/// confirm) is published again after the connection is restored, its delay spelled again
/// from its due time: it waits only what is left of its delay (here nothing), not the whole
/// delay once more; and it runs once, not before it is due.
#[test]
fn a_delayed_message_published_again_waits_only_what_is_left() {
    let Some(setup) = Amqp::setup() else { return };
    let proxy = dingo_test_support::proxy::Proxy::start(dingo_test_support::faults::server_addr(setup.url()))
        .expect("start a proxy");
    let through =
        AmqpBroker::connect_with(&dingo_test_support::faults::via(&proxy, setup.url()), setup.options().clone())
            .expect("connect through the proxy");
    setup.adopt(through.clone());
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller = App::builder().broker(through.clone()).build().expect("caller app");
    worker.allocate(stamp, 1).expect("allocate");
    // Declares the delay levels a second's delay passes (levels 0 to 6), before the partition.
    let warm = CallOptions::new().countdown(Duration::from_millis(1270));
    assert_eq!(stamp::call_with(&caller, &warm, 0).expect("call").wait_timeout(PATIENCE).expect("warm-up"), 0);
    proxy.partition();
    let due = SystemTime::now() + Duration::from_secs(1);
    let mut handle = stamp::call_with(&caller, &CallOptions::new().countdown(Duration::from_secs(1)), 1).expect("call");
    std::thread::sleep(Duration::from_millis(1500));
    proxy.resume();
    let restored = SystemTime::now();
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the call runs"), 1);
    let starts = lock(&STARTS)[handle.id().as_str()].clone();
    assert_eq!(starts.len(), 1, "ran once");
    assert!(starts[0] >= due, "ran early");
    let after = starts[0].duration_since(restored).unwrap_or_default();
    assert!(after < Duration::from_millis(700), "ran {after:?} after the connection was restored");
    assert!(through.stats().republished >= 1, "{:?}", through.stats());
    caller.close().expect("close");
    worker.close().expect("close");
}

// ---- worker processes ----

/// What a worker process serves and where it logs, from the test that starts it.
const WORKER_ENV: &str = "DINGO_DELAY_WORKER";

/// Not a test: the body of a worker process ([`Worker::start`]), which serves `stamp` and
/// `flaky` on 4 threads until it is killed. Run by a plain `cargo test` it returns at once.
#[test]
#[ignore = "the body of the worker processes the other tests start"]
fn worker_process() {
    let Ok(namespace) = std::env::var(WORKER_ENV) else { return };
    let url = std::env::var("DINGO_AMQP_URL").expect("DINGO_AMQP_URL");
    let durable = std::env::var("DINGO_DURABLE").is_ok_and(|v| v == "1");
    let options = AmqpOptions::new().namespace(namespace).durable(durable);
    let worker = App::builder().broker(AmqpBroker::connect_with(&url, options).expect("connect")).build().expect("app");
    worker.allocate(stamp, 4).expect("allocate");
    worker.allocate(flaky, 4).expect("allocate");
    println!("worker ready");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// A worker process: this binary running [`worker_process`], killed (SIGKILL) on drop.
struct Worker(Child);

impl Worker {
    fn start(setup: &Amqp, log: &Path) -> Worker {
        let exe = std::env::current_exe().expect("the test binary");
        let child = Command::new(exe)
            .args(["worker_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(WORKER_ENV, &setup.options().namespace)
            .env("DINGO_AMQP_URL", setup.url())
            .env("DINGO_DURABLE", if setup.options().durable { "1" } else { "0" })
            .env("DINGO_DELAY_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a worker process");
        Worker(child)
    }

    /// SIGKILL: nothing is given back, nothing acknowledged.
    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A run log for worker processes, removed at the end.
struct RunLog(PathBuf);

impl RunLog {
    fn new(test: &str) -> RunLog {
        let path = std::env::temp_dir().join(format!("dingo-{}-{test}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        RunLog(path)
    }

    /// How many times each (task, id, attempt) ran.
    fn runs(&self) -> HashMap<(String, String, u32), usize> {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        let mut runs = HashMap::new();
        for line in text.lines() {
            let mut words = line.split(' ');
            let (Some(name), Some(id), Some(attempt)) = (words.next(), words.next(), words.next()) else { continue };
            let attempt = attempt.parse().expect("an attempt number");
            *runs.entry((name.to_owned(), id.to_owned(), attempt)).or_default() += 1;
        }
        runs
    }

    fn lines(&self) -> usize {
        std::fs::read_to_string(&self.0).unwrap_or_default().lines().count()
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// 500 calls delayed by 1.5–2.5 s; both worker processes are killed (SIGKILL) while every
/// one of them waits in the delay queues, then a new worker process starts: each call runs
/// exactly once, after its due time. The delays were in RabbitMQ, not in a worker.
#[test]
fn worker_processes_killed_while_tasks_wait_lose_nothing() {
    const CALLS: u64 = 500;
    let Some(setup) = Amqp::setup() else { return };
    let log = RunLog::new("killed-while-delayed");
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    // Declared (and deleted at the end) by the test, whoever runs them.
    dingo::broker::Consumer::declare(&caller_broker, &dingo::TaskName::from(stamp::NAME)).expect("declare");
    let (a, b) = (Worker::start(&setup, &log.0), Worker::start(&setup, &log.0));
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    let calls: Vec<_> = (0..CALLS)
        .map(|n| {
            let wait = Duration::from_millis(1500 + random.below(1001));
            let due = SystemTime::now() + wait;
            (n, due, stamp::call_with(&caller, &CallOptions::new().countdown(wait), n).expect("call"))
        })
        .collect();
    wait_until("every call waits in the delay queues", || {
        caller_broker.delayed_len().expect("delayed length") == CALLS as usize
    });
    a.kill();
    b.kill();
    assert!(started.elapsed() < Duration::from_millis(1500), "the workers were killed before any call was due");
    assert_eq!(log.lines(), 0, "nothing ran before it was due");
    let _c = Worker::start(&setup, &log.0);
    for (n, due, mut handle) in calls {
        assert_eq!(handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n}: {e:?}")), n);
        assert!(SystemTime::now() >= due, "call {n} resolved before its due time");
    }
    let runs = log.runs();
    assert_eq!(runs.len(), CALLS as usize, "every call ran");
    assert!(runs.values().all(|&count| count == 1), "no call ran twice: {runs:?}");
    assert_eq!(caller_broker.delayed_len().expect("delayed length"), 0);
    caller.close().expect("close");
}

/// Calls that fail every attempt, with 2 retries 1.5 s apart: the worker process is
/// killed (SIGKILL) during the first backoff, and its successor during the second, each
/// while the next attempts wait in the delay queues. Each call still runs exactly 3
/// attempts, each once; its caller sees 2 `Retrying` reports, then a failure naming 3
/// attempts; each call leaves one dead letter.
#[test]
fn workers_killed_during_the_backoff_change_no_attempt_count() {
    const CALLS: usize = 5;
    let Some(setup) = Amqp::setup() else { return };
    let log = RunLog::new("killed-in-backoff");
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    dingo::broker::Consumer::declare(&caller_broker, &dingo::TaskName::from(flaky::NAME)).expect("declare");
    let options = CallOptions::new()
        .retries(2)
        .backoff(Backoff::fixed(Duration::from_millis(1500)).jitter(false))
        .monitor_progress(true);
    let mut worker = Worker::start(&setup, &log.0);
    let handles: Vec<_> = (0..CALLS).map(|_| flaky::call_with(&caller, &options, 99).expect("call")).collect();
    for attempt in 1..=2 {
        wait_until("every call ran its attempt and waits for the next", || {
            let runs = log.runs();
            runs.keys().filter(|(_, _, a)| *a == attempt).count() == CALLS
                && caller_broker.delayed_len().expect("delayed length") == CALLS
        });
        // The next attempts are stored (in the delay queues); let the acknowledgements of the
        // failed ones go out.
        std::thread::sleep(Duration::from_millis(200));
        worker.kill();
        worker = Worker::start(&setup, &log.0);
    }
    for mut handle in handles {
        let mut retrying = Vec::new();
        let failure = loop {
            match handle.next_report(Some(PATIENCE)) {
                Ok(Some(Report::Retrying { attempt, after, .. })) => retrying.push((attempt, after)),
                Ok(Some(Report::Failure(error))) => break error,
                Ok(Some(Report::Success(value))) => panic!("flaky(99) succeeded: {value}"),
                Ok(Some(_)) => {}
                other => panic!("no final report: {other:?}"),
            }
        };
        assert_eq!(failure.kind(), TaskErrorKind::Failed, "{failure:?}");
        assert_eq!(failure.attempts(), 3, "{failure:?}");
        let wait = Duration::from_millis(1500);
        assert_eq!(retrying, [(1, wait), (2, wait)]);
    }
    let runs = log.runs();
    assert_eq!(runs.len(), CALLS * 3, "3 attempts of each call: {runs:?}");
    assert!(runs.values().all(|&count| count == 1), "no attempt ran twice: {runs:?}");
    wait_until("one dead letter per call", || {
        caller_broker.dead_letters(&dingo::TaskName::from(flaky::NAME), usize::MAX).expect("dead letters").len()
            == CALLS
    });
    worker.kill();
    caller.close().expect("close");
}
