//! Async tasks on a tokio runtime the app is given (feature `tokio`): tasks that need a
//! tokio context (here `tokio::time`) get one, run concurrently, and a panic, a hard time
//! limit or a cancel is handled as on the pool's own threads — the last two abort the task
//! on the runtime.
#![cfg(feature = "tokio")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dingo::{App, CallOptions, Error, TaskErrorKind};
use dingo_test_support::PATIENCE;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().expect("a runtime")
}

fn app_on(runtime: &tokio::runtime::Runtime) -> App {
    App::builder().tokio_runtime(runtime.handle().clone()).build().expect("app")
}

fn failure<T: std::fmt::Debug>(result: Result<T, Error>) -> (TaskErrorKind, String) {
    match result {
        Err(Error::Task(e)) => (e.kind(), e.message().to_owned()),
        other => panic!("expected a task failure, got {other:?}"),
    }
}

/// Sets its flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[test]
fn a_thousand_tokio_sleeps_share_two_threads() {
    let runtime = runtime();
    let app = app_on(&runtime);
    app.register_async("tokio.nap", |n: u64| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        n + 1
    })
    .expect("register");
    app.allocate_concurrent("tokio.nap", 2, 1_000).expect("allocate");
    let started = Instant::now();
    let handles: Vec<_> = (0..1_000u64).map(|n| app.call::<_, u64>("tokio.nap", n).expect("call")).collect();
    for (n, mut handle) in handles.into_iter().enumerate() {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("value"), n as u64 + 1);
    }
    let took = started.elapsed();
    eprintln!("1,000 tokio sleeps of 50 ms on 2 pool threads: {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    app.close().expect("close");
}

#[test]
fn without_a_runtime_a_tokio_task_fails_with_tokios_message() {
    let app = App::local().expect("app");
    app.register_async("tokio.needs", |()| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
    })
    .expect("register");
    app.allocate("tokio.needs", 1).expect("allocate");
    let (kind, message) = failure(app.call::<_, ()>("tokio.needs", ()).expect("call").wait_timeout(PATIENCE));
    assert_eq!(kind, TaskErrorKind::Panic);
    assert!(message.contains("no reactor running"), "{message}");
    app.close().expect("close");
}

#[test]
fn a_panic_on_the_runtime_is_the_tasks_failure() {
    let runtime = runtime();
    let app = app_on(&runtime);
    app.register_async("tokio.explode", |n: i64| async move {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if n < 0 {
            panic!("tokio boom: {n}");
        }
        n
    })
    .expect("register");
    app.allocate("tokio.explode", 1).expect("allocate");
    let (kind, message) = failure(app.call::<_, i64>("tokio.explode", -1i64).expect("call").wait_timeout(PATIENCE));
    assert_eq!((kind, message.as_str()), (TaskErrorKind::Panic, "tokio boom: -1"));
    assert_eq!(app.call::<_, i64>("tokio.explode", 4i64).expect("call").wait_timeout(PATIENCE).expect("next"), 4);
    app.close().expect("close");
}

#[test]
fn a_hard_limit_or_a_cancel_aborts_the_task_on_the_runtime() {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let runtime = runtime();
    let app = app_on(&runtime);
    let flags: Arc<[Arc<AtomicBool>; 2]> =
        Arc::new([Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false))]);
    let kept = flags.clone();
    app.register_async("tokio.stuck", move |which: usize| {
        let guard = DropFlag(kept[which].clone());
        async move {
            let _guard = guard;
            STARTED.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(30)).await;
            which
        }
    })
    .expect("register");
    app.allocate_concurrent("tokio.stuck", 1, 10).expect("allocate");

    let limited = CallOptions::new().time_limit(Duration::from_millis(200));
    let (kind, message) =
        failure(app.call_with::<_, usize>("tokio.stuck", &limited, 0usize).expect("call").wait_timeout(PATIENCE));
    assert_eq!(kind, TaskErrorKind::TimeLimit, "{message}");
    // Aborted on the runtime: its future is dropped there, soon after.
    dingo_test_support::faults::wait_until("the limited task was dropped", || flags[0].load(Ordering::Acquire));

    let mut doomed = app.call::<_, usize>("tokio.stuck", 1usize).expect("call");
    dingo_test_support::faults::wait_until("it started", || STARTED.load(Ordering::SeqCst) == 2);
    doomed.cancel().expect("cancel");
    let (kind, message) = failure(doomed.wait_timeout(PATIENCE));
    assert_eq!(kind, TaskErrorKind::Cancelled, "{message}");
    dingo_test_support::faults::wait_until("the cancelled task was dropped", || flags[1].load(Ordering::Acquire));
    assert_eq!(app.threads_written_off(), 0);
    app.close().expect("close");
}

/// Progress sent from the runtime's threads keeps its order with the final report: the
/// pool's thread reports it (on Redis a report from elsewhere would take another path than
/// the final one, and could land after it).
#[cfg(feature = "redis")]
#[test]
fn progress_from_the_runtime_arrives_in_order_before_the_result_on_redis() {
    use dingo::{Context, Report};
    let Some(redis) = dingo_test_support::redis::Redis::setup() else { return };
    let runtime = runtime();
    let app = App::builder().broker(redis.broker()).tokio_runtime(runtime.handle().clone()).build().expect("app");
    app.register_async_with_context("tokio.steps", |ctx: Arc<Context<'static>>, steps: u32| async move {
        for step in 1..=steps {
            tokio::time::sleep(Duration::from_millis(1)).await;
            ctx.progress(step);
        }
        Ok::<u32, String>(steps * 10)
    })
    .expect("register");
    app.allocate_concurrent("tokio.steps", 1, 200).expect("allocate");
    let options = CallOptions::new().monitor_progress(true);
    // Many at once, each reporting its last step just before it returns: the window in
    // which a report on another path could land after the final one.
    let handles: Vec<_> =
        (0..200).map(|_| app.call_with::<_, u32>("tokio.steps", &options, 3u32).expect("call")).collect();
    for handle in handles {
        let reports: Vec<Report<u32>> = handle.reports().collect();
        let steps: Vec<u32> = reports
            .iter()
            .filter_map(|r| match r {
                Report::Progress(p) => p.value::<u32>().map(|v| v.expect("decodes")),
                _ => None,
            })
            .collect();
        assert_eq!(steps, [1, 2, 3], "{reports:?}");
        assert_eq!(reports.last(), Some(&Report::Success(30)));
    }
    app.close().expect("close");
}
