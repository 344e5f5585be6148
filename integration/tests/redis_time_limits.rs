//! Hard time limits on Redis, where a worker thread settles its tasks in the order of its
//! own processing list and fetches ahead: when the watchdog writes a thread off, the call
//! past its limit fails with `TimeLimit` and exactly its message leaves the processing list;
//! what the thread finished before is stored, in order; what it fetched but had not started
//! goes back to the queue at once and runs on the replacement thread; and the thread, when
//! it returns, settles and reports nothing.
#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dingo::broker::{Ack, Reporter};
use dingo::event::EventSink;
use dingo::message::{ReplyTo, ReportMessage};
use dingo::redis::RedisOptions;
use dingo::{App, BrokerError, CallOptions, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{lock, wait_until};
use dingo_test_support::redis::{Redis, held};

/// The runs of `limits.work`, by token: the numbers it was called with, in the order they
/// started.
static RUNS: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

/// Logs its run, sleeps `millis`, returns `n`.
#[dingo::task(name = "limits.work")]
fn work(token: String, n: u64, millis: u64) -> u64 {
    lock(&RUNS).push((token, n));
    std::thread::sleep(Duration::from_millis(millis));
    n
}

fn runs(token: &str) -> Vec<u64> {
    lock(&RUNS).iter().filter(|(t, _)| t == token).map(|(_, n)| *n).collect()
}

/// Counts what the worker publishes: final reports by task id, and other reports.
struct Counting {
    inner: Arc<dyn Reporter>,
    finals: Mutex<HashMap<String, usize>>,
    reports: AtomicUsize,
}

impl Counting {
    fn finals(&self, id: &str) -> usize {
        lock(&self.finals).get(id).copied().unwrap_or(0)
    }

    fn all_finals(&self) -> usize {
        lock(&self.finals).values().sum()
    }
}

impl Reporter for Counting {
    fn attach(&self, events: &EventSink) {
        self.inner.attach(events)
    }

    fn report(&self, to: &ReplyTo, report: ReportMessage<'_>) -> Result<(), BrokerError> {
        self.reports.fetch_add(1, Ordering::SeqCst);
        self.inner.report(to, report)
    }

    fn finish(&self, to: &ReplyTo, report: ReportMessage<'_>, ack: Option<Ack>) -> Result<(), BrokerError> {
        *lock(&self.finals).entry(report.id.to_string()).or_insert(0) += 1;
        self.inner.finish(to, report, ack)
    }

    fn accepts_local(&self) -> bool {
        self.inner.accepts_local()
    }

    fn close(&self) {
        self.inner.close()
    }
}

/// A pool of one thread fetching four tasks at a time takes A, B, C and D in one fetch. A
/// is quick; B sleeps 3 s under a hard limit of 300 ms. A's result arrives while B runs; B
/// fails with `TimeLimit` soon after its limit; C and D, fetched by the written-off thread,
/// run on its replacement at once, not after B's thread returns. Past B's return and past
/// the lease (reaped every 100 ms), B has run once, every task once, nothing is left in a
/// processing list or the queue, no lease expired, no report was rejected, and the
/// written-off thread published nothing after its write-off.
#[test]
fn a_written_off_thread_settles_in_order_and_hands_back_what_it_fetched() {
    let lease = Duration::from_secs(1);
    let options = RedisOptions::new().lease(lease).reap_interval(Duration::from_millis(100)).prefetch(4);
    let Some(setup) = Redis::with_options(options) else { return };
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let token = dingo_test_support::unique("writeoff");
    let limited = CallOptions::new().time_limit(Duration::from_millis(300));
    let mut a = work::call(&caller, token.clone(), 1, 0).expect("call A");
    let mut b = work::call_with(&caller, &limited, token.clone(), 2, 3_000).expect("call B");
    let mut c = work::call(&caller, token.clone(), 3, 0).expect("call C");
    let mut d = work::call(&caller, token.clone(), 4, 0).expect("call D");
    let b_id = b.id().to_string();

    let broker = setup.broker();
    let counting =
        Arc::new(Counting { inner: Arc::new(broker.clone()), finals: Mutex::default(), reports: AtomicUsize::new(0) });
    let worker = App::builder().broker(broker.clone()).reporter(counting.clone()).build().expect("worker app");
    let started = Instant::now();
    worker.allocate(work, 1).expect("allocate");

    assert_eq!(a.wait_timeout(PATIENCE).expect("A's result"), 1);
    // B runs; C and D wait behind it in the thread's buffer (and its processing list).
    std::thread::sleep(Duration::from_millis(100));
    assert!(started.elapsed() < Duration::from_millis(300), "too slow to look while B runs");
    assert_eq!(runs(&token), [1, 2], "C or D ran while B ran: they were not fetched with it");
    assert_eq!(held(setup.url(), &setup.options().namespace, work::NAME), 3, "B, C and D held by the thread");

    let failed = b.wait_timeout(PATIENCE).expect_err("B runs past its hard limit");
    let b_failed = started.elapsed();
    assert_eq!(failed.task_kind(), Some(TaskErrorKind::TimeLimit), "{failed:?}");
    assert!(b_failed < Duration::from_millis(1_300), "B failed {b_failed:?} after the worker started");

    assert_eq!(c.wait_timeout(PATIENCE).expect("C's result"), 3);
    assert_eq!(d.wait_timeout(PATIENCE).expect("D's result"), 4);
    let done = started.elapsed();
    eprintln!("B failed {b_failed:?} after the worker started; C and D were done after {done:?}");
    assert!(
        done < b_failed + Duration::from_millis(1_000),
        "C and D waited for the written-off thread: done {done:?} after the start, B failed after {b_failed:?}"
    );
    assert_eq!(worker.threads_written_off(), 1);
    wait_until("nothing is held once C and D are done", || {
        held(setup.url(), &setup.options().namespace, work::NAME) == 0
    });
    let (finals, reports) = (counting.all_finals(), counting.reports.load(Ordering::SeqCst));
    assert_eq!(finals, 4, "one final report per call");
    assert_eq!(counting.finals(&b_id), 1, "B's only final report is the watchdog's");

    // Past B's return (3 s after it started) and past the lease after that.
    std::thread::sleep((Duration::from_millis(3_000) + lease * 2).saturating_sub(started.elapsed()));
    let mut ran = runs(&token);
    ran.sort_unstable();
    assert_eq!(ran, [1, 2, 3, 4], "every task ran once; B never again");
    assert_eq!(counting.all_finals(), finals, "the written-off thread published a final report");
    assert_eq!(counting.reports.load(Ordering::SeqCst), reports, "the written-off thread published progress");
    assert_eq!(held(setup.url(), &setup.options().namespace, work::NAME), 0);
    assert_eq!(broker.queue_len(work::NAME).expect("queue length"), 0);
    let stats = broker.stats();
    assert_eq!(stats.requeued_expired, 0, "a lease expired: {stats:?}");
    assert_eq!(stats.rejected_reports, 0, "{stats:?}");
    assert_eq!(stats.completed, 4, "{stats:?}");
    worker.close().expect("close");
    caller.close().expect("close");
}

/// Two threads, each fetching two tasks at a time, and a stream of quick calls among which
/// some sleep past a hard limit: every quick call succeeds, every slow one fails with
/// `TimeLimit`, each task runs once, and nothing is left behind.
#[test]
fn write_offs_among_quick_tasks_lose_and_double_nothing() {
    let lease = Duration::from_secs(1);
    let options = RedisOptions::new().lease(lease).reap_interval(Duration::from_millis(100)).prefetch(4);
    let Some(setup) = Redis::with_options(options) else { return };
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let token = dingo_test_support::unique("writeoffs");
    let limited = CallOptions::new().time_limit(Duration::from_millis(200));
    let handles: Vec<_> = (0..40u64)
        .map(|n| {
            if n % 10 == 3 {
                work::call_with(&caller, &limited, token.clone(), n, 1_000).expect("call")
            } else {
                work::call_with(&caller, &limited, token.clone(), n, 5).expect("call")
            }
        })
        .collect();
    let broker = setup.broker();
    let worker = App::builder().broker(broker.clone()).build().expect("worker app");
    worker.allocate(work, 2).expect("allocate");
    for (n, mut handle) in handles.into_iter().enumerate() {
        let result = handle.wait_timeout(PATIENCE);
        if n % 10 == 3 {
            let err = result.expect_err("a slow call fails");
            assert_eq!(err.task_kind(), Some(TaskErrorKind::TimeLimit), "call {n}: {err:?}");
        } else {
            assert_eq!(result.expect("a quick call succeeds"), n as u64);
        }
    }
    // Counted just after the call was failed.
    wait_until("four threads written off", || worker.threads_written_off() == 4);
    // Past the slow tasks' return and the lease.
    std::thread::sleep(Duration::from_millis(1_000) + lease * 2);
    let mut ran = runs(&token);
    ran.sort_unstable();
    assert_eq!(ran, (0..40).collect::<Vec<u64>>(), "every task ran once");
    assert_eq!(held(setup.url(), &setup.options().namespace, work::NAME), 0);
    assert_eq!(broker.queue_len(work::NAME).expect("queue length"), 0);
    let stats = broker.stats();
    assert_eq!(stats.requeued_expired, 0, "{stats:?}");
    assert_eq!(stats.rejected_reports, 0, "{stats:?}");
    worker.close().expect("close");
    caller.close().expect("close");
}
