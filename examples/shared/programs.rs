//! The worker and caller programs, whatever the broker: the `*_worker` and `*_caller`
//! examples only choose the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dingo::AppBuilder;
use dingo::error::MainError;

use crate::tasks::{self, Order, add, slow_echo, total};

/// Serves the shared tasks: `[--threads N] [--tasks N] [--seconds S]`. Without `--tasks`
/// or `--seconds` it serves until SIGINT (Ctrl-C) or SIGTERM; with them it also stops after
/// that many tasks or seconds. Stopping is graceful: running tasks finish and report,
/// tasks taken but not started go back to their queue. A second signal exits at once.
pub(crate) fn worker(builder: AppBuilder) -> Result<(), MainError> {
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
    let signalled = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal sets the flag; a second one, with the flag set, exits (code 1).
        signal_hook::flag::register_conditional_shutdown(signal, 1, signalled.clone())?;
        signal_hook::flag::register(signal, signalled.clone())?;
    }
    let app = builder.build()?;
    app.allocate_all(threads)?;
    println!(
        "worker ready: {threads} thread(s) serving example.add, example.total, example.slow_echo, example.crash_if"
    );
    let started = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(20));
        if signalled.load(Ordering::SeqCst) {
            // Running tasks finish first.
            app.close()?;
            println!("worker stopped on a signal after {} task(s)", tasks::RUN.load(Ordering::SeqCst));
            return Ok(());
        }
        let run = tasks::RUN.load(Ordering::SeqCst);
        if stop_after_tasks.is_some_and(|n| run >= n) || stop_after.is_some_and(|d| started.elapsed() >= d) {
            println!("worker done after {run} task(s)");
            break;
        }
    }
    app.close()?;
    Ok(())
}

/// Calls the shared tasks and prints the typed results: `[--calls N]`.
pub(crate) fn caller(builder: AppBuilder) -> Result<(), MainError> {
    let mut calls = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--calls" => calls = value.parse()?,
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    let app = builder.build()?;
    let patience = Duration::from_secs(30);

    // Many calls in flight, then their results, in order.
    let handles: Vec<_> = (0..calls as i64).map(|i| add::call(&app, i, 1000)).collect::<Result<_, _>>()?;
    for (i, mut handle) in handles.into_iter().enumerate() {
        println!("add({i}, 1000) = {}", handle.wait_timeout(patience)?);
    }

    // Structs travel; an Err arrives as a failure carrying its value.
    let order = Order { id: 7, items: vec!["tea".into(), "cake".into()], cents_each: 350 };
    println!("total = {:?}", total::call(&app, order)?.wait_timeout(patience)?);
    let empty = Order { id: 8, items: vec![], cents_each: 100 };
    match total::call(&app, empty)?.wait_timeout(patience) {
        Err(dingo::Error::Task(e)) => println!("total failed: {} (payload {:?})", e.message(), e.payload::<String>()),
        other => println!("total: unexpected {other:?}"),
    }
    println!("slow_echo = {}", slow_echo::call(&app, 42, 50)?.wait_timeout(patience)?);
    app.close()?;
    Ok(())
}
