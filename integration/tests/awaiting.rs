//! Handles awaited: a handle is a `Future` of its result and `report_stream()` a `Stream` of
//! its reports, woken by the thread that delivers them. Timeouts that leave the handle
//! usable, detached and spent handles, futures dropped mid-flight, progress streams,
//! shutdown under an await, and 10,000 calls awaited at once by one current-thread runtime
//! whose thread is never blocked for long. On the local broker (both modes) and on Redis.
//!
//! (The App-level conformance scenarios run awaited too: see `app_suite!`.)

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use dingo::{App, CallOptions, Context, Error, Handle, Report, ReportStream, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::app::{AppSetup, NoWarnings};
use dingo_test_support::faults::{Gate, lock, wait_until};
use futures::StreamExt;
use tokio::runtime::Runtime;

#[dingo::task(name = "awaiting.plus_one")]
fn plus_one(n: u64) -> u64 {
    n + 1
}

/// Naps that ran to their end, by token.
static NAPPED: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

#[dingo::task(name = "awaiting.nap")]
fn nap(token: String, millis: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    *lock(&NAPPED).entry(token).or_default() += 1;
    millis
}

/// Progress steps acknowledged by the test, by token: `steps` reports step `k` only after
/// the test has seen step `k - 1`, so every report reaches a stream that is waiting.
static SEEN: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

#[dingo::task(name = "awaiting.steps")]
fn steps(ctx: &Context, token: String, count: u64) -> u64 {
    for step in 0..count {
        let deadline = Instant::now() + PATIENCE;
        while lock(&SEEN).get(&token).copied().unwrap_or(0) < step && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        ctx.progress(step * 10);
    }
    count
}

fn current_thread() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime")
}

fn multi_thread() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().expect("runtime")
}

/// Counts the polls of the future it wraps (a handle is polled only when woken: once to
/// find it pending, once when its result came).
struct Polls<F> {
    future: F,
    polls: u32,
}

impl<F: Future + Unpin> Future for Polls<F> {
    type Output = (F::Output, u32);

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        self.polls += 1;
        match Pin::new(&mut self.future).poll(cx) {
            Poll::Ready(output) => Poll::Ready((output, self.polls)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Statically: what a user spawns on a multi-thread runtime (`tokio::spawn(handle.into_future())`,
/// or an `async move` block awaiting it) is `Send + 'static`, handles and streams are `Unpin`
/// (`(&mut handle).await`). Then for real: handles awaited in spawned tasks.
#[test]
fn an_awaited_handle_can_be_spawned() {
    fn spawnable<F: Future + Send + 'static>(_: &F) {}
    fn send_sync_unpin<T: Send + Sync + Unpin + 'static>() {}
    fn stream<S: futures::Stream + Send + Unpin + 'static>() {}
    send_sync_unpin::<Handle<u64>>();
    send_sync_unpin::<Handle<String>>();
    stream::<ReportStream<Vec<u8>>>();

    let app = App::local().expect("app");
    app.allocate(plus_one, 2).expect("allocate");
    let runtime = multi_thread();
    let handle = plus_one::call(&app, 1).expect("call").into_future();
    spawnable(&handle);
    let in_block = {
        let app = app.clone();
        async move { plus_one::call(&app, 2)?.await }
    };
    spawnable(&in_block);
    let streamed = plus_one::call(&app, 3).expect("call").report_stream().collect::<Vec<_>>();
    spawnable(&streamed);
    let (a, b, c) = runtime.block_on(async {
        let (a, b, c) = (tokio::spawn(handle), tokio::spawn(in_block), tokio::spawn(streamed));
        (a.await.expect("task"), b.await.expect("task"), c.await.expect("task"))
    });
    assert_eq!((a.expect("result"), b.expect("result"), c), (2, 3, vec![Report::Success(4)]));
    app.close().expect("close");
}

/// `timeout(short, &mut handle)` times out and leaves the handle: awaited again, it gets the
/// value; awaited once more, `ResultTaken` (as `wait` after `wait`).
fn a_timeout_leaves_the_handle_to_await_again(setup: &dyn AppSetup) {
    let app = setup.app();
    let quiet = NoWarnings::watch(&app);
    let gate = Gate::register(&app, "awaiting.gated");
    app.allocate("awaiting.gated", 1).expect("allocate");
    let runtime = current_thread();
    let mut handle = app.call::<_, u64>("awaiting.gated", (41u64,)).expect("call");
    gate.started.recv_timeout(PATIENCE).expect("the task started");
    runtime.block_on(async {
        let started = Instant::now();
        assert!(tokio::time::timeout(Duration::from_millis(30), &mut handle).await.is_err(), "no result yet");
        assert!(started.elapsed() >= Duration::from_millis(30));
        gate.release.send(()).expect("release");
        let value = tokio::time::timeout(PATIENCE, &mut handle).await.expect("within patience");
        assert_eq!(value.expect("the value after the timeout"), 42);
        assert!(matches!((&mut handle).await, Err(Error::ResultTaken)));
    });
    app.close().expect("close");
    quiet.check();
}

/// A handle polled after it returned its value gets `ResultTaken`, at once; so does one
/// whose value `wait_timeout` took.
#[test]
fn a_handle_polled_after_ready_is_result_taken() {
    let app = App::local().expect("app");
    app.allocate(plus_one, 1).expect("allocate");
    let mut handle = plus_one::call(&app, 1).expect("call");
    assert_eq!(futures::executor::block_on((&mut handle).into_future()).expect("the value"), 2);
    assert!(matches!(futures::executor::block_on((&mut handle).into_future()), Err(Error::ResultTaken)));
    let mut waited = plus_one::call(&app, 2).expect("call");
    assert_eq!(waited.wait_timeout(PATIENCE).expect("the value"), 3);
    assert!(matches!(futures::executor::block_on(waited.into_future()), Err(Error::ResultTaken)));
    app.close().expect("close");
}

/// A detached handle (`ignore_report`) is ready at once with `NoReport`; its report stream
/// ends at once, empty.
#[test]
fn awaiting_a_detached_handle_is_no_report() {
    let app = App::local().expect("app");
    app.allocate(plus_one, 1).expect("allocate");
    let options = CallOptions::new().ignore_report(true);
    let runtime = current_thread();
    let handle = plus_one::call_with(&app, &options, 1).expect("call");
    assert!(handle.is_detached());
    assert!(matches!(runtime.block_on(handle.into_future()), Err(Error::NoReport)));
    let stream = plus_one::call_with(&app, &options, 2).expect("call").report_stream();
    assert_eq!(runtime.block_on(stream.collect::<Vec<_>>()), []);
    app.close().expect("close");
}

/// Futures dropped before their result came — by a `timeout` that owned the handle, by an
/// aborted task — lose nothing else: the calls awaited beside them get their results, the
/// dropped calls still run, their late results warn nobody, and the app closes cleanly.
fn dropped_futures_lose_nothing_else(setup: &dyn AppSetup) {
    let app = setup.app();
    let quiet = NoWarnings::watch(&app);
    app.allocate(nap, 4).expect("allocate");
    app.allocate(plus_one, 1).expect("allocate");
    let token = dingo_test_support::unique("dropped");
    let runtime = multi_thread();
    runtime.block_on(async {
        let aborted: Vec<_> =
            (0..10).map(|_| tokio::spawn(nap::call(&app, token.clone(), 100).expect("call").into_future())).collect();
        let kept: Vec<_> = (0..100u64).map(|n| (n, plus_one::call(&app, n).expect("call"))).collect();
        tokio::time::sleep(Duration::from_millis(5)).await; // the spawned handles are polled
        for task in &aborted {
            task.abort();
        }
        for task in aborted {
            assert!(task.await.expect_err("aborted").is_cancelled(), "a nap ended before its abort");
        }
        for _ in 0..10 {
            // The timeout owns the handle: it goes when the timeout passes.
            let handle = nap::call(&app, token.clone(), 100).expect("call");
            assert!(tokio::time::timeout(Duration::from_millis(5), handle).await.is_err(), "too quick a nap");
        }
        for (n, handle) in kept {
            assert_eq!(handle.await.expect("a call awaited beside the dropped ones"), n + 1);
        }
    });
    wait_until("the dropped calls ran", || lock(&NAPPED).get(&token) == Some(&20));
    std::thread::sleep(Duration::from_millis(100)); // their reports arrive for nobody
    let after = runtime.block_on(async { plus_one::call(&app, 7).expect("call").await });
    assert_eq!(after.expect("a call after them"), 8);
    app.close().expect("close");
    quiet.check();
}

/// `report_stream()` with `monitor_progress` yields Sent, the start, each progress value in
/// order (each sent only once the test saw the one before, so each wakes a waiting stream),
/// then Success, then ends.
fn report_stream_yields_progress_in_order(setup: &dyn AppSetup) {
    let app = setup.app();
    let quiet = NoWarnings::watch(&app);
    app.allocate(steps, 1).expect("allocate");
    let token = dingo_test_support::unique("steps");
    let options = CallOptions::new().monitor_progress(true);
    let mut stream = steps::call_with(&app, &options, token.clone(), 5).expect("call").report_stream();
    let runtime = current_thread();
    let reports = runtime.block_on(async {
        let mut reports = Vec::new();
        while let Some(report) = tokio::time::timeout(PATIENCE, stream.next()).await.expect("a report in time") {
            if let Report::Progress(progress) = &report
                && let Some(value) = progress.value::<u64>()
            {
                let step = value.expect("a step") / 10 + 1;
                lock(&SEEN).insert(token.clone(), step);
            }
            reports.push(report);
        }
        assert!(stream.next().await.is_none(), "an ended stream stays ended");
        reports
    });
    assert_eq!(reports.len(), 8, "{reports:?}");
    assert_eq!(reports[0], Report::Sent);
    assert!(matches!(&reports[1], Report::Progress(p) if p.is_start()), "{reports:?}");
    let values: Vec<u64> = reports[2..7]
        .iter()
        .map(|r| match r {
            Report::Progress(p) => p.value::<u64>().expect("a value").expect("decodes"),
            other => panic!("not progress: {other:?}"),
        })
        .collect();
    assert_eq!(values, [0, 10, 20, 30, 40]);
    assert_eq!(reports[7], Report::Success(5));
    app.close().expect("close");
    quiet.check();
}

/// Closing the app while a queued call is awaited (its waker stored, pending) wakes it with
/// the `Shutdown` failure, and a pending report stream ends with it; the running call
/// finishes and its future gets the value.
fn shutdown_while_awaiting_fails_with_shutdown(setup: &dyn AppSetup) {
    let app = setup.builder().shutdown_grace(PATIENCE).build().expect("build");
    app.allocate(nap, 1).expect("allocate");
    let token = dingo_test_support::unique("shutdown");
    let options = CallOptions::new().monitor_progress(true);
    let mut running = nap::call_with(&app, &options, token.clone(), 300).expect("call").report_stream();
    let runtime = current_thread();
    let closing = Arc::new(AtomicBool::new(false));
    let closer = runtime.block_on(async {
        assert_eq!(running.next().await, Some(Report::Sent), "the first call started");
        let mut queued = nap::call(&app, token.clone(), 0).expect("call");
        let mut queued_stream = nap::call_with(&app, &options, token.clone(), 0).expect("call").report_stream();
        let short = Duration::from_millis(30);
        assert!(tokio::time::timeout(short, &mut queued).await.is_err(), "queued behind the running call");
        assert!(tokio::time::timeout(short, queued_stream.next()).await.is_err(), "nothing for the stream yet");
        let closer = std::thread::spawn({
            let (app, closing) = (app.clone(), closing.clone());
            move || {
                closing.store(true, Ordering::SeqCst);
                app.close()
            }
        });
        let error = tokio::time::timeout(PATIENCE, queued).await.expect("woken").expect_err("cannot run any more");
        assert!(closing.load(Ordering::SeqCst), "failed before the app closed");
        assert_eq!(error.task_kind(), Some(TaskErrorKind::Shutdown), "{error:?}");
        let rest: Vec<Report<u64>> = tokio::time::timeout(PATIENCE, queued_stream.collect()).await.expect("ends");
        assert!(
            matches!(rest.as_slice(), [Report::Failure(e)] if e.kind() == TaskErrorKind::Shutdown),
            "the pending stream: {rest:?}"
        );
        let rest: Vec<Report<u64>> = tokio::time::timeout(PATIENCE, running.collect()).await.expect("ends");
        assert_eq!(rest.last(), Some(&Report::Success(300)), "the running call finishes: {rest:?}");
        closer
    });
    closer.join().expect("closing thread").expect("close");
    assert!(matches!(nap::call(&app, token, 0), Err(Error::Shutdown)));
}

/// What one awaited call saw: its argument, its result, how long `call` took, the thread it
/// ran on, and how often its handle was polled.
type Outcome = (u64, Result<u64, Error>, Duration, ThreadId, u32);

/// 10,000 calls awaited at once from one current-thread runtime: each a task of its own that
/// calls (the only part that blocks: a send) and awaits. Every result is exact, every call ran
/// on the runtime's one thread, no handle was polled more than twice (nothing polls: a
/// handle is polled when its result wakes it), and no `call` held the thread longer than
/// `bound`.
fn ten_thousand_awaited_calls(setup: &dyn AppSetup, workers: usize, bound: Duration) {
    const CALLS: u64 = 10_000;
    let app = setup.app();
    let quiet = NoWarnings::watch(&app);
    app.allocate(plus_one, workers).expect("allocate");
    let runtime = current_thread();
    // Connections and threads that start with the first call.
    assert_eq!(runtime.block_on(plus_one::call(&app, 0).expect("call").into_future()).expect("warm up"), 1);
    let started = Instant::now();
    let (outcomes, runtime_thread): (Vec<Outcome>, ThreadId) = runtime.block_on(async {
        let tasks: Vec<_> = (0..CALLS)
            .map(|n| {
                let app = app.clone();
                tokio::spawn(async move {
                    let calling = Instant::now();
                    let handle = plus_one::call(&app, n);
                    let took = calling.elapsed();
                    let thread = std::thread::current().id();
                    match handle {
                        Ok(handle) => {
                            let (result, polls) = Polls { future: handle.into_future(), polls: 0 }.await;
                            (n, result, took, thread, polls)
                        }
                        Err(error) => (n, Err(error), took, thread, 0),
                    }
                })
            })
            .collect();
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(task.await.expect("a task"));
        }
        (outcomes, std::thread::current().id())
    });
    let elapsed = started.elapsed();
    let mut took = Vec::with_capacity(outcomes.len());
    let mut pending = 0;
    for (n, result, call_took, thread, polls) in outcomes {
        assert_eq!(result.expect("a result"), n + 1);
        assert_eq!(thread, runtime_thread, "a call ran off the runtime's thread");
        assert!((1..=2).contains(&polls), "call {n}: polled {polls} times");
        pending += usize::from(polls == 2);
        took.push(call_took);
    }
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
    let max = took[took.len() - 1];
    eprintln!(
        "{}: {CALLS} awaited calls in {elapsed:?}; {pending} went pending first; call took p50 {:?}, p99 {:?}, \
         p99.9 {:?}, max {max:?} (bound {bound:?})",
        std::thread::current().name().unwrap_or("?"),
        at(0.5),
        at(0.99),
        at(0.999)
    );
    assert!(pending > 0, "every result was there before its first poll: nothing was awaited");
    assert!(max < bound, "a call held the runtime's thread for {max:?} (bound {bound:?})");
    app.close().expect("close");
    quiet.check();
}

/// The bound on one `call` on the runtime's thread. A call is microseconds of work (a move
/// into a queue, or a push to the Redis writer's channel); past the local queue's capacity
/// (4,096) it waits for a worker to take one. What makes it longer on a loaded CI machine
/// is being preempted, or waiting for a preempted worker: a scheduler period or two (CFS:
/// up to ~24 ms each on a busy 2-core machine). 100 ms is past that, and still far below
/// what a call that waited for a result, a reconnection or a timeout would take.
const CALL_BOUND: Duration = Duration::from_millis(100);

/// Instantiates the rules above for one setup expression (an `Option`; `None` skips).
macro_rules! rules {
    ($setup:expr; $($rule:ident $(($($arg:expr),*))?),+ $(,)?) => {
        $(
            #[test]
            fn $rule() {
                if let Some(setup) = $setup {
                    super::$rule(&setup $($(, $arg)*)?);
                }
            }
        )+
    };
}

mod memory {
    use super::CALL_BOUND;
    use dingo_test_support::local::Local;

    rules!(
        Some(Local::memory());
        a_timeout_leaves_the_handle_to_await_again,
        dropped_futures_lose_nothing_else,
        report_stream_yields_progress_in_order,
        shutdown_while_awaiting_fails_with_shutdown,
        ten_thousand_awaited_calls(2, CALL_BOUND),
    );
}

mod serialized {
    use super::CALL_BOUND;
    use dingo_test_support::local::Local;

    rules!(
        Some(Local::serialized());
        a_timeout_leaves_the_handle_to_await_again,
        dropped_futures_lose_nothing_else,
        report_stream_yields_progress_in_order,
        shutdown_while_awaiting_fails_with_shutdown,
        ten_thousand_awaited_calls(2, CALL_BOUND),
    );
}

/// On Redis the reports come through the listener thread, which wakes the tasks.
#[cfg(feature = "redis")]
mod redis {
    use super::CALL_BOUND;
    use dingo_test_support::redis::Redis;

    rules!(
        Redis::setup();
        a_timeout_leaves_the_handle_to_await_again,
        dropped_futures_lose_nothing_else,
        report_stream_yields_progress_in_order,
        shutdown_while_awaiting_fails_with_shutdown,
        ten_thousand_awaited_calls(2, CALL_BOUND),
    );
}
