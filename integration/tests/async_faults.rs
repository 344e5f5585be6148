//! Async tasks under a killed worker: a worker process running 60 async tasks at once on
//! one thread — some finished, the rest mid-`.await` — is killed with SIGKILL; a second
//! worker process picks up what the first did not settle, and every caller gets its exact
//! value. On Redis the first worker settled its tasks in the order it took them (a task
//! that finished early reported at once and waited for the earlier ones to be settled), so
//! the kill also tests that nothing a finished-but-unsettled task left behind is lost.
//!
//! The worker processes are this test binary, started again to run [`child_worker`] alone;
//! it logs every run to a file (call number and whether the run was a redelivery), so the
//! test counts runs across processes.
#![cfg(any(feature = "redis", feature = "amqp"))]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dingo::{App, AppBuilder};
use dingo_test_support::PATIENCE;
use dingo_test_support::async_tasks::sleep;
use dingo_test_support::faults::wait_until;
use dingo_test_support::process::Proc;

/// Set (to `redis` or `amqp`) in a worker process.
const CHILD: &str = "DINGO_ASYNC_CHILD";

/// How many calls, and how long the `n`-th one sleeps: the first ten are quick (they finish
/// before the kill), the rest outlast it.
const CALLS: u64 = 60;

fn nap(n: u64) -> Duration {
    if n % 6 == 5 { Duration::from_millis(20) } else { Duration::from_millis(1_500 + 10 * n) }
}

/// A worker process's part: serves `async.fault.nap` (logs the run, sleeps, returns
/// `n * 3`) on the broker and namespace it is given, 100 at once on one thread, until
/// killed (or two minutes, should its test die first). In the test process itself it does
/// nothing.
#[test]
fn child_worker() {
    let Ok(kind) = std::env::var(CHILD) else { return };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let (url, namespace) = (var("DINGO_ASYNC_URL"), var("DINGO_ASYNC_NAMESPACE"));
    let builder: AppBuilder = match kind.as_str() {
        #[cfg(feature = "redis")]
        "redis" => {
            use dingo::redis::{RedisBroker, RedisOptions};
            let lease = Duration::from_millis(1_000);
            let options = RedisOptions::new().namespace(namespace).lease(lease).reap_interval(lease / 4);
            App::builder().broker(RedisBroker::connect_with(&url, options).expect("connect"))
        }
        #[cfg(feature = "amqp")]
        "amqp" => {
            use dingo::amqp::{AmqpBroker, AmqpOptions};
            let options = AmqpOptions::new().durable(false).namespace(namespace);
            App::builder().broker(AmqpBroker::connect_with(&url, options).expect("connect"))
        }
        other => panic!("no broker {other}"),
    };
    let app = builder.build().expect("worker app");
    let log = PathBuf::from(var("DINGO_ASYNC_LOG"));
    app.register_async_with_context("async.fault.nap", move |ctx: std::sync::Arc<dingo::Context<'static>>, n: u64| {
        let log = log.clone();
        async move {
            append(&log, n, ctx.redelivered());
            sleep(nap(n)).await;
            Ok::<u64, String>(n * 3)
        }
    })
    .expect("register");
    app.allocate_concurrent("async.fault.nap", 1, 100).expect("allocate");
    println!("worker ready");
    std::thread::sleep(Duration::from_secs(120));
}

/// Logs one run: a line `n redelivered` (one `write` to a file opened for appending).
fn append(log: &Path, n: u64, redelivered: bool) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the log");
    file.write_all(format!("{n} {redelivered}\n").as_bytes()).expect("write the log");
}

/// The runs logged so far, by call: whether each run was a redelivery.
fn runs(log: &Path) -> BTreeMap<u64, Vec<bool>> {
    let mut runs: BTreeMap<u64, Vec<bool>> = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(log) else { return runs };
    for line in text.lines() {
        let mut words = line.split(' ');
        let (Some(n), Some(redelivered)) = (words.next(), words.next()) else { continue };
        runs.entry(n.parse().expect("a number")).or_default().push(redelivered == "true");
    }
    runs
}

fn worker(kind: &str, url: &str, namespace: &str, log: &Path) -> Proc {
    let log = log.to_string_lossy();
    let env =
        [(CHILD, kind), ("DINGO_ASYNC_URL", url), ("DINGO_ASYNC_NAMESPACE", namespace), ("DINGO_ASYNC_LOG", &log)];
    let mut worker = Proc::this_test("child_worker", &env);
    worker.wait_for_line("worker ready", PATIENCE);
    worker
}

/// The scenario, on a caller app of the broker under test.
fn killed_mid_flight(kind: &str, url: &str, namespace: &str, caller: &App) {
    let log = std::env::temp_dir().join(dingo_test_support::unique("dingo-async-runs"));
    let mut first = worker(kind, url, namespace, &log);
    let mut handles: Vec<_> =
        (0..CALLS).map(|n| (n, caller.call::<_, u64>("async.fault.nap", n).expect("call"))).collect();
    wait_until("every call started on the first worker", || runs(&log).len() == CALLS as usize);
    // The quick ones finish; the others are mid-sleep when the process dies.
    std::thread::sleep(Duration::from_millis(300));
    first.kill();
    let finished_before: Vec<u64> = handles.iter().filter(|(_, h)| h.is_finished()).map(|(n, _)| *n).collect();
    let _second = worker(kind, url, namespace, &log);
    for (n, handle) in &mut handles {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("a value"), *n * 3, "call {n}");
    }
    let runs = runs(&log);
    let quick: Vec<u64> = (0..CALLS).filter(|n| nap(*n) < Duration::from_millis(100)).collect();
    eprintln!("{kind}: calls finished before the kill: {finished_before:?}; runs: {runs:?}");
    for n in 0..CALLS {
        let ran = &runs[&n];
        assert!(!ran[0], "call {n}'s first run was not a redelivery");
        if quick.contains(&n) {
            assert!(finished_before.contains(&n), "quick call {n} had its value before the kill");
            // RabbitMQ acknowledged it at once; Redis settles a thread's tasks in order, so
            // one that finished before slower earlier ones waited with its report stored,
            // and runs again (at least once).
            let most = if kind == "amqp" { 1 } else { 2 };
            assert!(ran.len() <= most, "call {n} ran {} times", ran.len());
        } else {
            assert_eq!(ran, &[false, true], "call {n} ran once on each worker, the second a redelivery");
        }
    }
    let _ = std::fs::remove_file(&log);
}

#[cfg(feature = "redis")]
#[test]
fn redis_async_tasks_survive_a_killed_worker() {
    let Some(setup) = dingo_test_support::redis::Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    killed_mid_flight("redis", setup.url(), &namespace, &caller);
    caller.close().expect("close");
}

#[cfg(feature = "amqp")]
#[test]
fn amqp_async_tasks_survive_a_killed_worker() {
    let Some(setup) = dingo_test_support::amqp::Amqp::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    killed_mid_flight("amqp", setup.url(), &namespace, &caller);
    caller.close().expect("close");
}
