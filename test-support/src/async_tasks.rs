//! The rules of `async fn` tasks, on whatever broker the setup gives: a pool's threads drive
//! many futures at once, and the lifecycle (panics, retries, progress, soft and hard time
//! limits, cancellation, graceful shutdown) applies to them as to blocking tasks — a hard
//! limit or a cancel drops the future.
//!
//! The tasks sleep on [`sleep`], a timer of this module's own (one thread, a heap of
//! wakers): no async runtime, as a pool without the `tokio` feature runs.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as PollContext, Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use dingo::broker::kit::lock;
use dingo::{App, CallOptions, Context, Error, EventFilter, EventKind, Report, TaskErrorKind};

use crate::PATIENCE;
use crate::app::AppSetup;

/// A future ready `after` from its first poll, woken by the timer thread.
pub fn sleep(after: Duration) -> Sleep {
    Sleep { at: None, after, fired: Arc::new(AtomicBool::new(false)) }
}

/// See [`sleep`].
#[derive(Debug)]
pub struct Sleep {
    at: Option<Instant>,
    after: Duration,
    fired: Arc<AtomicBool>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut PollContext<'_>) -> Poll<()> {
        if self.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        let after = self.after;
        let at = *self.at.get_or_insert_with(|| Instant::now() + after);
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        // Every poll registers its waker anew (the timer wakes each once: a spurious wake is
        // harmless, a lost one is not).
        let _ = timer().send((at, cx.waker().clone(), self.fired.clone()));
        Poll::Pending
    }
}

type Timed = (Instant, Waker, Arc<AtomicBool>);

/// The timer thread's inbox.
fn timer() -> &'static Sender<Timed> {
    static TIMER: OnceLock<Sender<Timed>> = OnceLock::new();
    TIMER.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded::<Timed>();
        std::thread::Builder::new()
            .name("test-timer".into())
            .spawn(move || {
                let mut heap: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
                let mut wakers: BTreeMap<u64, (Waker, Arc<AtomicBool>)> = BTreeMap::new();
                let mut next = 0u64;
                loop {
                    let received = match heap.peek() {
                        Some(Reverse((at, _))) => rx.recv_deadline(*at).map_err(|e| e.is_disconnected()),
                        None => rx.recv().map_err(|_| true),
                    };
                    match received {
                        Ok((at, waker, fired)) => {
                            next += 1;
                            heap.push(Reverse((at, next)));
                            wakers.insert(next, (waker, fired));
                        }
                        Err(true) => return,
                        Err(false) => {}
                    }
                    let now = Instant::now();
                    while heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                        let Some(Reverse((_, key))) = heap.pop() else { break };
                        if let Some((waker, fired)) = wakers.remove(&key) {
                            fired.store(true, Ordering::Release);
                            waker.wake();
                        }
                    }
                }
            })
            .expect("start the test timer");
        tx
    })
}

/// Sets its flag when dropped: tells whether a task's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn close(app: &App) {
    app.close().expect("close");
}

fn kind_of<T: std::fmt::Debug>(result: Result<T, Error>) -> (TaskErrorKind, String) {
    match result {
        Err(Error::Task(e)) => (e.kind(), e.message().to_owned()),
        other => panic!("expected a task failure, got {other:?}"),
    }
}

fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 1,000 tasks that each sleep 50 ms, on a pool of two threads: they wait together, so the
/// whole batch takes about one sleep, not a thousand (50 s).
pub fn a_thousand_sleeping_tasks_share_two_threads(setup: &dyn AppSetup) {
    let app = setup.app();
    app.register_async("async.nap", |n: u64| async move {
        sleep(Duration::from_millis(50)).await;
        n * 2
    })
    .expect("register");
    app.allocate_concurrent("async.nap", 2, 1_000).expect("allocate");
    let started = Instant::now();
    let handles: Vec<_> = (0..1_000u64).map(|n| app.call::<_, u64>("async.nap", n).expect("call")).collect();
    for (n, mut handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), n as u64 * 2);
    }
    let took = started.elapsed();
    eprintln!("1,000 async tasks of 50 ms each on 2 threads: {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}: the tasks did not run concurrently");
    close(&app);
}

/// A pool's concurrency bounds how many run at once: 12 sleeps on 1 thread of concurrency 4
/// run as three rounds, and never more than 4 at a time.
pub fn concurrency_is_bounded_per_pool(setup: &dyn AppSetup) {
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    static MOST: AtomicUsize = AtomicUsize::new(0);
    let app = setup.app();
    app.register_async("async.bounded", |n: u64| async move {
        let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
        MOST.fetch_max(now, Ordering::SeqCst);
        sleep(Duration::from_millis(100)).await;
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        n
    })
    .expect("register");
    app.allocate_concurrent("async.bounded", 1, 4).expect("allocate");
    let started = Instant::now();
    let handles: Vec<_> = (0..12u64).map(|n| app.call::<_, u64>("async.bounded", n).expect("call")).collect();
    for (n, mut handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), n as u64);
    }
    let took = started.elapsed();
    assert_eq!(MOST.load(Ordering::SeqCst), 4, "at most 4 at once, and 4 did run together");
    assert!(took >= Duration::from_millis(300), "three rounds of 100 ms took {took:?}");
    close(&app);
}

/// A panic inside an async task (after an `.await`) is a `Panic` failure with its message;
/// the pool goes on.
pub fn a_panicking_async_task_fails_and_the_pool_goes_on(setup: &dyn AppSetup) {
    let app = setup.app();
    app.register_async("async.explode", |n: i64| async move {
        sleep(Duration::from_millis(1)).await;
        if n < 0 {
            panic!("async boom: {n}");
        }
        n
    })
    .expect("register");
    app.allocate_concurrent("async.explode", 1, 10).expect("allocate");
    let (kind, message) = kind_of(app.call::<_, i64>("async.explode", -3i64).expect("call").wait_timeout(PATIENCE));
    assert_eq!(kind, TaskErrorKind::Panic);
    assert_eq!(message, "async boom: -3");
    assert_eq!(app.call::<_, i64>("async.explode", 8i64).expect("call").wait_timeout(PATIENCE).expect("next"), 8);
    close(&app);
}

/// Tasks finish in another order than they started (the later, the shorter): every result
/// is exact and nothing runs twice.
pub fn async_tasks_finish_out_of_order(setup: &dyn AppSetup) {
    static RUNS: Mutex<BTreeMap<String, Vec<u64>>> = Mutex::new(BTreeMap::new());
    let token = crate::unique("order");
    let app = setup.app();
    let name = format!("async.order.{token}");
    let key = token.clone();
    app.register_async_with_context(name.clone(), move |ctx: Arc<Context<'static>>, n: u64| {
        let key = key.clone();
        async move {
            sleep(Duration::from_millis(10 * (20 - n))).await;
            assert!(!ctx.redelivered(), "a finished task came back");
            lock(&RUNS).entry(key).or_default().push(n);
            Ok::<u64, String>(n + 100)
        }
    })
    .expect("register");
    app.allocate_concurrent(name.as_str(), 1, 20).expect("allocate");
    let handles: Vec<_> = (0..20u64).map(|n| app.call::<_, u64>(&name, n).expect("call")).collect();
    for (n, mut handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), n as u64 + 100);
    }
    // Past the lease of a broker that redelivers: nothing ran again.
    std::thread::sleep(Duration::from_millis(300));
    let runs = lock(&RUNS).get(&token).cloned().unwrap_or_default();
    let mut sorted = runs.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..20).collect::<Vec<_>>(), "each ran once: {runs:?}");
    assert_ne!(runs, sorted, "the later (shorter) tasks finished first: {runs:?}");
    close(&app);
}

/// A failing async task is retried like a blocking one; its context counts the attempts.
pub fn an_async_task_retries_then_succeeds(setup: &dyn AppSetup) {
    let app = setup.app();
    app.register_async_with_context("async.flaky", |ctx: Arc<Context<'static>>, ()| async move {
        sleep(Duration::from_millis(1)).await;
        if ctx.attempt() < 3 { Err(format!("attempt {} failed", ctx.attempt())) } else { Ok(ctx.attempt()) }
    })
    .expect("register");
    app.allocate_concurrent("async.flaky", 1, 10).expect("allocate");
    let options = CallOptions::new().retries(4).backoff(dingo::Backoff::fixed(Duration::from_millis(10)));
    let attempts: u32 =
        app.call_with("async.flaky", &options, ()).expect("call").wait_timeout(PATIENCE).expect("value");
    assert_eq!(attempts, 3);
    close(&app);
}

/// Progress reports from an async task arrive in order, before its result.
pub fn progress_from_an_async_task(setup: &dyn AppSetup) {
    let app = setup.app();
    app.register_async_with_context("async.steps", |ctx: Arc<Context<'static>>, steps: u32| async move {
        for step in 0..steps {
            sleep(Duration::from_millis(2)).await;
            ctx.progress(step);
        }
        Ok::<u32, String>(steps)
    })
    .expect("register");
    app.allocate_concurrent("async.steps", 1, 10).expect("allocate");
    let options = CallOptions::new().monitor_progress(true);
    let reports: Vec<Report<u32>> = app.call_with("async.steps", &options, 3u32).expect("call").reports().collect();
    let progress: Vec<Option<u32>> = reports
        .iter()
        .filter_map(|r| match r {
            Report::Progress(p) => Some(p.value::<u32>().map(|v| v.expect("decodes"))),
            _ => None,
        })
        .collect();
    assert_eq!(reports.first(), Some(&Report::Sent), "{reports:?}");
    assert_eq!(progress, vec![None, Some(0), Some(1), Some(2)], "{reports:?}");
    assert_eq!(reports.last(), Some(&Report::Success(3)));
    close(&app);
}

/// Past its hard time limit an async task's future is dropped and its call fails with
/// `TimeLimit`; no thread is written off and the pool goes on at once.
pub fn a_hard_limit_drops_the_future(setup: &dyn AppSetup) {
    let dropped = Arc::new(AtomicBool::new(false));
    let app = setup.app();
    let flag = dropped.clone();
    app.register_async("async.stuck", move |ms: u64| {
        let guard = DropFlag(flag.clone());
        async move {
            let _guard = guard;
            sleep(Duration::from_millis(ms)).await;
            ms
        }
    })
    .expect("register");
    app.allocate_concurrent("async.stuck", 1, 10).expect("allocate");
    let events = app.events(EventFilter::new().kinds([EventKind::TimeLimitExceeded]));
    let options = CallOptions::new().time_limit(Duration::from_millis(200));
    let started = Instant::now();
    let (kind, message) =
        kind_of(app.call_with::<_, u64>("async.stuck", &options, 10_000u64).expect("call").wait_timeout(PATIENCE));
    let took = started.elapsed();
    assert_eq!(kind, TaskErrorKind::TimeLimit, "{message}");
    assert_eq!(message, "the task ran past its hard time limit of 200 ms: its future was dropped");
    assert!(took >= Duration::from_millis(200) && took < Duration::from_millis(1_200), "failed after {took:?}");
    assert!(dropped.load(Ordering::Acquire), "the future was dropped");
    assert!(events.recv_timeout(PATIENCE).is_some(), "no TimeLimitExceeded event");
    assert_eq!(app.threads_written_off(), 0, "an async task's limit writes no thread off");
    assert_eq!(app.call::<_, u64>("async.stuck", 5u64).expect("call").wait_timeout(PATIENCE).expect("next"), 5);
    close(&app);
}

/// A soft limit: the task sees it through its context and returns; an `Err` then is a
/// `TimeLimit` failure.
pub fn an_async_task_sees_its_soft_limit(setup: &dyn AppSetup) {
    let app = setup.app();
    app.register_async_with_context("async.patient", |ctx: Arc<Context<'static>>, ()| async move {
        while !ctx.is_cancelled() {
            sleep(Duration::from_millis(5)).await;
        }
        Err::<(), String>("stopped at the soft limit".into())
    })
    .expect("register");
    app.allocate_concurrent("async.patient", 1, 10).expect("allocate");
    let options = CallOptions::new().soft_time_limit(Duration::from_millis(100));
    let (kind, message) =
        kind_of(app.call_with::<_, ()>("async.patient", &options, ()).expect("call").wait_timeout(PATIENCE));
    assert_eq!(kind, TaskErrorKind::TimeLimit);
    assert_eq!(message, "soft time limit: stopped at the soft limit");
    close(&app);
}

/// Cancelling a running async task drops its future: the call fails with `Cancelled`, the
/// others on the thread go on.
pub fn a_cancel_drops_the_running_future(setup: &dyn AppSetup) {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let dropped = Arc::new(AtomicBool::new(false));
    let app = setup.app();
    let flag = dropped.clone();
    app.register_async("async.long", move |ms: u64| {
        let guard = DropFlag(flag.clone());
        async move {
            let _guard = guard;
            STARTED.fetch_add(1, Ordering::SeqCst);
            sleep(Duration::from_millis(ms)).await;
            ms
        }
    })
    .expect("register");
    app.allocate_concurrent("async.long", 1, 10).expect("allocate");
    let before = STARTED.load(Ordering::SeqCst);
    let mut doomed = app.call::<_, u64>("async.long", 30_000u64).expect("call");
    let mut other = app.call::<_, u64>("async.long", 300u64).expect("call");
    wait_for("both started", || STARTED.load(Ordering::SeqCst) >= before + 2);
    let cancelled = Instant::now();
    doomed.cancel().expect("cancel");
    let (kind, message) = kind_of(doomed.wait_timeout(PATIENCE));
    eprintln!("a running async task's cancel failed its call after {:?}", cancelled.elapsed());
    assert_eq!(kind, TaskErrorKind::Cancelled, "{message}");
    assert_eq!(message, "the call was cancelled while it ran: its future was dropped");
    assert!(dropped.load(Ordering::Acquire), "the future was dropped");
    assert_eq!(other.wait_timeout(PATIENCE).expect("the other one"), 300);
    close(&app);
}

/// Closing a worker app lets its running async tasks finish: their callers get the values.
pub fn close_waits_for_running_async_tasks(setup: &dyn AppSetup) {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let worker = setup.app();
    let caller = setup.app();
    let token = crate::unique("close");
    let name = format!("async.closing.{token}");
    for app in [&worker, &caller] {
        app.register_async(name.clone(), |n: u64| async move {
            STARTED.fetch_add(1, Ordering::SeqCst);
            sleep(Duration::from_millis(300)).await;
            n
        })
        .expect("register");
    }
    worker.allocate_concurrent(name.as_str(), 1, 10).expect("allocate");
    let before = STARTED.load(Ordering::SeqCst);
    let handles: Vec<_> = (0..5u64).map(|n| caller.call::<_, u64>(&name, n).expect("call")).collect();
    wait_for("the five started", || STARTED.load(Ordering::SeqCst) >= before + 5);
    close(&worker);
    for (n, mut handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("finished before close returned"), n as u64);
    }
    close(&caller);
}
