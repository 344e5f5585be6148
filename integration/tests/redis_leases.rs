//! Leases under faults: a task longer than its lease keeps it by renewing; a stalled worker
//! whose lease expired is fenced out (its late report rejected, never stored); and an
//! at-most-once task holds no lease at all (it leaves Redis when taken).
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dingo::App;
use dingo::redis::{RedisBroker, RedisOptions};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{Gate, lock, server_addr, via, wait_until};
use dingo_test_support::proxy::Proxy;
use dingo_test_support::redis::{Redis, held};

static LONG_RUNS: AtomicUsize = AtomicUsize::new(0);

#[dingo::task(name = "faults.long")]
fn long(ctx: &dingo::Context, millis: u64) -> (u64, bool) {
    LONG_RUNS.fetch_add(1, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(millis));
    (millis, ctx.redelivered())
}

/// With a lease of 1 s and two worker apps reaping every 100 ms, a task of 3.5 s runs once,
/// on one worker, not redelivered: its lease was renewed all along, nobody requeued it, no
/// report was rejected.
#[test]
fn a_task_longer_than_its_lease_is_not_stolen() {
    let options = RedisOptions::new().lease(Duration::from_secs(1)).reap_interval(Duration::from_millis(100));
    let Some(setup) = Redis::with_options(options) else { return };
    let brokers: Vec<RedisBroker> = (0..2).map(|_| setup.broker()).collect();
    let workers: Vec<App> =
        brokers.iter().map(|b| App::builder().broker(b.clone()).build().expect("worker app")).collect();
    for worker in &workers {
        worker.allocate(long, 1).expect("allocate");
    }
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");

    let mut handle = long::call(&caller, 3500).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the long task's result"), (3500, false));
    assert_eq!(LONG_RUNS.load(Ordering::SeqCst), 1, "the task ran exactly once");

    let sum = |f: fn(&dingo::redis::Stats) -> u64| brokers.iter().map(|b| f(&b.stats())).sum::<u64>();
    wait_until("the result is counted as completed", || sum(|s| s.completed) == 1);
    assert_eq!(sum(|s| s.requeued_expired), 0, "no lease expired");
    assert_eq!(sum(|s| s.rejected_reports), 0, "no report was rejected");
    assert_eq!(sum(|s| s.dead_lettered), 0);
    // Renewed every third of the lease for 3.5 s: about 10 times.
    let renewed = sum(|s| s.renewed);
    assert!(renewed >= 5, "the lease was renewed only {renewed} time(s)");
    assert_eq!(held(setup.url(), &setup.options().namespace, long::NAME), 0);
    caller.close().expect("close");
    for worker in &workers {
        worker.close().expect("close");
    }
}

const FENCED: &str = "faults.fenced";

/// Worker A takes a task and stalls in it past its lease, cut off from Redis (its proxy is
/// paused, so its lease keeper cannot renew). Worker B reaps the expired lease, runs the task
/// again (marked redelivered) and completes it: the caller gets B's result. When A comes back
/// and finishes, its late report is rejected and counted, never stored.
#[test]
fn a_stalled_worker_is_fenced_out() {
    let Some(setup) = Redis::with_options(fencing_options()) else { return };
    stalled_worker_is_fenced_out(setup);
}

/// The same as a least-privilege user (`dingo::redis::acl_rules`: nothing in `@dangerous`).
#[test]
fn a_stalled_worker_is_fenced_out_as_a_least_privilege_user() {
    let Some(setup) = Redis::restricted_with_options(fencing_options()) else { return };
    stalled_worker_is_fenced_out(setup);
}

fn fencing_options() -> RedisOptions {
    RedisOptions::new().lease(Duration::from_secs(1)).reap_interval(Duration::from_millis(100))
}

fn stalled_worker_is_fenced_out(setup: Redis) {
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let a_broker =
        RedisBroker::connect_with(&via(&proxy, setup.url()), setup.options().clone()).expect("connect A via proxy");
    let worker_a = App::builder().broker(a_broker.clone()).build().expect("worker A");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");

    let (started_tx, started_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let (release_tx, release_rx) = std::sync::mpsc::sync_channel::<()>(1);
    let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
    let a_runs = Arc::new(AtomicUsize::new(0));
    let a_count = a_runs.clone();
    worker_a
        .register(FENCED, move |(n,): (u64,)| {
            a_count.fetch_add(1, Ordering::SeqCst);
            let _ = lock(&started_tx).send(());
            let _ = lock(&release_rx).recv_timeout(PATIENCE);
            format!("A:{n}")
        })
        .expect("register on A");
    worker_a.allocate(FENCED, 1).expect("allocate on A");

    let mut handle = caller.call::<_, String>(FENCED, (7u64,)).expect("call");
    started_rx.recv_timeout(PATIENCE).expect("worker A starts the task");
    // A stalls: no connection of A's reaches Redis any more.
    proxy.pause();

    let b_broker = setup.broker();
    let worker_b = App::builder().broker(b_broker.clone()).build().expect("worker B");
    let b_runs = Arc::new(Mutex::new(Vec::new()));
    let b_seen = b_runs.clone();
    worker_b
        .register_with_context(FENCED, move |ctx: &dingo::Context, (n,): (u64,)| {
            lock(&b_seen).push(ctx.redelivered());
            Ok::<_, String>(format!("B:{n}"))
        })
        .expect("register on B");
    worker_b.allocate(FENCED, 1).expect("allocate on B");

    assert_eq!(handle.wait_timeout(PATIENCE).expect("B's result"), "B:7");
    assert_eq!(*lock(&b_runs), [true], "B ran the task once, marked redelivered");
    // Counted once the keeper read its reply, which may come after the result.
    wait_until("B's keeper requeued A's expired lease", || b_broker.stats().requeued_expired >= 1);
    wait_until("B's result is counted", || b_broker.stats().completed == 1);

    // A comes back and finishes: too late.
    proxy.resume();
    release_tx.send(()).expect("release A");
    wait_until("A's late report is rejected", || a_broker.stats().rejected_reports >= 1);
    assert_eq!(a_broker.stats().rejected_reports, 1);
    assert_eq!(a_broker.stats().completed, 0, "A's report was not stored");
    assert_eq!(a_runs.load(Ordering::SeqCst), 1);
    assert_eq!(lock(&b_runs).len(), 1);
    assert_eq!(b_broker.queue_len(FENCED).expect("queue length"), 0);
    assert_eq!(held(setup.admin_url(), &setup.options().namespace, FENCED), 0);
    worker_a.close().expect("close A");
    worker_b.close().expect("close B");
    caller.close().expect("close the caller");
}

/// At most once, per call: the task leaves Redis when a worker takes it — nothing in a
/// processing list, nothing to requeue if the worker dies — and its progress and result
/// still come back in order. An at-least-once call of the same task, meanwhile, sits in
/// its worker's processing list until it is done.
#[test]
fn an_at_most_once_task_leaves_redis_when_taken() {
    let Some(setup) = Redis::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let gate = Gate::register(&worker, "faults.amo");
    worker.allocate("faults.amo", 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let namespace = &setup.options().namespace;
    let in_redis = || {
        setup.broker().queue_len("faults.amo").expect("queue length") as u64
            + held(setup.url(), namespace, "faults.amo")
    };

    let at_most_once = dingo::CallOptions::new().at_most_once(true).monitor_progress(true);
    let handle = caller.call_with::<_, u64>("faults.amo", &at_most_once, (1u64,)).expect("call");
    assert_eq!(gate.started.recv_timeout(PATIENCE).expect("the task starts"), 1);
    assert_eq!(in_redis(), 0, "an at-most-once task is nowhere in Redis while it runs");
    gate.release.send(()).expect("release");
    let reports: Vec<dingo::Report<u64>> = handle.reports().collect();
    assert!(matches!(reports.first(), Some(dingo::Report::Sent)), "Sent comes first: {reports:?}");
    assert!(matches!(reports.last(), Some(dingo::Report::Success(2))), "Success(2) comes last: {reports:?}");
    assert!(reports[1..reports.len() - 1].iter().all(|r| matches!(r, dingo::Report::Progress(_))), "{reports:?}");

    let mut handle = caller.call::<_, u64>("faults.amo", (2u64,)).expect("call");
    assert_eq!(gate.started.recv_timeout(PATIENCE).expect("the task starts"), 2);
    assert_eq!(in_redis(), 1, "an at-least-once task stays in its worker's processing list while it runs");
    gate.release.send(()).expect("release");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 3);
    wait_until("the task is settled", || in_redis() == 0);
    caller.close().expect("close");
    worker.close().expect("close");
}
