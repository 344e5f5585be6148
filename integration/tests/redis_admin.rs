//! The operator's role on Redis: cancels that hold in every process (one started after the
//! cancel too) and reach running tasks, dead letters listed oldest first with reason, time
//! and key, replayed once (even when the replaying process is killed half-way), purged with
//! exact counts.
//!
//! The worker and replaying processes are this test binary, started again to run
//! [`child_worker`] or [`child_replayer`] alone.
#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dingo::broker::{Admin, Select};
use dingo::message::ReplyTo;
use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, CallOptions, Context, Error, TaskErrorKind, TaskId, TaskName};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{crafted, lock, wait_until};
use dingo_test_support::redis::Redis;

/// Set (to the server's URL) in a child process.
const CHILD_URL: &str = "DINGO_ADMIN_CHILD_URL";

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"))
}

/// A worker process's part: serves `admin.record` (logs the run, returns its number) on the
/// namespace and log file it is given, until killed (or two minutes). In the test process
/// itself it does nothing.
#[test]
fn child_worker() {
    let Ok(url) = std::env::var(CHILD_URL) else { return };
    if std::env::var("DINGO_ADMIN_ROLE").as_deref() != Ok("worker") {
        return;
    }
    let options = RedisOptions::new().namespace(var("DINGO_ADMIN_NAMESPACE"));
    let broker = RedisBroker::connect_with(&url, options).expect("connect");
    let app = App::builder().broker(broker).build().expect("worker app");
    let log = PathBuf::from(var("DINGO_ADMIN_LOG"));
    app.register("admin.record", move |n: u64| {
        append(&log, n);
        n
    })
    .expect("register");
    app.allocate("admin.record", 2).expect("allocate");
    println!("worker ready");
    std::thread::sleep(Duration::from_secs(120));
}

/// A replaying process's part: replays every dead letter of `admin.replay`, then says how
/// many it replayed (if it lives that long).
#[test]
fn child_replayer() {
    let Ok(url) = std::env::var(CHILD_URL) else { return };
    if std::env::var("DINGO_ADMIN_ROLE").as_deref() != Ok("replayer") {
        return;
    }
    let options = RedisOptions::new().namespace(var("DINGO_ADMIN_NAMESPACE"));
    let broker = RedisBroker::connect_with(&url, options).expect("connect");
    println!("replaying");
    let replayed = Admin::replay(&broker, &TaskName::from("admin.replay"), &Select::All).expect("replay");
    println!("replayed {replayed}");
}

/// Logs one run: a line `n` (one `write` to a file opened for appending).
fn append(log: &Path, n: u64) {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the log");
    file.write_all(format!("{n}\n").as_bytes()).expect("write the log");
}

/// How many times each call ran, by the log.
fn runs(log: &Path) -> HashMap<u64, usize> {
    let mut runs = HashMap::new();
    let Ok(text) = std::fs::read_to_string(log) else { return runs };
    for line in text.lines() {
        *runs.entry(line.parse().expect("a number")).or_insert(0) += 1;
    }
    runs
}

fn log_file() -> PathBuf {
    let path = std::env::temp_dir().join(dingo_test_support::unique("dingo-admin-runs"));
    let _ = std::fs::remove_file(&path);
    path
}

/// A child process (see [`child_worker`], [`child_replayer`]), killed with SIGKILL on drop.
struct Child {
    child: std::process::Child,
    stdout: Arc<Mutex<String>>,
}

impl Child {
    fn spawn(role: &str, test: &str, url: &str, namespace: &str, log: &Path) -> Child {
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_URL, url)
            .env("DINGO_ADMIN_ROLE", role)
            .env("DINGO_ADMIN_NAMESPACE", namespace)
            .env("DINGO_ADMIN_LOG", log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a child process");
        let stdout = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().expect("piped");
        let into = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut out = lock(&into);
                out.push_str(&line);
                out.push('\n');
            }
        });
        Child { child, stdout }
    }

    fn said(&self, what: &str) -> bool {
        lock(&self.stdout).contains(what)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

fn cancelled(result: &Result<u64, Error>) -> bool {
    matches!(result, Err(Error::Task(e)) if e.kind() == TaskErrorKind::Cancelled)
}

/// 200 calls queued, 100 of them cancelled by key before any worker runs: exactly those
/// fail with `Cancelled` and never run; the other 100 run once each.
#[test]
fn cancel_100_of_200_queued_calls_before_any_worker_runs() {
    let Some(setup) = Redis::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let ran: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let seen = ran.clone();
    worker
        .register("admin.cancel_queued", move |n: u64| {
            *lock(&seen).entry(n).or_insert(0) += 1;
            n
        })
        .expect("register");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let mut handles: Vec<_> =
        (0..200u64).map(|n| (n, caller.call::<_, u64>("admin.cancel_queued", n).expect("call"))).collect();
    for (n, handle) in &handles {
        if n % 2 == 0 {
            handle.cancel().expect("cancel");
        }
    }
    worker.allocate("admin.cancel_queued", 4).expect("allocate");
    for (n, handle) in &mut handles {
        let result = handle.wait_timeout(PATIENCE);
        if *n % 2 == 0 {
            assert!(cancelled(&result), "call {n}: {result:?}");
        } else {
            assert_eq!(result.expect("an uncancelled call runs"), *n);
        }
    }
    let ran = lock(&ran).clone();
    assert_eq!(ran.len(), 100, "{ran:?}");
    assert!(ran.iter().all(|(n, runs)| n % 2 == 1 && *runs == 1), "{ran:?}");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Calls cancelled while no worker process exists: a worker process started afterwards
/// (which never saw the cancel happen) does not run them, and runs the others.
#[test]
fn a_cancel_holds_in_a_worker_process_started_after_it() {
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let log = log_file();
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    // Declared (so calls are routable) without serving it.
    caller.register("admin.record", |n: u64| n).expect("register");
    let mut handles: Vec<_> =
        (0..20u64).map(|n| (n, caller.call::<_, u64>("admin.record", n).expect("call"))).collect();
    for (n, _) in handles.iter().filter(|(n, _)| n % 4 == 0) {
        let id = handles[*n as usize].1.id().clone();
        caller.cancel("admin.record", &id).expect("cancel by key");
    }
    let worker = Child::spawn("worker", "child_worker", setup.url(), &namespace, &log);
    wait_until("the worker process is ready", || worker.said("worker ready"));
    for (n, handle) in &mut handles {
        let result = handle.wait_timeout(PATIENCE);
        if *n % 4 == 0 {
            assert!(cancelled(&result), "call {n}: {result:?}");
        } else {
            assert_eq!(result.expect("an uncancelled call runs"), *n);
        }
    }
    let runs = runs(&log);
    assert_eq!(runs.len(), 15, "{runs:?}");
    assert!(runs.iter().all(|(n, count)| n % 4 != 0 && *count == 1), "{runs:?}");
    caller.close().expect("close");
    let _ = std::fs::remove_file(&log);
}

/// A running task sees its cancel (`ctx.is_cancelled()`) within 200 ms of `cancel`
/// returning, returns early, and its caller gets `Cancelled`.
#[test]
fn a_running_task_sees_its_cancel_within_200_ms() {
    let Some(setup) = Redis::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let (started_tx, started) = std::sync::mpsc::sync_channel::<()>(4);
    let started_tx = Mutex::new(started_tx);
    let saw: Arc<Mutex<Option<Instant>>> = Arc::default();
    let seen = saw.clone();
    worker
        .register_with_context("admin.loop", move |ctx: &Context<'_>, n: u64| -> Result<u64, String> {
            let _ = lock(&started_tx).send(());
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline {
                if ctx.is_cancelled() {
                    *lock(&seen) = Some(Instant::now());
                    return Err("cancelled".to_owned());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(n)
        })
        .expect("register");
    worker.allocate("admin.loop", 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let mut handle = caller.call::<_, u64>("admin.loop", 7u64).expect("call");
    started.recv_timeout(PATIENCE).expect("the task starts");
    let cancelled_at = Instant::now();
    handle.cancel().expect("cancel");
    let result = handle.wait_timeout(PATIENCE);
    assert!(cancelled(&result), "{result:?}");
    let saw = lock(&saw).expect("the task saw the cancel");
    let took = saw.duration_since(cancelled_at);
    assert!(took < Duration::from_millis(200), "the task saw its cancel after {took:?}");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Cancelling a key nobody called is fine and changes nothing (no error, no event storm);
/// cancelling a call that finished leaves its result as it was.
#[test]
fn a_cancel_of_an_unknown_or_finished_call_changes_nothing() {
    let Some(setup) = Redis::setup() else { return };
    let broker = setup.broker();
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let runs = Arc::new(AtomicU64::new(0));
    let counted = runs.clone();
    worker
        .register("admin.done", move |n: u64| {
            counted.fetch_add(1, Ordering::SeqCst);
            n * 2
        })
        .expect("register");
    worker.allocate("admin.done", 1).expect("allocate");
    let caller = App::builder().broker(broker.clone()).build().expect("caller app");
    let errors = caller.events(dingo::EventFilter::default());
    for i in 0..50 {
        caller.cancel("admin.done", &TaskId::new(&format!("nobody-{i}"))).expect("an unknown key is fine");
    }
    caller.cancel("admin.nothing", &TaskId::new("nobody")).expect("an unknown task is fine");
    let mut handle = caller.call::<_, u64>("admin.done", 21u64).expect("call");
    wait_until("the call ran", || runs.load(Ordering::SeqCst) == 1);
    // Its result is on its way (or here): a cancel now changes nothing.
    std::thread::sleep(Duration::from_millis(100));
    handle.cancel().expect("cancel after completion");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the result stays"), 42);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let events: Vec<_> = std::iter::from_fn(|| errors.try_recv()).collect();
    assert!(events.iter().all(|e| e.level != dingo::Level::Error), "{events:#?}");
    assert!(events.len() < 10, "no event per cancel: {events:#?}");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// An undecodable message, one naming a task the worker does not have, and a call whose
/// retries ran out: listed oldest first with their reasons, times and keys, and counted.
#[test]
fn dead_letters_are_listed_oldest_first_with_reason_time_and_key() {
    let Some(setup) = Redis::setup() else { return };
    let broker = setup.broker();
    let worker = App::builder().broker(broker.clone()).build().expect("worker app");
    worker
        .register_with_context("admin.fails", |_: &Context<'_>, n: u64| -> Result<u64, String> {
            Err(format!("call {n} fails"))
        })
        .expect("register");
    worker.allocate("admin.fails", 1).expect("allocate");
    let queue = TaskName::from("admin.fails");
    let start = SystemTime::now() - Duration::from_millis(5);

    broker.push_raw("admin.fails", b"\xff\x00 not a task message".to_vec()).expect("push garbage");
    wait_until("the garbage is buried", || Admin::dead_count(&broker, &queue).expect("count") == 1);
    let ghost = crafted(&worker, "admin.ghost", "ghost-1", 0, ReplyTo::None);
    broker.push_raw("admin.fails", ghost.clone()).expect("push an unknown task");
    wait_until("the unknown task is buried", || Admin::dead_count(&broker, &queue).expect("count") == 2);
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let options = CallOptions::new().retries(1).backoff(dingo::Backoff::fixed(Duration::from_millis(10)));
    let mut handle = caller.call_with::<_, u64>("admin.fails", &options, 3u64).expect("call");
    let id = handle.id().clone();
    assert!(handle.wait_timeout(PATIENCE).is_err());
    wait_until("the exhausted call is buried", || Admin::dead_count(&broker, &queue).expect("count") == 3);

    let letters = Admin::dead_letters(&broker, &queue, 100).expect("dead letters");
    let end = SystemTime::now() + Duration::from_millis(5);
    assert_eq!(letters.len(), 3, "{letters:#?}");
    assert!(letters[0].reason.starts_with("undecodable message"), "{letters:#?}");
    assert!(letters[0].key.is_none());
    assert!(letters[1].reason.starts_with("unknown task"), "{letters:#?}");
    assert_eq!(letters[1].key.as_ref().map(|k| (k.name.as_str(), k.id.as_str())), Some(("admin.ghost", "ghost-1")));
    assert_eq!(letters[1].bytes, ghost);
    assert_eq!(letters[2].key.as_ref().map(|k| &k.id), Some(&id), "{letters:#?}");
    assert!(letters[2].reason.starts_with("failed") && letters[2].reason.contains("call 3 fails"), "{letters:#?}");
    let times: Vec<SystemTime> = letters.iter().map(|l| l.at.expect("a time")).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first: {times:?}");
    assert!(times.iter().all(|t| *t >= start && *t <= end), "{times:?}");
    assert!(letters.iter().all(|l| l.queue == queue));
    // A limit takes the oldest.
    let oldest = Admin::dead_letters(&broker, &queue, 2).expect("dead letters");
    assert_eq!(oldest, letters[..2]);
    assert_eq!(caller.dead_count("admin.fails").expect("count through the app"), 3);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// A call whose retries ran out, replayed by id once it can succeed: it runs once more, as a
/// fresh attempt (attempt 1, not redelivered), and leaves the dead letters; replaying again
/// sends nothing.
#[test]
fn a_replayed_letter_runs_once_as_a_fresh_attempt() {
    let Some(setup) = Redis::setup() else { return };
    let broker = setup.broker();
    let worker = App::builder().broker(broker.clone()).build().expect("worker app");
    let failing = Arc::new(AtomicBool::new(true));
    let runs: Arc<Mutex<Vec<(u64, u32, bool)>>> = Arc::default();
    let (fail, seen) = (failing.clone(), runs.clone());
    worker
        .register_with_context("admin.flaky", move |ctx: &Context<'_>, n: u64| -> Result<u64, String> {
            lock(&seen).push((n, ctx.attempt(), ctx.redelivered()));
            if fail.load(Ordering::SeqCst) { Err(format!("call {n} fails")) } else { Ok(n) }
        })
        .expect("register");
    worker.allocate("admin.flaky", 2).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let queue = TaskName::from("admin.flaky");
    let mut ids = Vec::new();
    // A retry, so that a failure goes to the dead letters once the retries ran out.
    let options = CallOptions::new().retries(1).backoff(dingo::Backoff::fixed(Duration::from_millis(10)));
    for n in [1u64, 2] {
        let mut handle = caller.call_with::<_, u64>("admin.flaky", &options, n).expect("call");
        ids.push(handle.id().clone());
        assert!(handle.wait_timeout(PATIENCE).is_err());
    }
    wait_until("both are buried", || Admin::dead_count(&broker, &queue).expect("count") == 2);
    failing.store(false, Ordering::SeqCst);
    assert_eq!(caller.replay_dead("admin.flaky", &Select::Ids(vec![ids[1].clone()])).expect("replay"), 1);
    // Two attempts each, then the replay.
    wait_until("the replayed call ran", || lock(&runs).len() == 5);
    assert_eq!(lock(&runs)[4], (2, 1, false), "a fresh attempt");
    assert_eq!(Admin::dead_count(&broker, &queue).expect("count"), 1, "the other stays");
    assert_eq!(caller.replay_dead("admin.flaky", &Select::Ids(vec![ids[1].clone()])).expect("replay"), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(lock(&runs).len(), 5, "ran once: {:?}", lock(&runs));
    caller.close().expect("close");
    worker.close().expect("close");
}

/// `purge_dead` by id and then all, and `purge` of waiting tasks (delayed ones stay), each
/// with its exact count.
#[test]
fn purges_return_exact_counts() {
    let Some(setup) = Redis::setup() else { return };
    let broker = setup.broker();
    let queue = TaskName::from("admin.purged");
    let app = App::builder().broker(broker.clone()).build().expect("app");
    app.register("admin.purged", |n: u64| n).expect("register");
    for i in 0..3 {
        let ghost = crafted(&app, "admin.ghost", &format!("ghost-{i}"), 0, ReplyTo::None);
        broker.push_raw("admin.purged", ghost).expect("push");
    }
    broker.push_raw("admin.purged", b"\xff garbage".to_vec()).expect("push");
    app.allocate("admin.purged", 1).expect("allocate");
    wait_until("four dead letters", || Admin::dead_count(&broker, &queue).expect("count") == 4);
    let some = Select::Ids(vec![TaskId::new("ghost-1"), TaskId::new("nobody")]);
    assert_eq!(app.purge_dead("admin.purged", &some).expect("purge one"), 1);
    assert_eq!(Admin::dead_count(&broker, &queue).expect("count"), 3);
    assert_eq!(app.purge_dead("admin.purged", &Select::All).expect("purge all"), 3);
    assert_eq!(Admin::dead_count(&broker, &queue).expect("count"), 0);
    assert_eq!(app.purge_dead("admin.purged", &Select::All).expect("purge none"), 0);
    app.close().expect("close");

    // Waiting tasks, with no worker: at least once, at most once, and delayed.
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    for n in 0..5u64 {
        caller.send("admin.purged", n).expect("send");
    }
    let amo = CallOptions::new().at_most_once(true);
    for n in 0..2u64 {
        drop(caller.call_with::<_, u64>("admin.purged", &amo, n).expect("call"));
    }
    let later = CallOptions::new().countdown(Duration::from_secs(60));
    for n in 0..3u64 {
        drop(caller.call_with::<_, u64>("admin.purged", &later, n).expect("call"));
    }
    wait_until("all are queued", || {
        broker.queue_len("admin.purged").expect("len") == 7 && broker.delayed_len("admin.purged").expect("len") == 3
    });
    assert_eq!(caller.purge("admin.purged").expect("purge"), 7);
    assert_eq!(broker.queue_len("admin.purged").expect("len"), 0);
    assert_eq!(broker.delayed_len("admin.purged").expect("len"), 3, "delayed tasks stay");
    assert_eq!(caller.purge("admin.purged").expect("purge again"), 0);
    caller.close().expect("close");
}

/// 1,000 dead letters (16 KiB of arguments each); a process replaying them all is killed
/// with SIGKILL half-way; a fresh process replays the rest. Every call ran exactly once, and
/// no letter is left.
#[test]
fn a_replay_killed_half_way_loses_none_and_runs_none_twice() {
    const CALLS: u64 = 1000;
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let broker = setup.broker();
    let queue = TaskName::from("admin.replay");
    let worker = App::builder().broker(broker.clone()).build().expect("worker app");
    let failing = Arc::new(AtomicBool::new(true));
    let ran: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let (fail, seen) = (failing.clone(), ran.clone());
    worker
        .register_with_context(
            "admin.replay",
            move |_: &Context<'_>, (n, _pad): (u64, String)| -> Result<u64, String> {
                if fail.load(Ordering::SeqCst) {
                    return Err(format!("call {n} fails"));
                }
                *lock(&seen).entry(n).or_insert(0) += 1;
                Ok(n)
            },
        )
        .expect("register");
    worker.allocate("admin.replay", 4).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let pad = "x".repeat(16 << 10);
    let options = CallOptions::new().retries(1).backoff(dingo::Backoff::fixed(Duration::from_millis(10)));
    for n in 0..CALLS {
        drop(caller.call_with::<_, u64>("admin.replay", &options, (n, pad.clone())).expect("call"));
    }
    wait_until("every call is buried", || Admin::dead_count(&broker, &queue).expect("count") == CALLS as usize);
    let letters = Admin::dead_letters(&broker, &queue, 1).expect("dead letters");
    assert!(letters[0].reason.starts_with("failed"), "retries ran out: {}", letters[0].reason);
    failing.store(false, Ordering::SeqCst);

    let log = log_file();
    let mut first = Child::spawn("replayer", "child_replayer", setup.url(), &namespace, &log);
    let deadline = Instant::now() + PATIENCE;
    while Admin::dead_count(&broker, &queue).expect("count") == CALLS as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    first.kill();
    // A batch it wrote before it died still runs at the server (whole: one script).
    std::thread::sleep(Duration::from_millis(300));
    let left = Admin::dead_count(&broker, &queue).expect("count");
    assert!(!first.said("replayed"), "killed before it finished (left: {left})");
    assert!(left > 0 && left < CALLS as usize, "killed half-way: {left} left");

    let second = Child::spawn("replayer", "child_replayer", setup.url(), &namespace, &log);
    wait_until("the second replay finished", || second.said("replayed"));
    assert!(second.said(&format!("replayed {left}\n")), "{}", lock(&second.stdout));
    wait_until("every call ran", || lock(&ran).len() == CALLS as usize);
    assert_eq!(Admin::dead_count(&broker, &queue).expect("count"), 0);
    std::thread::sleep(Duration::from_millis(500));
    let ran = lock(&ran).clone();
    assert!(
        ran.values().all(|&runs| runs == 1),
        "each once: {:?}",
        ran.iter().filter(|(_, r)| **r != 1).collect::<Vec<_>>()
    );
    assert_eq!(broker.queue_len("admin.replay").expect("len"), 0);
    caller.close().expect("close");
    worker.close().expect("close");
    let _ = std::fs::remove_file(&log);
}
