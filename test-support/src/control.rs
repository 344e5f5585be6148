//! The control rules: time limits, cancellation and dead letters (the operator's side of the
//! lifecycle), on whatever broker the setup gives.
//!
//! Tasks record what they ran under a token unique to the test, so the rules of one binary
//! can run in parallel on several brokers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dingo::broker::Select;
use dingo::broker::kit::lock;
use dingo::{App, CallOptions, Context, Error, EventFilter, EventKind, Level, TaskErrorKind, TaskId};

use crate::PATIENCE;
use crate::app::{AppSetup, CountingReporter};

/// Slack on the time bounds of these rules, for a loaded CI machine (the targets, e.g. a
/// hard limit failing the call within limit + 100 ms, are what the rules print and the
/// benchmark measures).
const SLACK: Duration = Duration::from_millis(900);

/// Runs by token: the attempt of each run, by call id.
static RUNS: Mutex<BTreeMap<String, Vec<(String, u32)>>> = Mutex::new(BTreeMap::new());

/// When each `stubborn` task started, by token.
static STARTED: Mutex<BTreeMap<String, Instant>> = Mutex::new(BTreeMap::new());

/// How late past a hard limit the caller may learn of it, measured from the task's start:
/// the target is 100 ms; the rest is room for a loaded CI machine (the figure is printed).
const HARD_LATE: Duration = Duration::from_millis(300);

/// Tokens whose `breakable` calls fail.
static BROKEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn record(ctx: &Context<'_>, token: &str) {
    lock(&RUNS).entry(token.to_owned()).or_default().push((ctx.id().to_string(), ctx.attempt()));
}

fn runs(token: &str) -> Vec<(String, u32)> {
    lock(&RUNS).get(token).cloned().unwrap_or_default()
}

fn ran(token: &str) -> BTreeSet<String> {
    runs(token).into_iter().map(|(id, _)| id).collect()
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn kind_of<T: std::fmt::Debug>(result: Result<T, Error>) -> Option<TaskErrorKind> {
    match result {
        Err(e) => e.task_kind(),
        Ok(value) => panic!("expected a failure, got {value:?}"),
    }
}

#[dingo::task(name = "control.stamp")]
fn stamp(ctx: &Context, token: String) -> u32 {
    record(ctx, &token);
    ctx.attempt()
}

/// Counts until it is told to stop (at most `max_ms`), then returns the count or, with
/// `fail`, an error.
#[dingo::task(name = "control.count")]
fn count(ctx: &Context, token: String, max_ms: u64, fail: bool) -> Result<u64, String> {
    record(ctx, &token);
    let until = Instant::now() + Duration::from_millis(max_ms);
    let mut n = 0;
    while !ctx.is_cancelled() && Instant::now() < until {
        n += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    if fail && ctx.is_cancelled() { Err(format!("stopped after {n}")) } else { Ok(n) }
}

/// Ignores every limit: sleeps.
#[dingo::task(name = "control.stubborn")]
fn stubborn(ctx: &Context, token: String, sleep_ms: u64) -> u64 {
    lock(&STARTED).entry(token.clone()).or_insert_with(Instant::now);
    record(ctx, &token);
    std::thread::sleep(Duration::from_millis(sleep_ms));
    sleep_ms
}

/// Fails while its token is broken.
#[dingo::task(name = "control.breakable", retries = 2, retry_backoff = "10ms", retry_jitter = false)]
fn breakable(ctx: &Context, token: String) -> Result<u32, String> {
    record(ctx, &token);
    if lock(&BROKEN).contains(&token) { Err(format!("attempt {} broke", ctx.attempt())) } else { Ok(ctx.attempt()) }
}

/// A task limited by its attribute.
#[dingo::task(name = "control.limited", time_limit = "300ms")]
fn limited(ctx: &Context, token: String) -> u32 {
    record(ctx, &token);
    std::thread::sleep(Duration::from_secs(3));
    0
}

fn close(app: &App) {
    app.close().expect("close");
}

/// Soft limit: a task that loops while `!ctx.is_cancelled()` returns once its soft limit
/// passes, and its value arrives.
pub fn a_soft_limit_lets_the_task_return(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(count, 1).expect("allocate");
    let token = crate::unique("soft");
    let options = CallOptions::new().soft_time_limit(Duration::from_millis(200));
    let started = Instant::now();
    let counted = count::call_with(&app, &options, token.clone(), 10_000, false).expect("call").wait_timeout(PATIENCE);
    let took = started.elapsed();
    assert!(counted.expect("the value arrives") > 0);
    assert!(took >= Duration::from_millis(200), "returned before its soft limit ({took:?})");
    assert!(took < Duration::from_millis(200) + SLACK, "returned {took:?} after the call (soft limit 200 ms)");
    assert_eq!(app.threads_written_off(), 0);
    close(&app);
}

/// An `Err` returned after the task saw its soft limit is a `TimeLimit` failure, and is not
/// retried even with retries left.
pub fn an_err_after_the_soft_limit_is_a_time_limit(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(count, 1).expect("allocate");
    let token = crate::unique("soft-err");
    let options = CallOptions::new()
        .soft_time_limit(Duration::from_millis(100))
        .retries(2)
        .backoff(dingo::Backoff::fixed(Duration::from_millis(10)).jitter(false));
    let result = count::call_with(&app, &options, token.clone(), 10_000, true).expect("call").wait_timeout(PATIENCE);
    assert_eq!(kind_of(result), Some(TaskErrorKind::TimeLimit));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(runs(&token).len(), 1, "a time-limit failure must not be retried");
    close(&app);
}

/// Hard limit: a task sleeping past it fails with `TimeLimit` soon after the limit; the pool
/// of one thread serves the next call at once; the written-off thread's late return
/// produces no second report; the message is settled (not run again).
pub fn a_hard_limit_fails_the_call_and_keeps_the_pool(setup: &dyn AppSetup) {
    let counting = Arc::new(CountingReporter { inner: setup.reporter(), published: AtomicUsize::new(0) });
    let app = setup.builder().reporter(counting.clone()).build().expect("build");
    let events = app.events(EventFilter::new().kinds([EventKind::TimeLimitExceeded]));
    app.allocate_all(1).expect("allocate");
    let token = crate::unique("hard");
    let options = CallOptions::new().time_limit(Duration::from_millis(300));
    let started = Instant::now();
    let result = stubborn::call_with(&app, &options, token.clone(), 1_500).expect("call").wait_timeout(PATIENCE);
    let took = started.elapsed();
    assert_eq!(kind_of(result), Some(TaskErrorKind::TimeLimit));
    let ran = lock(&STARTED)[&token].elapsed();
    let after_start = took.saturating_sub(started.elapsed() - ran);
    eprintln!(
        "hard limit 300 ms: the caller had TimeLimit {after_start:?} after the task started ({took:?} after the call)"
    );
    assert!(after_start >= Duration::from_millis(300), "failed before its limit ({after_start:?})");
    assert!(
        after_start < Duration::from_millis(300) + HARD_LATE,
        "failed {after_start:?} after the task started (limit 300 ms)"
    );
    assert!(events.recv_timeout(PATIENCE).is_some(), "no TimeLimitExceeded event");
    // The pool kept its one thread: the next call runs while the stubborn one still sleeps.
    let next = Instant::now();
    assert_eq!(stamp::call(&app, token.clone()).expect("call").wait_timeout(PATIENCE).expect("the next call"), 1);
    assert!(next.elapsed() < Duration::from_millis(1_000), "the next call waited {:?}", next.elapsed());
    assert_eq!(app.threads_written_off(), 1);
    let published = counting.published.load(Ordering::SeqCst);
    // Past the stubborn task's return: nothing more is published for it, and it ran once.
    std::thread::sleep(Duration::from_millis(1_700));
    assert_eq!(counting.published.load(Ordering::SeqCst), published, "the written-off thread reported");
    assert_eq!(runs(&token).iter().filter(|(_, attempt)| *attempt == 1).count(), 2, "{:?}", runs(&token));
    close(&app);
}

/// A task's own `time_limit` attribute applies to a call that sets none.
pub fn a_task_attribute_sets_the_hard_limit(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(limited, 2).expect("allocate");
    let token = crate::unique("attr-limit");
    let started = Instant::now();
    let result = limited::call(&app, token.clone()).expect("call").wait_timeout(PATIENCE);
    assert_eq!(kind_of(result), Some(TaskErrorKind::TimeLimit));
    assert!(started.elapsed() < Duration::from_millis(300) + SLACK, "{:?}", started.elapsed());
    close(&app);
}

/// 200 calls queued before any worker runs; 100 of them cancelled (half through their
/// handles, half by key from another app): exactly those fail with `Cancelled` and never
/// run, the other 100 run.
pub fn cancelled_queued_calls_never_run(setup: &dyn AppSetup) {
    let caller = setup.app();
    let other = setup.app();
    let token = crate::unique("cancel-queued");
    let handles: Vec<_> = (0..200).map(|_| stamp::call(&caller, token.clone()).expect("call")).collect();
    let mut cancelled = BTreeSet::new();
    for (n, handle) in handles.iter().enumerate().filter(|(n, _)| n % 2 == 0) {
        if n % 4 == 0 {
            handle.cancel().expect("cancel through the handle");
        } else {
            other.cancel(handle.name(), handle.id()).expect("cancel by key");
        }
        cancelled.insert(handle.id().to_string());
    }
    let worker = setup.app();
    worker.allocate(stamp, 4).expect("allocate");
    for mut handle in handles {
        let id = handle.id().to_string();
        let result = handle.wait_timeout(PATIENCE);
        if cancelled.contains(&id) {
            assert_eq!(kind_of(result), Some(TaskErrorKind::Cancelled), "call {id}");
        } else {
            assert_eq!(result.expect("an uncancelled call runs"), 1);
        }
    }
    let ran = ran(&token);
    assert_eq!(ran.len(), 100);
    assert!(ran.is_disjoint(&cancelled), "a cancelled call ran");
    for app in [&caller, &other, &worker] {
        close(app);
    }
}

/// A delayed call cancelled while it waits never runs; its caller gets `Cancelled` once it
/// is due.
pub fn a_cancelled_delayed_call_never_runs(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(stamp, 1).expect("allocate");
    let token = crate::unique("cancel-delayed");
    let options = CallOptions::new().countdown(Duration::from_millis(300));
    let mut handle = stamp::call_with(&app, &options, token.clone()).expect("call");
    handle.cancel().expect("cancel");
    assert_eq!(kind_of(handle.wait_timeout(PATIENCE)), Some(TaskErrorKind::Cancelled));
    assert!(runs(&token).is_empty(), "the cancelled call ran");
    close(&app);
}

/// A call cancelled while it waits out a retry's backoff does not run again: its caller
/// gets `Cancelled` when the next attempt comes due.
pub fn a_cancel_stops_retries(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(breakable, 1).expect("allocate");
    let token = crate::unique("cancel-retry");
    lock(&BROKEN).insert(token.clone());
    let options =
        CallOptions::new().retries(3).backoff(dingo::Backoff::fixed(Duration::from_millis(400)).jitter(false));
    let mut handle = breakable::call_with(&app, &options, token.clone()).expect("call");
    wait_for("the first attempt", || !runs(&token).is_empty());
    handle.cancel().expect("cancel");
    assert_eq!(kind_of(handle.wait_timeout(PATIENCE)), Some(TaskErrorKind::Cancelled));
    assert_eq!(runs(&token).len(), 1, "a cancelled call was retried: {:?}", runs(&token));
    lock(&BROKEN).remove(&token);
    close(&app);
}

/// A running task sees its cancel (`ctx.is_cancelled()`), and returning `Err` because of it
/// gives its caller `Cancelled`.
pub fn a_running_task_sees_its_cancel(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(count, 1).expect("allocate");
    let token = crate::unique("cancel-running");
    let mut handle = count::call(&app, token.clone(), 15_000, true).expect("call");
    wait_for("the task to start", || !runs(&token).is_empty());
    let cancelled = Instant::now();
    app.cancel(handle.name(), handle.id()).expect("cancel");
    let result = handle.wait_timeout(PATIENCE);
    let took = cancelled.elapsed();
    assert_eq!(kind_of(result), Some(TaskErrorKind::Cancelled));
    eprintln!("a running task returned {took:?} after its cancel");
    assert!(took < Duration::from_millis(200) + SLACK, "the task saw its cancel after {took:?}");
    close(&app);
}

/// Cancelling an unknown call, or one that finished, is not an error and changes nothing
/// (no warning, no event storm); a finished call's result stays what it was.
pub fn cancelling_unknown_or_finished_calls_changes_nothing(setup: &dyn AppSetup) {
    let app = setup.app();
    let warnings = app.events(EventFilter::new().level(Level::Warning));
    app.allocate(stamp, 1).expect("allocate");
    let token = crate::unique("cancel-nothing");
    app.cancel("control.stamp", &TaskId::new(crate::unique("nobody").as_str())).expect("cancel an unknown call");
    app.cancel("control.no_such_task", &TaskId::new("1")).expect("cancel a call of an unknown task");
    let mut handle = stamp::call(&app, token.clone()).expect("call");
    let id = handle.id().clone();
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 1);
    app.cancel("control.stamp", &id).expect("cancel a finished call");
    // Other calls run as before.
    assert_eq!(stamp::call(&app, token.clone()).expect("call").wait_timeout(PATIENCE).expect("result"), 1);
    assert_eq!(runs(&token).len(), 2);
    assert!(warnings.try_recv().is_none(), "a cancel raised a warning");
    close(&app);
}

/// Exhausted retries are listed with their reason, time and key; replay sends them back as
/// fresh attempts, each once; purge deletes.
pub fn dead_letters_are_listed_replayed_and_purged(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(breakable, 2).expect("allocate");
    let token = crate::unique("dead");
    lock(&BROKEN).insert(token.clone());
    let before = SystemTime::now() - Duration::from_secs(1);
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let mut handle = breakable::call(&app, token.clone()).expect("call");
            let id = handle.id().to_string();
            assert_eq!(kind_of(handle.wait_timeout(PATIENCE)), Some(TaskErrorKind::Failed));
            id
        })
        .collect();
    wait_for("three dead letters", || app.dead_count("control.breakable").expect("count") == 3);
    let letters = app.dead_letters("control.breakable", 100).expect("list");
    assert_eq!(letters.len(), 3);
    let listed: Vec<String> = letters.iter().map(|l| l.key.as_ref().expect("a key").id.to_string()).collect::<Vec<_>>();
    assert_eq!(listed.iter().collect::<BTreeSet<_>>(), ids.iter().collect::<BTreeSet<_>>());
    for letter in &letters {
        assert!(letter.reason.contains("after 3 attempt(s)"), "reason: {}", letter.reason);
        assert_eq!(letter.queue.as_str(), "control.breakable");
        let at = letter.at.expect("every broker records when a letter died");
        // RabbitMQ's own dead-lettering records whole seconds.
        assert!(at + Duration::from_secs(1) >= before && at <= SystemTime::now() + Duration::from_secs(1), "{at:?}");
    }
    assert_eq!(app.dead_letters("control.breakable", 2).expect("list").len(), 2, "the limit");

    // Mended: replay one, then the rest; each runs once more, as attempt 1.
    lock(&BROKEN).remove(&token);
    let first = TaskId::new(ids[0].as_str());
    assert_eq!(app.replay_dead("control.breakable", &Select::Ids(vec![first])).expect("replay"), 1);
    let runs_of =
        |id: &str| runs(&token).into_iter().filter(|(i, _)| i == id).map(|(_, attempt)| attempt).collect::<Vec<_>>();
    wait_for("the replayed call", || runs_of(&ids[0]).len() == 4);
    assert_eq!(runs_of(&ids[0]), [1, 2, 3, 1], "replayed as a fresh attempt");
    assert_eq!(app.dead_count("control.breakable").expect("count"), 2);
    assert_eq!(app.replay_dead("control.breakable", &Select::All).expect("replay"), 2);
    wait_for("every replayed call", || runs(&token).len() == 12);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(runs(&token).len(), 12, "a replayed call ran twice: {:?}", runs(&token));
    assert_eq!(app.dead_count("control.breakable").expect("count"), 0);
    assert_eq!(app.replay_dead("control.breakable", &Select::All).expect("replay"), 0);

    // Purge.
    lock(&BROKEN).insert(token.clone());
    for _ in 0..2 {
        let _ = breakable::call(&app, token.clone()).expect("call").wait_timeout(PATIENCE);
    }
    wait_for("two dead letters", || app.dead_count("control.breakable").expect("count") == 2);
    assert_eq!(app.purge_dead("control.breakable", &Select::All).expect("purge"), 2);
    assert_eq!(app.dead_count("control.breakable").expect("count"), 0);
    lock(&BROKEN).remove(&token);
    close(&app);
}

/// `purge` deletes what waits in a task's queue and says how many; none of it runs.
pub fn purge_empties_a_queue(setup: &dyn AppSetup) {
    let caller = setup.app();
    let token = crate::unique("purge");
    let options = CallOptions::new().ignore_report(true);
    for _ in 0..5 {
        // Nothing to wait for; a handle is a `Future`, so clippy wants `drop`, not `let _`.
        drop(stamp::call_with(&caller, &options, token.clone()).expect("call"));
    }
    // A send may still be on its way to the broker when the call returns (Redis pipelines
    // them): purge until all five were counted, then nothing is left.
    let mut purged = 0;
    wait_for("the five calls to be purged", || {
        purged += caller.purge("control.stamp").expect("purge");
        purged >= 5
    });
    assert_eq!(purged, 5);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(caller.purge("control.stamp").expect("purge again"), 0);
    let worker = setup.app();
    worker.allocate(stamp, 1).expect("allocate");
    // The worker serves later calls, and nothing purged runs.
    assert_eq!(stamp::call(&caller, format!("{token}.after")).expect("call").wait_timeout(PATIENCE).expect("runs"), 1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(runs(&token).is_empty(), "a purged call ran");
    close(&caller);
    close(&worker);
}
