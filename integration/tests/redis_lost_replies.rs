//! Commands lost, muted or delayed on their way (through a [`Proxy`]): the reply to a send,
//! a fetch or a completion lost on its way back, a send lost or delayed on its way to Redis.
//! Each reproduces, deterministically, a defect these faults once uncovered (duplicated sends
//! and completions on retry, a task left in a processing list): every call runs once.
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dingo::redis::RedisBroker;
use dingo::{App, Event, EventFilter, EventKind, Level};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{Gate, lock, server_addr, via, wait_until};
use dingo_test_support::proxy::Proxy;
use dingo_test_support::redis::{Redis, command_stats, held};

/// A caller whose task messages go through a proxy (command timeout 1 s) and whose
/// reports come straight from Redis, so only the send is disturbed; a worker that counts
/// the runs of `task` per argument. The sender's first batch (argument 0) is acknowledged
/// before the test disturbs anything (a result can come back before the send's own reply).
struct SendFault {
    setup: Redis,
    proxy: Proxy,
    sender: RedisBroker,
    caller: App,
    worker: App,
    task: &'static str,
    runs: Arc<Mutex<BTreeMap<u64, u32>>>,
}

impl SendFault {
    fn start(task: &'static str) -> Option<SendFault> {
        Some(SendFault::start_on(Redis::setup()?, task))
    }

    fn start_on(setup: Redis, task: &'static str) -> SendFault {
        let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
        let options = setup.options().clone().command_timeout(Duration::from_secs(1));
        let sender = RedisBroker::connect_with(&via(&proxy, setup.url()), options).expect("connect via the proxy");
        let caller = App::builder().tasks(sender.clone()).reports(setup.broker()).build().expect("caller app");
        let worker = App::builder().broker(setup.broker()).build().expect("worker app");
        let runs: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
        let counted = runs.clone();
        worker
            .register(task, move |(n,): (u64,)| {
                *lock(&counted).entry(n).or_default() += 1;
                n
            })
            .expect("register");
        worker.allocate(task, 1).expect("allocate");
        let fault = SendFault { setup, proxy, sender, caller, worker, task, runs };
        assert_eq!(fault.call(0).wait_timeout(PATIENCE).expect("the first call"), 0);
        wait_until("the first send is acknowledged", || fault.sent() == 1);
        fault
    }

    fn call(&self, n: u64) -> dingo::Handle<u64> {
        self.caller.call::<_, u64>(self.task, (n,)).expect("call")
    }

    fn sent(&self) -> u64 {
        self.sender.stats().sent
    }

    /// Waits until the queue is empty and nothing is held, then checks that each of the
    /// arguments `0..=last` ran once, and closes the apps; the setup stays for a look.
    fn ran_once(self, last: u64) -> Redis {
        let namespace = &self.setup.options().namespace;
        wait_until("the queue is drained", || {
            self.setup.broker().queue_len(self.task).expect("queue length") == 0
                && held(self.setup.admin_url(), namespace, self.task) == 0
        });
        let expected: BTreeMap<u64, u32> = (0..=last).map(|n| (n, 1)).collect();
        assert_eq!(*lock(&self.runs), expected, "each call ran once");
        self.caller.close().expect("close");
        self.worker.close().expect("close");
        self.setup
    }
}

/// The reply to a batch of task messages is lost on its way back (the messages were
/// queued): the caller's retry must not queue them again, so each call runs once.
#[test]
fn a_lost_reply_to_a_send_does_not_run_the_call_twice() {
    let Some(fault) = SendFault::start("faults.once") else { return };
    fault.proxy.mute();
    assert_eq!(fault.call(1).wait_timeout(PATIENCE).expect("the call ran"), 1);
    fault.proxy.resume();
    wait_until("the sender's retry went through", || fault.sent() == 2);
    fault.ran_once(1);
}

/// A batch of task messages is lost on its way to Redis (never applied): the sender's
/// retry must queue it — as numbered scripts now, not the transaction it was written as —
/// and each call runs once. A retry that dropped the batch would leave the calls waiting.
#[test]
fn a_send_lost_on_its_way_is_sent_again_and_runs_once() {
    let Some(fault) = SendFault::start("faults.resent") else { return };
    fault.proxy.partition();
    let handles: Vec<_> = (1..=5u64).map(|n| (n, fault.call(n))).collect();
    std::thread::sleep(Duration::from_millis(1500)); // past the sender's command timeout
    let queued = fault.setup.broker().queue_len(fault.task).expect("queue length");
    assert_eq!(queued, 0, "nothing reached redis");
    fault.proxy.resume();
    for (n, mut handle) in handles {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("the call ran"), n);
    }
    wait_until("every send is acknowledged", || fault.sent() == 6);
    std::thread::sleep(Duration::from_millis(300)); // time for a second run, if there were one
    fault.ran_once(5);
}

/// A batch of task messages is delayed on its way to Redis past the sender's timeout, and
/// arrives after the sender reconnected and sent it again: the late copy must not queue it
/// a second time (the sender ends its old connection at the server before sending again),
/// so each call runs once.
#[test]
fn a_late_copy_of_a_send_does_not_queue_it_twice() {
    let Some(fault) = SendFault::start("faults.late") else { return };
    late_copy_runs_once(fault);
}

fn late_copy_runs_once(fault: SendFault) -> Redis {
    fault.proxy.hold();
    assert_eq!(fault.call(1).wait_timeout(PATIENCE).expect("the call ran, sent again"), 1);
    fault.proxy.release(); // the first copy arrives now
    std::thread::sleep(Duration::from_millis(500)); // time for it to run, if it could
    fault.ran_once(1)
}

/// The same, as a user who may not end other connections (`CLIENT KILL`, in `@dangerous`):
/// the sender cannot fence its old connection, so it sends numbered scripts from the start
/// (never a plain transaction, which a late copy would queue twice) — and the server saw
/// its `CLIENT KILL` refused and no `MULTI` at all.
#[test]
fn a_late_copy_of_a_send_does_not_queue_it_twice_without_client_kill() {
    let Some(setup) = Redis::restricted() else { return };
    let setup = late_copy_runs_once(SendFault::start_on(setup, "faults.late_restricted"));
    let stats = command_stats(setup.admin_url());
    let kill = stats.get("client|kill").expect("the sender asked to end connections");
    assert_eq!(kill.calls, 0, "{kill:?}");
    assert!(kill.rejected >= 1, "{kill:?}");
    assert_eq!(stats.get("multi"), None, "no plain transaction was sent");
    assert!(stats.get("evalsha").is_some_and(|evalsha| evalsha.calls >= 2), "the sends were scripts: {stats:?}");
}

/// The reply to an at-most-once message is lost on its way back (the message was queued):
/// the sender must not queue it again — it would run twice — and its caller learns that
/// the message's fate is unknown instead of waiting forever. The queued message still runs,
/// once.
#[test]
fn a_lost_reply_to_an_at_most_once_send_is_not_sent_again() {
    let Some(setup) = Redis::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let options = setup.options().clone().command_timeout(Duration::from_secs(1));
    let sender = RedisBroker::connect_with(&via(&proxy, setup.url()), options).expect("connect via the proxy");
    // Reports through the sender's broker too: it tells the callers it serves itself.
    let caller = App::builder().broker(sender.clone()).build().expect("caller app");
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let runs: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let counted = runs.clone();
    worker
        .register("faults.amo_once", move |(n,): (u64,)| {
            *lock(&counted).entry(n).or_default() += 1;
            n
        })
        .expect("register");
    let at_most_once = dingo::CallOptions::new().at_most_once(true);
    // The sender's connection is up, and its first batch acknowledged, before the replies
    // go missing; no worker runs yet, so nothing answers the calls but the sender.
    let _first = caller.call_with::<_, u64>("faults.amo_once", &at_most_once, (0u64,)).expect("call");
    wait_until("the first send is acknowledged", || sender.stats().sent == 1);

    proxy.mute();
    let mut handle = caller.call_with::<_, u64>("faults.amo_once", &at_most_once, (1u64,)).expect("call");
    std::thread::sleep(Duration::from_millis(1500)); // past the sender's command timeout
    proxy.resume();
    match handle.wait_timeout(PATIENCE) {
        Err(dingo::Error::Task(error)) => {
            assert!(error.message().contains("may or may not have been queued"), "{error:?}")
        }
        other => panic!("the caller must learn the message's fate is unknown, got {other:?}"),
    }
    worker.allocate("faults.amo_once", 1).expect("allocate");
    wait_until("both messages ran", || lock(&runs).len() == 2);
    std::thread::sleep(Duration::from_millis(300)); // time for a second run, if there were one
    assert_eq!(*lock(&runs), BTreeMap::from([(0, 1), (1, 1)]), "each message ran once");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// The reply to a worker's fetch is lost on its way back (the task was moved into the
/// worker's processing list): the retried fetch must hand the worker that same task, not
/// leave it in the processing list where nobody runs it. It runs once and is settled.
#[test]
fn a_lost_reply_to_a_fetch_still_delivers_the_task() {
    let Some(setup) = Redis::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let worker_broker =
        RedisBroker::connect_with(&via(&proxy, setup.url()), setup.options().clone()).expect("connect via the proxy");
    // Tasks fetched through the proxy; reports and calls straight from Redis.
    let worker = App::builder().tasks(worker_broker.clone()).reports(setup.broker()).build().expect("worker app");
    let runs: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let counted = runs.clone();
    worker
        .register("faults.fetched", move |(n,): (u64,)| {
            *lock(&counted).entry(n).or_default() += 1;
            n * 2
        })
        .expect("register");
    worker.allocate("faults.fetched", 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    assert_eq!(caller.call::<_, u64>("faults.fetched", (1u64,)).expect("call").wait_timeout(PATIENCE).expect("ok"), 2);
    let namespace = &setup.options().namespace;
    wait_until("the first task is settled", || held(setup.url(), namespace, "faults.fetched") == 0);

    // The idle worker waits with its fetch pipelined; the reply to that fetch is lost.
    proxy.mute();
    let mut handle = caller.call::<_, u64>("faults.fetched", (2u64,)).expect("call");
    wait_until("the fetch took the task", || held(setup.url(), namespace, "faults.fetched") == 1);
    assert_eq!(worker_broker.stats().fetched, 1, "the worker has not seen the second task");
    proxy.resume();
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the retried fetch delivered the task"), 4);
    wait_until("the task is settled", || held(setup.url(), namespace, "faults.fetched") == 0);
    assert_eq!(*lock(&runs), BTreeMap::from([(1, 1), (2, 1)]), "each call ran once");
    assert_eq!(worker_broker.stats().fetches_replayed, 1, "the lost fetch was answered again");
    assert_eq!(setup.broker().queue_len("faults.fetched").expect("queue length"), 0);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// The reply to a worker's completion is lost on its way back (the report was stored and
/// the lease released): the retry must not count it as a late report rejected by fencing,
/// nor warn that the task was handed to another worker, since it never was.
#[test]
fn a_lost_reply_to_a_completion_is_not_a_rejected_report() {
    let Some(setup) = Redis::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let options = setup.options().clone().command_timeout(Duration::from_secs(1));
    let worker_broker = RedisBroker::connect_with(&via(&proxy, setup.url()), options).expect("connect via the proxy");
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let warnings = worker.events(EventFilter::new().level(Level::Warning));
    let gate = Gate::register(&worker, "faults.gate");
    worker.allocate("faults.gate", 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    // The report writer's connection is up before the replies go missing.
    let mut first = caller.call::<_, u64>("faults.gate", (1u64,)).expect("call");
    assert_eq!(gate.started.recv_timeout(PATIENCE).expect("the task starts"), 1);
    gate.release.send(()).expect("release");
    assert_eq!(first.wait_timeout(PATIENCE).expect("result"), 2);

    let mut handle = caller.call::<_, u64>("faults.gate", (2u64,)).expect("call");
    assert_eq!(gate.started.recv_timeout(PATIENCE).expect("the task starts"), 2);
    proxy.mute();
    gate.release.send(()).expect("release");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the report was stored"), 3);
    proxy.resume();
    wait_until("the completion is settled", || {
        worker_broker.stats().completed + worker_broker.stats().rejected_reports >= 2
    });
    assert_eq!((worker_broker.stats().completed, worker_broker.stats().rejected_reports), (2, 0));
    let rejected: Vec<Event> =
        std::iter::from_fn(|| warnings.try_recv()).filter(|e| e.kind == EventKind::ReportFailed).collect();
    assert!(rejected.is_empty(), "{rejected:#?}");
    caller.close().expect("close");
    worker.close().expect("close");
}
