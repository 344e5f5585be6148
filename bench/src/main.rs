//! The dingo benchmark: whole-process measurements of calls per second and call→result
//! latency, each scenario run several times and reported as the median (with the spread).
//!
//! ```text
//! cargo run --release -p dingo-bench -- local [--runs 5] [--calls 2000000] [--window 1024] [--workers 1]
//! cargo run --release -p dingo-bench -- redis [--url redis://127.0.0.1:6379] [--calls 300000] [--workers 2]
//! cargo run --release -p dingo-bench -- amqp [--url amqp://guest:guest@127.0.0.1:5672/%2f] [--calls 100000] [--workers 2]
//! ```
//!
//! `--url` may carry broker options in its query (`redis://127.0.0.1:6379/?prefetch=512`,
//! `amqp://guest:guest@127.0.0.1:5672/%2f?prefetch=256`).
//!
//! `--only` takes one scenario name or several, comma-separated.
//!
//! Scenarios on the local broker:
//! - `inflight`: no-op `add` with a result, `--window` calls in flight from one caller thread;
//! - `inflight-await`: the same through `.await` on a current-thread tokio runtime (the one
//!   caller thread): `--window` handles in flight in a `FuturesUnordered`, the next call made
//!   as soon as one of them is ready;
//! - `fire-and-forget`: `add::send`, counted when the worker has run them all;
//! - `sequential`: one call at a time, p50 / p99 of call→result latency;
//! - `sequential-await`: the same, `add::call(..)?.await` on a current-thread tokio runtime;
//! - `call-time`, `call-time-await`: `inflight` and `inflight-await` with every `call` timed
//!   (what blocks a caller, and an async caller's runtime thread: the send, and the wait
//!   for room in a full queue): its p99.9 and its max over the run, beside the rate;
//! - `inflight-serialized`: `inflight` through the serialized local broker (MessagePack and
//!   the wire format on every message), so the codec's cost shows;
//! - `payload-1k-serialized`: a 1 KiB string echoed through the serialized broker.
//! - `delayed`: `--calls` calls, each due at a random moment of the run's first second (an
//!   ETA), call→result rate from the first send to the last result (the broker's delay
//!   structure under load; tasks due while the caller still sends run at once);
//! - `lateness`: 2,000 calls delayed 50–500 ms, sent at 1,000 calls/s; p50 / p99 of the
//!   time from each one's due time to its worker starting it;
//! - `retry`: `inflight` with a task that fails its first attempt and retries once after
//!   1 ms (through the broker's delay), call→result rate.
//!
//! Scenarios on Redis (a caller app and a worker app, each with its own connections, in
//! this process; a fresh namespace per run, deleted afterwards):
//! - `redis-inflight`: at-least-once `add::call` + `wait`, `--window` calls in flight;
//!   `redis-inflight-await` through `.await`, as `inflight-await`;
//! - `redis-inflight-at-most-once`: the same with the task's default `at_most_once`;
//! - `redis-fire-and-forget`: at-least-once `add::send`, counted when the workers ran them;
//! - `redis-sequential`: one call at a time, p50 / p99; `redis-sequential-await` through
//!   `.await`;
//! - `redis-call-time`, `redis-call-time-await`: as `call-time`, `call-time-await`;
//! - `redis-raw-request-reply`: the baseline without dingo, the `redis` crate alone: one
//!   request-reply at a time with four plain commands (`LPUSH`, `BRPOP` on each side), the
//!   floor under `redis-sequential`.
//!
//! - `redis-delayed`, `redis-lateness`, `redis-retry`: the three lifecycle scenarios above.
//!
//! Scenarios on RabbitMQ: the same (`amqp-inflight`, `amqp-inflight-await`,
//! `amqp-inflight-at-most-once`, `amqp-fire-and-forget`, `amqp-sequential`,
//! `amqp-sequential-await`, `amqp-call-time`, `amqp-call-time-await`, `amqp-delayed`,
//! `amqp-lateness`, `amqp-retry`), with durable queues, persistent messages and
//! publisher confirms (the broker's defaults); a fresh namespace per run, its queues deleted
//! afterwards. And four baselines without dingo, amiquip alone on the same server:
//! `amqp-raw-inflight` (calls as dingo makes them — persistent confirmed requests, a
//! responder acknowledging each once its confirmed reply is out — `--window` in flight:
//! the reference for `amqp-inflight`), `amqp-raw-inflight-at-most-once` (transient
//! requests and replies published without confirms, each request acknowledged as it
//! arrives: the reference for `amqp-inflight-at-most-once`), `amqp-raw-publish-consume`
//! (persistent messages,
//! publisher confirms, manual acks: what fire-and-forget needs at the least, in messages/s)
//! and `amqp-raw-request-reply` (one persistent confirmed request and its reply at a time:
//! the floor under `amqp-sequential`).
//!
//! A scenario and its `-await` twin run in turns (blocking, awaiting, blocking, …), so both
//! medians come from the same minutes of a shared machine, and print one under the other.

mod raw_amqp;
mod raw_redis;

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dingo::amqp::{AmqpBroker, AmqpOptions};
use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, Backoff, CallOptions, Context, Handle, LocalBroker};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

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

/// Microseconds since the Unix epoch (the lateness scenario compares wall-clock times).
fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// How late it started: the time from `due_us` to now, in microseconds.
#[dingo::task(name = "bench.late")]
fn late(due_us: u64) -> u64 {
    now_us().saturating_sub(due_us)
}

/// Fails its first attempt.
#[dingo::task(name = "bench.flaky")]
fn flaky(ctx: &Context, a: i64) -> Result<i64, String> {
    if ctx.attempt() == 1 { Err("first attempts fail".to_owned()) } else { Ok(a) }
}

struct Config {
    runs: usize,
    calls: Option<u64>,
    url: String,
    window: usize,
    workers: usize,
    only: Option<Vec<String>>,
    worker_spin: Option<Duration>,
    sequential_ids: bool,
}

type Outcome = Result<Measure, dingo::Error>;
type Scenario<'a> = (&'static str, Box<dyn Fn() -> Outcome + 'a>);

enum Measure {
    Rate(f64),
    Latency {
        p50: Duration,
        p99: Duration,
        rate: f64,
    },
    /// The rate, and how long one `call` took: its p99.9 and its max over the run.
    CallTime {
        rate: f64,
        p999: Duration,
        max: Duration,
    },
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "local".to_owned());
    let mut config = Config {
        runs: 5,
        calls: None,
        url: match mode.as_str() {
            "amqp" => {
                std::env::var("DINGO_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
            }
            _ => std::env::var("DINGO_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned()),
        },
        window: 1024,
        // One worker thread per core the broker leaves free: in process, the caller and one
        // worker share two cores; with Redis, two workers (Redis runs on its own thread).
        workers: if mode == "local" { 1 } else { 2 },
        only: None,
        worker_spin: None,
        sequential_ids: false,
    };
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_default();
        let number = || value.parse::<u64>().unwrap_or_else(|_| usage(&format!("{flag} needs a number")));
        match flag.as_str() {
            "--runs" => config.runs = number().max(1) as usize,
            "--calls" => config.calls = Some(number().max(1)),
            "--url" => config.url = value.clone(),
            "--window" => config.window = number().max(1) as usize,
            "--workers" => config.workers = number().max(1) as usize,
            "--only" => config.only = Some(value.split(',').map(str::to_owned).collect()),
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
        "redis" => redis(&config),
        "amqp" => amqp(&config),
        other => usage(&format!("unknown mode {other} (this build knows: local, redis, amqp)")),
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: dingo-bench local|redis|amqp [--runs N] [--url URL] [--calls N] [--window N] [--workers N] [--only SCENARIO[,SCENARIO…]] [--worker-spin-us N] [--ids uuid|sequential]"
    );
    std::process::exit(2)
}

fn machine(config: &Config, mode: &str, calls: u64) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let allocator = if cfg!(feature = "mimalloc") { "mimalloc" } else { "system malloc" };
    println!(
        "dingo-bench {mode}: {} runs per scenario, {calls} calls per run, window {}, {} worker thread(s), {cores} cores, {allocator}",
        config.runs, config.window, config.workers
    );
}

fn local(config: &Config) {
    let calls = config.calls.unwrap_or(2_000_000);
    machine(config, "local", calls);
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
    let scenarios: Vec<Scenario<'_>> = vec![
        ("inflight", Box::new(move || inflight(&memory()?, &memory_same(), config, calls))),
        ("inflight-await", Box::new(move || inflight_await(&memory()?, &memory_same(), config, calls))),
        ("fire-and-forget", Box::new(move || fire_and_forget(&memory()?, &memory_same(), config, calls))),
        ("sequential", Box::new(move || sequential(&memory()?, &memory_same(), config, (calls / 10).max(1)))),
        (
            "sequential-await",
            Box::new(move || sequential_await(&memory()?, &memory_same(), config, (calls / 10).max(1))),
        ),
        ("call-time", Box::new(move || call_time(&memory()?, &memory_same(), config, calls, Wait::Blocking))),
        ("call-time-await", Box::new(move || call_time(&memory()?, &memory_same(), config, calls, Wait::Await))),
        ("inflight-serialized", Box::new(move || inflight(&serialized()?, &memory_same(), config, (calls / 4).max(1)))),
        ("payload-1k-serialized", Box::new(move || payload(serialized()?, config, (calls / 10).max(1)))),
        ("delayed", Box::new(move || delayed(&memory()?, &memory_same(), config, calls))),
        ("lateness", Box::new(move || lateness(&memory()?, &memory_same(), config, 2_000))),
        ("retry", Box::new(move || retry(&memory()?, &memory_same(), config, (calls / 4).max(1)))),
        ("time-limit", Box::new(move || time_limited(&memory()?, &memory_same(), config, calls))),
        ("cancel", Box::new(move || cancels(&memory()?, (calls / 4).max(1)))),
    ];
    run(config, scenarios);
}

/// The worker app of a local scenario: the caller app itself.
fn memory_same() -> Option<App> {
    None
}

/// A caller app and a worker app on one server, and what removes their run's traces.
type Pair = (App, App, Box<dyn std::any::Any>);

fn redis(config: &Config) {
    let calls = config.calls.unwrap_or(300_000);
    machine(config, "redis", calls);
    let url = config.url.as_str();
    let pair = move || -> Result<Pair, dingo::Error> {
        let namespace = Namespace::new(url)?;
        let caller = App::builder().broker(namespace.broker()?).build()?;
        let worker = App::builder().broker(namespace.broker()?).build()?;
        Ok((caller, worker, Box::new(namespace)))
    };
    let mut scenarios = remote("redis", config, calls, &pair);
    scenarios.push(("redis-raw-request-reply", Box::new(move || raw_redis::request_reply(url, (calls / 20).max(1)))));
    run(config, scenarios);
}

fn amqp(config: &Config) {
    let calls = config.calls.unwrap_or(100_000);
    machine(config, "amqp", calls);
    let url = config.url.as_str();
    let pair = move || -> Result<Pair, dingo::Error> {
        let topology = Topology::new(url)?;
        let caller = App::builder().broker(topology.broker()?).build()?;
        let worker = App::builder().broker(topology.broker()?).build()?;
        Ok((caller, worker, Box::new(topology)))
    };
    let mut scenarios = remote("amqp", config, calls, &pair);
    scenarios.push(("amqp-raw-inflight", Box::new(move || raw_amqp::inflight(url, calls, config.window))));
    scenarios.push((
        "amqp-raw-inflight-at-most-once",
        Box::new(move || raw_amqp::inflight_at_most_once(url, calls, config.window)),
    ));
    scenarios.push(("amqp-raw-publish-consume", Box::new(move || raw_amqp::publish_consume(url, calls, 1024))));
    scenarios.push(("amqp-raw-request-reply", Box::new(move || raw_amqp::request_reply(url, (calls / 20).max(1)))));
    run(config, scenarios);
}

/// The scenarios of a broker on a server: a caller app and a worker app per run.
fn remote<'a>(
    broker: &str,
    config: &'a Config,
    calls: u64,
    pair: &'a (dyn Fn() -> Result<Pair, dingo::Error> + 'a),
) -> Vec<Scenario<'a>> {
    let at_most_once = |app: &App| app.set_default_options(add, CallOptions::new().at_most_once(true));
    let name = |scenario: &str| -> &'static str { format!("{broker}-{scenario}").leak() };
    vec![
        (
            name("inflight"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                inflight(&caller, &Some(worker), config, calls)
            }),
        ),
        (
            name("inflight-await"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                inflight_await(&caller, &Some(worker), config, calls)
            }),
        ),
        (
            name("inflight-at-most-once"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                at_most_once(&caller)?;
                inflight(&caller, &Some(worker), config, calls)
            }),
        ),
        (
            name("fire-and-forget"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                fire_and_forget(&caller, &Some(worker), config, calls)
            }),
        ),
        (
            name("sequential"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                sequential(&caller, &Some(worker), config, (calls / 20).max(1))
            }),
        ),
        (
            name("sequential-await"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                sequential_await(&caller, &Some(worker), config, (calls / 20).max(1))
            }),
        ),
        (
            name("call-time"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                call_time(&caller, &Some(worker), config, calls, Wait::Blocking)
            }),
        ),
        (
            name("call-time-await"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                call_time(&caller, &Some(worker), config, calls, Wait::Await)
            }),
        ),
        (
            name("delayed"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                delayed(&caller, &Some(worker), config, calls)
            }),
        ),
        (
            name("lateness"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                lateness(&caller, &Some(worker), config, 2_000)
            }),
        ),
        (
            name("retry"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                retry(&caller, &Some(worker), config, (calls / 4).max(1))
            }),
        ),
        (
            name("time-limit"),
            Box::new(move || {
                let (caller, worker, _cleanup) = pair()?;
                time_limited(&caller, &Some(worker), config, calls)
            }),
        ),
        (
            name("cancel"),
            Box::new(move || {
                let (caller, _worker, _cleanup) = pair()?;
                cancels(&caller, (calls / 10).max(1))
            }),
        ),
    ]
}

/// The queues of one AMQP run, in a namespace of their own, deleted afterwards.
struct Topology {
    url: String,
    options: AmqpOptions,
    brokers: std::cell::RefCell<Vec<AmqpBroker>>,
}

impl Topology {
    fn new(url: &str) -> Result<Topology, dingo::Error> {
        let name = format!("dingo-bench-{}-{}", std::process::id(), dingo::IdMaker::next_id(&dingo::UuidV7));
        Ok(Topology { url: url.to_owned(), options: AmqpOptions::new().namespace(name), brokers: Default::default() })
    }

    fn broker(&self) -> Result<AmqpBroker, dingo::Error> {
        let broker = AmqpBroker::connect_with(&self.url, self.options.clone())?;
        self.brokers.borrow_mut().push(broker.clone());
        Ok(broker)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let brokers = self.brokers.take();
        let tasks: Vec<String> = brokers.iter().flat_map(AmqpBroker::known_tasks).collect();
        let replies: Vec<String> = brokers.iter().map(|b| b.reply_queue().to_owned()).collect();
        drop(brokers);
        if let Ok(cleaner) = AmqpBroker::connect_with(&self.url, self.options.clone()) {
            let _ = cleaner.delete_topology(&tasks, &replies);
        }
    }
}

/// A namespace of its own for one run, deleted afterwards.
struct Namespace {
    url: String,
    options: RedisOptions,
}

impl Namespace {
    fn new(url: &str) -> Result<Namespace, dingo::Error> {
        let name = format!("dingo-bench-{}-{}", std::process::id(), dingo::IdMaker::next_id(&dingo::UuidV7));
        Ok(Namespace { url: url.to_owned(), options: RedisOptions::new().namespace(name) })
    }

    fn broker(&self) -> Result<RedisBroker, dingo::Error> {
        Ok(RedisBroker::connect_with(&self.url, self.options.clone())?)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Ok(broker) = self.broker() {
            let _ = broker.purge_namespace();
        }
    }
}

fn run(config: &Config, scenarios: Vec<Scenario<'_>>) {
    println!(
        "{:<28} {:>14} {:>14} {:>14} {:>10} {:>10} {:>11} {:>11}",
        "scenario", "median/s", "min/s", "max/s", "p50", "p99", "call p99.9", "call max"
    );
    let wanted = |name: &str| config.only.as_ref().is_none_or(|only| only.iter().any(|o| o == name));
    // A scenario and its `-await` twin (listed right after it) run in turns.
    let mut groups: Vec<Vec<Scenario<'_>>> = Vec::new();
    for scenario in scenarios.into_iter().filter(|(name, _)| wanted(name)) {
        let stem = scenario.0.strip_suffix("-await");
        match groups.last_mut() {
            Some(group) if stem == Some(group[0].0) => group.push(scenario),
            _ => groups.push(vec![scenario]),
        }
    }
    for group in groups {
        let mut samples: Vec<Samples> = group.iter().map(|_| Samples::default()).collect();
        for _ in 0..config.runs {
            for ((name, scenario), samples) in group.iter().zip(&mut samples) {
                match scenario() {
                    Ok(measure) => samples.add(measure),
                    Err(e) => {
                        eprintln!("{name} failed: {}", dingo::error::chain(&e));
                        std::process::exit(1);
                    }
                }
            }
        }
        for ((name, _), samples) in group.iter().zip(samples) {
            samples.print(name);
        }
    }
}

/// What the runs of one scenario measured.
#[derive(Default)]
struct Samples {
    rates: Vec<f64>,
    p50s: Vec<Duration>,
    p99s: Vec<Duration>,
    call_p999s: Vec<Duration>,
    call_maxes: Vec<Duration>,
}

impl Samples {
    fn add(&mut self, measure: Measure) {
        match measure {
            Measure::Rate(rate) => self.rates.push(rate),
            Measure::Latency { p50, p99, rate } => {
                self.rates.push(rate);
                self.p50s.push(p50);
                self.p99s.push(p99);
            }
            Measure::CallTime { rate, p999, max } => {
                self.rates.push(rate);
                self.call_p999s.push(p999);
                self.call_maxes.push(max);
            }
        }
    }

    /// One row: the medians (and the spread of the rate).
    fn print(mut self, name: &str) {
        self.rates.sort_by(f64::total_cmp);
        let latency = |v: &mut Vec<Duration>| {
            v.sort();
            v.get(v.len() / 2).map_or_else(|| "-".into(), |d| format!("{:.2}µs", d.as_secs_f64() * 1e6))
        };
        let rates = &self.rates;
        println!(
            "{:<28} {:>14.0} {:>14.0} {:>14.0} {:>10} {:>10} {:>11} {:>11}",
            name,
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1],
            latency(&mut self.p50s),
            latency(&mut self.p99s),
            latency(&mut self.call_p999s),
            latency(&mut self.call_maxes),
        );
    }
}

/// The app whose workers run the tasks: a separate worker app, or the caller itself.
fn workers<'a>(caller: &'a App, worker: &'a Option<App>) -> &'a App {
    worker.as_ref().unwrap_or(caller)
}

fn close(caller: &App, worker: &Option<App>) -> Result<(), dingo::Error> {
    caller.close()?;
    if let Some(worker) = worker {
        worker.close()?;
    }
    Ok(())
}

fn inflight(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(add, config.workers)?;
    warm_up(app)?;
    let rate = windowed(config.window, calls, |i| add::call(app, i, 1))?;
    close(app, worker)?;
    Ok(Measure::Rate(rate))
}

fn fire_and_forget(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(count, config.workers)?;
    let before = EXECUTED.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..calls as i64 {
        count::send(app, i, 1)?;
    }
    // Sleeping, not yielding: a caller spinning on `sched_yield` takes the CPU the broker
    // and the workers need (RabbitMQ most of all).
    while EXECUTED.load(Ordering::Relaxed) - before < calls {
        std::thread::sleep(Duration::from_micros(200));
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    close(app, worker)?;
    Ok(Measure::Rate(rate))
}

fn sequential(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(add, config.workers)?;
    warm_up(app)?;
    let mut latencies = Vec::with_capacity(calls as usize);
    let start = Instant::now();
    for i in 0..calls as i64 {
        let begin = Instant::now();
        add::call(app, i, 1)?.wait()?;
        latencies.push(begin.elapsed());
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let measure = Measure::Latency { p50: at(&latencies, 0.50), p99: at(&latencies, 0.99), rate };
    close(app, worker)?;
    Ok(measure)
}

/// `sequential` through `.await` on a current-thread tokio runtime.
fn sequential_await(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(add, config.workers)?;
    warm_up(app)?;
    let runtime = runtime()?;
    let mut latencies = Vec::with_capacity(calls as usize);
    let start = Instant::now();
    runtime.block_on(async {
        for i in 0..calls as i64 {
            let begin = Instant::now();
            add::call(app, i, 1)?.await?;
            latencies.push(begin.elapsed());
        }
        Ok::<(), dingo::Error>(())
    })?;
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let measure = Measure::Latency { p50: at(&latencies, 0.50), p99: at(&latencies, 0.99), rate };
    close(app, worker)?;
    Ok(measure)
}

/// The `q` quantile of `sorted` (not empty).
fn at(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// A current-thread tokio runtime: an async caller on one thread, as the blocking caller.
fn runtime() -> Result<tokio::runtime::Runtime, dingo::Error> {
    tokio::runtime::Builder::new_current_thread().build().map_err(|e| {
        dingo::Error::Broker(dingo::BrokerError::new(dingo::BrokerErrorKind::Other, format!("tokio runtime: {e}")))
    })
}

/// How a caller waits for its results.
#[derive(Clone, Copy)]
enum Wait {
    /// `wait` on the oldest handle ([`windowed`]).
    Blocking,
    /// `.await` in a `FuturesUnordered` ([`windowed_await`]).
    Await,
}

/// `inflight` through `.await` ([`windowed_await`]).
fn inflight_await(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(add, config.workers)?;
    warm_up(app)?;
    let rate = runtime()?.block_on(windowed_await(config.window, calls, |i| add::call(app, i, 1)))?;
    close(app, worker)?;
    Ok(Measure::Rate(rate))
}

/// `inflight` (or `inflight_await`) with every `call` timed: how long a caller's thread is
/// held by the call itself (the send; the wait for room when a queue is full).
fn call_time(app: &App, worker: &Option<App>, config: &Config, calls: u64, wait: Wait) -> Outcome {
    workers(app, worker).allocate(add, config.workers)?;
    warm_up(app)?;
    let mut times = Vec::with_capacity(calls as usize);
    let call = |i| {
        let begin = Instant::now();
        let handle = add::call(app, i, 1);
        times.push(begin.elapsed());
        handle
    };
    let rate = match wait {
        Wait::Blocking => windowed(config.window, calls, call)?,
        Wait::Await => runtime()?.block_on(windowed_await(config.window, calls, call))?,
    };
    close(app, worker)?;
    times.sort_unstable();
    Ok(Measure::CallTime { rate, p999: at(&times, 0.999), max: at(&times, 1.0) })
}

fn payload(app: App, config: &Config, calls: u64) -> Outcome {
    app.allocate(echo, config.workers)?;
    let data: String = (0..1024u32).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let rate = windowed(config.window, calls, |_| echo::call(&app, data.clone()))?;
    app.close()?;
    Ok(Measure::Rate(rate))
}

/// A small random number generator (xorshift), for spreading delays.
struct Spread(u64);

impl Spread {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below.max(1)
    }
}

fn delayed(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(add, config.workers)?;
    warm_up(app)?;
    let mut spread = Spread(0x2545_f491_4f6c_dd1d);
    let mut handles = Vec::with_capacity(calls as usize);
    let start = Instant::now();
    let first_second = SystemTime::now();
    for i in 0..calls as i64 {
        // Due at a random moment of the run's first second (an ETA): tasks due while the
        // caller still sends are delivered at once, as on a busy system.
        let eta = first_second + Duration::from_micros(spread.next(1_000_000));
        handles.push(add::call_with(app, &CallOptions::new().eta(eta), i, 1)?);
    }
    for handle in handles {
        handle.wait()?;
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    close(app, worker)?;
    Ok(Measure::Rate(rate))
}

fn lateness(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(late, config.workers)?;
    let mut spread = Spread(0x9e37_79b9_7f4a_7c15);
    let mut handles = Vec::with_capacity(calls as usize);
    let start = Instant::now();
    for i in 0..calls {
        // Paced at 1,000 calls/s: lateness of a broker at work, not of one buried in a burst.
        let next = start + Duration::from_millis(i);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let countdown = Duration::from_millis(50 + spread.next(451));
        let due = now_us() + countdown.as_micros() as u64;
        handles.push(late::call_with(app, &CallOptions::new().countdown(countdown), due)?);
    }
    let mut latencies = Vec::with_capacity(calls as usize);
    for handle in handles {
        latencies.push(Duration::from_micros(handle.wait()?));
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let measure = Measure::Latency { p50: at(&latencies, 0.50), p99: at(&latencies, 0.99), rate };
    close(app, worker)?;
    Ok(measure)
}

fn retry(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(flaky, config.workers)?;
    let options = CallOptions::new().retries(1).backoff(Backoff::fixed(Duration::from_millis(1)));
    let rate = windowed(config.window, calls, |i| flaky::call_with(app, &options, i))?;
    close(app, worker)?;
    Ok(Measure::Rate(rate))
}

/// In flight with a hard time limit (never reached) on every call: the watchdog's cost.
fn time_limited(app: &App, worker: &Option<App>, config: &Config, calls: u64) -> Outcome {
    workers(app, worker).allocate(add, config.workers)?;
    warm_up(app)?;
    let options = CallOptions::new().time_limit(Duration::from_secs(60));
    let rate = windowed(config.window, calls, |i| add::call_with(app, &options, i, 1))?;
    close(app, worker)?;
    Ok(Measure::Rate(rate))
}

/// Cancels per second, one after another, of distinct unknown calls (what the broker
/// records; no worker runs).
fn cancels(app: &App, cancels: u64) -> Outcome {
    let name = add::NAME;
    let start = Instant::now();
    for i in 0..cancels {
        app.cancel(name, &dingo::TaskId::new(&format!("bench-cancel-{i}")))?;
    }
    let rate = cancels as f64 / start.elapsed().as_secs_f64();
    app.close()?;
    Ok(Measure::Rate(rate))
}

/// Calls per second of `calls` calls made by `call`, `window` of them in flight from this
/// thread: call, and once the window is full wait for the oldest.
fn windowed<T: Send + 'static>(
    window: usize,
    calls: u64,
    mut call: impl FnMut(i64) -> Result<dingo::Handle<T>, dingo::Error>,
) -> Result<f64, dingo::Error> {
    let mut pending = VecDeque::with_capacity(window);
    let start = Instant::now();
    for i in 0..calls as i64 {
        pending.push_back(call(i)?);
        if pending.len() >= window {
            let handle = pending.pop_front().ok_or(dingo::Error::NoReport)?;
            handle.wait()?;
        }
    }
    for handle in pending {
        handle.wait()?;
    }
    Ok(calls as f64 / start.elapsed().as_secs_f64())
}

/// [`windowed`] through `.await`: `window` handles in flight in a `FuturesUnordered`, the
/// next call made as soon as one of them is ready (whichever: each is polled when woken).
async fn windowed_await<T: Send + 'static>(
    window: usize,
    calls: u64,
    mut call: impl FnMut(i64) -> Result<Handle<T>, dingo::Error>,
) -> Result<f64, dingo::Error> {
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..calls as i64 {
        pending.push(call(i)?.into_future());
        if pending.len() >= window
            && let Some(result) = pending.next().await
        {
            result?;
        }
    }
    while let Some(result) = pending.next().await {
        result?;
    }
    Ok(calls as f64 / start.elapsed().as_secs_f64())
}

fn warm_up(app: &App) -> Result<(), dingo::Error> {
    for i in 0..1000 {
        add::call(app, i, 1)?.wait()?;
    }
    Ok(())
}
