//! The lifecycle of a call on the embedded broker: a reminder sent in 300 ms, an offer that
//! expires before anyone can take it, a payment that fails twice before it goes through
//! (its caller watching the retries), a report that stops at its soft time limit, a hung
//! export cut off by its hard one, an email cancelled before it went out, and the dead
//! letters an operator replays.
//!
//! Run it with `cargo run --example lifecycle`. The same calls work on Redis and RabbitMQ:
//! there the broker keeps the delayed tasks (they survive worker restarts).

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dingo::broker::Select;
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

/// Adds up rows until its soft time limit, then returns what it has (cooperative).
#[dingo::task(soft_time_limit = "150ms")]
fn report(ctx: &Context, rows: u64) -> u64 {
    let mut summed = 0;
    while summed < rows && !ctx.is_cancelled() {
        summed += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    summed
}

/// An export that hangs (it ignores `is_cancelled`): its hard limit cuts it off.
#[dingo::task(time_limit = "200ms")]
fn export(millis: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    millis
}

/// Sends an email (here: says so).
#[dingo::task]
fn email(to: String) -> String {
    format!("sent to {to}")
}

/// Imports a file: fails while the file is missing (every attempt), so its calls end in the
/// dead letters.
#[dingo::task(retries = 1, retry_backoff = "10ms")]
fn import(path: String) -> Result<u64, String> {
    static MISSING: AtomicU32 = AtomicU32::new(4); // two calls of two attempts
    if MISSING.load(Ordering::SeqCst) > 0 {
        MISSING.fetch_sub(1, Ordering::SeqCst);
        return Err(format!("{path}: no such file"));
    }
    Ok(path.len() as u64)
}

fn main() -> Result<(), dingo::Error> {
    let app = dingo::App::local()?;
    app.allocate(remind, 1)?;
    app.allocate(charge, 1)?;
    app.allocate(busy, 1)?;
    app.allocate(report, 1)?;
    app.allocate(export, 1)?;
    app.allocate(email, 1)?;
    app.allocate(import, 1)?;

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

    // A soft time limit: the task sees `is_cancelled()` and returns what it has.
    let summed = report::call(&app, 1_000_000)?.wait()?;
    println!("report: summed {summed} rows before its soft limit");
    assert!(summed > 0 && summed < 1_000_000);

    // A hard time limit: the caller gets `TimeLimit` at 200 ms, the stuck thread is written
    // off and a fresh one serves the next call at once.
    let started = Instant::now();
    let cut = export::call(&app, 10_000)?.wait().expect_err("the export hangs");
    println!("export: {cut} (after {} ms)", started.elapsed().as_millis());
    assert_eq!(cut.task_kind(), Some(TaskErrorKind::TimeLimit));
    assert_eq!(export::call(&app, 1)?.wait()?, 1);
    assert_eq!(app.threads_written_off(), 1);

    // A cancel: the email is due in 200 ms; cancelled meanwhile, it never goes out.
    let later = CallOptions::new().countdown(Duration::from_millis(200));
    let mail = email::call_with(&app, &later, "grace".to_string())?;
    mail.cancel()?;
    let cancelled = mail.wait().expect_err("the email was cancelled");
    println!("email: {cancelled}");
    assert_eq!(cancelled.task_kind(), Some(TaskErrorKind::Cancelled));

    // Dead letters: two imports fail all their attempts; once the file is there, an operator
    // replays them and they go through.
    for path in ["a.csv", "b.csv"] {
        let failed = import::call(&app, path.to_string())?.wait().expect_err("missing file");
        println!("import {path}: {failed}");
    }
    let name = import::NAME;
    // The worker buries a letter just after telling its caller.
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.dead_count(name)? < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let letters = app.dead_letters(name, 10)?;
    for letter in &letters {
        println!(
            "dead letter of {}: {}",
            letter.key.as_ref().map_or("?".to_string(), |k| k.to_string()),
            letter.reason
        );
    }
    assert_eq!(letters.len(), 2);
    let replayed = app.replay_dead(name, &Select::All)?;
    println!("replayed {replayed} dead letter(s)");
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.dead_count(name)? > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(app.dead_count(name)?, 0);
    app.close()
}
