//! The dingo benchmark: whole-process measurements of calls per second and call→result
//! latency, each scenario run several times and reported as the median (with the spread).
//!
//! ```text
//! cargo run --release -p dingo-bench -- local [--runs 5] [--calls 2000000] [--window 1024] [--workers 1]
//! ```
//!
//! Scenarios on the local broker:
//! - `inflight`: no-op `add` with a result, `--window` calls in flight from one caller thread;
//! - `fire-and-forget`: `add::send`, counted when the worker has run them all;
//! - `sequential`: one call at a time, p50 / p99 of call→result latency;
//! - `inflight-serialized`: `inflight` through the serialized local broker (MessagePack and
//!   the wire format on every message), so the codec's cost shows;
//! - `payload-1k-serialized`: a 1 KiB string echoed through the serialized broker.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dingo::{App, LocalBroker};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[dingo::task(name = "bench.add")]
fn add(a: i64, b: i64) -> i64 {
    a + b
}

static EXECUTED: AtomicU64 = AtomicU64::new(0);

#[dingo::task(name = "bench.count")]
fn count(a: i64, b: i64) {
    let _ = a + b;
    EXECUTED.fetch_add(1, Ordering::Relaxed);
}

#[dingo::task(name = "bench.echo")]
fn echo(payload: String) -> String {
    payload
}

struct Config {
    runs: usize,
    calls: u64,
    window: usize,
    workers: usize,
    only: Option<String>,
    worker_spin: Option<Duration>,
    sequential_ids: bool,
}

type Outcome = Result<Measure, dingo::Error>;
type Scenario<'a> = (&'static str, Box<dyn Fn() -> Outcome + 'a>);

enum Measure {
    Rate(f64),
    Latency { p50: Duration, p99: Duration, rate: f64 },
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "local".to_owned());
    let mut config = Config {
        runs: 5,
        calls: 2_000_000,
        window: 1024,
        workers: 1,
        only: None,
        worker_spin: None,
        sequential_ids: false,
    };
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        let number = || value.parse::<u64>().unwrap_or_else(|_| usage(&format!("{flag} needs a number")));
        match flag.as_str() {
            "--runs" => config.runs = number().max(1) as usize,
            "--calls" => config.calls = number().max(1),
            "--window" => config.window = number().max(1) as usize,
            "--workers" => config.workers = number().max(1) as usize,
            "--only" => config.only = Some(value.clone()),
            "--worker-spin-us" => config.worker_spin = Some(Duration::from_micros(number())),
            "--ids" => match value.as_str() {
                "uuid" => config.sequential_ids = false,
                "sequential" => config.sequential_ids = true,
                _ => usage("--ids takes uuid or sequential"),
            },
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    match mode.as_str() {
        "local" => local(&config),
        other => usage(&format!("unknown mode {other} (this build knows: local)")),
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: dingo-bench local [--runs N] [--calls N] [--window N] [--workers N] [--only SCENARIO] [--worker-spin-us N] [--ids uuid|sequential]"
    );
    std::process::exit(2)
}

fn local(config: &Config) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let allocator = if cfg!(feature = "mimalloc") { "mimalloc" } else { "system malloc" };
    println!(
        "dingo-bench local: {} runs per scenario, {} calls per run, window {}, {} worker thread(s), {cores} cores, {allocator}",
        config.runs, config.calls, config.window, config.workers
    );
    let builder = || {
        let mut builder = App::builder();
        if let Some(spin) = config.worker_spin {
            builder = builder.worker_spin(spin);
        }
        if config.sequential_ids {
            builder = builder.id_maker(dingo::Sequential::new());
        }
        builder
    };
    let memory = || builder().broker(LocalBroker::new()).build();
    let serialized = || builder().broker(LocalBroker::serialized()).build();
    let calls = config.calls;
    let scenarios: Vec<Scenario<'_>> = vec![
        ("inflight", Box::new(move || inflight(memory()?, config, calls))),
        ("fire-and-forget", Box::new(move || fire_and_forget(memory()?, config, calls))),
        ("sequential", Box::new(move || sequential(memory()?, config, (calls / 10).max(1)))),
        ("inflight-serialized", Box::new(move || inflight(serialized()?, config, (calls / 4).max(1)))),
        ("payload-1k-serialized", Box::new(move || payload(serialized()?, config, (calls / 10).max(1)))),
    ];
    println!("{:<24} {:>14} {:>14} {:>14} {:>10} {:>10}", "scenario", "median/s", "min/s", "max/s", "p50", "p99");
    for (name, scenario) in scenarios {
        if config.only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        let mut rates = Vec::new();
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        for _ in 0..config.runs {
            match scenario() {
                Ok(Measure::Rate(rate)) => rates.push(rate),
                Ok(Measure::Latency { p50, p99, rate }) => {
                    rates.push(rate);
                    p50s.push(p50);
                    p99s.push(p99);
                }
                Err(e) => {
                    eprintln!("{name} failed: {e}");
                    std::process::exit(1);
                }
            }
        }
        rates.sort_by(f64::total_cmp);
        p50s.sort();
        p99s.sort();
        let latency = |v: &[Duration]| v.get(v.len() / 2).map(|d| format!("{:.2}µs", d.as_secs_f64() * 1e6));
        println!(
            "{:<24} {:>14.0} {:>14.0} {:>14.0} {:>10} {:>10}",
            name,
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1],
            latency(&p50s).unwrap_or_else(|| "-".into()),
            latency(&p99s).unwrap_or_else(|| "-".into()),
        );
    }
}

/// `window` calls in flight from one caller thread: call, and once the window is full wait
/// for the oldest.
fn inflight(app: App, config: &Config, calls: u64) -> Outcome {
    app.allocate(add, config.workers)?;
    warm_up(&app)?;
    let mut pending = VecDeque::with_capacity(config.window);
    let start = Instant::now();
    for i in 0..calls as i64 {
        pending.push_back(add::call(&app, i, 1)?);
        if pending.len() >= config.window {
            let handle = pending.pop_front().ok_or(dingo::Error::NoReport)?;
            handle.wait()?;
        }
    }
    for handle in pending {
        handle.wait()?;
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    app.close()?;
    Ok(Measure::Rate(rate))
}

fn fire_and_forget(app: App, config: &Config, calls: u64) -> Outcome {
    app.allocate(count, config.workers)?;
    let before = EXECUTED.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..calls as i64 {
        count::send(&app, i, 1)?;
    }
    while EXECUTED.load(Ordering::Relaxed) - before < calls {
        std::hint::spin_loop();
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    app.close()?;
    Ok(Measure::Rate(rate))
}

fn sequential(app: App, config: &Config, calls: u64) -> Outcome {
    app.allocate(add, config.workers)?;
    warm_up(&app)?;
    let mut latencies = Vec::with_capacity(calls as usize);
    let start = Instant::now();
    for i in 0..calls as i64 {
        let begin = Instant::now();
        add::call(&app, i, 1)?.wait()?;
        latencies.push(begin.elapsed());
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let measure = Measure::Latency { p50: at(0.50), p99: at(0.99), rate };
    app.close()?;
    Ok(measure)
}

fn payload(app: App, config: &Config, calls: u64) -> Outcome {
    app.allocate(echo, config.workers)?;
    let data: String = (0..1024u32).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let mut pending = VecDeque::with_capacity(config.window);
    let start = Instant::now();
    for _ in 0..calls {
        pending.push_back(echo::call(&app, data.clone())?);
        if pending.len() >= config.window {
            let handle = pending.pop_front().ok_or(dingo::Error::NoReport)?;
            handle.wait()?;
        }
    }
    for handle in pending {
        handle.wait()?;
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    app.close()?;
    Ok(Measure::Rate(rate))
}

fn warm_up(app: &App) -> Result<(), dingo::Error> {
    for i in 0..1000 {
        add::call(app, i, 1)?.wait()?;
    }
    Ok(())
}
