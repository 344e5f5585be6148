//! Connections cut under running apps (through a [`Proxy`]), each asserting that nothing
//! is lost and nothing completes twice: cuts and an outage while tasks run, a report in
//! flight when the caller's listener is partitioned, and the broker's own commands right
//! after a cut (a failing first command after a cut was once a defect).
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use dingo::redis::RedisBroker;
use dingo::{App, EventKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{Gate, Seen, lock, server_addr, via, wait_until};
use dingo_test_support::proxy::Proxy;
use dingo_test_support::redis::{Redis, held, redis_cli};

/// Runs per argument of `cut_echo` (distinct per call).
static CUT_RUNS: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

#[dingo::task(name = "faults.cut_echo")]
fn cut_echo(n: u64, millis: u64) -> u64 {
    *lock(&CUT_RUNS).entry(n).or_default() += 1;
    std::thread::sleep(Duration::from_millis(millis));
    n * 3 + 1
}

fn cut_echo_started() -> usize {
    lock(&CUT_RUNS).len()
}

/// Resolves handles of `cut_echo(n, _)` to `n * 3 + 1`, or fails naming the call.
fn expect_cut_echoes(handles: Vec<(u64, dingo::Handle<u64>)>) {
    for (n, mut handle) in handles {
        let got = handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n} got no result: {e:?}"));
        assert_eq!(got, n * 3 + 1, "call {n}");
    }
}

/// A caller and a worker, each with its own broker and its own proxy to Redis; 300 calls in
/// three waves. The worker's connections are cut three times while tasks run and fetches,
/// renewals and reports are in flight; then both sides go through an outage of a second
/// (connections dropped, reconnections refused) with 100 calls waiting. (The caller's side
/// is cut only while no report is on its way to it: a report in flight is lost, see
/// `a_report_in_flight_survives_a_partition`.) Every call gets its own exact result, every
/// run's report is stored once or rejected, any extra run is accounted for by an expired
/// lease, and both apps report the lost and restored connections.
#[test]
fn connection_cuts_and_an_outage_lose_nothing() {
    let Some(setup) = Redis::setup() else { return };
    let worker_proxy = Proxy::start(server_addr(setup.url())).expect("start the worker's proxy");
    let caller_proxy = Proxy::start(server_addr(setup.url())).expect("start the caller's proxy");
    let connect = |proxy: &Proxy| {
        RedisBroker::connect_with(&via(proxy, setup.url()), setup.options().clone()).expect("connect via the proxy")
    };
    let worker_broker = connect(&worker_proxy);
    let caller_broker = connect(&caller_proxy);
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut worker_events = Seen::watch(&worker);
    let mut caller_events = Seen::watch(&caller);
    worker.allocate(cut_echo, 4).expect("allocate");
    let call = |range: std::ops::Range<u64>| -> Vec<(u64, dingo::Handle<u64>)> {
        range.map(|n| (n, cut_echo::call(&caller, n, 10).expect("call"))).collect()
    };

    // Waves 1 and 2, the worker cut off twice while it works.
    let mut handles = call(0..100);
    wait_until("50 tasks started", || cut_echo_started() >= 50);
    let cut = worker_proxy.cut();
    assert!(cut >= 3, "the worker's connections go through the proxy (cut {cut})");
    handles.extend(call(100..200));
    wait_until("120 tasks started", || cut_echo_started() >= 120);
    worker_proxy.cut();
    expect_cut_echoes(handles);

    // The outage: the worker goes first (so no report is on its way to the caller), wave 3
    // is written, then the caller goes too.
    worker_proxy.pause();
    let handles = call(200..300);
    wait_until("wave 3 is written", || caller_broker.stats().sent == 300);
    assert!(caller_proxy.cut() >= 2, "the caller's connections go through its proxy");
    caller_proxy.pause();
    std::thread::sleep(Duration::from_secs(1)); // the outage's length, not an assertion
    caller_proxy.resume();
    worker_proxy.resume();
    wait_until("250 tasks started", || cut_echo_started() >= 250);
    worker_proxy.cut();
    expect_cut_echoes(handles);

    let runs = lock(&CUT_RUNS).clone();
    assert_eq!(runs.keys().copied().collect::<Vec<_>>(), (0..300).collect::<Vec<_>>(), "every task ran");
    let executions: u64 = runs.values().map(|&r| u64::from(r)).sum();
    let twice: Vec<u64> = runs.iter().filter(|(_, r)| **r > 1).map(|(n, _)| *n).collect();
    eprintln!(
        "cuts: {} task(s) ran more than once {twice:?}; {} lease(s) expired and were requeued; {} report(s) \
         rejected; the worker's proxy accepted {} and refused {} connection(s), the caller's {} and {}",
        twice.len(),
        worker_broker.stats().requeued_expired,
        worker_broker.stats().rejected_reports,
        worker_proxy.accepted(),
        worker_proxy.refused(),
        caller_proxy.accepted(),
        caller_proxy.refused(),
    );
    // At least once: a task runs again only after its lease expired and it was requeued.
    assert!(
        twice.len() as u64 <= worker_broker.stats().requeued_expired,
        "{} task(s) ran twice but only {} lease(s) expired: {twice:?}",
        twice.len(),
        worker_broker.stats().requeued_expired
    );
    // Every run's final report was stored or rejected (fencing, or a retried batch), none
    // lost in between, and at most one stored per call.
    wait_until("every run's report is stored or rejected", || {
        worker_broker.stats().completed + worker_broker.stats().rejected_reports == executions
    });
    assert!(
        worker_broker.stats().completed <= 300,
        "at most one stored result per call: {}",
        worker_broker.stats().completed
    );
    // On a fresh connection: see `broker_commands_work_after_a_connection_cut` for the
    // broker's own command connection after a cut.
    assert_eq!(setup.broker().queue_len(cut_echo::NAME).expect("queue length"), 0);
    assert_eq!(held(setup.url(), &setup.options().namespace, cut_echo::NAME), 0);

    for (who, events) in [("worker", &mut worker_events), ("caller", &mut caller_events)] {
        events.wait_for(EventKind::ConnectionLost);
        events.wait_for(EventKind::ConnectionRestored);
        eprintln!(
            "cuts: the {who} saw {} ConnectionLost and {} ConnectionRestored event(s)",
            events.count(EventKind::ConnectionLost),
            events.count(EventKind::ConnectionRestored)
        );
    }
    assert!(worker_proxy.refused() >= 1, "the worker tried to reconnect during the outage");
    assert!(caller_proxy.refused() >= 1, "the caller tried to reconnect during the outage");
    caller.close().expect("close the caller");
    worker.close().expect("close the worker");
}

/// The notify lists of a namespace that exist now (a token waits in one while its reply
/// list has reports nobody has read).
fn notify_lists(url: &str, namespace: &str) -> String {
    redis_cli(url, &["--scan", "--pattern", &format!("{namespace}:*:notify:*")])
}

/// The connection of the caller's report listener breaks after Redis handed it a report
/// (a partition, then the connection given up): the report still reaches its handle.
#[test]
fn a_report_in_flight_survives_a_partition() {
    let Some(setup) = Redis::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    // The listener's wait lasts long on the server, so it is surely waiting there when the
    // report comes.
    let options = setup.options().clone().block_timeout(Duration::from_secs(10));
    let caller = App::builder()
        .broker(RedisBroker::connect_with(&via(&proxy, setup.url()), options).expect("connect via the proxy"))
        .build()
        .expect("caller app");
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let gate = Gate::register(&worker, "faults.gate");
    worker.allocate("faults.gate", 1).expect("allocate");

    let mut handle = caller.call::<_, u64>("faults.gate", (5u64,)).expect("call");
    assert_eq!(gate.started.recv_timeout(PATIENCE).expect("the task starts"), 5);
    proxy.partition();
    gate.release.send(()).expect("release the task");
    let namespace = &setup.options().namespace;
    wait_until("the report is stored and the listener's wait ended with it", || {
        worker_broker.stats().completed == 1 && notify_lists(setup.url(), namespace).is_empty()
    });
    proxy.resume();
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the report after the partition"), 6);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// A connection cut costs no error once Redis answers again: the broker's own commands
/// (queue length, dead letters), declaring a task, and calling a task by a name only the
/// worker knows all work on the first try after a cut.
#[test]
fn broker_commands_work_after_a_connection_cut() {
    let Some(setup) = Redis::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let broker = RedisBroker::connect_with(&via(&proxy, setup.url()), setup.options().clone()).expect("connect");
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker.register("faults.by_name", |n: i64| n * 10).expect("register");
    worker.allocate("faults.by_name", 1).expect("allocate");
    let caller = App::builder().broker(broker.clone()).build().expect("caller app");

    proxy.cut();
    assert_eq!(broker.queue_len("faults.by_name").expect("queue length after a cut"), 0);
    proxy.cut();
    assert!(broker.dead_letters("faults.by_name").expect("dead letters after a cut").is_empty());
    proxy.cut();
    caller.register("faults.declared_late", |n: i64| n).expect("register after a cut");
    proxy.cut();
    let mut handle = caller.call::<_, i64>("faults.by_name", 4i64).expect("call by name after a cut");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 40);
    caller.close().expect("close");
    worker.close().expect("close");
}
