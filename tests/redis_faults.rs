//! Faults on the Redis broker, each asserting that nothing is lost and nothing completes
//! twice: connections cut and an outage (through a [`Proxy`]), a task outliving its lease
//! while renewing it, a stalled worker fenced out, garbage in a queue, and a Redis server
//! restarted under running apps (a server of the test's own; the shared one is never
//! restarted).
//!
//! Several tests reproduce, deterministically, defects these faults once uncovered (lost dead
//! letter bytes, lease tokens reused after a server restart, reports lost in transit,
//! duplicated sends and completions on retry, a failing first command after a cut).
#![cfg(feature = "redis")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dingo::message::ReplyTo;
use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, Event, EventFilter, EventKind, Level, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{Seen, close_promptly, crafted, failure, lock, server_addr, via, wait_until, watch};
use dingo_test_support::proxy::Proxy;
use dingo_test_support::redis::{Redis, held, redis_cli};
use dingo_test_support::redis_server::Server;

// ---------------------------------------------------------------------------------------
// a. Connections cut, and an outage
// ---------------------------------------------------------------------------------------

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

/// A task that waits for the test to let it finish; returns `n + 1`.
struct Gate {
    started: std::sync::mpsc::Receiver<u64>,
    release: std::sync::mpsc::SyncSender<()>,
}

impl Gate {
    /// Registers `name` on `app` as a gated task.
    fn register(app: &App, name: &str) -> Gate {
        let (started_tx, started) = std::sync::mpsc::sync_channel::<u64>(16);
        let (release, release_rx) = std::sync::mpsc::sync_channel::<()>(16);
        let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
        app.register(name, move |(n,): (u64,)| {
            let _ = lock(&started_tx).send(n);
            let _ = lock(&release_rx).recv_timeout(PATIENCE);
            n + 1
        })
        .expect("register the gated task");
        Gate { started, release }
    }
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

/// Runs per argument of `nap` (the closing tests' own task: `cut_echo`'s runs are counted
/// by a test that checks them all).
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

/// A command's counts in `INFO commandstats`.
#[derive(Debug, PartialEq)]
struct CommandStat {
    calls: u64,
    rejected: u64,
}

/// `INFO commandstats` of the server at `url`, by command (`client|kill`, …).
fn command_stats(url: &str) -> BTreeMap<String, CommandStat> {
    let info = redis_cli(url, &["INFO", "commandstats"]);
    let mut stats = BTreeMap::new();
    for line in info.lines() {
        let Some((command, fields)) = line.strip_prefix("cmdstat_").and_then(|line| line.split_once(':')) else {
            continue;
        };
        let field = |name: &str| {
            fields.split(',').find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.trim().parse::<u64>().ok())
        };
        let stat = CommandStat { calls: field("calls").unwrap_or(0), rejected: field("rejected_calls").unwrap_or(0) };
        stats.insert(command.to_owned(), stat);
    }
    stats
}

/// A least-privilege Redis user (`dingo::redis::acl_rules`: no `@dangerous` command, so
/// neither `CLIENT KILL` nor `SORT`, and no key outside the namespace) still runs tasks, at
/// least once and at most once: sends go as scripts from the start and fetches move tasks
/// through Lua.
#[test]
fn a_user_without_dangerous_commands_still_runs_tasks() {
    let Some(setup) = Redis::restricted() else { return };
    let app = App::builder().broker(setup.broker()).build().expect("app");
    app.register("faults.restricted", |(n,): (u64,)| n * 2).expect("register");
    app.allocate("faults.restricted", 2).expect("allocate");
    let at_most_once = dingo::CallOptions::new().at_most_once(true);
    let handles: Vec<_> = (0..200u64)
        .map(|n| {
            let options = if n % 2 == 0 { dingo::CallOptions::new() } else { at_most_once.clone() };
            (n, app.call_with::<_, u64>("faults.restricted", &options, (n,)).expect("call"))
        })
        .collect();
    for (n, mut handle) in handles {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("the call ran"), n * 2);
    }
    app.close().expect("close");
    let sort = command_stats(setup.admin_url()).remove("sort").expect("fetches tried SORT");
    assert_eq!(sort.calls, 0, "{sort:?}");
    assert!(sort.rejected >= 1, "SORT was refused: {sort:?}");
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

/// Redis refuses a task message (the key of its list holds a string): the call fails at
/// once saying so, instead of waiting for a result — at most once or at least once; with
/// the key fixed, calls work.
#[test]
fn a_refused_send_fails_its_call() {
    let Some(setup) = Redis::setup() else { return };
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker.register("faults.refused", |(n,): (u64,)| n).expect("register");
    let at_most_once = dingo::CallOptions::new().at_most_once(true);
    let at_least_once = dingo::CallOptions::new();
    for (options, list) in [(&at_most_once, "amo"), (&at_least_once, "pending")] {
        let list = format!("{}:{{faults.refused}}:{list}", setup.options().namespace);
        assert_eq!(redis_cli(setup.url(), &["SET", &list, "not a list"]), "OK");
        let mut handle = caller.call_with::<_, u64>("faults.refused", options, (1u64,)).expect("call");
        match handle.wait_timeout(PATIENCE) {
            Err(dingo::Error::Task(error)) => assert!(error.message().contains("refused"), "{list}: {error:?}"),
            other => panic!("the call must fail, refused ({list}), got {other:?}"),
        }
        redis_cli(setup.url(), &["DEL", &list]);
    }
    worker.allocate("faults.refused", 1).expect("allocate");
    for (options, n) in [(&at_most_once, 2u64), (&at_least_once, 3u64)] {
        let mut handle = caller.call_with::<_, u64>("faults.refused", options, (n,)).expect("call");
        assert_eq!(handle.wait_timeout(PATIENCE).expect("works once the key is a list"), n);
    }
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

// ---------------------------------------------------------------------------------------
// b. A task longer than its lease, renewing it
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// c. Fencing
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// d. Garbage in a queue
// ---------------------------------------------------------------------------------------

#[dingo::task(name = "faults.plus")]
fn plus(n: i64) -> i64 {
    n + 1
}

/// Four bad messages pushed straight into a queue: bytes that do not decode, a message cut
/// short (its caller can be identified), one with another signature, and one naming a task
/// the worker does not have. Each goes to the dead letters with its reason and an event;
/// callers that can be identified get a failure of the right kind; the worker's single
/// thread goes on serving.
#[test]
fn garbage_in_a_queue_is_dead_lettered_and_the_worker_goes_on() {
    let Some(setup) = Redis::setup() else { return };
    let worker_broker = setup.broker();
    let caller_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut events = Seen::watch(&worker);
    worker.allocate(plus, 1).expect("allocate");
    assert_eq!(plus::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 2);

    // Not a dingo message at all.
    let garbage = b"\xff\x00 definitely not a task message".to_vec();
    worker_broker.push_raw(plus::NAME, garbage.clone()).expect("push garbage");
    let event = events.wait_for(EventKind::MalformedMessage);
    assert_eq!(event.level, Level::Error);
    assert!(event.message.contains("undecodable"), "{}", event.message);

    // A message cut short after its name, id and reply address: its caller is told.
    let (reply_to, cut_inbox) = watch(&caller_broker, plus::NAME, "cut-1");
    let whole = crafted(&caller, plus::NAME, "cut-1", <plus as dingo::Task>::fingerprint(), reply_to);
    let cut_short = whole[..whole.len() - 6].to_vec();
    worker_broker.push_raw(plus::NAME, cut_short.clone()).expect("push a truncated message");
    let (kind, message) = failure(&cut_inbox);
    assert_eq!(kind, TaskErrorKind::BadPayload, "{message}");

    // Another signature: decodes, but must not run.
    let (reply_to, sig_inbox) = watch(&caller_broker, plus::NAME, "sig-1");
    let wrong_signature = crafted(&caller, plus::NAME, "sig-1", 0x0bad_5eed_0bad_5eed, reply_to);
    worker_broker.push_raw(plus::NAME, wrong_signature.clone()).expect("push a wrong signature");
    let (kind, message) = failure(&sig_inbox);
    assert_eq!(kind, TaskErrorKind::SignatureMismatch, "{message}");
    events.wait_for(EventKind::SignatureMismatch);

    // A task nobody serves, in this queue.
    let (reply_to, ghost_inbox) = watch(&caller_broker, "faults.ghost", "ghost-1");
    let ghost = crafted(&caller, "faults.ghost", "ghost-1", <plus as dingo::Task>::fingerprint(), reply_to);
    worker_broker.push_raw(plus::NAME, ghost.clone()).expect("push an unknown task");
    let (kind, message) = failure(&ghost_inbox);
    assert_eq!(kind, TaskErrorKind::UnknownTask, "{message}");
    events.wait_for(EventKind::UnknownTask);

    // The worker's one thread still serves.
    for n in [41, 99] {
        assert_eq!(plus::call(&caller, n).expect("call").wait_timeout(PATIENCE).expect("works"), n + 1);
    }

    wait_until("four dead letters", || worker_broker.dead_letters(plus::NAME).expect("dead letters").len() >= 4);
    let dead = worker_broker.dead_letters(plus::NAME).expect("dead letters");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(dead.len(), 4, "{reasons:#?}");
    // Newest first.
    assert!(reasons[0].starts_with("unknown task"), "{reasons:#?}");
    assert!(reasons[1].starts_with("signature mismatch"), "{reasons:#?}");
    assert!(reasons[2].starts_with("undecodable message"), "{reasons:#?}");
    assert!(reasons[3].starts_with("undecodable message"), "{reasons:#?}");
    assert_eq!(events.count(EventKind::MalformedMessage), 2);
    // One `DeadLettered` per dead letter, whatever the cause, in order, naming the calls known.
    wait_until("a DeadLettered event per dead letter", || events.count(EventKind::DeadLettered) == 4);
    let dead_events = events.of_kind(EventKind::DeadLettered);
    let calls: Vec<Option<&str>> = dead_events.iter().map(|e| e.task.as_ref().map(|k| k.id.as_str())).collect();
    assert_eq!(calls, [None, Some("cut-1"), Some("sig-1"), Some("ghost-1")], "{dead_events:#?}");
    for inbox in [&cut_inbox, &sig_inbox, &ghost_inbox] {
        assert_eq!(inbox.other.load(Ordering::SeqCst), 0, "only the failure report");
    }
    assert_eq!(worker_broker.queue_len(plus::NAME).expect("queue length"), 0);
    assert_eq!(held(setup.url(), &setup.options().namespace, plus::NAME), 0);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Dead letters keep the message as it was queued, byte for byte, so it can be replayed,
/// and name their queue; dead-lettering is counted and raises no error.
#[test]
fn dead_letters_keep_the_message_bytes() {
    let Some(setup) = Redis::setup() else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let errors = worker.events(EventFilter::new().level(Level::Error));
    worker.allocate(plus, 1).expect("allocate");
    let garbage = b"\xff\x00 not a task message either".to_vec();
    worker_broker.push_raw(plus::NAME, garbage.clone()).expect("push garbage");
    let wrong_signature = crafted(&worker, plus::NAME, "sig-2", 0x0bad_5eed_0bad_5eed, ReplyTo::None);
    worker_broker.push_raw(plus::NAME, wrong_signature.clone()).expect("push a wrong signature");
    wait_until("two dead letters", || worker_broker.dead_letters(plus::NAME).expect("dead letters").len() >= 2);
    let dead = worker_broker.dead_letters(plus::NAME).expect("dead letters");
    assert_eq!(dead.len(), 2, "{dead:#?}");
    assert!(dead[0].reason.starts_with("signature mismatch"), "{dead:#?}");
    assert_eq!(dead[0].bytes, wrong_signature, "the wrong-signature message, as queued");
    assert!(dead[1].reason.starts_with("undecodable message"), "{dead:#?}");
    assert_eq!(dead[1].bytes, garbage, "the garbage, as queued");
    assert!(dead.iter().all(|d| d.queue.as_str() == plus::NAME), "each names its queue: {dead:#?}");
    wait_until("the dead letters are counted", || worker_broker.stats().dead_lettered == 2);
    let failed: Vec<Event> =
        std::iter::from_fn(|| errors.try_recv()).filter(|e| e.kind == EventKind::ReportFailed).collect();
    assert!(failed.is_empty(), "dead-lettering failed: {failed:#?}");
    worker.close().expect("close");
}

// ---------------------------------------------------------------------------------------
// e. A Redis restart under running apps
// ---------------------------------------------------------------------------------------

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
