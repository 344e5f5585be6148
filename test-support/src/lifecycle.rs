//! The lifecycle rules: delays (countdown, ETA), expiry and retries, on whatever broker the
//! setup gives. The broker keeps delayed tasks; the worker decides expiry and retries.
//!
//! Tasks record what they saw under a token unique to the test, so the rules of one binary
//! can run in parallel on several brokers.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dingo::broker::kit::lock;
use dingo::{App, Backoff, CallOptions, Context, Error, EventFilter, EventKind, Report, TaskErrorKind};

use crate::PATIENCE;
use crate::app::AppSetup;

/// How late a delayed task may start in these rules: far above the brokers' targets (those
/// are measured by the benchmark), so a loaded CI machine does not fail them.
const LATE: Duration = Duration::from_millis(1_500);

/// One run of a task: its attempt, its call id, and when it started (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    attempt: u32,
    id: String,
    started: u64,
    due: u64,
}

static RUNS: Mutex<BTreeMap<String, Vec<Run>>> = Mutex::new(BTreeMap::new());

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn record(ctx: &Context<'_>, token: &str, due: u64) {
    let run = Run { attempt: ctx.attempt(), id: ctx.id().to_string(), started: now_ms(), due };
    lock(&RUNS).entry(token.to_owned()).or_default().push(run);
}

fn runs(token: &str) -> Vec<Run> {
    lock(&RUNS).get(token).cloned().unwrap_or_default()
}

/// A token no other test (on any broker of this binary) uses.
fn token(rule: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{rule}.{}.{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

#[dingo::task(name = "lifecycle.stamp")]
fn stamp(ctx: &Context, token: String, due: u64) -> u64 {
    record(ctx, &token, due);
    now_ms()
}

#[dingo::task(name = "lifecycle.flaky")]
fn flaky(ctx: &Context, token: String, failures: u32) -> Result<u32, String> {
    record(ctx, &token, 0);
    if ctx.attempt() <= failures { Err(format!("attempt {} failed", ctx.attempt())) } else { Ok(ctx.attempt()) }
}

#[dingo::task(name = "lifecycle.always_fails", retries = 2, retry_backoff = "20ms", retry_jitter = false)]
fn always_fails(ctx: &Context, token: String) -> Result<(), String> {
    record(ctx, &token, 0);
    Err(format!("attempt {} failed", ctx.attempt()))
}

#[dingo::task(name = "lifecycle.panics")]
fn panics(ctx: &Context, token: String) -> u32 {
    record(ctx, &token, 0);
    panic!("no retry for a panic");
}

#[dingo::task(name = "lifecycle.polite")]
fn polite(ctx: &Context, token: String, wait_ms: u64) -> Result<u32, String> {
    record(ctx, &token, 0);
    if ctx.attempt() == 1 {
        ctx.retry_after(Duration::from_millis(wait_ms));
        return Err("503 Service Unavailable, Retry-After".to_string());
    }
    Ok(ctx.attempt())
}

#[dingo::task(name = "lifecycle.nap")]
fn nap(ctx: &Context, token: String, millis: u64) -> u64 {
    record(ctx, &token, 0);
    std::thread::sleep(Duration::from_millis(millis));
    millis
}

fn retrying(reports: &[Report<u32>]) -> Vec<(u32, Duration)> {
    reports
        .iter()
        .filter_map(|r| match r {
            Report::Retrying { attempt, after, .. } => Some((*attempt, *after)),
            _ => None,
        })
        .collect()
}

fn close(app: &App) {
    app.close().expect("close");
}

/// A task delayed by 300 ms starts no earlier than due and within `LATE` (1.5 s: far above the targets) of it.
pub fn countdown_runs_after_its_delay(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(stamp, 1).expect("allocate");
    let token = token("countdown");
    let sent = now_ms();
    let due = sent + 300;
    let options = CallOptions::new().countdown(Duration::from_millis(300));
    let started = stamp::call_with(&app, &options, token.clone(), due).expect("call").wait_timeout(PATIENCE);
    let started = started.expect("result");
    assert!(started >= due, "started {} ms early", due - started);
    assert!(started - due <= LATE.as_millis() as u64, "started {} ms late", started - due);
    assert_eq!(runs(&token).len(), 1);
    close(&app);
}

/// An ETA a second ahead waits; an ETA in the past runs at once.
pub fn eta_waits_and_a_past_eta_runs_at_once(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(stamp, 2).expect("allocate");
    let token = token("eta");
    let now = SystemTime::now();
    let ahead = CallOptions::new().eta(now + Duration::from_millis(400));
    let past = CallOptions::new().eta(now - Duration::from_secs(3600));
    let sent = now_ms();
    let mut later = stamp::call_with(&app, &ahead, token.clone(), sent + 400).expect("call");
    let at_once = stamp::call_with(&app, &past, token.clone(), sent).expect("call").wait_timeout(PATIENCE);
    let at_once = at_once.expect("result");
    assert!(at_once - sent < 300, "a past ETA waited {} ms", at_once - sent);
    let later = later.wait_timeout(PATIENCE).expect("result");
    assert!(later >= sent + 400, "ran {} ms before its ETA", sent + 400 - later);
    close(&app);
}

/// 2,000 tasks with random delays of 0–3 s each run exactly once, none before its due time,
/// and (one worker thread) in due order within the lateness.
pub fn random_delays_run_once_in_due_order(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(stamp, 1).expect("allocate");
    let token = token("random");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ now_ms();
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let start = now_ms();
    let mut handles = Vec::with_capacity(2_000);
    for _ in 0..2_000 {
        let delay = next() % 3_000;
        let due = now_ms() + delay;
        let options = CallOptions::new().countdown(Duration::from_millis(delay));
        handles.push(stamp::call_with(&app, &options, token.clone(), due).expect("call"));
    }
    for mut handle in handles {
        handle.wait_timeout(PATIENCE).expect("result");
    }
    let runs = runs(&token);
    assert_eq!(runs.len(), 2_000, "every task runs exactly once");
    let ids: std::collections::HashSet<&str> = runs.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 2_000, "no task ran twice");
    for run in &runs {
        assert!(run.started >= run.due, "{} started {} ms early", run.id, run.due - run.started);
    }
    let late: Vec<u64> = runs.iter().map(|r| r.started - r.due).collect();
    let worst = late.iter().max().copied().unwrap_or(0);
    // One bound for both: a task that may start this late may start after tasks due up to
    // this much later (RabbitMQ's quorum delay hops, under CI's load, reach ~1.8 s).
    let bound = LATE.as_millis() as u64 + 1_000;
    assert!(worst <= bound, "a task started {worst} ms late");
    for pair in runs.windows(2) {
        assert!(
            pair[1].due + bound >= pair[0].due,
            "out of due order: due {} ran after due {}",
            pair[1].due - start,
            pair[0].due - start
        );
    }
    close(&app);
}

/// A task whose expiry passes before a worker can start it is not run: its caller gets
/// `Expired` and an event says so.
pub fn an_expired_task_is_not_run(setup: &dyn AppSetup) {
    let app = setup.app();
    let events = app.events(EventFilter::new().kinds([EventKind::TaskExpired]));
    app.allocate(stamp, 1).expect("allocate");
    let token = token("expired");
    let options = CallOptions::new().countdown(Duration::from_millis(300)).expires_in(Duration::from_millis(100));
    let outcome = stamp::call_with(&app, &options, token.clone(), 0).expect("call").wait_timeout(PATIENCE);
    let error = outcome.expect_err("expired");
    assert_eq!(error.task_kind(), Some(TaskErrorKind::Expired), "{error:?}");
    assert!(events.recv_timeout(PATIENCE).is_some(), "a TaskExpired event");
    assert!(runs(&token).is_empty(), "an expired task must not run");
    // The worker goes on: the next call runs.
    let mut fine = stamp::call_with(&app, &CallOptions::new().expires_in(PATIENCE), token.clone(), 0).expect("call");
    fine.wait_timeout(PATIENCE).expect("an unexpired call runs");
    assert_eq!(runs(&token).len(), 1);
    close(&app);
}

/// A task that started before its expiry is not interrupted by it.
pub fn a_started_task_outlives_its_expiry(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(nap, 1).expect("allocate");
    let token = token("outlives");
    let options = CallOptions::new().expires_in(Duration::from_millis(300));
    let slept = nap::call_with(&app, &options, token.clone(), 600).expect("call").wait_timeout(PATIENCE);
    assert_eq!(slept.expect("finishes"), 600);
    close(&app);
}

/// A task failing twice then succeeding with `retries = 3` returns its value; its caller saw
/// two `Retrying` reports with growing waits; every attempt kept the call's id.
pub fn a_failing_task_retries_then_succeeds(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(flaky, 1).expect("allocate");
    let token = token("flaky");
    let backoff = Backoff::exponential(Duration::from_millis(50)).jitter(false);
    let options = CallOptions::new().retries(3).backoff(backoff).monitor_progress(true);
    let handle = flaky::call_with(&app, &options, token.clone(), 2).expect("call");
    let id = handle.id().to_string();
    let reports: Vec<Report<u32>> = handle.reports().collect();
    assert_eq!(reports.last(), Some(&Report::Success(3)), "{reports:?}");
    assert_eq!(retrying(&reports), [(1, Duration::from_millis(50)), (2, Duration::from_millis(100))]);
    let runs = runs(&token);
    assert_eq!(runs.iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(runs.iter().all(|r| r.id == id), "a retry keeps the call's id: {runs:?}");
    for (pair, wait) in runs.windows(2).zip([50u64, 100]) {
        assert!(pair[1].started >= pair[0].started + wait, "attempt {} came early: {runs:?}", pair[1].attempt);
    }
    close(&app);
}

/// With `retries = 2` (the task's attribute) an always-failing task runs 3 times, then fails
/// naming the 3 attempts with its last error, and its message goes to the dead letters once.
pub fn retries_run_out_into_the_dead_letters(setup: &dyn AppSetup) {
    let app = setup.app();
    let events = app.events(EventFilter::new().kinds([EventKind::DeadLettered]));
    app.allocate(always_fails, 1).expect("allocate");
    let token = token("exhausted");
    let outcome = always_fails::call(&app, token.clone()).expect("call").wait_timeout(PATIENCE);
    let error = match outcome {
        Err(Error::Task(error)) => error,
        other => panic!("expected a task failure, got {other:?}"),
    };
    assert_eq!(error.kind(), TaskErrorKind::Failed);
    assert_eq!(error.attempts(), 3);
    assert!(error.message().contains("after 3 attempt"), "{}", error.message());
    assert!(error.message().contains("attempt 3 failed"), "the last error: {}", error.message());
    assert_eq!(runs(&token).iter().map(|r| r.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    let letter = events.recv_timeout(PATIENCE).expect("a DeadLettered event");
    assert_eq!(letter.task.map(|k| k.name.to_string()).as_deref(), Some(always_fails::NAME));
    assert!(events.recv_timeout(Duration::from_millis(300)).is_none(), "one dead letter, not more");
    close(&app);
}

/// Waits grow exponentially and stay under the cap; with jitter each stays under its
/// ceiling.
pub fn backoff_grows_and_stays_under_its_cap(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(flaky, 2).expect("allocate");
    let exact = Backoff::exponential(Duration::from_millis(10)).cap(Duration::from_millis(40)).jitter(false);
    let options = CallOptions::new().retries(4).backoff(exact).monitor_progress(true);
    let reports: Vec<Report<u32>> =
        flaky::call_with(&app, &options, token("grows"), 4).expect("call").reports().collect();
    let waits: Vec<u64> = retrying(&reports).iter().map(|(_, w)| w.as_millis() as u64).collect();
    assert_eq!(waits, [10, 20, 40, 40], "{reports:?}");
    assert_eq!(reports.last(), Some(&Report::Success(5)));

    let jittered = Backoff::exponential(Duration::from_millis(10)).cap(Duration::from_millis(40));
    let options = CallOptions::new().retries(4).backoff(jittered).monitor_progress(true);
    let reports: Vec<Report<u32>> =
        flaky::call_with(&app, &options, token("jitter"), 4).expect("call").reports().collect();
    let waits = retrying(&reports);
    assert_eq!(waits.len(), 4, "{reports:?}");
    for ((attempt, wait), ceiling) in waits.iter().zip([10u64, 20, 40, 40]) {
        assert!(wait.as_millis() as u64 <= ceiling, "attempt {attempt} waited {wait:?} > {ceiling} ms");
    }
    close(&app);
}

/// A task that asks for a wait (`ctx.retry_after`) gets exactly that wait.
pub fn a_task_can_ask_for_its_retry_wait(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(polite, 1).expect("allocate");
    let token = token("polite");
    let options = CallOptions::new().retries(1).monitor_progress(true);
    let reports: Vec<Report<u32>> =
        polite::call_with(&app, &options, token.clone(), 250).expect("call").reports().collect();
    assert_eq!(retrying(&reports), [(1, Duration::from_millis(250))]);
    assert_eq!(reports.last(), Some(&Report::Success(2)));
    let runs = runs(&token);
    assert!(runs[1].started >= runs[0].started + 250, "{runs:?}");
    // Without retries the request changes nothing: the failure is final.
    let outcome = polite::call(&app, token.clone(), 10).expect("call").wait_timeout(PATIENCE);
    assert_eq!(outcome.expect_err("no retries").task_kind(), Some(TaskErrorKind::Failed));
    close(&app);
}

/// A panic is never retried, whatever the retries.
pub fn a_panic_is_not_retried(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(panics, 1).expect("allocate");
    let token = token("panics");
    let options = CallOptions::new().retries(3).backoff(Backoff::fixed(Duration::from_millis(5)));
    let outcome = panics::call_with(&app, &options, token.clone()).expect("call").wait_timeout(PATIENCE);
    let error = outcome.expect_err("panicked");
    assert_eq!(error.task_kind(), Some(TaskErrorKind::Panic), "{error:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(runs(&token).len(), 1, "a panic must not run again");
    close(&app);
}

/// A message that cannot run (its arguments do not decode) is never retried, whatever the
/// retries: one failure of kind `BadPayload`, no `TaskRetrying`, one dead letter.
pub fn a_bad_payload_is_not_retried(setup: &dyn AppSetup) {
    let app = setup.app();
    let events = app.events(EventFilter::new().kinds([EventKind::TaskRetrying, EventKind::DeadLettered]));
    app.allocate(stamp, 1).expect("allocate");
    let garbage = dingo::Encoded::new(dingo::codec::MSGPACK, vec![0xc1, 0xff, 0x00]);
    let options = CallOptions::new().retries(3).backoff(Backoff::fixed(Duration::from_millis(5)));
    let outcome = app.call_raw(stamp::NAME, &options, garbage).expect("call").wait_timeout(PATIENCE);
    let error = outcome.expect_err("bad payload");
    assert_eq!(error.task_kind(), Some(TaskErrorKind::BadPayload), "{error:?}");
    assert_eq!(error.task_error().map(|e| e.attempts()), Some(1));
    let kinds: Vec<EventKind> =
        std::iter::from_fn(|| events.recv_timeout(Duration::from_millis(500))).map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::DeadLettered], "dead-lettered once, never retried");
    close(&app);
}

/// `wait_timeout` on a delayed or retrying call loses nothing: waiting again gets the result.
pub fn a_timed_out_wait_on_a_delayed_call_loses_nothing(setup: &dyn AppSetup) {
    let app = setup.app();
    app.allocate(flaky, 1).expect("allocate");
    let token = token("wait");
    let options = CallOptions::new()
        .countdown(Duration::from_millis(200))
        .retries(1)
        .backoff(Backoff::fixed(Duration::from_millis(200)));
    // Timed from before the call: its countdown runs from the call's start, and a first
    // call may take a while (a remote broker connects its threads as they are first needed).
    let started = Instant::now();
    let mut handle = flaky::call_with(&app, &options, token.clone(), 1).expect("call");
    for _ in 0..3 {
        match handle.wait_timeout(Duration::from_millis(60)) {
            Err(Error::Timeout(_)) => {}
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the result after all"), 2);
    assert!(started.elapsed() >= Duration::from_millis(400), "delay and backoff were both kept");
    close(&app);
}
