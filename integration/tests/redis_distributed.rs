//! Callers and workers as separate processes on Redis: the example programs run as child
//! processes, and a worker process is killed with SIGKILL in the middle of 1,000 tasks.
#![cfg(feature = "redis")]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dingo::App;
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::wait_until;
use dingo_test_support::process::{Examples, Proc, example};
use dingo_test_support::redis::{Redis, held};

/// The example programs, built with this test's features.
const EXAMPLES: Examples = dingo_test_support::examples!["redis_worker", "redis_caller"];

// The tasks the example programs share: the same names and signatures, so the test process
// can call what the worker processes run.
#[allow(dead_code)]
#[path = "../../examples/shared/tasks.rs"]
mod tasks;

/// The worker example serving 13 tasks on 2 threads and the caller example making its 10
/// calls and the rest: the caller prints exactly the typed results, and both exit 0.
#[test]
fn the_example_worker_and_caller_as_processes() {
    let Some(setup) = Redis::setup() else { return };
    let env = [("DINGO_REDIS_URL", setup.url()), ("DINGO_NAMESPACE", setup.options().namespace.as_str())];
    let mut worker = Proc::spawn(&EXAMPLES, "redis_worker", &["--tasks", "13", "--threads", "2"], &env);
    let mut caller = Proc::spawn(&EXAMPLES, "redis_caller", &["--calls", "10"], &env);

    let status = caller.wait(Duration::from_secs(30));
    assert!(status.success(), "the caller failed: {status}; stderr:\n{}", caller.stderr());
    let mut expected: Vec<String> = (0..10).map(|i| format!("add({i}, 1000) = {}", 1000 + i)).collect();
    expected.push("total = Invoice { order: 7, total_cents: 700 }".into());
    expected.push(r#"total failed: order 8 has no items (payload Some(Ok("order 8 has no items")))"#.into());
    expected.push("slow_echo = 42".into());
    assert_eq!(caller.stdout().lines().collect::<Vec<_>>(), expected);

    let status = worker.wait(Duration::from_secs(30));
    assert!(status.success(), "the worker failed: {status}; stderr:\n{}", worker.stderr());
    assert_eq!(
        worker.stdout().lines().collect::<Vec<_>>(),
        [
            "worker ready: 2 thread(s) serving example.add, example.total, example.slow_echo, example.crash_if",
            "worker done after 13 task(s)"
        ]
    );
}

/// The worker example serving until told to stop: SIGTERM while a task runs stops it
/// gracefully — the running task finishes and its result arrives, the process exits 0,
/// and it leaves nothing in Redis (no task held, no lease).
#[test]
fn the_example_worker_stops_gracefully_on_sigterm() {
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let env = [("DINGO_REDIS_URL", setup.url()), ("DINGO_NAMESPACE", namespace.as_str())];
    let mut worker = Proc::spawn(&EXAMPLES, "redis_worker", &["--threads", "2"], &env);
    wait_until("the worker is ready", || worker.stdout().contains("worker ready"));
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    assert_eq!(tasks::add::call(&caller, 2, 3).expect("call").wait_timeout(PATIENCE).expect("served"), 5);
    let mut slow = tasks::slow_echo::call(&caller, 7, 1_000).expect("call");
    wait_until("the slow task runs", || held(setup.url(), &namespace, tasks::slow_echo::NAME) == 1);
    worker.signal("TERM");
    assert_eq!(slow.wait_timeout(PATIENCE).expect("the running task finishes"), 7);
    let status = worker.wait(Duration::from_secs(30));
    assert!(status.success(), "the worker failed: {status}; stderr:\n{}", worker.stderr());
    assert_eq!(worker.stdout().lines().last(), Some("worker stopped on a signal after 2 task(s)"));
    assert_eq!(held(setup.url(), &namespace, tasks::slow_echo::NAME), 0, "nothing held");
    let leases = format!("{namespace}:{{{}}}:consumers", tasks::slow_echo::NAME);
    assert_eq!(dingo_test_support::redis::redis_cli(setup.url(), &["ZCARD", &leases]), "0", "no lease left");
    caller.close().expect("close");
}

/// 1,000 `slow_echo` calls from this process; worker process A (4 threads, lease 1 s) is
/// killed with SIGKILL once about 150 results are in, holding running and prefetched tasks;
/// worker process B starts and, once A's leases expire, finishes everything. Each of the
/// 1,000 calls resolves to its own value, exactly once; some of A's tasks reach B marked
/// redelivered; no message, lease or in-flight entry is left behind.
#[test]
fn a_worker_process_killed_mid_run_loses_nothing() {
    const CALLS: u64 = 1000;
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let env = [("DINGO_REDIS_URL", setup.url()), ("DINGO_NAMESPACE", namespace.as_str()), ("DINGO_LEASE_MS", "1000")];
    // Built before any call waits: a first build takes longer than a call's patience.
    example(&EXAMPLES, "redis_worker");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let handles: Vec<_> = (0..CALLS).map(|n| (n, tasks::slow_echo::call(&caller, n, 5).expect("call"))).collect();
    let ids: HashSet<String> = handles.iter().map(|(_, h)| h.id().to_string()).collect();
    assert_eq!(ids.len(), CALLS as usize, "every call has its own id");

    // Results are taken in call order on a thread of their own while the workers come and go.
    let resolved = Arc::new(AtomicUsize::new(0));
    let counter = resolved.clone();
    let collector = std::thread::Builder::new()
        .name("results".into())
        .spawn(move || {
            handles
                .into_iter()
                .map(|(n, mut handle)| {
                    let got = handle.wait_timeout(PATIENCE);
                    counter.fetch_add(1, Ordering::SeqCst);
                    (n, handle.id().to_string(), got)
                })
                .collect::<Vec<_>>()
        })
        .expect("spawn the collector");

    let mut a = Proc::spawn(&EXAMPLES, "redis_worker", &["--threads", "4"], &env);
    wait_until("about 150 results are in", || resolved.load(Ordering::SeqCst) >= 150);
    a.kill();
    let at_kill = resolved.load(Ordering::SeqCst);
    assert!(at_kill < CALLS as usize, "worker A finished everything before it was killed");
    let mut b = Proc::spawn(&EXAMPLES, "redis_worker", &["--threads", "4"], &env);

    let results = collector.join().expect("the collector");
    let mut seen = HashSet::new();
    for (n, id, got) in results {
        let got = got.unwrap_or_else(|e| panic!("call {n} ({id}) got no result: {e:?}"));
        assert_eq!(got, n, "call {n}");
        assert!(seen.insert(id), "call {n} resolved twice");
    }
    assert_eq!(seen, ids, "all 1,000 calls resolved");

    let fresh = setup.broker();
    wait_until("the queue is empty and no lease is left", || {
        fresh.queue_len(tasks::slow_echo::NAME).expect("queue length") == 0
            && held(setup.url(), &namespace, tasks::slow_echo::NAME) == 0
    });
    assert!(fresh.dead_letters(tasks::slow_echo::NAME).expect("dead letters").is_empty());
    b.kill();
    let redelivered = b.stderr().lines().filter(|l| l.ends_with("was redelivered")).count();
    eprintln!("sigkill: {at_kill} result(s) in when A was killed; B ran {redelivered} task(s) redelivered from A");
    assert!(redelivered >= 1, "A's unfinished tasks reached B marked redelivered; B's stderr:\n{}", b.stderr());
    caller.close().expect("close");
}
