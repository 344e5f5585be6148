//! A worker process on Redis: serves the shared tasks with a pool of threads.
//!
//! ```text
//! cargo run --features redis --example redis_worker -- [--threads N] [--tasks N] [--seconds S]
//! ```
//! Without `--tasks` or `--seconds` it serves until killed; with them it stops (gracefully)
//! after that many tasks or seconds. Run `redis_caller` in another terminal.

use std::time::{Duration, Instant};

#[path = "shared/tasks.rs"]
mod tasks;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut threads = 4;
    let mut stop_after_tasks = None;
    let mut stop_after = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--threads" => threads = value.parse()?,
            "--tasks" => stop_after_tasks = Some(value.parse::<u64>()?),
            "--seconds" => stop_after = Some(Duration::from_secs_f64(value.parse()?)),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let app = dingo::App::builder().broker(tasks::broker()?).build()?;
    app.allocate_all(threads)?;
    println!("worker ready: {threads} thread(s) serving example.add, example.total, example.slow_echo");
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let run = tasks::RUN.load(std::sync::atomic::Ordering::SeqCst);
        if stop_after_tasks.is_some_and(|n| run >= n) || stop_after.is_some_and(|d| started.elapsed() >= d) {
            println!("worker done after {run} task(s)");
            break;
        }
    }
    app.close()?;
    Ok(())
}
