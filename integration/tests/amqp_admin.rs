//! The operator's role on the RabbitMQ broker ([`Admin`]): cancels through the namespace's
//! cancel stream — honoured by workers that start after them, and by the set of a consumer
//! that runs — and dead letters listed with their reasons, replayed once (also when the
//! replaying process is killed half-way) and purged, and task queues purged.
//!
//! Child processes are this test binary itself, started again to run only
//! [`worker_process`] or [`replay_process`] (ignored tests that return at once when run
//! by a plain `cargo test`).
#![cfg(feature = "amqp")]

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use dingo::amqp::{AmqpBroker, AmqpOptions};
use dingo::broker::{Admin, ConsumeSettings, Consumer, Recv, Select};
use dingo::message::{Payload, ReplyTo, TaskMessage, wire};
use dingo::{App, Backoff, CallKey, CallOptions, Error, TaskErrorKind, TaskId, TaskName};
use dingo_test_support::PATIENCE;
use dingo_test_support::amqp::Amqp;
use dingo_test_support::app::NoWarnings;
use dingo_test_support::faults::{crafted, lock, server_addr, via, wait_until};
use dingo_test_support::proxy::Proxy;

/// Runs of `counted`, by argument.
static RUNS: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

/// Counts its run; returns its argument.
#[dingo::task(name = "amqp_admin.counted")]
fn counted(ctx: &dingo::Context, n: u64) -> u64 {
    *lock(&RUNS).entry(n).or_default() += 1;
    log_run(ctx.id().as_str());
    n
}

/// Whether `fickle` fails.
static FICKLE_FAILS: Mutex<bool> = Mutex::new(true);

/// The attempts and redelivered flags `fickle` ran with, by argument.
static FICKLE_RUNS: Mutex<Vec<(u64, u32, bool)>> = Mutex::new(Vec::new());

/// Fails while [`FICKLE_FAILS`] is set.
#[dingo::task(name = "amqp_admin.fickle")]
fn fickle(ctx: &dingo::Context, n: u64) -> Result<u64, String> {
    lock(&FICKLE_RUNS).push((n, ctx.attempt(), ctx.redelivered()));
    if *lock(&FICKLE_FAILS) { Err(format!("{n} fails")) } else { Ok(n) }
}

/// When `patient` started, and when it saw its cancel.
static PATIENT: Mutex<(Option<Instant>, Option<Instant>)> = Mutex::new((None, None));

/// Waits (up to 15 s) until it is cancelled, then fails because of it.
#[dingo::task(name = "amqp_admin.patient")]
fn patient(ctx: &dingo::Context) -> Result<(), String> {
    lock(&PATIENT).0 = Some(Instant::now());
    let until = Instant::now() + Duration::from_secs(15);
    while !ctx.is_cancelled() {
        if Instant::now() >= until {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    lock(&PATIENT).1 = Some(Instant::now());
    Err("stopped: cancelled".to_owned())
}

/// The file worker processes log their runs to (`DINGO_ADMIN_LOG`), if set.
fn log_run(id: &str) {
    if let Ok(path) = std::env::var("DINGO_ADMIN_LOG") {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("open the run log");
        // One write per line, appended: lines of several processes never mix.
        file.write_all(format!("{id}\n").as_bytes()).expect("log the run");
    }
}

fn name(task: &str) -> TaskName {
    TaskName::from(task)
}

/// A task message for `counted(n)` with id `id`, as a caller would queue it, wanting no
/// reports.
fn counted_message(app: &App, id: &str, n: u64) -> Vec<u8> {
    let args = app.codecs().encode(dingo::codec::MSGPACK, &n).expect("encode the arguments");
    let message = TaskMessage::new(
        name(counted::NAME),
        TaskId::from(id),
        <counted as dingo::Task>::fingerprint(),
        Payload::Encoded(args),
    )
    .with_options(dingo::TaskOptions::new())
    .with_reply_to(ReplyTo::None);
    wire::encode_task(&message).expect("encode the message")
}

/// 200 calls queued while no worker runs; 100 of them cancelled by key; then a worker
/// starts: exactly those 100 fail with `Cancelled` and never run, the other 100 run.
#[test]
fn cancelled_queued_calls_never_run() {
    let Some(setup) = Amqp::setup() else { return };
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    Consumer::declare(&caller_broker, &name(counted::NAME)).expect("declare");
    let handles: Vec<_> = (1000..1200u64).map(|n| (n, counted::call(&caller, n).expect("call"))).collect();
    let cancelling = Instant::now();
    for (n, handle) in &handles {
        if n % 2 == 0 {
            handle.cancel().expect("cancel");
        }
    }
    eprintln!("100 cancels took {:?}", cancelling.elapsed());
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker.allocate(counted, 4).expect("allocate");
    for (n, mut handle) in handles {
        match handle.wait_timeout(PATIENCE) {
            Ok(value) => assert!(n % 2 == 1 && value == n, "call {n} ran: {value}"),
            Err(Error::Task(e)) => assert!(n % 2 == 0 && e.kind() == TaskErrorKind::Cancelled, "call {n}: {e:?}"),
            Err(e) => panic!("call {n}: {e:?}"),
        }
    }
    let runs = lock(&RUNS);
    let ran: Vec<u64> = runs.range(1000..1200).map(|(n, _)| *n).collect();
    assert_eq!(ran, (1000..1200).filter(|n| n % 2 == 1).collect::<Vec<_>>(), "exactly the others ran");
    assert!(runs.range(1000..1200).all(|(_, count)| *count == 1), "each once");
    drop(runs);
    worker.close().expect("close");
    caller.close().expect("close");
}

/// The broker's side of the guarantee, without the worker's check: a subscription that
/// starts after cancels were recorded (by another broker) hands out no delivery before its
/// consumer's set holds every one of them.
#[test]
fn a_new_subscription_knows_every_earlier_cancel_before_its_first_delivery() {
    let Some(setup) = Amqp::setup() else { return };
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    Consumer::declare(&caller_broker, &name(counted::NAME)).expect("declare");
    let keys: Vec<CallKey> = (0..50u64)
        .map(|n| counted::call_with(&caller, &CallOptions::new().ignore_report(true), n).expect("call").key().clone())
        .collect();
    let admin = setup.broker();
    let until = SystemTime::now() + Duration::from_secs(600);
    for key in &keys {
        admin.cancel(key, until).expect("cancel");
    }
    let worker_broker = setup.broker();
    let cancels = worker_broker.cancels().expect("the broker keeps cancels");
    let subscription = worker_broker.consume(&[name(counted::NAME)], &ConsumeSettings::new(1)).expect("consume");
    let mut seen = 0;
    while seen < keys.len() {
        match subscription.recv(Some(PATIENCE)) {
            Recv::Delivery(delivery) => {
                let key = delivery.message.key();
                assert!(cancels.is_cancelled(&key.name, &key.id), "{key:?} was delivered before its cancel was known");
                assert_eq!(cancels.len(), keys.len(), "every cancel is known at the first delivery");
                if let Some(ack) = delivery.ack {
                    ack.ack().expect("ack");
                }
                seen += 1;
            }
            other => panic!("no delivery: {other:?}"),
        }
    }
    subscription.stop();
    drop(subscription);
    caller.close().expect("close");
}

/// A consumer that runs learns of a cancel recorded by another broker (another connection)
/// within 200 ms, through the cancel stream.
#[test]
fn a_running_consumer_learns_a_cancel_within_200_ms() {
    let Some(setup) = Amqp::setup() else { return };
    let worker_broker = setup.broker();
    let cancels = worker_broker.cancels().expect("the broker keeps cancels");
    Consumer::declare(&worker_broker, &name(counted::NAME)).expect("declare");
    let subscription = worker_broker.consume(&[name(counted::NAME)], &ConsumeSettings::new(1)).expect("consume");
    // The subscription has read the stream once it delivers: wait for one delivery.
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    counted::call_with(&caller, &CallOptions::new().ignore_report(true), 7).expect("call");
    match subscription.recv(Some(PATIENCE)) {
        Recv::Delivery(delivery) => drop(delivery.ack.map(|ack| ack.ack())),
        other => panic!("no delivery: {other:?}"),
    }
    let admin = setup.broker();
    let mut slowest = Duration::ZERO;
    for n in 0..20 {
        let key = CallKey { name: name(counted::NAME), id: TaskId::from(format!("live-{n}").as_str()) };
        let sent = Instant::now();
        admin.cancel(&key, SystemTime::now() + Duration::from_secs(60)).expect("cancel");
        while !cancels.is_cancelled(&key.name, &key.id) {
            assert!(sent.elapsed() < Duration::from_millis(200), "cancel {n} not seen within 200 ms");
            std::thread::sleep(Duration::from_micros(200));
        }
        slowest = slowest.max(sent.elapsed());
    }
    eprintln!("slowest cancel seen after {slowest:?} (cancel call included)");
    subscription.stop();
    drop(subscription);
    caller.close().expect("close");
}

/// A task running in a worker on another connection sees its cancel (`ctx.is_cancelled()`)
/// within 200 ms of the cancel returning, through the cancel stream; its caller gets
/// `Cancelled`.
#[test]
fn a_running_task_sees_a_cancel_from_another_connection_within_200_ms() {
    let Some(setup) = Amqp::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker.allocate(patient, 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let mut handle = patient::call(&caller).expect("call");
    wait_until("the task runs", || lock(&PATIENT).0.is_some());
    let cancelled = Instant::now();
    handle.cancel().expect("cancel");
    let returned = Instant::now();
    match handle.wait_timeout(PATIENCE) {
        Err(Error::Task(e)) => assert_eq!(e.kind(), TaskErrorKind::Cancelled, "{e:?}"),
        other => panic!("{other:?}"),
    }
    let seen = lock(&PATIENT).1.expect("the task saw its cancel");
    let after_return = seen.saturating_duration_since(returned);
    eprintln!(
        "the task saw its cancel {after_return:?} after the cancel returned ({:?} after it was called)",
        seen.saturating_duration_since(cancelled)
    );
    assert!(after_return < Duration::from_millis(200), "seen {after_return:?} after the cancel returned");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Cancelling a key nobody called, and one whose call finished: `Ok`, no event at warning
/// level or above, and the finished call's result is still there for its handle.
#[test]
fn cancelling_unknown_and_finished_calls_changes_nothing() {
    let Some(setup) = Amqp::setup() else { return };
    let app = App::builder().broker(setup.broker()).build().expect("app");
    let quiet = NoWarnings::watch(&app);
    app.allocate(counted, 1).expect("allocate");
    app.cancel(counted::NAME, &TaskId::from("nobody-called-this")).expect("cancel an unknown key");
    app.cancel("amqp_admin.no_such_task", &TaskId::from("1")).expect("cancel a key of an unknown task");
    let mut handle = counted::call(&app, 2024).expect("call");
    wait_until("the call ran", || lock(&RUNS).contains_key(&2024));
    // Its result is on its way or there: the cancel comes too late to change it.
    std::thread::sleep(Duration::from_millis(100));
    handle.cancel().expect("cancel a finished call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the result stays"), 2024);
    assert_eq!(counted::call(&app, 2025).expect("call").wait_timeout(PATIENCE).expect("works"), 2025);
    app.close().expect("close");
    quiet.check();
}

/// An undecodable message, a task nobody serves in this queue and a call out of retries are
/// listed oldest first with their reasons, times and keys, and counted; replaying the call
/// runs it once more as a fresh attempt (attempt 1, not redelivered) and removes it; a
/// replayed undecodable message comes back to the dead letters.
#[test]
fn dead_letters_are_listed_replayed_once_and_purged() {
    let Some(setup) = Amqp::setup() else { return };
    let broker = setup.broker();
    let app = App::builder().broker(broker.clone()).build().expect("app");
    app.allocate(fickle, 1).expect("allocate");
    let queue = name(fickle::NAME);
    let before = SystemTime::now() - Duration::from_secs(1);

    let garbage = b"\xff\x00 not a task message".to_vec();
    broker.publish_raw(fickle::NAME, garbage.clone()).expect("publish garbage");
    wait_until("the garbage is dead", || broker.dead_count(&queue).expect("count") == 1);
    let ghost = crafted(&app, "amqp_admin.ghost", "ghost-1", <fickle as dingo::Task>::fingerprint(), ReplyTo::None);
    broker.publish_raw(fickle::NAME, ghost.clone()).expect("publish an unknown task");
    wait_until("the ghost is dead", || broker.dead_count(&queue).expect("count") == 2);
    let retry = CallOptions::new().retries(1).backoff(Backoff::fixed(Duration::from_millis(20)).jitter(false));
    let mut handle = fickle::call_with(&app, &retry, 5).expect("call");
    match handle.wait_timeout(PATIENCE) {
        Err(Error::Task(e)) => assert_eq!(e.kind(), TaskErrorKind::Failed, "{e:?}"),
        other => panic!("{other:?}"),
    }
    wait_until("the call is dead", || broker.dead_count(&queue).expect("count") == 3);

    let letters = broker.dead_letters(&queue, 100).expect("dead letters");
    let reasons: Vec<&str> = letters.iter().map(|l| l.reason.as_str()).collect();
    assert_eq!(letters.len(), 3, "{reasons:#?}");
    assert!(reasons[0].starts_with("undecodable message"), "{reasons:#?}");
    assert!(reasons[1].starts_with("unknown task"), "{reasons:#?}");
    assert!(reasons[2].contains("after 2 attempt(s)"), "{reasons:#?}");
    assert_eq!(letters[0].bytes, garbage);
    assert_eq!(letters[0].key, None);
    assert_eq!(letters[1].key, Some(CallKey { name: name("amqp_admin.ghost"), id: TaskId::from("ghost-1") }));
    assert_eq!(letters[2].key.as_ref(), Some(handle.key()));
    for letter in &letters {
        let at = letter.at.expect("dingo records when it dead-letters");
        assert!(at >= before && at <= SystemTime::now(), "{at:?}");
        assert_eq!(letter.queue, queue);
    }
    // Oldest first, and reading takes nothing.
    let times: Vec<SystemTime> = letters.iter().filter_map(|l| l.at).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_eq!(broker.dead_letters(&queue, 2).expect("the first two").len(), 2);
    assert_eq!(broker.dead_count(&queue).expect("count"), 3);

    // Replay the call alone: it runs once more, as attempt 1, not redelivered.
    *lock(&FICKLE_FAILS) = false;
    let runs_before = lock(&FICKLE_RUNS).len();
    assert_eq!(broker.replay(&queue, &Select::Ids(vec![handle.id().clone()])).expect("replay"), 1);
    wait_until("the replayed call ran", || lock(&FICKLE_RUNS).len() == runs_before + 1);
    assert_eq!(lock(&FICKLE_RUNS)[runs_before], (5, 1, false), "a fresh attempt");
    let left = broker.dead_letters(&queue, 100).expect("dead letters");
    assert_eq!(left.iter().map(|l| l.reason.clone()).collect::<Vec<_>>(), reasons[..2].to_vec(), "in order");
    // An id nobody has: nothing replayed.
    assert_eq!(broker.replay(&queue, &Select::Ids(vec![TaskId::from("none")])).expect("replay"), 0);

    // Replay everything: the garbage and the ghost come back to the dead letters.
    assert_eq!(broker.replay(&queue, &Select::All).expect("replay all"), 2);
    wait_until("both are dead again", || broker.dead_count(&queue).expect("count") == 2);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lock(&FICKLE_RUNS).len(), runs_before + 1, "the call ran once");

    // Purges count what they remove.
    assert_eq!(broker.purge_dead(&queue, &Select::Ids(vec![TaskId::from("ghost-1")])).expect("purge one"), 1);
    let left = broker.dead_letters(&queue, 100).expect("dead letters");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].bytes, garbage);
    assert_eq!(broker.purge_dead(&queue, &Select::All).expect("purge all"), 1);
    assert_eq!(broker.dead_count(&queue).expect("count"), 0);
    assert_eq!(broker.purge_dead(&queue, &Select::All).expect("purge nothing"), 0);
    assert_eq!(broker.replay(&queue, &Select::All).expect("replay nothing"), 0);
    app.close().expect("close");
}

/// `purge` removes what waits in a task queue and says how many; queues nobody declared
/// hold nothing.
#[test]
fn purge_counts_what_it_removes() {
    let Some(setup) = Amqp::setup() else { return };
    let broker = setup.broker();
    let caller = App::builder().broker(broker.clone()).build().expect("caller app");
    Consumer::declare(&broker, &name(counted::NAME)).expect("declare");
    for n in 0..37 {
        counted::call_with(&caller, &CallOptions::new().ignore_report(true), n).expect("call");
    }
    let queue = name(counted::NAME);
    wait_until("37 wait", || broker.queue_len(counted::NAME).expect("length") == 37);
    assert_eq!(broker.purge(&queue).expect("purge"), 37);
    assert_eq!(broker.queue_len(counted::NAME).expect("length"), 0);
    assert_eq!(broker.purge(&queue).expect("purge again"), 0);
    let nobody = name("amqp_admin.nobody");
    assert_eq!(broker.purge(&nobody).expect("purge a missing queue"), 0);
    assert_eq!(broker.dead_count(&nobody).expect("count a missing queue"), 0);
    assert!(broker.dead_letters(&nobody, 10).expect("list a missing queue").is_empty());
    caller.close().expect("close");
}

/// 1,000 dead letters; a child process replaying them all is killed (SIGKILL) as soon as
/// the first of them reach the task queue; in RabbitMQ every letter is then either replayed
/// or still dead, never both; replaying the rest and running a worker runs every call
/// exactly once.
#[test]
fn a_replay_killed_half_way_loses_none_and_runs_none_twice() {
    const LETTERS: usize = 1000;
    let Some(setup) = Amqp::with_options(AmqpOptions::new()) else { return };
    let broker = setup.broker();
    let app = App::builder().broker(broker.clone()).build().expect("app");
    Consumer::declare(&broker, &name(counted::NAME)).expect("declare");
    let queue = name(counted::NAME);
    let dead_queue = format!("{}.dead.{}", setup.options().namespace, counted::NAME);
    for n in 0..LETTERS as u64 {
        let id = format!("replay-{n}");
        broker.publish_raw_to(&dead_queue, counted_message(&app, &id, 5000 + n)).expect("forge a dead letter");
    }
    assert_eq!(broker.dead_count(&queue).expect("count"), LETTERS);

    let child = ChildProcess::replay(&setup);
    let started = Instant::now();
    while broker.queue_len(counted::NAME).expect("length") == 0 {
        assert!(started.elapsed() < PATIENCE, "the replay never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill();
    // RabbitMQ gives back what the dead process had fetched once it sees the connection go.
    let mut settled = (0, 0);
    wait_until("every letter replayed or dead", || {
        let (queued, dead) =
            (broker.queue_len(counted::NAME).expect("length"), broker.dead_count(&queue).expect("count"));
        assert!(queued + dead <= LETTERS, "{queued} replayed and {dead} dead: some are both");
        settled = (queued, dead);
        queued + dead == LETTERS
    });
    let (queued, dead) = settled;
    eprintln!("killed with {queued} letters replayed and {dead} still dead");
    assert!(dead > 0, "the replay finished before it was killed: nothing was tested");

    assert_eq!(broker.replay(&queue, &Select::All).expect("replay the rest"), dead);
    assert_eq!(broker.dead_count(&queue).expect("count"), 0);
    assert_eq!(broker.queue_len(counted::NAME).expect("length"), LETTERS);
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker.allocate(counted, 8).expect("allocate");
    let range = 5000..5000 + LETTERS as u64;
    wait_until("every call ran", || lock(&RUNS).range(range.clone()).count() == LETTERS);
    std::thread::sleep(Duration::from_millis(300));
    let twice: Vec<u64> = lock(&RUNS).range(range).filter(|(_, c)| **c != 1).map(|(n, _)| *n).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    worker.close().expect("close");
    app.close().expect("close");
}

/// A call cancelled before any worker process exists, then a new worker process: the
/// cancelled call fails with `Cancelled` and never runs there; the other call runs.
#[test]
fn a_worker_process_started_after_a_cancel_does_not_run_it() {
    let Some(setup) = Amqp::setup() else { return };
    let log = RunLog::new("after-cancel");
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    Consumer::declare(&caller_broker, &name(counted::NAME)).expect("declare");
    let mut cancelled = counted::call(&caller, 1).expect("call");
    let mut kept = counted::call(&caller, 2).expect("call");
    cancelled.cancel().expect("cancel");
    let _worker = ChildProcess::worker(&setup, &log.0);
    assert_eq!(kept.wait_timeout(PATIENCE).expect("the other call runs"), 2);
    match cancelled.wait_timeout(PATIENCE) {
        Err(Error::Task(e)) => assert_eq!(e.kind(), TaskErrorKind::Cancelled, "{e:?}"),
        other => panic!("the cancelled call: {other:?}"),
    }
    let runs = log.runs();
    assert_eq!(runs.get(kept.id().as_str()), Some(&1), "{runs:?}");
    assert_eq!(runs.get(cancelled.id().as_str()), None, "the cancelled call ran: {runs:?}");
    caller.close().expect("close");
}

/// A worker cut off from RabbitMQ (an outage, through a proxy) while a call is queued and
/// cancelled: once it reconnects, the cancelled call fails with `Cancelled` and never runs
/// there; the other call runs.
#[test]
fn a_worker_cut_off_when_a_cancel_was_sent_honours_it_after_reconnecting() {
    let Some(setup) = Amqp::setup() else { return };
    let proxy = Proxy::start(server_addr(setup.url())).expect("start the proxy");
    let worker_broker =
        AmqpBroker::connect_with(&via(&proxy, setup.url()), setup.options().clone()).expect("connect via the proxy");
    setup.adopt(worker_broker.clone());
    let worker = App::builder().broker(worker_broker).build().expect("worker app");
    worker.allocate(counted, 2).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    assert_eq!(counted::call(&caller, 3000).expect("call").wait_timeout(PATIENCE).expect("works"), 3000);
    proxy.pause();
    let mut cancelled = counted::call(&caller, 3001).expect("call");
    let mut kept = counted::call(&caller, 3002).expect("call");
    cancelled.cancel().expect("cancel");
    std::thread::sleep(Duration::from_millis(300));
    proxy.resume();
    assert_eq!(kept.wait_timeout(PATIENCE).expect("the other call runs"), 3002);
    match cancelled.wait_timeout(PATIENCE) {
        Err(Error::Task(e)) => assert_eq!(e.kind(), TaskErrorKind::Cancelled, "{e:?}"),
        other => panic!("the cancelled call: {other:?}"),
    }
    assert!(!lock(&RUNS).contains_key(&3001), "the cancelled call ran");
    caller.close().expect("close");
    worker.close().expect("close");
}

const WORKER_ENV: &str = "DINGO_ADMIN_WORKER";
const REPLAY_ENV: &str = "DINGO_ADMIN_REPLAY";

/// Not a test: the body of a worker process ([`ChildProcess::worker`]), which serves
/// `counted` on 2 threads until it is killed.
#[test]
#[ignore = "the body of the worker processes the other tests start"]
fn worker_process() {
    let Ok(namespace) = std::env::var(WORKER_ENV) else { return };
    let worker = App::builder().broker(child_broker(namespace)).build().expect("app");
    worker.allocate(counted, 2).expect("allocate");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Not a test: the body of a replaying process ([`ChildProcess::replay`]), which replays
/// every dead letter of `counted`, then waits to be killed.
#[test]
#[ignore = "the body of the replaying processes the other tests start"]
fn replay_process() {
    let Ok(namespace) = std::env::var(REPLAY_ENV) else { return };
    let broker = child_broker(namespace);
    broker.replay(&name(counted::NAME), &Select::All).expect("replay");
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn child_broker(namespace: String) -> AmqpBroker {
    let url = std::env::var("DINGO_AMQP_URL").expect("DINGO_AMQP_URL");
    let durable = std::env::var("DINGO_DURABLE").is_ok_and(|v| v == "1");
    AmqpBroker::connect_with(&url, AmqpOptions::new().namespace(namespace).durable(durable)).expect("connect")
}

/// This binary running [`worker_process`] or [`replay_process`], killed (SIGKILL) on drop.
struct ChildProcess(Child);

impl ChildProcess {
    fn worker(setup: &Amqp, log: &Path) -> ChildProcess {
        ChildProcess::start(setup, "worker_process", WORKER_ENV, Some(log))
    }

    fn replay(setup: &Amqp) -> ChildProcess {
        ChildProcess::start(setup, "replay_process", REPLAY_ENV, None)
    }

    fn start(setup: &Amqp, test: &str, env: &str, log: Option<&Path>) -> ChildProcess {
        let exe = std::env::current_exe().expect("the test binary");
        let mut command = Command::new(exe);
        command
            .args([test, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(env, &setup.options().namespace)
            .env("DINGO_AMQP_URL", setup.url())
            .env("DINGO_DURABLE", if setup.options().durable { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(log) = log {
            command.env("DINGO_ADMIN_LOG", log);
        }
        ChildProcess(command.spawn().expect("start a child process"))
    }

    /// SIGKILL: nothing is given back, nothing acknowledged, no transaction committed.
    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A run log for worker processes, removed at the end.
struct RunLog(PathBuf);

impl RunLog {
    fn new(test: &str) -> RunLog {
        let path = std::env::temp_dir().join(format!("dingo-admin-{}-{test}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        RunLog(path)
    }

    /// How many times each call id ran.
    fn runs(&self) -> HashMap<String, usize> {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        let mut runs = HashMap::new();
        for id in text.lines() {
            *runs.entry(id.to_owned()).or_default() += 1;
        }
        runs
    }
}

impl Drop for RunLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
