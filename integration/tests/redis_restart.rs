//! A Redis server restarted under running apps (a server of the test's own; the shared one
//! is never restarted): calls made afterwards get their exact results, calls lost with the
//! crashed server never hang (lease tokens reused after a restart were once a defect).
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, EventKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{Seen, wait_until};
use dingo_test_support::redis_server::Server;

static RESTART_RUNS: AtomicUsize = AtomicUsize::new(0);

#[dingo::task(name = "faults.restart_echo")]
fn restart_echo(n: u64, millis: u64) -> u64 {
    RESTART_RUNS.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(millis));
    n * 2
}

#[dingo::task(name = "faults.restart_orphan")]
fn restart_orphan(n: u64) -> u64 {
    n + 7
}

/// Apps on a server that is killed and started again on the same port, with no task
/// running at the crash: both report the lost connection and its recovery, and calls made
/// afterwards — while the server is down and once it is back — get their exact results,
/// each run once. Calls that only waited in the crashed server's queue are gone with it
/// (it kept nothing on disk): their handles time out instead of hanging.
#[test]
fn apps_survive_a_redis_restart() {
    let Some(mut server) = Server::start_fresh() else { return };
    let options = RedisOptions::new()
        .namespace(dingo_test_support::unique("dingo-test"))
        .lease(Duration::from_secs(2))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(200));
    let worker_broker = RedisBroker::connect_with(&server.url(), options.clone()).expect("connect");
    let caller_broker = RedisBroker::connect_with(&server.url(), options.clone()).expect("connect");
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut worker_events = Seen::watch(&worker);
    let mut caller_events = Seen::watch(&caller);
    worker.allocate(restart_echo, 2).expect("allocate");

    let before: Vec<_> = (0..10).map(|n| (n, restart_echo::call(&caller, n, 0).expect("call"))).collect();
    for (n, mut handle) in before {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("a result before the crash"), n * 2);
    }
    // Queued for a task nobody serves yet: these die with the server.
    let orphans: Vec<_> = (0..3).map(|n| restart_orphan::call(&caller, n).expect("call")).collect();
    wait_until("the orphan calls are queued", || caller_broker.stats().sent == 13);

    server.kill();
    worker_events.wait_for(EventKind::ConnectionLost);
    caller_events.wait_for(EventKind::ConnectionLost);
    // Calls while the server is down wait in the caller's buffer.
    let during: Vec<_> = (100..110).map(|n| (n, restart_echo::call(&caller, n, 0).expect("call"))).collect();
    server.start();
    worker_events.wait_for(EventKind::ConnectionRestored);
    caller_events.wait_for(EventKind::ConnectionRestored);

    let after: Vec<_> = (200..230).map(|n| (n, restart_echo::call(&caller, n, 5).expect("call"))).collect();
    for (n, mut handle) in during.into_iter().chain(after) {
        let got = handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n} after the restart: {e:?}"));
        assert_eq!(got, n * 2, "call {n}");
    }
    assert_eq!(RESTART_RUNS.load(Ordering::SeqCst), 50, "each call ran once");

    // Now the orphans' task is served: new calls work, the lost ones give up in time.
    worker.allocate(restart_orphan, 1).expect("allocate");
    assert_eq!(restart_orphan::call(&caller, 100).expect("call").wait_timeout(PATIENCE).expect("result"), 107);
    let deadline = Instant::now() + Duration::from_secs(1);
    for (n, mut handle) in (0u64..).zip(orphans) {
        match handle.wait_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(got) => assert_eq!(got, n + 7, "a lost call, if ever resolved, has its own result"),
            Err(dingo::Error::Timeout(_) | dingo::Error::Task(_)) => {}
            Err(other) => panic!("orphan {n}: unexpected {other:?}"),
        }
    }
    assert!(Instant::now() < deadline + Duration::from_secs(1), "waiting for lost calls does not hang");
    let fresh = RedisBroker::connect_with(&server.url(), options).expect("connect");
    assert_eq!(fresh.queue_len(restart_echo::NAME).expect("queue length"), 0);
    assert_eq!(fresh.queue_len(restart_orphan::NAME).expect("queue length"), 0);
    caller.close().expect("close");
    worker.close().expect("close");
}

static INFLIGHT_RUNS: AtomicUsize = AtomicUsize::new(0);

#[dingo::task(name = "faults.inflight_echo")]
fn inflight_echo(n: u64, millis: u64) -> u64 {
    INFLIGHT_RUNS.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(millis));
    n * 2
}

/// The same with tasks running at the crash: their handles give up after a timeout or get
/// a failure (never hang), while every call made after the restart gets its exact result —
/// even though the workers finish the old tasks with leases the new server never issued.
#[test]
fn calls_after_a_redis_restart_succeed_while_old_tasks_finish() {
    let Some(mut server) = Server::start_fresh() else { return };
    let options = RedisOptions::new()
        .namespace(dingo_test_support::unique("dingo-test"))
        .lease(Duration::from_secs(2))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(200));
    let worker_broker = RedisBroker::connect_with(&server.url(), options.clone()).expect("connect");
    let caller_broker = RedisBroker::connect_with(&server.url(), options).expect("connect");
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut worker_events = Seen::watch(&worker);
    worker.allocate(inflight_echo, 2).expect("allocate");

    // Ten calls done (lease tokens 1..=10 on the old server), then two long ones running.
    for n in 0..10 {
        assert_eq!(inflight_echo::call(&caller, n, 0).expect("call").wait_timeout(PATIENCE).expect("result"), n * 2);
    }
    let running: Vec<_> = (10..12).map(|n| (n, inflight_echo::call(&caller, n, 1500).expect("call"))).collect();
    wait_until("both long tasks run", || INFLIGHT_RUNS.load(Ordering::SeqCst) == 12);

    server.kill();
    worker_events.wait_for(EventKind::ConnectionLost);
    server.start();
    worker_events.wait_for(EventKind::ConnectionRestored);

    // While the old tasks still run, new ones are fetched under the new server's leases.
    let after: Vec<_> = (200..230).map(|n| (n, inflight_echo::call(&caller, n, 5).expect("call"))).collect();
    for (n, mut handle) in after {
        let got = handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n} after the restart: {e:?}"));
        assert_eq!(got, n * 2, "call {n}");
    }
    // The calls running at the crash: a result, a failure or a timeout, but never a hang.
    for (n, mut handle) in running {
        let started = Instant::now();
        match handle.wait_timeout(Duration::from_secs(3)) {
            Ok(got) => assert_eq!(got, n * 2, "call {n}"),
            Err(dingo::Error::Timeout(_) | dingo::Error::Task(_)) => {}
            Err(other) => panic!("call {n}: unexpected {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    caller.close().expect("close");
    worker.close().expect("close");
}
