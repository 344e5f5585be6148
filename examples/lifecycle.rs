//! Delays, expiry and retries on the embedded broker: a reminder sent in 300 ms, an offer
//! that expires before anyone can take it, and a payment that fails twice before it goes
//! through, with its caller watching the retries.
//!
//! Run it with `cargo run --example lifecycle`. The same calls work on Redis and RabbitMQ:
//! there the broker keeps the delayed tasks (they survive worker restarts).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dingo::{CallOptions, Context, Report, TaskErrorKind};

/// Sends a reminder (here: says when it ran).
#[dingo::task]
fn remind(who: String) -> String {
    format!("reminded {who}")
}

/// A payment gateway that times out twice, then accepts. Up to 4 retries, exponential
/// backoff from 50 ms (no jitter, so the waits below are exact).
#[dingo::task(retries = 4, retry_backoff = "50ms", retry_jitter = false)]
fn charge(ctx: &Context, cents: u64) -> Result<String, String> {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    if CALLS.fetch_add(1, Ordering::SeqCst) < 2 {
        return Err(format!("gateway timeout on attempt {}", ctx.attempt()));
    }
    Ok(format!("charged {cents} cents on attempt {}", ctx.attempt()))
}

/// Holds its worker for a while (so the offer below waits in the queue).
#[dingo::task]
fn busy(millis: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    millis
}

fn main() -> Result<(), dingo::Error> {
    let app = dingo::App::local()?;
    app.allocate(remind, 1)?;
    app.allocate(charge, 1)?;
    app.allocate(busy, 1)?;

    // A countdown: the broker keeps the task for 300 ms, then a worker runs it.
    let started = Instant::now();
    let later = CallOptions::new().countdown(Duration::from_millis(300));
    let reminded = remind::call_with(&app, &later, "ada".to_string())?.wait()?;
    let waited = started.elapsed();
    println!("{reminded} after {} ms", waited.as_millis());
    assert!(waited >= Duration::from_millis(300));

    // Expiry: the one `busy` worker is taken for 400 ms, so an offer valid for 100 ms is
    // not started in time. It never runs; its caller gets `Expired`.
    let working = busy::call(&app, 400)?;
    let offer = CallOptions::new().expires_in(Duration::from_millis(100));
    let expired = busy::call_with(&app, &offer, 1)?.wait().expect_err("the offer expired");
    println!("offer: {expired}");
    assert_eq!(expired.task_kind(), Some(TaskErrorKind::Expired));
    working.wait()?;

    // Retries: the task's attribute says 4 retries; `monitor_progress` shows each one.
    let watch = CallOptions::new().monitor_progress(true);
    for report in charge::call_with(&app, &watch, 1250)?.reports() {
        match report {
            Report::Retrying { attempt, after, error } => {
                println!("attempt {attempt} failed ({}), next in {} ms", error.message(), after.as_millis())
            }
            Report::Success(receipt) => {
                println!("{receipt}");
                assert_eq!(receipt, "charged 1250 cents on attempt 3");
            }
            Report::Failure(error) => return Err(error.into()),
            _ => {}
        }
    }
    app.close()
}
