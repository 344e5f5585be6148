//! Delayed tasks and retries on Redis under faults: every worker process killed with SIGKILL
//! while tasks wait in the delayed set, a worker killed during a retry's backoff or while it
//! runs an attempt, and the server itself killed and started again (append-only file,
//! `fsync` on every write) while tasks wait. Each task runs exactly as often as it should.
//!
//! The worker processes are this test binary, started again to run [`child_worker`] alone:
//! it serves the tasks below, logging every run (call and attempt) to a file, so the test
//! counts runs across processes.
#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, Backoff, CallOptions, Context, Error, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{lock, wait_until};
use dingo_test_support::redis::Redis;
use dingo_test_support::redis_server::Server;

/// Set (to the server's URL) in a worker process.
const CHILD_URL: &str = "DINGO_DELAY_CHILD_URL";

/// A worker process's part: serves `delay.record` (logs the run, returns its number),
/// `delay.flaky` (logs the run, fails until the given attempt) and `delay.slow_flaky` (logs
/// the run; its first attempt naps, then fails) on the namespace, lease and
/// log file it is given, until killed (or two minutes, should its test die first). In the
/// test process itself it does nothing.
#[test]
fn child_worker() {
    let Ok(url) = std::env::var(CHILD_URL) else { return };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let lease = Duration::from_millis(var("DINGO_DELAY_LEASE_MS").parse().expect("a lease"));
    let options = RedisOptions::new().namespace(var("DINGO_DELAY_NAMESPACE")).lease(lease).reap_interval(lease / 4);
    let broker = RedisBroker::connect_with(&url, options).expect("connect");
    let app = App::builder().broker(broker).build().expect("worker app");
    let log = PathBuf::from(var("DINGO_DELAY_LOG"));
    let record = log.clone();
    app.register_with_context("delay.record", move |ctx: &Context<'_>, n: u64| -> Result<u64, String> {
        append(&record, n, ctx.attempt());
        Ok(n)
    })
    .expect("register");
    app.register_with_context("delay.flaky", move |ctx: &Context<'_>, (n, succeed_at): (u64, u32)| {
        append(&log, n, ctx.attempt());
        if ctx.attempt() < succeed_at { Err(format!("attempt {} of call {n} fails", ctx.attempt())) } else { Ok(n) }
    })
    .expect("register");
    let slow = PathBuf::from(var("DINGO_DELAY_LOG"));
    app.register_with_context("delay.slow_flaky", move |ctx: &Context<'_>, (n, nap_ms): (u64, u64)| {
        append(&slow, n, ctx.attempt());
        if ctx.attempt() == 1 {
            std::thread::sleep(Duration::from_millis(nap_ms));
            return Err(format!("attempt 1 of call {n} fails"));
        }
        Ok(n)
    })
    .expect("register");
    app.allocate("delay.record", 2).expect("allocate");
    app.allocate("delay.flaky", 1).expect("allocate");
    app.allocate("delay.slow_flaky", 1).expect("allocate");
    println!("worker ready");
    std::thread::sleep(Duration::from_secs(120));
}

/// Logs one run: a line `n attempt` (one `write` to a file opened for appending: lines of
/// several processes never interleave).
fn append(log: &Path, n: u64, attempt: u32) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the log");
    file.write_all(format!("{n} {attempt}\n").as_bytes()).expect("write the log");
}

/// The runs logged so far: how many times each (call, attempt) ran.
fn runs(log: &Path) -> HashMap<(u64, u32), usize> {
    let mut runs = HashMap::new();
    let Ok(text) = std::fs::read_to_string(log) else { return runs };
    for line in text.lines() {
        let mut words = line.split(' ');
        let (Some(n), Some(attempt)) = (words.next(), words.next()) else { continue };
        *runs.entry((n.parse().expect("a number"), attempt.parse().expect("an attempt"))).or_insert(0) += 1;
    }
    runs
}

/// A worker process (see [`child_worker`]), killed with SIGKILL on drop.
struct Worker {
    child: std::process::Child,
    stdout: Arc<Mutex<String>>,
}

impl Worker {
    fn spawn(url: &str, namespace: &str, log: &Path) -> Worker {
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args(["child_worker", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_URL, url)
            .env("DINGO_DELAY_NAMESPACE", namespace)
            .env("DINGO_DELAY_LEASE_MS", "1000")
            .env("DINGO_DELAY_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a worker process");
        let stdout = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().expect("piped");
        let into = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut out = lock(&into);
                out.push_str(&line);
                out.push('\n');
            }
        });
        let worker = Worker { child, stdout };
        wait_until("the worker process is ready", || lock(&worker.stdout).contains("worker ready"));
        worker
    }

    /// SIGKILL: it gives nothing back.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A log file of the test's own.
fn log_file() -> PathBuf {
    let path = std::env::temp_dir().join(dingo_test_support::unique("dingo-delay-runs"));
    let _ = std::fs::remove_file(&path);
    path
}

/// 500 calls delayed 3–4 s; both worker processes are killed with SIGKILL while the calls
/// wait (nothing of them is in any process); a new worker process starts, promotes them
/// once due, and every call runs exactly once with its own result.
#[test]
fn delayed_tasks_survive_every_worker_process_killed() {
    const CALLS: u64 = 500;
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let log = log_file();
    let mut first = [Worker::spawn(setup.url(), &namespace, &log), Worker::spawn(setup.url(), &namespace, &log)];
    let broker = setup.broker();
    let caller = App::builder().broker(broker.clone()).build().expect("caller app");
    let start = SystemTime::now();
    let handles: Vec<_> = (0..CALLS)
        .map(|n| {
            let due = start + Duration::from_millis(3_000 + n * 2);
            (n, caller.call_with::<_, u64>("delay.record", &CallOptions::new().eta(due), n).expect("call"))
        })
        .collect();
    wait_until("every call waits in the delayed set", || {
        broker.delayed_len("delay.record").expect("ZCARD") == CALLS as usize
    });
    for worker in &mut first {
        worker.kill();
    }
    assert!(start.elapsed().expect("clock") < Duration::from_millis(2_500), "killed before any was due");
    assert_eq!(broker.delayed_len("delay.record").expect("ZCARD"), CALLS as usize, "none was promoted");
    let _second = Worker::spawn(setup.url(), &namespace, &log);
    for (n, mut handle) in handles {
        assert_eq!(handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n}: {e:?}")), n);
    }
    let runs = runs(&log);
    for n in 0..CALLS {
        assert_eq!(runs.get(&(n, 1)), Some(&1), "call {n} ran {:?} times", runs.get(&(n, 1)));
    }
    assert_eq!(runs.len(), CALLS as usize);
    caller.close().expect("close");
    let _ = std::fs::remove_file(&log);
}

/// `retries = 2` and a fixed backoff of 2 s on a call that fails twice, then succeeds: the
/// worker process is killed with SIGKILL while the first retry waits (its attempt settled,
/// the next one in the delayed set); a new worker process runs attempts 2 and 3 — each
/// attempt exactly once — and the call gets its value.
#[test]
fn a_worker_killed_during_a_retry_backoff_still_runs_every_attempt_once() {
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let log = log_file();
    let mut first = Worker::spawn(setup.url(), &namespace, &log);
    let broker = setup.broker();
    let caller = App::builder().broker(broker.clone()).build().expect("caller app");
    let options = CallOptions::new().retries(2).backoff(Backoff::fixed(Duration::from_secs(2)));
    let calls: Vec<u64> = (0..5).collect();
    let handles: Vec<_> =
        calls.iter().map(|&n| caller.call_with::<_, u64>("delay.flaky", &options, (n, 3u32)).expect("call")).collect();
    wait_until("every first attempt ran and its retry waits", || {
        broker.delayed_len("delay.flaky").expect("ZCARD") == calls.len()
    });
    first.kill();
    let held = dingo_test_support::redis::held(setup.url(), &namespace, "delay.flaky");
    assert_eq!(held, 0, "the failed attempts were settled with their retries queued");
    let _second = Worker::spawn(setup.url(), &namespace, &log);
    for (&n, mut handle) in calls.iter().zip(handles) {
        assert_eq!(handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n}: {e:?}")), n);
    }
    let runs = runs(&log);
    for &n in &calls {
        for attempt in 1..=3 {
            assert_eq!(runs.get(&(n, attempt)), Some(&1), "call {n} attempt {attempt}: {runs:?}");
        }
    }
    assert_eq!(runs.len(), calls.len() * 3, "no fourth attempt: {runs:?}");
    caller.close().expect("close");
    let _ = std::fs::remove_file(&log);
}

/// `retries = 1` on a call that always fails, its worker killed during the backoff: the
/// second worker runs the one retry, the failure names 2 attempts, one dead letter.
#[test]
fn a_worker_killed_during_the_last_backoff_still_ends_in_one_dead_letter() {
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let log = log_file();
    let mut first = Worker::spawn(setup.url(), &namespace, &log);
    let broker = setup.broker();
    let caller = App::builder().broker(broker.clone()).build().expect("caller app");
    let options = CallOptions::new().retries(1).backoff(Backoff::fixed(Duration::from_millis(1_500)));
    let mut handle = caller.call_with::<_, u64>("delay.flaky", &options, (1u64, u32::MAX)).expect("call");
    wait_until("the retry waits", || broker.delayed_len("delay.flaky").expect("ZCARD") == 1);
    first.kill();
    let _second = Worker::spawn(setup.url(), &namespace, &log);
    match handle.wait_timeout(PATIENCE) {
        Err(Error::Task(e)) => assert_eq!((e.kind(), e.attempts()), (TaskErrorKind::Failed, 2), "{e}"),
        other => panic!("expected the final failure, got {other:?}"),
    }
    wait_until("one dead letter", || broker.dead_letters("delay.flaky").expect("dead letters").len() == 1);
    let runs = runs(&log);
    assert_eq!((runs.get(&(1, 1)), runs.get(&(1, 2)), runs.len()), (Some(&1), Some(&1), 2), "{runs:?}");
    caller.close().expect("close");
    let _ = std::fs::remove_file(&log);
}

/// A worker killed while it runs an attempt does not use the attempt up: `retries = 1`, the
/// first attempt is cut off by a SIGKILL, comes back once the dead worker's lease expires
/// (redelivered, still attempt 1), fails, and its one retry succeeds — attempt 1 twice,
/// attempt 2 once.
#[test]
fn a_worker_killed_during_an_attempt_does_not_use_it_up() {
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let log = log_file();
    let mut first = Worker::spawn(setup.url(), &namespace, &log);
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let options = CallOptions::new().retries(1).backoff(Backoff::fixed(Duration::from_millis(100)));
    let mut handle = caller.call_with::<_, u64>("delay.slow_flaky", &options, (4u64, 1_000u64)).expect("call");
    wait_until("the first attempt runs", || runs(&log).contains_key(&(4, 1)));
    first.kill();
    let _second = Worker::spawn(setup.url(), &namespace, &log);
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the retry succeeds"), 4);
    let runs = runs(&log);
    assert_eq!((runs.get(&(4, 1)), runs.get(&(4, 2)), runs.len()), (Some(&2), Some(&1), 2), "{runs:?}");
    caller.close().expect("close");
    let _ = std::fs::remove_file(&log);
}

static RESTART_RUNS: AtomicU64 = AtomicU64::new(0);

/// A server of the test's own, with the append-only file and an `fsync` per write: 200 calls
/// delayed 1–2 s, the server killed (SIGKILL) and started again on the same port and
/// directory while they wait. Every call runs exactly once, none before it is due.
#[test]
fn delayed_tasks_survive_a_redis_restart() {
    const CALLS: u64 = 200;
    let Some(mut server) = Server::start_with(&["--appendonly", "yes", "--appendfsync", "always"]) else { return };
    let options = RedisOptions::new()
        .namespace(dingo_test_support::unique("dingo-test"))
        .lease(Duration::from_secs(2))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(200));
    let worker_broker = RedisBroker::connect_with(&server.url(), options.clone()).expect("connect");
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let starts: Arc<Mutex<HashMap<u64, Vec<SystemTime>>>> = Arc::default();
    let seen = starts.clone();
    worker
        .register("delay.restart", move |n: u64| {
            RESTART_RUNS.fetch_add(1, Ordering::SeqCst);
            lock(&seen).entry(n).or_default().push(SystemTime::now());
            n * 3
        })
        .expect("register");
    worker.allocate("delay.restart", 2).expect("allocate");
    let caller_broker = RedisBroker::connect_with(&server.url(), options).expect("connect");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let start = SystemTime::now();
    let dues: Vec<SystemTime> = (0..CALLS).map(|n| start + Duration::from_millis(1_000 + n * 5)).collect();
    let handles: Vec<_> = (0..CALLS)
        .map(|n| {
            let options = CallOptions::new().eta(dues[n as usize]);
            caller.call_with::<_, u64>("delay.restart", &options, n).expect("call")
        })
        .collect();
    wait_until("every call waits", || caller_broker.delayed_len("delay.restart").unwrap_or(0) == CALLS as usize);
    server.kill();
    let down = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    server.start();
    assert!(start.elapsed().expect("clock") < Duration::from_secs(1), "restarted before the first was due");
    eprintln!("the server was down for {:?}", down.elapsed());
    for (n, mut handle) in (0u64..).zip(handles) {
        assert_eq!(handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n}: {e:?}")), n * 3);
    }
    assert_eq!(RESTART_RUNS.load(Ordering::SeqCst), CALLS, "each ran once");
    for (n, due) in (0u64..).zip(&dues) {
        let runs = &lock(&starts)[&n];
        assert_eq!(runs.len(), 1);
        assert!(runs[0] >= *due, "call {n} started before it was due");
    }
    caller.close().expect("close");
    worker.close().expect("close");
}
