//! Redis goes away (connections dropped, reconnections refused, through a [`Proxy`]) while
//! tasks run: closing the apps does not hang, and what a stopped worker could not settle
//! runs again once Redis is back.
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use dingo::redis::RedisBroker;
use dingo::{App, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{close_promptly, lock, server_addr, via, wait_until};
use dingo_test_support::proxy::Proxy;
use dingo_test_support::redis::{Redis, held};

/// Runs per argument of `nap`.
static NAP_RUNS: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

#[dingo::task(name = "faults.nap")]
fn nap(n: u64, millis: u64) -> u64 {
    *lock(&NAP_RUNS).entry(n).or_default() += 1;
    std::thread::sleep(Duration::from_millis(millis));
    n * 3 + 1
}

/// Redis goes away (connections dropped, reconnections refused) while a task runs, so its
/// report cannot be stored: closing the worker and the caller returns within seconds
/// instead of waiting for Redis to come back, and the waiting call fails with `Shutdown`
/// (its task stays in the worker's processing list, to run again once its lease expires).
#[test]
fn closing_during_an_outage_does_not_hang() {
    let Some(setup) = Redis::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let options = setup.options().clone().command_timeout(Duration::from_secs(1));
    let connect = || RedisBroker::connect_with(&via(&proxy, setup.url()), options.clone()).expect("connect");
    let worker = App::builder().broker(connect()).shutdown_grace(Duration::from_secs(1)).build().expect("worker");
    let caller = App::builder().broker(connect()).build().expect("caller app");
    worker.allocate(nap, 1).expect("allocate");
    assert_eq!(nap::call(&caller, 9_000, 0).expect("call").wait_timeout(PATIENCE).expect("works"), 27_001);
    let waiting = nap::call(&caller, 9_001, 500).expect("call");
    wait_until("the task runs", || lock(&NAP_RUNS).contains_key(&9_001));
    proxy.pause();
    std::thread::sleep(Duration::from_millis(700)); // the task finishes; its report has nowhere to go
    close_promptly(&caller, &worker);
    let error = waiting.wait().expect_err("no result can come");
    assert_eq!(error.task_kind(), Some(TaskErrorKind::Shutdown), "{error:?}");
    proxy.resume();
}

/// The same with a finished task's settlement waiting to be stored when Redis goes away
/// (two tasks fetched together; the first ends during the outage, and its worker keeps
/// retrying to store it before it starts the second): closing still returns within
/// seconds — the retries give up once the worker stops, its tasks left to run again after
/// their lease.
#[test]
fn closing_during_an_outage_with_settlements_pending_does_not_hang() {
    let Some(setup) = Redis::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let options = setup.options().clone().command_timeout(Duration::from_secs(1));
    let connect = || RedisBroker::connect_with(&via(&proxy, setup.url()), options.clone()).expect("connect");
    let worker = App::builder().broker(connect()).shutdown_grace(Duration::from_secs(2)).build().expect("worker");
    let caller = App::builder().broker(connect()).build().expect("caller app");
    // Both queued before the worker starts: one fetch takes the two.
    let first = nap::call(&caller, 9_100, 300).expect("call");
    let second = nap::call(&caller, 9_101, 0).expect("call");
    wait_until("both are queued", || setup.broker().queue_len(nap::NAME).expect("queue length") == 2);
    worker.allocate(nap, 1).expect("allocate");
    wait_until("the first task runs", || lock(&NAP_RUNS).contains_key(&9_100));
    proxy.pause();
    std::thread::sleep(Duration::from_millis(600)); // it ends; its settlement cannot be stored
    close_promptly(&caller, &worker); // the worker's retries give up
    drop((first, second));
    proxy.resume();
}

/// What a worker stopped during an outage could not settle is not lost: once Redis is back
/// and the worker's lease expired, another worker runs those tasks and their callers get
/// their results — including the task that had finished but whose settlement was given up
/// (its consumer is abandoned, so no later settlement removes another task's message).
#[test]
fn tasks_a_worker_could_not_settle_at_stop_run_again() {
    let Some(setup) = Redis::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let options = setup.options().clone().command_timeout(Duration::from_secs(1)).lease(Duration::from_secs(1));
    let worker_broker =
        RedisBroker::connect_with(&via(&proxy, setup.url()), options.clone()).expect("connect via the proxy");
    let worker = App::builder().broker(worker_broker).shutdown_grace(Duration::from_secs(2)).build().expect("worker");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    // Both queued before the worker starts: one fetch takes the two.
    let mut first = nap::call(&caller, 9_200, 300).expect("call");
    let mut second = nap::call(&caller, 9_201, 0).expect("call");
    wait_until("both are queued", || setup.broker().queue_len(nap::NAME).expect("queue length") == 2);
    worker.allocate(nap, 1).expect("allocate");
    wait_until("the first task runs", || lock(&NAP_RUNS).contains_key(&9_200));
    proxy.pause();
    std::thread::sleep(Duration::from_millis(600)); // it ends; its settlement cannot be stored
    worker.close().expect("close the worker");
    proxy.resume();
    let rescuer = App::builder().broker(setup.broker()).build().expect("a second worker");
    rescuer.allocate(nap, 1).expect("allocate");
    assert_eq!(first.wait_timeout(PATIENCE).expect("the first call's result"), 9_200 * 3 + 1);
    assert_eq!(second.wait_timeout(PATIENCE).expect("the second call's result"), 9_201 * 3 + 1);
    assert_eq!(lock(&NAP_RUNS).get(&9_200), Some(&2), "the first task ran again");
    let namespace = &setup.options().namespace;
    wait_until("nothing is held", || held(setup.url(), namespace, nap::NAME) == 0);
    rescuer.close().expect("close");
    caller.close().expect("close");
}
