//! `#[dingo::task]` on an `async fn`: the same stubs as a plain `fn`, the future driven by the
//! pool's workers (several calls at once on one thread), or to the end on the calling thread
//! by `Task::run`; an `Err` fails the same way either way.

use std::future::{Future, poll_fn};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use dingo::serde::{Deserialize, Serialize};
use dingo::{App, CallOptions, Context, Handle, LocalBroker, Report, Task, TaskErrorKind};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
enum QuoteError {
    Unknown { sku: String },
}

impl std::fmt::Display for QuoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuoteError::Unknown { sku } => write!(f, "no price for {sku}"),
        }
    }
}

/// Pending once, then ready: an `.await` that really suspends the task.
fn yield_now() -> impl Future<Output = ()> + Send {
    let mut yielded = false;
    poll_fn(move |cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
}

#[dingo::task]
async fn add(a: i64, b: i64) -> i64 {
    yield_now().await;
    a + b
}

#[dingo::task]
async fn negate(n: i64) -> i64 {
    -n
}

#[dingo::task]
async fn answer() -> i64 {
    42
}

/// The context is the future's own: it is still there after an `.await`.
#[dingo::task(name = "async.whoami")]
async fn whoami(ctx: &Context, greeting: String) -> String {
    ctx.progress("looking");
    yield_now().await;
    format!("{greeting} from {} (attempt {})", ctx.name(), ctx.attempt())
}

#[dingo::task]
async fn quote(sku: String) -> Result<u64, QuoteError> {
    yield_now().await;
    match sku.as_str() {
        "tea" => Ok(350),
        _ => Err(QuoteError::Unknown { sku }),
    }
}

static FLAKY_RUNS: AtomicU64 = AtomicU64::new(0);

#[dingo::task(retries = 3, retry_backoff = "5ms", retry_jitter = false)]
async fn flaky(ctx: &Context, n: u64) -> Result<u64, String> {
    FLAKY_RUNS.fetch_add(1, Ordering::SeqCst);
    yield_now().await;
    if ctx.attempt() < 3 { Err(format!("attempt {} failed", ctx.attempt())) } else { Ok(n) }
}

static RECORDED: AtomicU64 = AtomicU64::new(0);

#[dingo::task]
async fn record(value: u64) {
    yield_now().await;
    RECORDED.store(value, Ordering::SeqCst);
}

static TICKS: AtomicU64 = AtomicU64::new(0);

#[dingo::task]
async fn tick() {
    yield_now().await;
    TICKS.fetch_add(1, Ordering::SeqCst);
}

/// Every call waits until `MEETING` calls have arrived: they finish only if the worker
/// drives them all at once.
const MEETING: usize = 8;

static ARRIVED: Mutex<(usize, Vec<Waker>)> = Mutex::new((0, Vec::new()));

#[dingo::task]
async fn meet(n: u64) -> u64 {
    {
        let mut arrived = ARRIVED.lock().unwrap();
        arrived.0 += 1;
        if arrived.0 == MEETING {
            arrived.1.drain(..).for_each(Waker::wake);
        }
    }
    poll_fn(|cx| {
        let mut arrived = ARRIVED.lock().unwrap();
        if arrived.0 >= MEETING {
            Poll::Ready(())
        } else {
            arrived.1.push(cx.waker().clone());
            Poll::Pending
        }
    })
    .await;
    n
}

/// A blocking task that runs async ones through `Task::run`, lending its context: the
/// futures are driven to the end on this worker's thread, no executor involved.
#[dingo::task]
fn drive(ctx: &Context, sku: String) -> Result<(i64, String), String> {
    let sum = <add as Task>::run(ctx, (2, 3)).map_err(|e| e.to_string())?;
    let who = <whoami as Task>::run(ctx, "hi".to_string()).map_err(|e| e.to_string())?;
    assert_eq!(<quote as Task>::run(ctx, "tea".to_string()), Ok(350));
    <tick as Task>::run(ctx, ()).map_err(|e| e.to_string())?;
    match <quote as Task>::run(ctx, sku) {
        Ok(_) => Err("an unknown sku was quoted".to_string()),
        Err(failure) => {
            let payload: QuoteError = failure.payload().unwrap().unwrap();
            Ok((sum, format!("{who}; {}: {} ({payload:?})", failure.kind(), failure.message())))
        }
    }
}

fn app() -> App {
    let app = App::local().unwrap();
    app.allocate_all(2).unwrap();
    app
}

fn wait<T: dingo::serde::de::DeserializeOwned + Send + 'static>(mut handle: Handle<T>) -> T {
    handle.wait_timeout(WAIT).unwrap()
}

#[test]
fn async_tasks_get_async_handlers_and_plain_ones_do_not() {
    assert!(<add as Task>::handler().is_async());
    assert!(<whoami as Task>::handler().is_async());
    assert!(<record as Task>::handler().is_async());
    assert!(!<drive as Task>::handler().is_async());
    assert_eq!(whoami::NAME, "async.whoami");
    assert_eq!(
        <flaky as Task>::defaults(),
        CallOptions::new().retries(3).backoff(dingo::Backoff::exponential(Duration::from_millis(5)).jitter(false))
    );
}

/// Needs only the macro: `Task::run` drives the future on the calling thread.
#[test]
fn run_drives_the_future_on_the_calling_thread() {
    let app = App::local().unwrap();
    app.allocate(drive, 1).unwrap();
    let (sum, text) = wait(drive::call(&app, "coffee".to_string()).unwrap());
    assert_eq!(sum, 5);
    assert_eq!(
        text,
        format!("hi from {} (attempt 1); failed: no price for coffee (Unknown {{ sku: \"coffee\" }})", drive::NAME)
    );
    assert_eq!(TICKS.load(Ordering::SeqCst), 1);
    app.close().unwrap();
}

#[test]
fn stubs_call_async_tasks_like_plain_ones() {
    let app = app();
    assert_eq!(wait(add::call(&app, 2, 3).unwrap()), 5);
    assert_eq!(wait(add::call_with(&app, &CallOptions::new(), 4, 5).unwrap()), 9);
    assert_eq!(wait(negate::call(&app, 4).unwrap()), -4);
    assert_eq!(wait(answer::call(&app).unwrap()), 42);
    // By name, one argument as itself or as `(x,)`, as for a plain `fn`.
    assert_eq!(wait(app.call::<_, i64>(negate::NAME, 5i64).unwrap()), -5);
    assert_eq!(wait(app.call::<_, i64>(negate::NAME, (6i64,)).unwrap()), -6);
    app.close().unwrap();
}

#[test]
fn the_context_is_the_futures_own_across_awaits() {
    let app = app();
    let options = CallOptions::new().monitor_progress(true);
    let reports: Vec<Report<String>> =
        whoami::call_with(&app, &options, "hello".to_string()).unwrap().reports().collect();
    let said = |r: &Report<String>| match r {
        Report::Progress(p) => p.value::<String>().and_then(Result::ok),
        _ => None,
    };
    assert!(reports.iter().any(|r| said(r).as_deref() == Some("looking")), "{reports:?}");
    assert_eq!(reports.last(), Some(&Report::Success("hello from async.whoami (attempt 1)".to_string())));
    app.close().unwrap();
}

#[test]
fn an_err_is_a_failure_carrying_the_error_as_for_a_plain_fn() {
    // Serialized: the error value goes through the codec, as on Redis or RabbitMQ.
    let app = App::builder().broker(LocalBroker::serialized()).build().unwrap();
    app.allocate(quote, 1).unwrap();
    assert_eq!(wait(quote::call(&app, "tea".to_string()).unwrap()), 350);

    let err = quote::call(&app, "mate".to_string()).unwrap().wait_timeout(WAIT).unwrap_err();
    assert_eq!(err.task_kind(), Some(TaskErrorKind::Failed));
    let failure = err.task_error().unwrap();
    assert_eq!(failure.message(), "no price for mate");
    let payload: QuoteError = failure.payload().unwrap().unwrap();
    assert_eq!(payload, QuoteError::Unknown { sku: "mate".to_string() });
    app.close().unwrap();
}

#[test]
fn attribute_keys_apply_to_async_tasks() {
    let app = App::local().unwrap();
    app.allocate(flaky, 1).unwrap();
    assert_eq!(wait(flaky::call(&app, 7).unwrap()), 7);
    assert_eq!(FLAKY_RUNS.load(Ordering::SeqCst), 3);
    app.close().unwrap();
}

#[test]
fn unit_tasks_run_and_send_returns_an_id() {
    let app = App::local().unwrap();
    app.allocate(record, 1).unwrap();
    wait(record::call(&app, 1).unwrap());
    assert_eq!(RECORDED.load(Ordering::SeqCst), 1);

    record::send(&app, 2).unwrap();
    let deadline = Instant::now() + WAIT;
    while RECORDED.load(Ordering::SeqCst) != 2 {
        assert!(Instant::now() < deadline, "the sent task did not run");
        std::thread::sleep(Duration::from_millis(5));
    }
    app.close().unwrap();
}

#[test]
fn one_thread_drives_many_calls_at_once() {
    let app = App::local().unwrap();
    app.allocate(meet, 1).unwrap();
    let handles: Vec<_> = (0..MEETING as u64).map(|n| meet::call(&app, n).unwrap()).collect();
    let met: Vec<u64> = handles.into_iter().map(wait).collect();
    assert_eq!(met, (0..MEETING as u64).collect::<Vec<_>>());
    app.close().unwrap();
}
