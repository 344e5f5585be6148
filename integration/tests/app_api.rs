//! The App API as a user relies on it: allocation, registration, handles (timeouts,
//! callbacks, reports), options, back-pressure, events, shutdown, URLs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use dingo::{
    App, CallOptions, Context, Error, EventFilter, EventKind, Handle, Level, LocalBroker, LocalOptions, Origin, Report,
    Sequential, TaskErrorKind,
};

const PATIENCE: Duration = Duration::from_secs(20);

fn app() -> App {
    App::local().expect("local app")
}

#[test]
fn public_types_are_shareable_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<App>();
    send_sync::<LocalBroker>();
    send_sync::<Error>();
    send_sync::<dingo::TaskError>();
    send_sync::<dingo::Events>();
    send::<Handle<i64>>();
    send::<Handle<String>>();
    send::<dingo::Reports<Vec<u8>>>();
    #[cfg(feature = "redis")]
    send_sync::<dingo::redis::RedisBroker>();
    #[cfg(feature = "amqp")]
    send_sync::<dingo::amqp::AmqpBroker>();
}

#[test]
fn allocate_again_adds_workers() {
    let app = app();
    let barrier = Arc::new(Barrier::new(3));
    let b = barrier.clone();
    // Each call blocks until three run at once: only possible with three workers.
    app.register("rendezvous", move |n: u32| {
        b.wait();
        n
    })
    .unwrap();
    app.allocate("rendezvous", 2).unwrap();
    app.allocate("rendezvous", 1).unwrap();
    let handles: Vec<Handle<u32>> = (0..3u32).map(|n| app.call("rendezvous", n).unwrap()).collect();
    for (n, mut h) in handles.into_iter().enumerate() {
        assert_eq!(h.wait_timeout(PATIENCE).unwrap(), n as u32);
    }
    app.close().unwrap();
}

#[test]
fn allocation_errors_are_clear() {
    let app = app();
    assert!(matches!(app.allocate("no.such.task", 1), Err(Error::UnknownTask { name }) if name == "no.such.task"));
    let not_a_task = |n: i64| n;
    assert!(matches!(app.allocate(not_a_task, 1), Err(Error::NotATask { .. })));
    app.register("zero", |n: i64| n).unwrap();
    assert!(matches!(app.allocate("zero", 0), Err(Error::InvalidConfig(_))));
    assert!(matches!(app.register("zero", |n: i64| n + 1), Err(Error::DuplicateTask { name }) if name == "zero"));
    let caller_only = App::builder().producer(Arc::new(LocalBroker::new())).build().unwrap();
    caller_only.register("x", |n: i64| n).unwrap();
    assert!(matches!(caller_only.allocate("x", 1), Err(Error::MissingRole(dingo::Role::Consumer))));
    assert!(matches!(caller_only.call::<_, i64>("x", 1i64), Err(Error::MissingRole(dingo::Role::Store))));
}

#[test]
fn a_timeout_loses_nothing() {
    let app = app();
    app.register("slow", |ms: u64| {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    })
    .unwrap();
    app.allocate("slow", 1).unwrap();
    let mut handle: Handle<u64> = app.call("slow", 300u64).unwrap();
    assert!(handle.try_get().is_none());
    let started = Instant::now();
    assert!(
        matches!(handle.wait_timeout(Duration::from_millis(20)), Err(Error::Timeout(d)) if d == Duration::from_millis(20))
    );
    assert!(started.elapsed() >= Duration::from_millis(20));
    assert!(!handle.is_finished());
    assert_eq!(handle.wait_timeout(PATIENCE).unwrap(), 300);
    assert!(matches!(handle.wait_timeout(PATIENCE), Err(Error::ResultTaken)));

    let mut quick: Handle<u64> = app.call("slow", 0u64).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let value = loop {
        if let Some(result) = quick.try_get() {
            break result.unwrap();
        }
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    };
    assert_eq!(value, 0);
    app.close().unwrap();
}

#[test]
fn handles_can_be_waited_on_from_other_threads() {
    let app = app();
    app.register("square", |n: i64| n * n).unwrap();
    app.allocate("square", 2).unwrap();
    let handles: Vec<Handle<i64>> = (0..50i64).map(|n| app.call("square", n).unwrap()).collect();
    let joins: Vec<_> = handles.into_iter().map(|h| std::thread::spawn(move || h.wait().unwrap())).collect();
    let got: Vec<i64> = joins.into_iter().map(|j| j.join().unwrap()).collect();
    assert_eq!(got, (0..50i64).map(|n| n * n).collect::<Vec<_>>());
    app.close().unwrap();
}

fn fallible(app: &App) {
    app.register_with_context("fallible", |ctx: &Context<'_>, n: i64| {
        ctx.progress(n);
        if n < 0 { Err(format!("negative: {n}")) } else { Ok(n * 2) }
    })
    .unwrap();
    app.allocate("fallible", 2).unwrap();
}

#[test]
fn callbacks_fire_once_whatever_the_order_and_the_reports_before() {
    let app = app();
    fallible(&app);
    let progress = CallOptions::new().monitor_progress(true);
    for (n, expect_ok) in [(21i64, true), (-1, false)] {
        for ok_first in [true, false] {
            let oks = Arc::new(AtomicUsize::new(0));
            let errs = Arc::new(Mutex::new(Vec::new()));
            let mut handle: Handle<i64> = app.call_with("fallible", &progress, n).unwrap();
            // A progress report arrives before the callbacks are registered (Go dingo lost
            // its error handler in that case).
            assert!(matches!(handle.next_report(Some(PATIENCE)), Ok(Some(Report::Sent))));
            let (o, e) = (oks.clone(), errs.clone());
            let on_ok = move |v: &i64| {
                assert_eq!(*v, 42);
                o.fetch_add(1, Ordering::SeqCst);
            };
            let on_err = move |err: &dingo::TaskError| e.lock().unwrap().push(err.message().to_owned());
            if ok_first {
                handle.on_ok(on_ok).on_err(on_err);
            } else {
                handle.on_err(on_err).on_ok(on_ok);
            }
            let result = handle.wait_timeout(PATIENCE);
            assert_eq!(result.is_ok(), expect_ok, "{result:?}");
            if expect_ok {
                assert_eq!(oks.load(Ordering::SeqCst), 1);
                assert!(errs.lock().unwrap().is_empty());
            } else {
                assert_eq!(oks.load(Ordering::SeqCst), 0);
                assert_eq!(*errs.lock().unwrap(), ["negative: -1"]);
            }
        }
    }
    app.close().unwrap();
}

#[test]
fn callbacks_fire_without_waiting_and_late_ones_fire_at_once() {
    let app = app();
    fallible(&app);
    let (tx, rx) = std::sync::mpsc::channel();
    let handle: Handle<i64> = app.call("fallible", 5i64).unwrap();
    handle.on_ok(move |v| tx.send(*v).unwrap());
    assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), 10);
    // Registered after the result arrived: runs at once, on this thread.
    let here = std::thread::current().id();
    let ran_here = Arc::new(Mutex::new(None));
    let r = ran_here.clone();
    handle.on_ok(move |_| *r.lock().unwrap() = Some(std::thread::current().id()));
    assert_eq!(*ran_here.lock().unwrap(), Some(here));
    assert_eq!(handle.wait().unwrap(), 10);
    app.close().unwrap();
}

#[test]
fn reports_carry_typed_progress_and_failures_carry_payloads() {
    let app = app();
    fallible(&app);
    let opts = CallOptions::new().monitor_progress(true);
    let reports: Vec<Report<i64>> = app.call_with("fallible", &opts, -7i64).unwrap().reports().collect();
    assert_eq!(reports.len(), 4, "{reports:?}");
    assert_eq!(reports[0], Report::Sent);
    assert!(matches!(&reports[1], Report::Progress(p) if p.is_start()));
    assert!(matches!(&reports[2], Report::Progress(p) if p.value::<i64>().unwrap().unwrap() == -7));
    let Report::Failure(error) = &reports[3] else { panic!("{reports:?}") };
    assert_eq!(error.kind(), TaskErrorKind::Failed);
    assert_eq!(error.payload::<String>().unwrap().unwrap(), "negative: -7");
    // Without monitor_progress, progress calls are free and nothing but the result comes.
    let reports: Vec<Report<i64>> = app.call("fallible", 1i64).unwrap().reports().collect();
    assert_eq!(reports, [Report::Success(2)]);
    app.close().unwrap();
}

#[test]
fn options_ids_and_defaults() {
    let app = app();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    app.register_with_context("ids", move |ctx: &Context<'_>, (): ()| {
        s.lock().unwrap().push((ctx.name().to_string(), ctx.id().to_string(), ctx.redelivered()));
        Ok::<_, String>(ctx.id().to_string())
    })
    .unwrap();
    app.allocate("ids", 1).unwrap();
    // An explicit id wins.
    let id: String = app.call_with("ids", &CallOptions::new().id("order-42"), ()).unwrap().wait().unwrap();
    assert_eq!(id, "order-42");
    // The default id maker: UUIDv7.
    let h: Handle<String> = app.call("ids", ()).unwrap();
    assert_eq!(h.id().as_str().len(), 36);
    assert_eq!(h.id().as_str().as_bytes()[14], b'7');
    h.wait().unwrap();
    // A per-task id maker and default options.
    app.set_id_maker("ids", Sequential::starting_at(100)).unwrap();
    app.set_default_options("ids", CallOptions::new().monitor_progress(true)).unwrap();
    let reports: Vec<Report<String>> = app.call("ids", ()).unwrap().reports().collect();
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[2], Report::Success("100".to_owned()));
    // The call's own option wins over the default.
    let reports: Vec<Report<String>> =
        app.call_with("ids", &CallOptions::new().monitor_progress(false), ()).unwrap().reports().collect();
    assert_eq!(reports, [Report::Success("101".to_owned())]);
    assert_eq!(seen.lock().unwrap()[0], ("ids".to_owned(), "order-42".to_owned(), false));
    app.close().unwrap();
}

#[test]
fn a_full_queue_applies_back_pressure() {
    let broker = LocalBroker::with_options(LocalOptions::new().capacity(2));
    let app = App::builder().broker(broker.clone()).build().unwrap();
    app.register("inc", |n: i64| n + 1).unwrap();
    let a: Handle<i64> = app.call("inc", 1i64).unwrap();
    let b: Handle<i64> = app.call("inc", 2i64).unwrap();
    assert_eq!(broker.queue_len("inc"), 2);
    let no_wait = CallOptions::new().enqueue_timeout(Duration::ZERO);
    assert!(matches!(app.call_with::<_, i64>("inc", &no_wait, 3i64), Err(Error::QueueFull { task }) if task == "inc"));
    let started = Instant::now();
    let short = CallOptions::new().enqueue_timeout(Duration::from_millis(50));
    assert!(matches!(app.call_with::<_, i64>("inc", &short, 3i64), Err(Error::QueueFull { .. })));
    assert!(started.elapsed() >= Duration::from_millis(50));
    // A blocking call waits for room: a worker started later makes it.
    let app2 = app.clone();
    let blocked = std::thread::spawn(move || app2.call::<_, i64>("inc", 3i64).unwrap().wait().unwrap());
    std::thread::sleep(Duration::from_millis(50));
    assert!(!blocked.is_finished());
    app.allocate("inc", 1).unwrap();
    assert_eq!(blocked.join().unwrap(), 4);
    assert_eq!((a.wait().unwrap(), b.wait().unwrap()), (2, 3));
    app.close().unwrap();
}

#[test]
fn events_are_filtered_and_a_slow_subscriber_loses_them_counted() {
    let app = app();
    app.register("boom", |n: i64| -> i64 { panic!("boom {n}") }).unwrap();
    app.allocate("boom", 1).unwrap();
    let workers = app.events(EventFilter::new().origins(Origin::Worker).level(Level::Warning));
    let errors_only = app.events(EventFilter::new().level(Level::Error));
    let producer_only = app.events(EventFilter::new().origins(Origin::Producer | Origin::Store).level(Level::Debug));
    let slow = app.events(EventFilter::new().level(Level::Warning).capacity(1));
    for n in 0..3i64 {
        let err = app.call::<_, i64>("boom", n).unwrap().wait().unwrap_err();
        assert_eq!(err.task_kind(), Some(TaskErrorKind::Panic));
    }
    let kinds: Vec<EventKind> = (0..3).map(|_| workers.recv_timeout(PATIENCE).unwrap().kind).collect();
    assert_eq!(kinds, [EventKind::TaskPanicked; 3]);
    let event = slow.try_recv().unwrap();
    assert_eq!((event.origin, event.level), (Origin::Worker, Level::Warning));
    assert_eq!(event.task.unwrap().name, "boom");
    assert_eq!(slow.dropped(), 2);
    assert!(errors_only.try_recv().is_none(), "a panic is a warning");
    assert!(producer_only.try_recv().is_none());
    app.close().unwrap();
    assert!(workers.iter().next().is_none(), "closing the app ends the subscription");
}

#[test]
fn close_is_graceful_idempotent_and_final() {
    let app = app();
    app.register("nap", |ms: u64| {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    })
    .unwrap();
    app.allocate("nap", 1).unwrap();
    let running: Handle<u64> = app.call("nap", 100u64).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    app.close().unwrap();
    assert_eq!(running.wait().unwrap(), 100);
    app.close().unwrap();
    assert!(app.is_closed());
    assert!(matches!(app.call::<_, u64>("nap", 1u64), Err(Error::Shutdown)));
    assert!(matches!(app.allocate("nap", 1), Err(Error::Shutdown)));
}

#[test]
fn dropping_an_app_does_not_block() {
    let app = app();
    app.register("idle", |n: i64| n).unwrap();
    app.allocate("idle", 2).unwrap();
    let started = Instant::now();
    drop(app);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn urls_choose_the_broker() {
    let app = App::connect("local://").unwrap();
    app.register("echo", |s: String| s).unwrap();
    app.allocate("echo", 1).unwrap();
    assert_eq!(app.call::<_, String>("echo", "hi".to_owned()).unwrap().wait().unwrap(), "hi");
    app.close().unwrap();
    App::connect("local://?serialized").unwrap().close().unwrap();
    for url in ["nope://host", "no-scheme", "local://?fast"] {
        assert!(matches!(App::connect(url), Err(Error::InvalidUrl { .. })), "{url}");
    }
    #[cfg(not(feature = "redis"))]
    {
        let err = App::connect("redis://:secret@127.0.0.1:6379").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`redis` feature"), "{text}");
        assert!(!text.contains("secret"), "the password leaked: {text}");
    }
}

#[test]
fn closures_keep_state() {
    let app = app();
    let counter = AtomicUsize::new(0);
    app.register("counter", move |()| counter.fetch_add(1, Ordering::SeqCst) + 1).unwrap();
    app.allocate("counter", 1).unwrap();
    let counts: Vec<usize> = (0..3).map(|_| app.call::<_, usize>("counter", ()).unwrap().wait().unwrap()).collect();
    assert_eq!(counts, [1, 2, 3]);
    app.close().unwrap();
}

#[test]
fn a_panicking_callback_neither_kills_the_worker_nor_hangs_the_waiter() {
    let app = app();
    app.register("id", |n: i64| n).unwrap();
    app.allocate("id", 1).unwrap();
    let handle: Handle<i64> = app.call("id", 1i64).unwrap();
    handle.on_ok(|_| panic!("a bad callback"));
    assert_eq!(handle.wait().unwrap(), 1);
    // The only worker still serves.
    assert_eq!(app.call::<_, i64>("id", 2i64).unwrap().wait_timeout(PATIENCE).unwrap(), 2);
    app.close().unwrap();
}

/// A type whose decoding panics: user serde code runs on the worker too.
#[derive(Debug)]
struct Bomb;

impl dingo::serde::Serialize for Bomb {
    fn serialize<S: dingo::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit()
    }
}

impl<'de> dingo::serde::Deserialize<'de> for Bomb {
    fn deserialize<D: dingo::serde::Deserializer<'de>>(_: D) -> Result<Bomb, D::Error> {
        panic!("cannot decode a bomb")
    }
}

#[test]
fn a_panic_while_decoding_arguments_is_a_task_failure() {
    let app = App::builder().broker(LocalBroker::serialized()).build().unwrap();
    app.register("defuse", |_: Bomb| 0u8).unwrap();
    app.allocate("defuse", 1).unwrap();
    let err = app.call::<_, u8>("defuse", Bomb).unwrap().wait_timeout(PATIENCE).unwrap_err();
    assert_eq!(err.task_kind(), Some(TaskErrorKind::Panic));
    assert_eq!(err.task_error().unwrap().message(), "cannot decode a bomb");
    app.register("fine", |n: u8| n).unwrap();
    app.allocate("fine", 1).unwrap();
    assert_eq!(app.call::<_, u8>("fine", 7u8).unwrap().wait_timeout(PATIENCE).unwrap(), 7);
    app.close().unwrap();
}

#[test]
fn a_dropped_handle_still_runs_its_callback() {
    for broker in [LocalBroker::new(), LocalBroker::serialized()] {
        let app = App::builder().broker(broker).build().unwrap();
        app.register("triple", |n: i64| n * 3).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let handle: Handle<i64> = app.call("triple", 5i64).unwrap();
        let errors = tx.clone();
        handle.on_ok(move |v| tx.send(Ok(*v)).unwrap());
        handle.on_err(move |e| errors.send(Err(e.kind())).unwrap());
        drop(handle);
        app.allocate("triple", 1).unwrap();
        assert_eq!(rx.recv_timeout(PATIENCE).unwrap(), Ok(15));
        app.close().unwrap();
    }
}

#[test]
fn huge_timeouts_mean_no_limit() {
    let app = App::builder().shutdown_grace(Duration::MAX).build().unwrap();
    app.register("one", |(): ()| 1u8).unwrap();
    app.allocate("one", 1).unwrap();
    let mut handle: Handle<u8> = app.call("one", ()).unwrap();
    assert_eq!(handle.wait_timeout(Duration::MAX).unwrap(), 1);
    app.close().unwrap();
}

#[test]
fn events_subscribed_after_close_end_at_once() {
    let app = app();
    app.close().unwrap();
    assert!(app.events(EventFilter::new()).recv().is_none());
}

#[test]
fn close_from_inside_a_task_does_not_wait_for_itself() {
    let app = App::builder().shutdown_grace(Duration::from_secs(10)).build().unwrap();
    let inner = app.clone();
    app.register("closer", move |(): ()| inner.close().is_ok()).unwrap();
    app.allocate("closer", 1).unwrap();
    let started = Instant::now();
    assert!(app.call::<_, bool>("closer", ()).unwrap().wait_timeout(PATIENCE).unwrap());
    assert!(started.elapsed() < Duration::from_secs(5), "close waited for its own thread");
    assert!(app.is_closed());
}

#[test]
fn fire_and_forget_by_name_checks_the_argument_type() {
    for broker in [LocalBroker::new(), LocalBroker::serialized()] {
        // The app that registered the closure refuses at once.
        let app = App::builder().broker(broker.clone()).build().unwrap();
        let events = app.events(EventFilter::new().level(Level::Error));
        app.register("wide", |n: i64| n).unwrap();
        app.allocate("wide", 1).unwrap();
        let err = app.send("wide", 1i32).unwrap_err();
        assert_eq!(err.to_string(), "signature mismatch: task `wide` takes i64 and returns i64; this call passes i32");
        let event = events.recv_timeout(PATIENCE).unwrap();
        assert_eq!((event.kind, event.origin), (EventKind::SignatureMismatch, Origin::Producer));
        assert_eq!(event.message, err.task_error().unwrap().message());

        // Another app sends it; the worker refuses it, with nobody to tell but its events.
        let other = App::builder().broker(broker).build().unwrap();
        other.send("wide", 1i32).unwrap();
        let event = events.recv_timeout(PATIENCE).unwrap();
        assert_eq!((event.kind, event.origin), (EventKind::SignatureMismatch, Origin::Worker));
        assert!(event.message.starts_with("task `wide` takes i64 and returns i64 on this worker"), "{}", event.message);
        other.close().unwrap();
        app.close().unwrap();
    }
}

/// The errors of a task looked up by name say what to check, the crate that may not be
/// linked first; a function that is not a task says so instead.
#[test]
fn unknown_tasks_say_what_to_check() {
    let app = app();
    assert_eq!(
        app.allocate("billing::refund", 1).unwrap_err().to_string(),
        "no task named `billing::refund` is registered in this app: register a closure first; if it is a \
         `#[dingo::task]` of crate `billing`, that crate may not be linked into this binary (a crate nothing \
         refers to is left out, and its tasks with it): add `use billing as _;` to the binary"
    );
    assert_eq!(
        app.allocate("billing.refund", 1).unwrap_err().to_string(),
        "no task named `billing.refund` is registered in this app: register a closure first; if it is a \
         `#[dingo::task]`, the crate defining it may not be linked into this binary (a crate nothing refers to \
         is left out, and its tasks with it): add `use that_crate as _;` to the binary"
    );
    fn plain(n: i64) -> i64 {
        n
    }
    assert_eq!(
        app.allocate(plain, 1).unwrap_err().to_string(),
        "`app_api::unknown_tasks_say_what_to_check::plain` is not a `#[dingo::task]` function"
    );
    app.close().unwrap();
}

#[test]
fn an_explicit_id_cannot_be_a_default() {
    let app = app();
    app.register("x", |n: i64| n).unwrap();
    let options = CallOptions::new().id("always-the-same");
    assert!(matches!(app.set_default_options("x", options), Err(Error::InvalidConfig(_))));
}
