//! A tour of what a caller gets back: structured arguments, failures with typed payloads,
//! progress reports, fire-and-forget calls, closures with state, events, back-pressure.
//!
//! Run it with `cargo run --example tour`.

use std::time::Duration;

use dingo::serde::{Deserialize, Serialize};
use dingo::{App, CallOptions, EventFilter, Level, LocalBroker, LocalOptions, Report, TaskErrorKind};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
struct Order {
    id: u32,
    items: Vec<String>,
    cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
struct Receipt {
    order: u32,
    total_cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(crate = "dingo::serde")]
enum ChargeError {
    Declined { reason: String },
    EmptyOrder,
}

impl std::fmt::Display for ChargeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChargeError::Declined { reason } => write!(f, "card declined: {reason}"),
            ChargeError::EmptyOrder => f.write_str("the order is empty"),
        }
    }
}

/// A fallible task with a chosen name: `Err` reaches the caller with its value.
#[dingo::task(name = "billing.charge")]
fn charge(order: Order) -> Result<Receipt, ChargeError> {
    if order.items.is_empty() {
        return Err(ChargeError::EmptyOrder);
    }
    if order.cents > 100_000 {
        return Err(ChargeError::Declined { reason: "over the limit".into() });
    }
    Ok(Receipt { order: order.id, total_cents: order.cents })
}

/// A task that reports progress through its injected context.
#[dingo::task]
fn crunch(ctx: &dingo::Context, steps: u32) -> u32 {
    for step in 1..=steps {
        ctx.progress(format!("step {step}/{steps}"));
    }
    steps
}

/// A task that panics on bad input: the caller gets a `Panic` failure, the worker lives on.
#[dingo::task]
fn parse_port(text: String) -> u16 {
    text.parse().expect("not a port number")
}

fn main() -> Result<(), dingo::Error> {
    // Small queues, so the back-pressure part below has something to show.
    let broker = LocalBroker::with_options(LocalOptions::new().capacity(8));
    let app = App::builder().broker(broker).build()?;
    let events = app.events(EventFilter::new().level(Level::Warning));
    app.allocate_all(2)?;

    // Structured arguments and results.
    let order = Order { id: 7, items: vec!["tea".into(), "cake".into()], cents: 1250 };
    let receipt = charge::call(&app, order)?.wait()?;
    println!("charged: {receipt:?}");

    // A failure carries the task's own error value.
    let err = charge::call(&app, Order { id: 8, items: vec![], cents: 0 })?.wait().unwrap_err();
    let task_error = err.task_error().expect("a task failure");
    let payload: Option<ChargeError> = task_error.payload().and_then(Result::ok);
    println!("failed ({}): {} / payload {payload:?}", task_error.kind(), task_error.message());

    // Progress reports, in order, with `monitor_progress`.
    let opts = CallOptions::new().monitor_progress(true);
    for report in crunch::call_with(&app, &opts, 3)?.reports() {
        match report {
            Report::Sent => println!("crunch: received by a worker"),
            Report::Progress(p) if p.is_start() => println!("crunch: started"),
            Report::Progress(p) => println!("crunch: {}", p.value::<String>().and_then(Result::ok).unwrap_or_default()),
            Report::Success(steps) => println!("crunch: done after {steps} steps"),
            Report::Failure(e) => println!("crunch: failed: {e}"),
            other => println!("crunch: {other:?}"), // kinds added in later versions
        }
    }

    // A panic is a failure, not a dead worker.
    let err = parse_port::call(&app, "eighty".into())?.wait().unwrap_err();
    assert_eq!(err.task_kind(), Some(TaskErrorKind::Panic));
    println!("parse_port failed: {err}; next call: {}", parse_port::call(&app, "8080".into())?.wait()?);
    if let Some(event) = events.recv_timeout(Duration::from_secs(1)) {
        println!("event: {:?} {:?}: {}", event.level, event.kind, event.message);
    }

    // A closure with state, registered at run time and called by name.
    let counter = std::sync::atomic::AtomicU64::new(0);
    app.register("tour.count", move |()| counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1)?;
    app.allocate("tour.count", 1)?;
    let counts: Vec<u64> = (0..3).map(|_| app.call::<_, u64>("tour.count", ())?.wait()).collect::<Result<_, _>>()?;
    println!("counter: {counts:?}");

    // Fire-and-forget, and waiting with a timeout (a timeout loses nothing).
    let id = crunch::send(&app, 1)?;
    println!("sent crunch {id} without waiting for it");
    let mut handle = crunch::call(&app, 2)?;
    let steps = loop {
        match handle.wait_timeout(Duration::from_millis(1)) {
            Err(dingo::Error::Timeout(_)) => continue,
            other => break other?,
        }
    };
    println!("crunch finished: {steps}");

    // Back-pressure: with the workers gone, the queue of 8 fills and a call that may not
    // wait is refused instead of growing memory.
    app.close()?;
    let full = App::builder().broker(LocalBroker::with_options(LocalOptions::new().capacity(2))).build()?;
    let no_wait = CallOptions::new().enqueue_timeout(Duration::ZERO);
    let results: Vec<_> = (0..3).map(|i| crunch::call_with(&full, &no_wait, i).map(|h| h.id().clone())).collect();
    println!("without workers, queue of 2: {:?}", results.iter().map(|r| r.is_ok()).collect::<Vec<_>>());
    full.close()
}
