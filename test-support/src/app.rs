//! App-level scenarios (Go dingo's single- and multi-app suites, and the failure paths):
//! they run on whatever broker the setup gives, with one app holding every role or with
//! several caller and worker apps sharing the broker. Each waits for its calls through a
//! [`Waiter`]: blocking, or `.await` on an executor, the same rules for both.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dingo::broker::{Ack, Reporter};
use dingo::message::{ReplyTo, ReportMessage};
use dingo::registry::fingerprint;
use dingo::{
    App, AppBuilder, BrokerError, CallOptions, Encoded, Error, EventFilter, EventKind, Events, Level, Origin, Report,
    Sequential, TaskErrorKind,
};

use crate::PATIENCE;
use crate::awaiting::Waiter;
use dingo::broker::kit::lock;

/// Builds apps on one fresh broker (or namespace) per test.
pub trait AppSetup {
    /// A builder with every role set, on this test's broker.
    fn builder(&self) -> AppBuilder;

    /// A reporter on this test's broker (tests wrap it to watch what workers publish).
    fn reporter(&self) -> Arc<dyn Reporter>;

    /// A new app on this test's broker.
    fn app(&self) -> App {
        self.builder().build().expect("build the app")
    }
}

#[dingo::task(name = "conformance.plus_one")]
fn plus_one(n: i64) -> i64 {
    n + 1
}

#[dingo::task(name = "conformance.explode")]
fn explode(n: i64) -> i64 {
    if n < 0 {
        panic!("boom: {n}");
    }
    n * 10
}

#[dingo::task(name = "conformance.sleep_then_echo")]
fn sleep_then_echo(millis: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    millis
}

#[dingo::task(name = "conformance.order")]
fn order(n: i64, name: String) -> (i64, String) {
    (n + 1, name + "b")
}

static RECORDED: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[dingo::task(name = "conformance.record")]
fn record(token: String) {
    lock(&RECORDED).push(token);
}

/// Fails the test if any event at `Warning` or above was emitted (Go dingo's suites do the
/// same): library errors must not pass silently.
pub struct NoWarnings(Events);

impl NoWarnings {
    /// Starts watching `app`.
    pub fn watch(app: &App) -> NoWarnings {
        NoWarnings(app.events(EventFilter::new().level(Level::Warning)))
    }

    /// Asserts nothing was emitted.
    pub fn check(self) {
        let events: Vec<_> = std::iter::from_fn(|| self.0.try_recv()).collect();
        assert!(events.is_empty(), "unexpected events: {events:#?}");
    }
}

/// Waits for an event of `kind`, or fails.
pub fn expect_event(events: &Events, kind: EventKind) -> dingo::Event {
    let deadline = Instant::now() + PATIENCE;
    while let Some(event) = events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if event.kind == kind {
            return event;
        }
    }
    panic!("no {kind:?} event within {PATIENCE:?}");
}

/// A task `n -> n + 1` called with `monitor_progress` delivers exactly Sent, Progress (its
/// start) and Success(6) for n = 5.
pub fn sent_progress_success(setup: &dyn AppSetup, waiter: &Waiter) {
    let app = setup.app();
    let quiet = NoWarnings::watch(&app);
    app.allocate(plus_one, 1).expect("allocate");
    let handle = plus_one::call_with(&app, &CallOptions::new().monitor_progress(true), 5).expect("call");
    let reports: Vec<Report<i64>> = waiter.reports(handle);
    assert_eq!(reports.len(), 3, "{reports:?}");
    assert_eq!(reports[0], Report::Sent);
    assert!(matches!(&reports[1], Report::Progress(p) if p.is_start()), "{reports:?}");
    assert_eq!(reports[2], Report::Success(6));
    // Without monitor_progress only the final report arrives.
    let reports: Vec<Report<i64>> = waiter.reports(plus_one::call(&app, 6).expect("call"));
    assert_eq!(reports, [Report::Success(7)]);
    app.close().expect("close");
    quiet.check();
}

/// 12 task names of `fn(n: i64, msg: String) -> (i64, String)`, each with its own sequential
/// ids (so every name issues "1".."5"), 5 concurrent calls each: every call gets
/// `(n + 1000, "the msg: " + msg)`.
pub fn same_ids_under_12_names(setup: &dyn AppSetup, waiter: &Waiter) {
    let app = setup.app();
    let quiet = NoWarnings::watch(&app);
    let names: Vec<String> = (0..12).map(|i| format!("conformance.same_id.{i}")).collect();
    for name in &names {
        app.register(name.clone(), |(n, msg): (i64, String)| (n + 1000, format!("the msg: {msg}"))).expect("register");
        app.set_id_maker(name, Sequential::new()).expect("id maker");
        app.set_default_options(name, CallOptions::new().monitor_progress(true)).expect("options");
        app.allocate(name, 3).expect("allocate");
    }
    let ids = Mutex::new(HashSet::new());
    std::thread::scope(|s| {
        for (i, name) in names.iter().enumerate() {
            let (app, ids) = (&app, &ids);
            s.spawn(move || {
                for j in 0..5i64 {
                    let n = i as i64 * 12 + j;
                    let handle = app.call::<_, (i64, String)>(name, (n, j.to_string())).expect("call");
                    lock(ids).insert((name.clone(), handle.id().to_string()));
                    let got = waiter.wait_timeout(handle, PATIENCE).expect("result");
                    assert_eq!(got, (n + 1000, format!("the msg: {j}")));
                }
            });
        }
    });
    let ids = ids.into_inner().unwrap_or_else(|e| e.into_inner());
    assert_eq!(ids.len(), 60);
    assert_eq!(ids.iter().filter(|(_, id)| id == "5").count(), 12, "each name counts its own ids");
    app.close().expect("close");
    quiet.check();
}

/// A panic becomes a `Panic` failure with the panic's message, and the next call on the
/// same (only) worker works.
pub fn panic_is_reported_and_worker_survives(setup: &dyn AppSetup, waiter: &Waiter) {
    let app = setup.app();
    let events = app.events(EventFilter::new().level(Level::Warning));
    app.allocate(explode, 1).expect("allocate");
    let err = waiter.wait(explode::call(&app, -1).expect("call")).expect_err("must fail");
    let task_error = err.task_error().expect("a task error");
    assert_eq!(task_error.kind(), TaskErrorKind::Panic);
    assert_eq!(task_error.message(), "boom: -1");
    expect_event(&events, EventKind::TaskPanicked);
    for n in 1..=3 {
        assert_eq!(waiter.wait(explode::call(&app, n).expect("call")).expect("works again"), n * 10);
    }
    app.close().expect("close");
}

/// Counts what workers publish.
pub(crate) struct CountingReporter {
    pub(crate) inner: Arc<dyn Reporter>,
    pub(crate) published: AtomicUsize,
}

impl Reporter for CountingReporter {
    fn attach(&self, events: &dingo::event::EventSink) {
        self.inner.attach(events)
    }

    fn report(&self, to: &ReplyTo, report: ReportMessage<'_>) -> Result<(), BrokerError> {
        self.published.fetch_add(1, Ordering::SeqCst);
        self.inner.report(to, report)
    }

    fn finish(&self, to: &ReplyTo, report: ReportMessage<'_>, ack: Option<Ack>) -> Result<(), BrokerError> {
        self.published.fetch_add(1, Ordering::SeqCst);
        self.inner.finish(to, report, ack)
    }

    fn accepts_local(&self) -> bool {
        self.inner.accepts_local()
    }

    fn close(&self) {
        self.inner.close()
    }
}

/// `ignore_report` (fire-and-forget): the call gives no handle to wait on, the task runs,
/// and the worker publishes nothing.
pub fn ignore_report_gives_no_handle_and_no_report(setup: &dyn AppSetup, waiter: &Waiter) {
    let counting = Arc::new(CountingReporter { inner: setup.reporter(), published: AtomicUsize::new(0) });
    let app = setup.builder().reporter(counting.clone()).build().expect("build");
    app.allocate(record, 1).expect("allocate");
    let token = crate::unique("fire-and-forget");
    let id = record::send(&app, token.clone()).expect("send");
    assert!(!id.as_str().is_empty());
    let options = CallOptions::new().ignore_report(true).monitor_progress(true);
    let handle = record::call_with(&app, &options, format!("{token}.2")).expect("call");
    assert!(handle.is_detached());
    assert!(matches!(waiter.wait(handle), Err(Error::NoReport)));

    let deadline = Instant::now() + PATIENCE;
    while !(lock(&RECORDED).contains(&token) && lock(&RECORDED).contains(&format!("{token}.2"))) {
        assert!(Instant::now() < deadline, "the fire-and-forget tasks did not run");
        std::thread::sleep(Duration::from_millis(2));
    }
    app.close().expect("close");
    assert_eq!(counting.published.load(Ordering::SeqCst), 0, "a worker published a report");
}

/// Closing an app lets the running task finish; a call still queued gets a `Shutdown`
/// failure instead of waiting forever.
pub fn shutdown_fails_pending_calls(setup: &dyn AppSetup, waiter: &Waiter) {
    let app = setup.builder().shutdown_grace(PATIENCE).build().expect("build");
    app.allocate(sleep_then_echo, 1).expect("allocate");
    let running = sleep_then_echo::call_with(&app, &CallOptions::new().monitor_progress(true), 300).expect("call");
    let mut running = waiter.on(running);
    assert!(matches!(running.next_report(Some(PATIENCE)), Ok(Some(Report::Sent))), "the first task started");
    let queued = sleep_then_echo::call(&app, 0).expect("call");
    app.close().expect("close");
    assert_eq!(running.wait().expect("the running task finishes"), 300);
    let err = waiter.wait(queued).expect_err("the queued task cannot run any more");
    assert_eq!(err.task_kind(), Some(TaskErrorKind::Shutdown), "{err:?}");
    assert!(matches!(sleep_then_echo::call(&app, 0), Err(Error::Shutdown)));
}

/// A wait that times out loses nothing: the result that arrives later is there for the next
/// wait, and a result that arrives while nobody waits is kept for the first wait.
pub fn a_timed_out_wait_loses_nothing(setup: &dyn AppSetup, waiter: &Waiter) {
    let app = setup.app();
    app.allocate(sleep_then_echo, 1).expect("allocate");
    let mut slow = waiter.on(sleep_then_echo::call(&app, 300).expect("call"));
    let second = sleep_then_echo::call(&app, 0).expect("call");
    match slow.wait_timeout(Duration::from_millis(50)) {
        Err(Error::Timeout(after)) => assert_eq!(after, Duration::from_millis(50)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(slow.wait_timeout(PATIENCE).expect("waiting again"), 300);
    std::thread::sleep(Duration::from_millis(200)); // `second` finishes while nobody waits
    assert_eq!(waiter.wait(second).expect("a result that came while nobody waited"), 0);
    app.close().expect("close");
}

/// A call of a task nobody registered fails with `UnknownTask` instead of hanging, and says
/// that the crate defining it may not be linked (the likely cause for a `#[dingo::task]`).
pub fn unknown_task_fails(setup: &dyn AppSetup, waiter: &Waiter) {
    let app = setup.app();
    app.allocate_all(1).expect("allocate");
    let task = "conformance_tasks::no_such_task";
    let outcome = app.call::<_, i64>(task, 1i64).and_then(|h| waiter.wait_timeout(h, PATIENCE));
    let err = outcome.expect_err("must fail");
    assert_eq!(err.task_kind(), Some(TaskErrorKind::UnknownTask), "{err:?}");
    let message = err.task_error().expect("a task error").message().to_owned();
    assert!(message.starts_with("no queue serves task `conformance_tasks::no_such_task`"), "{message}");
    assert!(
        message.ends_with(
            ": no app on this broker has registered it; if it is a `#[dingo::task]` of crate `conformance_tasks`, \
             that crate may not be linked into this binary (a crate nothing refers to is left out, and its tasks \
             with it): add `use conformance_tasks as _;` to the binary"
        ),
        "{message}"
    );
    app.close().expect("close");
}

/// A call with other types than the task's fails with `SignatureMismatch` (and an event):
/// at once, naming both signatures, when the calling app has the task itself (every app has
/// every `#[dingo::task]`); otherwise at the worker, which names its own types. The worker
/// goes on.
pub fn signature_mismatch_fails(setup: &dyn AppSetup, waiter: &Waiter) {
    let worker = setup.app();
    let caller = setup.app();
    let worker_events = worker.events(EventFilter::new().level(Level::Error));
    let caller_events = caller.events(EventFilter::new().level(Level::Error));
    worker.allocate(plus_one, 1).expect("allocate");

    let err = caller.call::<_, i64>(plus_one::NAME, "five".to_string()).expect_err("refused before it is sent");
    assert_eq!(err.task_kind(), Some(TaskErrorKind::SignatureMismatch), "{err:?}");
    assert_eq!(
        err.to_string(),
        "signature mismatch: task `conformance.plus_one` takes i64 and returns i64; \
         this call passes String and expects i64"
    );
    assert_eq!(expect_event(&caller_events, EventKind::SignatureMismatch).origin, Origin::Producer);
    let err = caller.send(plus_one::NAME, (1u8, 2u8)).expect_err("refused before it is sent");
    assert_eq!(
        err.to_string(),
        "signature mismatch: task `conformance.plus_one` takes i64 and returns i64; this call passes (u8, u8)"
    );

    // A closure only the worker has: what a caller built from other code would send.
    worker.register("conformance.halve", |n: u64| n / 2).expect("register");
    worker.allocate("conformance.halve", 1).expect("allocate");
    let handle = caller.call::<_, u64>("conformance.halve", (8u64, 2u64)).expect("sent: the caller cannot check");
    let err = waiter.wait_timeout(handle, PATIENCE).expect_err("refused by the worker");
    assert_eq!(err.task_kind(), Some(TaskErrorKind::SignatureMismatch), "{err:?}");
    assert_eq!(
        err.task_error().expect("a task error").message(),
        format!(
            "task `conformance.halve` takes u64 and returns u64 on this worker, but the call passes other \
             argument types (signature {:016x}, this worker's {:016x}); likely causes: the caller calls it by \
             name with other types, or was built from other code (another version of the task)",
            fingerprint::<(u64, u64), u64>(),
            fingerprint::<u64, u64>()
        )
    );
    let event = expect_event(&worker_events, EventKind::SignatureMismatch);
    assert_eq!(event.origin, Origin::Worker);
    let handle = caller.call::<_, String>("conformance.halve", 8u64).expect("sent");
    let err = waiter.wait_timeout(handle, PATIENCE).expect_err("refused by the worker");
    assert!(
        err.to_string().contains("but the call passes the same arguments but expects another result type"),
        "{err}"
    );

    assert_eq!(waiter.wait_timeout(plus_one::call(&caller, 1).expect("call"), PATIENCE).expect("works"), 2);
    let handle = caller.call::<_, u64>("conformance.halve", 8u64).expect("call");
    assert_eq!(waiter.wait_timeout(handle, PATIENCE).expect("works"), 4);
    close_both(&caller, &worker);
}

/// A task of one argument takes it by name as the value itself or as a one-element tuple
/// `(x,)` — a `#[dingo::task]` as a closure, from the app that runs it as from another — and
/// reads each as what was sent: an empty list of lists sent as `(vec![],)` is that empty list,
/// not a list holding one empty list.
pub fn one_argument_calls_agree(setup: &dyn AppSetup, waiter: &Waiter) {
    let worker = setup.app();
    let caller = setup.app();
    let warnings = NoWarnings::watch(&worker);
    worker.register("conformance.halve", |n: u64| n / 2).expect("register");
    worker.register("conformance.count", |lists: Vec<Vec<u64>>| lists.len()).expect("register");
    worker.allocate(plus_one, 1).expect("allocate");
    worker.allocate(record, 1).expect("allocate");
    worker.allocate("conformance.halve", 1).expect("allocate");
    worker.allocate("conformance.count", 1).expect("allocate");

    for (who, app) in [("worker", &worker), ("caller", &caller)] {
        let wait = |handle: Result<dingo::Handle<i64>, Error>| waiter.wait_timeout(handle.expect("call"), PATIENCE);
        assert_eq!(wait(plus_one::call(app, 1)).expect("stub"), 2, "{who}");
        assert_eq!(wait(app.call(plus_one::NAME, 2i64)).expect("bare"), 3, "{who}");
        assert_eq!(wait(app.call(plus_one::NAME, (3i64,))).expect("tuple"), 4, "{who}");

        let wait = |handle: Result<dingo::Handle<u64>, Error>| waiter.wait_timeout(handle.expect("call"), PATIENCE);
        assert_eq!(wait(app.call("conformance.halve", 8u64)).expect("bare"), 4, "{who}");
        assert_eq!(wait(app.call("conformance.halve", (10u64,))).expect("tuple"), 5, "{who}");

        let wait = |handle: Result<dingo::Handle<usize>, Error>| waiter.wait_timeout(handle.expect("call"), PATIENCE);
        assert_eq!(wait(app.call("conformance.count", (Vec::<Vec<u64>>::new(),))).expect("tuple"), 0, "{who}");
        assert_eq!(wait(app.call("conformance.count", vec![Vec::<u64>::new()])).expect("bare"), 1, "{who}");
        assert_eq!(wait(app.call("conformance.count", (vec![Vec::<u64>::new()],))).expect("tuple"), 1, "{who}");

        let token = crate::unique(who);
        app.send(record::NAME, (format!("{token}.tuple"),)).expect("send a tuple");
        app.send(record::NAME, format!("{token}.bare")).expect("send bare");
        let deadline = Instant::now() + PATIENCE;
        let ran = |suffix: &str| lock(&RECORDED).contains(&format!("{token}.{suffix}"));
        while !(ran("tuple") && ran("bare")) {
            assert!(Instant::now() < deadline, "the fire-and-forget tasks did not run");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    close_both(&caller, &worker);
    warnings.check();
}

fn close_both(caller: &App, worker: &App) {
    caller.close().expect("close the caller");
    worker.close().expect("close the worker");
}

/// Arguments that do not decode give a `BadPayload` failure and an event; the worker goes
/// on.
pub fn bad_payload_fails_and_worker_goes_on(setup: &dyn AppSetup, waiter: &Waiter) {
    let app = setup.app();
    let events = app.events(EventFilter::new().level(Level::Error));
    app.allocate(plus_one, 1).expect("allocate");
    let garbage = Encoded::new(dingo::codec::MSGPACK, vec![0xc1, 0xff, 0x00]);
    let handle = app.call_raw(plus_one::NAME, &CallOptions::new(), garbage).expect("call");
    let err = waiter.wait_timeout(handle, PATIENCE).expect_err("must fail");
    assert_eq!(err.task_kind(), Some(TaskErrorKind::BadPayload), "{err:?}");
    let event = expect_event(&events, EventKind::BadPayload);
    assert_eq!(event.task.map(|t| t.name.to_string()), Some(plus_one::NAME.to_string()));
    assert_eq!(waiter.wait(plus_one::call(&app, 41).expect("call")).expect("works"), 42);
    app.close().expect("close");
}

/// Three caller apps and three worker apps on one broker. Only the callers ask for progress
/// reports (the option travels with the task); each caller gets exactly Sent, Progress and
/// its own result for each of its 5 calls.
pub fn three_callers_three_workers(setup: &dyn AppSetup, waiter: &Waiter) {
    let workers: Vec<App> = (0..3).map(|_| setup.app()).collect();
    for worker in &workers {
        worker.allocate(order, 1).expect("allocate");
    }
    let callers: Vec<App> = (0..3).map(|_| setup.app()).collect();
    let quiet: Vec<NoWarnings> = callers.iter().chain(&workers).map(NoWarnings::watch).collect();
    for caller in &callers {
        caller.set_default_options(order, CallOptions::new().monitor_progress(true)).expect("options");
    }
    std::thread::scope(|s| {
        for (k, caller) in callers.iter().enumerate() {
            s.spawn(move || {
                let handles: Vec<_> =
                    (0..5).map(|i| order::call(caller, k as i64, format!("{k}.{i}")).expect("call")).collect();
                for (i, handle) in handles.into_iter().enumerate() {
                    let reports: Vec<Report<(i64, String)>> = waiter.reports(handle);
                    assert_eq!(reports.len(), 3, "{reports:?}");
                    assert_eq!(reports[0], Report::Sent);
                    assert!(matches!(&reports[1], Report::Progress(p) if p.is_start()));
                    assert_eq!(reports[2], Report::Success((k as i64 + 1, format!("{k}.{i}b"))));
                }
            });
        }
    });
    for app in callers.iter().chain(&workers) {
        app.close().expect("close");
    }
    for q in quiet {
        q.check();
    }
}
