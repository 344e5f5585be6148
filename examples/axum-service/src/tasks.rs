//! The service's tasks, all here. The handlers reach them only through their stubs
//! (`add::call_with`, …) and [`serve`]: whether a task is an `async fn` is the task's
//! business, not its callers'.
//!
//! `add` is an ordinary function run by a worker thread; `sum_squares` is an `async fn`
//! that waits on tokio's timer between its steps: the pool's threads drive many such calls
//! at once, on the tokio runtime the app was given (`AppBuilder::tokio_runtime`).

use std::time::Duration;

use dingo::{App, Context};
use serde::{Deserialize, Serialize};

/// The most steps [`sum_squares()`] takes: a call asking for more fails.
pub const MAX_STEPS: u32 = 1000;

/// The longest pause [`sum_squares()`] makes between two steps.
pub const MAX_PAUSE_MS: u64 = 1000;

/// `a + b`; an overflow is the task's failure (an HTTP 422 for the caller).
#[dingo::task(name = "axum_example.add")]
pub fn add(a: i64, b: i64) -> Result<i64, String> {
    a.checked_add(b).ok_or_else(|| format!("{a} + {b} overflows a 64-bit integer"))
}

/// What [`sum_squares()`] reports after each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Steps done, from 1.
    pub done: u32,
    /// Steps in all.
    pub of: u32,
}

/// What [`sum_squares()`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Squares {
    /// The `n` asked for.
    pub n: u32,
    /// 1² + 2² + … + n².
    pub sum: u64,
}

/// Sums the squares of 1 to `n`, one step at a time with a pause of `pause_ms` before each,
/// reporting a [`Step`] after each: a slow task with progress. Cancelled (the caller went
/// away), its future is dropped at its next pause.
#[dingo::task(name = "axum_example.sum_squares")]
pub async fn sum_squares(ctx: &Context, n: u32, pause_ms: u64) -> Result<Squares, String> {
    if n > MAX_STEPS {
        return Err(format!("n = {n} is more than {MAX_STEPS} steps"));
    }
    let pause = Duration::from_millis(pause_ms.min(MAX_PAUSE_MS));
    let mut sum = 0u64;
    for i in 1..=n {
        if ctx.is_cancelled() {
            return Err(format!("stopped after {} of {n} steps", i - 1));
        }
        tokio::time::sleep(pause).await;
        sum += u64::from(i) * u64::from(i);
        ctx.progress(Step { done: i, of: n });
    }
    Ok(Squares { n, sum })
}

/// How many `sum_squares` calls the service's workers run at once.
pub const CONCURRENCY: usize = 200;

/// Starts `threads` worker threads for each task of the service (a pool per task, so slow
/// `sum_squares` calls never hold up `add`); those of `sum_squares` run up to
/// [`CONCURRENCY`] calls at once. The app needs a tokio runtime (`sum_squares` sleeps on
/// tokio's timer).
pub fn serve(app: &App, threads: usize) -> Result<(), dingo::Error> {
    app.allocate(add, threads)?;
    app.allocate_concurrent(sum_squares, threads, CONCURRENCY)?;
    Ok(())
}
