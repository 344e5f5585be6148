//! Faults on the RabbitMQ broker, each asserting that nothing is lost: connections cut and
//! an outage (through a [`Proxy`]), the connection closed by the server
//! (`rabbitmqctl close_connection`), and garbage in a queue.
#![cfg(feature = "amqp")]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use dingo::amqp::AmqpBroker;
use dingo::broker::Admin as _;
use dingo::{App, EventKind, Level, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::amqp::Amqp;
use dingo_test_support::faults::{Seen, close_promptly, crafted, failure, lock, server_addr, via, wait_until, watch};
use dingo_test_support::proxy::Proxy;

/// A broker of `setup` whose connection goes through `proxy` (its queues deleted with the
/// setup's).
fn through(setup: &Amqp, proxy: &Proxy) -> AmqpBroker {
    let broker =
        AmqpBroker::connect_with(&via(proxy, setup.url()), setup.options().clone()).expect("connect via the proxy");
    setup.adopt(broker.clone());
    broker
}

/// Runs per argument of `cut_echo` (distinct per call).
static CUT_RUNS: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

#[dingo::task(name = "amqp_faults.cut_echo")]
fn cut_echo(n: u64, millis: u64) -> u64 {
    *lock(&CUT_RUNS).entry(n).or_default() += 1;
    std::thread::sleep(Duration::from_millis(millis));
    n * 3 + 1
}

fn cut_echo_started(from: u64, to: u64) -> usize {
    lock(&CUT_RUNS).range(from..to).count()
}

/// Resolves handles of `cut_echo(n, _)` to `n * 3 + 1`, or fails naming the call.
fn expect_cut_echoes(handles: Vec<(u64, dingo::Handle<u64>)>) {
    for (n, mut handle) in handles {
        let got = handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n} got no result: {e:?}"));
        assert_eq!(got, n * 3 + 1, "call {n}");
    }
}

/// A caller and a worker, each with its own broker and its own proxy to RabbitMQ; 300
/// calls in three waves. The worker's connection is cut twice while tasks run, reports are
/// published and acknowledgements are on their way, the caller's once while reports come
/// in; then both sides go through an outage of a second (connections dropped, reconnections
/// refused) with 100 calls waiting. Every call gets its own exact result; a task runs again
/// only when RabbitMQ redelivered it or a message was published again after a cut; both
/// apps report the lost and restored connections.
#[test]
fn connection_cuts_and_an_outage_lose_nothing() {
    let Some(setup) = Amqp::setup() else { return };
    let worker_proxy = Proxy::start(server_addr(setup.url())).expect("start the worker's proxy");
    let caller_proxy = Proxy::start(server_addr(setup.url())).expect("start the caller's proxy");
    let connect = |proxy: &Proxy| through(&setup, proxy);
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

    // Waves 1 and 2: the worker cut off twice while it works, the caller once.
    let mut handles = call(0..100);
    wait_until("50 tasks started", || cut_echo_started(0, 100) >= 50);
    assert!(worker_proxy.cut() >= 1, "the worker's connection goes through the proxy");
    handles.extend(call(100..200));
    wait_until("120 tasks started", || cut_echo_started(0, 200) >= 120);
    worker_proxy.cut();
    wait_until("150 tasks started", || cut_echo_started(0, 200) >= 150);
    assert!(caller_proxy.cut() >= 1, "the caller's connection goes through its proxy");
    expect_cut_echoes(handles);

    // The outage, with wave 3 waiting to be sent.
    worker_proxy.pause();
    caller_proxy.pause();
    let handles = call(200..300);
    std::thread::sleep(Duration::from_secs(1)); // the outage's length, not an assertion
    caller_proxy.resume();
    worker_proxy.resume();
    expect_cut_echoes(handles);

    let runs = lock(&CUT_RUNS).clone();
    assert_eq!(runs.keys().copied().collect::<Vec<_>>(), (0..300).collect::<Vec<_>>(), "every task ran");
    let twice: Vec<u64> = runs.iter().filter(|(_, r)| **r > 1).map(|(n, _)| *n).collect();
    let (redelivered, republished) = (worker_broker.stats().redelivered, caller_broker.stats().republished);
    eprintln!(
        "cuts: {} task(s) ran more than once {twice:?}; {redelivered} redelivered; {republished} task message(s) \
         published again; the worker's proxy accepted {} and refused {} connection(s), the caller's {} and {}",
        twice.len(),
        worker_proxy.accepted(),
        worker_proxy.refused(),
        caller_proxy.accepted(),
        caller_proxy.refused(),
    );
    // At least once: a task runs again only when it came twice.
    assert!(
        twice.len() as u64 <= redelivered + republished,
        "{} task(s) ran twice, but only {redelivered} were redelivered and {republished} published again",
        twice.len()
    );
    assert_eq!(setup.broker().queue_len(cut_echo::NAME).expect("queue length"), 0);
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

#[dingo::task(name = "amqp_faults.triple")]
fn triple(n: u64) -> u64 {
    n * 3
}

/// `rabbitmqctl list_connections`: the pids of the connections whose client properties
/// mention `namespace` (dingo names its namespace there).
fn connections_of(namespace: &str) -> Vec<String> {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl must be installed for this test");
    assert!(out.status.success(), "rabbitmqctl list_connections failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(namespace))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// RabbitMQ closes the connections of a worker app and a caller app (as an operator or a
/// failing node would): both reconnect, declare again, consume again, and the calls made
/// before and after the close all get their results.
#[test]
fn connections_closed_by_the_server_are_reopened() {
    let Some(setup) = Amqp::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let mut events = Seen::watch(&worker);
    worker.allocate(triple, 2).expect("allocate");
    assert_eq!(triple::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 3);

    let namespace = &setup.options().namespace;
    let pids = connections_of(namespace);
    // The worker's broker has two (its tasks', and the cancel stream's), the caller's one.
    assert_eq!(pids.len(), 3, "the connections of both brokers: {pids:?}");
    for pid in &pids {
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by the dingo fault test"])
            .status()
            .expect("rabbitmqctl close_connection");
        assert!(status.success(), "rabbitmqctl close_connection {pid} failed");
    }
    events.wait_for(EventKind::ConnectionLost);
    let handles: Vec<_> = (0..50u64).map(|n| (n, triple::call(&caller, n).expect("call"))).collect();
    for (n, mut handle) in handles {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("result after the close"), n * 3, "call {n}");
    }
    events.wait_for(EventKind::ConnectionRestored);
    wait_until("both apps are connected again", || connections_of(namespace).len() == 3);
    caller.close().expect("close");
    worker.close().expect("close");
}

#[dingo::task(name = "amqp_faults.plus")]
fn plus(n: i64) -> i64 {
    n + 1
}

/// Four bad messages published straight into a queue: bytes that do not decode, a message
/// cut short (its caller can be identified), one with another signature, and one naming a
/// task the worker does not have. Each goes to the dead letters with its reason (and its
/// bytes as queued) and an event; callers that can be identified get a failure of the right
/// kind; the worker's single thread goes on serving; the queue is left empty.
#[test]
fn garbage_in_a_queue_is_dead_lettered_and_the_worker_goes_on() {
    let Some(setup) = Amqp::setup() else { return };
    let worker_broker = setup.broker();
    let caller_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut events = Seen::watch(&worker);
    worker.allocate(plus, 1).expect("allocate");
    assert_eq!(plus::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 2);

    // Not a dingo message at all.
    let garbage = b"\xff\x00 definitely not a task message".to_vec();
    worker_broker.publish_raw(plus::NAME, garbage.clone()).expect("publish garbage");
    let event = events.wait_for(EventKind::MalformedMessage);
    assert_eq!(event.level, Level::Error);
    assert!(event.message.contains("undecodable"), "{}", event.message);

    // A message cut short after its name, id and reply address: its caller is told.
    let (reply_to, cut_inbox) = watch(&caller_broker, plus::NAME, "cut-1");
    let whole = crafted(&caller, plus::NAME, "cut-1", <plus as dingo::Task>::fingerprint(), reply_to);
    let cut_short = whole[..whole.len() - 6].to_vec();
    worker_broker.publish_raw(plus::NAME, cut_short.clone()).expect("publish a truncated message");
    let (kind, message) = failure(&cut_inbox);
    assert_eq!(kind, TaskErrorKind::BadPayload, "{message}");

    // Another signature: decodes, but must not run.
    let (reply_to, sig_inbox) = watch(&caller_broker, plus::NAME, "sig-1");
    let wrong_signature = crafted(&caller, plus::NAME, "sig-1", 0x0bad_5eed_0bad_5eed, reply_to);
    worker_broker.publish_raw(plus::NAME, wrong_signature.clone()).expect("publish a wrong signature");
    let (kind, message) = failure(&sig_inbox);
    assert_eq!(kind, TaskErrorKind::SignatureMismatch, "{message}");
    events.wait_for(EventKind::SignatureMismatch);

    // A task nobody serves, in this queue.
    let (reply_to, ghost_inbox) = watch(&caller_broker, "amqp_faults.ghost", "ghost-1");
    let ghost = crafted(&caller, "amqp_faults.ghost", "ghost-1", <plus as dingo::Task>::fingerprint(), reply_to);
    worker_broker.publish_raw(plus::NAME, ghost.clone()).expect("publish an unknown task");
    let (kind, message) = failure(&ghost_inbox);
    assert_eq!(kind, TaskErrorKind::UnknownTask, "{message}");
    events.wait_for(EventKind::UnknownTask);

    // The worker's one thread still serves.
    for n in [41, 99] {
        assert_eq!(plus::call(&caller, n).expect("call").wait_timeout(PATIENCE).expect("works"), n + 1);
    }

    wait_until("four dead letters", || worker_broker.stats().dead_lettered == 4);
    let dead = worker_broker.dead_letters(&dingo::TaskName::from(plus::NAME), usize::MAX).expect("dead letters");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(dead.len(), 4, "{reasons:#?}");
    // Oldest first, each as it was queued.
    assert!(reasons[0].starts_with("undecodable message"), "{reasons:#?}");
    assert!(reasons[1].starts_with("undecodable message"), "{reasons:#?}");
    assert!(reasons[2].starts_with("signature mismatch"), "{reasons:#?}");
    assert!(reasons[3].starts_with("unknown task"), "{reasons:#?}");
    let bytes: Vec<&[u8]> = dead.iter().map(|d| d.bytes.as_slice()).collect();
    assert_eq!(bytes, [&garbage[..], &cut_short[..], &wrong_signature[..], &ghost[..]]);
    assert_eq!(events.count(EventKind::MalformedMessage), 2);
    // One `DeadLettered` per dead letter, whatever the cause, in order, naming the calls known.
    wait_until("a DeadLettered event per dead letter", || events.count(EventKind::DeadLettered) == 4);
    let dead_events = events.of_kind(EventKind::DeadLettered);
    let calls: Vec<Option<&str>> = dead_events.iter().map(|e| e.task.as_ref().map(|k| k.id.as_str())).collect();
    assert_eq!(calls, [None, Some("cut-1"), Some("sig-1"), Some("ghost-1")], "{dead_events:#?}");
    for inbox in [&cut_inbox, &sig_inbox, &ghost_inbox] {
        assert_eq!(inbox.other.load(std::sync::atomic::Ordering::SeqCst), 0, "only the failure report");
    }
    // Reading the dead letters leaves them there.
    assert_eq!(
        worker_broker.dead_letters(&dingo::TaskName::from(plus::NAME), usize::MAX).expect("dead letters again").len(),
        4
    );
    assert_eq!(worker_broker.queue_len(plus::NAME).expect("queue length"), 0);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// A task message RabbitMQ cannot route (its queue was deleted behind the caller's back,
/// after the caller learnt it existed) comes back as a return: the call fails with
/// `UnknownTask` instead of waiting forever — at least once (confirmed) and at most once
/// (published without confirms) — and the next call, once the queue is declared again,
/// works.
#[test]
fn a_task_whose_queue_is_gone_fails_its_call() {
    let Some(setup) = Amqp::setup() else { return };
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker.allocate(triple, 1).expect("allocate");
    assert_eq!(triple::call(&caller, 2).expect("call").wait_timeout(PATIENCE).expect("works"), 6);
    worker.close().expect("close the worker");
    // Deleted by another client: the caller's broker still believes the queue is there.
    setup.broker().delete_topology(&[triple::NAME.to_owned()], &[]).expect("delete the queue");
    let failures: Vec<TaskErrorKind> = (0..20u64)
        .map(|n| triple::call(&caller, n).expect("call"))
        .map(|mut handle| {
            handle.wait_timeout(PATIENCE).expect_err("no queue serves it").task_kind().expect("a task error")
        })
        .collect();
    assert!(failures.iter().all(|kind| *kind == TaskErrorKind::UnknownTask), "{failures:?}");
    assert_eq!(caller_broker.stats().returned, 20);
    // At most once, published without confirms: the return alone fails the call.
    let at_most_once = dingo::CallOptions::new().at_most_once(true);
    let failures: Vec<TaskErrorKind> = (0..5u64)
        .map(|n| triple::call_with(&caller, &at_most_once, n).expect("call"))
        .map(|mut handle| {
            handle.wait_timeout(PATIENCE).expect_err("no queue serves it").task_kind().expect("a task error")
        })
        .collect();
    assert_eq!(failures, [TaskErrorKind::UnknownTask; 5]);
    assert_eq!(caller_broker.stats().returned, 25);
    let worker = App::builder().broker(setup.broker()).build().expect("a new worker app");
    worker.allocate(triple, 1).expect("allocate declares the queue again");
    assert_eq!(triple::call(&caller, 5).expect("call").wait_timeout(PATIENCE).expect("works again"), 15);
    worker.close().expect("close");
    caller.close().expect("close");
}

/// RabbitMQ goes away (connections dropped, reconnections refused) under a caller app and a
/// worker app, one call waiting: closing both apps returns within the settle grace instead
/// of waiting for RabbitMQ to come back, and the waiting call fails with `Shutdown`.
#[test]
fn closing_during_an_outage_does_not_hang() {
    let Some(setup) =
        Amqp::with_options(dingo::amqp::AmqpOptions::new().durable(false).settle_grace(Duration::from_millis(500)))
    else {
        return;
    };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let connect = || through(&setup, &proxy);
    let worker = App::builder().broker(connect()).shutdown_grace(Duration::from_secs(1)).build().expect("worker");
    let caller = App::builder().broker(connect()).build().expect("caller app");
    worker.allocate(triple, 1).expect("allocate");
    assert_eq!(triple::call(&caller, 3).expect("call").wait_timeout(PATIENCE).expect("works"), 9);
    proxy.pause();
    let waiting = triple::call(&caller, 4).expect("the call is queued while RabbitMQ is away");
    close_promptly(&caller, &worker);
    let error = waiting.wait().expect_err("no result can come");
    assert_eq!(error.task_kind(), Some(TaskErrorKind::Shutdown), "{error:?}");
    proxy.resume();
}

/// The network to RabbitMQ goes silent (connections stay open, nothing gets through, new
/// ones hang in their handshake) under a caller app and a worker app: heartbeats find the
/// dead connections, and closing both apps returns within seconds instead of hanging on a
/// connection that will never answer.
#[test]
fn closing_during_a_partition_does_not_hang() {
    let options = dingo::amqp::AmqpOptions::new()
        .durable(false)
        .heartbeat(Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(1))
        .settle_grace(Duration::from_millis(500));
    let Some(setup) = Amqp::with_options(options) else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let connect = || through(&setup, &proxy);
    let worker = App::builder().broker(connect()).shutdown_grace(Duration::from_secs(1)).build().expect("worker");
    let caller = App::builder().broker(connect()).build().expect("caller app");
    let mut events = Seen::watch(&caller);
    worker.allocate(triple, 1).expect("allocate");
    assert_eq!(triple::call(&caller, 3).expect("call").wait_timeout(PATIENCE).expect("works"), 9);
    proxy.partition();
    let waiting = triple::call(&caller, 4).expect("the call is queued");
    events.wait_for(EventKind::ConnectionLost);
    close_promptly(&caller, &worker);
    assert_eq!(waiting.wait().expect_err("no result can come").task_kind(), Some(TaskErrorKind::Shutdown));
    proxy.resume();
}

/// Sleeps, then returns its input.
#[dingo::task(name = "amqp_faults.nap")]
fn nap(n: u64, millis: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    n
}

/// A pool of one thread (no hand-backs: `hand_back_after(None)`) runs a task of a second
/// while 20 more wait in its prefetch, and is closed: it finishes the long one and gives the
/// 20 back unstarted. A second worker whose `max_redeliveries` is 0 (a redelivery it counted
/// would send the task straight to the dead letters) runs them all: none arrives marked
/// redelivered, none is dead-lettered, each call resolves to its own value.
#[test]
fn a_graceful_stop_gives_prefetched_tasks_back_uncounted() {
    let Some(setup) = Amqp::setup() else { return };
    let options = setup.options().clone();
    let first = AmqpBroker::connect_with(setup.url(), options.clone().hand_back_after(None)).expect("connect");
    setup.adopt(first.clone());
    let worker = App::builder().broker(first.clone()).build().expect("worker app");
    worker.allocate(nap::NAME, 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let mut long = nap::call(&caller, 0, 1000).expect("call");
    let waiting: Vec<_> = (1..=20).map(|n| (n, nap::call(&caller, n, 1).expect("call"))).collect();
    wait_until("the worker runs the long task with the others in its prefetch", || {
        first.stats().fetched == 1 && first.queue_len(nap::NAME).expect("queue length") == 0
    });
    worker.close().expect("close the first worker");
    assert_eq!(long.wait_timeout(PATIENCE).expect("the long task's result"), 0);

    let second = AmqpBroker::connect_with(setup.url(), options.max_redeliveries(0)).expect("connect");
    setup.adopt(second.clone());
    let worker = App::builder().broker(second.clone()).build().expect("worker app");
    worker.allocate(nap::NAME, 2).expect("allocate");
    for (n, mut handle) in waiting {
        assert_eq!(handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n}: {e:?}")), n);
    }
    assert_eq!(second.stats().fetched, 20);
    assert_eq!(second.stats().redelivered, 0);
    assert!(second.dead_letters(&dingo::TaskName::from(nap::NAME), usize::MAX).expect("dead letters").is_empty());
    // (Each hand-back is counted once its copy is confirmed and the original acknowledged;
    // in about one run in ten under load a few are not counted although every assertion
    // above holds — not investigated yet, see the closing note of 2026-12-02.)
    assert!(first.stats().requeued > 0, "the prefetched tasks were handed back");
    assert_eq!(first.stats().dead_lettered, 0);
    worker.close().expect("close");
    caller.close().expect("close");
}
