//! A Redis server that is not ready yet: after a restart it answers `LOADING` until its data
//! is loaded (seconds for a large data set), and a server reloading its data does the same
//! to the connections it already has. Calls made meanwhile wait with backoff and complete,
//! each run once — they are not failed as refused. Each test runs a `redis-server` of its
//! own whose data takes seconds to load (filled first, loaded slowly with the server's
//! `key-load-delay`); the shared server is never touched.
#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, CallOptions, EventKind, Handle};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{Seen, lock, wait_until};
use dingo_test_support::redis::redis_cli;
use dingo_test_support::redis_server::Server;

/// The options that make a server's data slow to load: 25,000 keys at about 100 µs each
/// (the server answers other clients between keys).
const SLOW_LOAD: [&str; 6] =
    ["--key-load-delay", "100", "--loading-process-events-interval-bytes", "1024", "--enable-debug-command", "local"];

/// Fills the server with keys of its own: what makes loading take seconds.
fn fill(server: &Server) {
    fill_with(server, 25_000);
}

fn fill_with(server: &Server, keys: u32) {
    assert_eq!(redis_cli(&server.url(), &["DEBUG", "POPULATE", &keys.to_string(), "filler"]), "OK");
}

/// A server that keeps every write in its append-only file (synced), filled so that it
/// takes seconds to load it again after a restart: the keys go to the file's base, which
/// loads key by key.
fn slow_to_load_on_restart() -> Option<Server> {
    let mut args = vec!["--appendonly", "yes", "--appendfsync", "always"];
    args.extend(SLOW_LOAD);
    let server = Server::start_with(&args)?;
    fill(&server);
    redis_cli(&server.url(), &["BGREWRITEAOF"]);
    wait_until("the append-only file is rewritten", || {
        let info = redis_cli(&server.url(), &["INFO", "persistence"]);
        info.contains("aof_rewrite_in_progress:0") && info.contains("aof_rewrite_scheduled:0")
    });
    Some(server)
}

// Runs of each call of one test, by argument.
static RESTART_RUNS: Mutex<Option<HashMap<u64, u32>>> = Mutex::new(None);
static RELOAD_RUNS: Mutex<Option<HashMap<u64, u32>>> = Mutex::new(None);

fn count(runs: &Mutex<Option<HashMap<u64, u32>>>, n: u64) {
    *lock(runs).get_or_insert_with(HashMap::new).entry(n).or_default() += 1;
}

fn runs_of(runs: &Mutex<Option<HashMap<u64, u32>>>) -> HashMap<u64, u32> {
    lock(runs).clone().unwrap_or_default()
}

#[dingo::task(name = "loading.restart_echo")]
fn restart_echo(n: u64, millis: u64) -> u64 {
    count(&RESTART_RUNS, n);
    std::thread::sleep(Duration::from_millis(millis));
    n * 3
}

#[dingo::task(name = "loading.reload_echo")]
fn reload_echo(n: u64, millis: u64) -> u64 {
    count(&RELOAD_RUNS, n);
    std::thread::sleep(Duration::from_millis(millis));
    n * 3
}

fn apps(server: &Server) -> (App, App) {
    let mut options = RedisOptions::new()
        .namespace(dingo_test_support::unique("dingo-test"))
        .reconnect_backoff(Duration::from_millis(10), Duration::from_millis(200))
        .block_timeout(Duration::from_millis(500));
    options.read_margin = Duration::from_secs(1);
    let broker = || RedisBroker::connect_with(&server.url(), options.clone()).expect("connect");
    let worker = App::builder().broker(broker()).build().expect("worker app");
    let caller = App::builder().broker(broker()).build().expect("caller app");
    (worker, caller)
}

/// Waits for every call: each gets its exact result, and ran exactly once.
fn expect_each_once(handles: Vec<(u64, Handle<u64>)>, runs: &Mutex<Option<HashMap<u64, u32>>>) {
    let count = handles.len();
    for (n, mut handle) in handles {
        let got = handle.wait_timeout(PATIENCE).unwrap_or_else(|e| panic!("call {n}: {}", dingo::error::chain(&e)));
        assert_eq!(got, n * 3, "call {n}");
    }
    let runs = runs_of(runs);
    let twice: Vec<_> = runs.iter().filter(|(_, r)| **r != 1).collect();
    assert!(twice.is_empty(), "calls that ran more than once: {twice:?}");
    assert_eq!(runs.len(), count, "every call ran");
}

/// A server killed (SIGKILL) with tasks queued and running, started again on its
/// append-only file, answers `LOADING` for seconds. The calls queued before the crash, the
/// ones made while it was down and the ones made while it loads (at least once and at most
/// once) all complete, each once.
#[test]
fn calls_wait_for_a_restarted_server_to_load_its_data() {
    let Some(mut server) = slow_to_load_on_restart() else { return };
    let (worker, caller) = apps(&server);
    let mut caller_events = Seen::watch(&caller);
    worker.allocate(restart_echo, 2).expect("allocate");
    let at_most_once = CallOptions::new().at_most_once(true);
    let mut handles = Vec::new();
    for n in 0..20 {
        handles.push((n, restart_echo::call(&caller, n, 0).expect("call")));
    }
    // Queued, and running, at the crash.
    for n in 20..60 {
        handles.push((n, restart_echo::call(&caller, n, 30).expect("call")));
    }
    wait_until("tasks run", || runs_of(&RESTART_RUNS).len() > 20);

    server.kill();
    caller_events.wait_for(EventKind::ConnectionLost);
    // At least once: an at-most-once message written on a connection that has not noticed
    // the crash yet may or may not have been queued, and fails (it is not sent twice).
    for n in 100..140 {
        handles.push((n, restart_echo::call(&caller, n, 0).expect("call while the server is down")));
    }
    server.spawn();
    assert!(server.loading(), "the restarted server is loading its data (else this test shows nothing)");
    let loading_since = Instant::now();
    for n in 200..240 {
        let options = if n % 2 == 0 { &at_most_once } else { &CallOptions::new() };
        handles.push((n, restart_echo::call_with(&caller, options, n, 0).expect("call while the server loads")));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.loading(), "still loading after the calls were made");
    wait_until("the server has loaded its data", || !server.loading());
    assert!(loading_since.elapsed() > Duration::from_secs(1), "loading took {:?}", loading_since.elapsed());
    expect_each_once(handles, &RESTART_RUNS);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// A server that reloads its data (`DEBUG RELOAD`, as a replica's full resynchronisation
/// does) answers `LOADING` on the connections it already has, in the middle of whatever
/// they were doing: sends, fetches, settlements, report reads. Calls made before and during
/// the reload all complete, each once.
#[test]
fn live_connections_wait_out_a_reload() {
    let Some(server) = Server::start_with(&SLOW_LOAD) else { return };
    fill(&server);
    let (worker, caller) = apps(&server);
    let mut worker_events = Seen::watch(&worker);
    let mut caller_events = Seen::watch(&caller);
    worker.allocate(reload_echo, 2).expect("allocate");
    let url = server.url();
    let reload = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        assert_eq!(redis_cli(&url, &["DEBUG", "RELOAD"]), "OK");
        started.elapsed()
    });
    let at_most_once = CallOptions::new().at_most_once(true);
    let mut handles = Vec::new();
    let began = Instant::now();
    let mut n = 0;
    // Calls in bursts, before, during and after the reload.
    while began.elapsed() < Duration::from_secs(3) || !reload.is_finished() {
        for _ in 0..8 {
            let options = if n % 3 == 0 { &at_most_once } else { &CallOptions::new() };
            handles.push((n, reload_echo::call_with(&caller, options, n, n % 4).expect("call")));
            n += 1;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let took = reload.join().expect("the reload");
    assert!(took > Duration::from_secs(1), "the reload took {took:?} (else this test shows nothing)");
    expect_each_once(handles, &RELOAD_RUNS);
    // Both sides met the server not ready, and said so.
    for events in [&mut worker_events, &mut caller_events] {
        let event = events.wait_for(EventKind::ConnectionLost);
        assert!(event.message.contains("not ready"), "{}", event.message);
    }
    caller.close().expect("close");
    worker.close().expect("close");
}

#[dingo::task(name = "loading.started_echo")]
fn started_echo(n: u64) -> u64 {
    n * 3
}

/// A server with an append-only file, killed and started again, loading it for seconds.
fn restarted_and_loading() -> Option<Server> {
    let mut server = slow_to_load_on_restart()?;
    server.kill();
    server.spawn();
    assert!(server.loading(), "the restarted server is loading its data (else the test shows nothing)");
    Some(server)
}

/// A process that starts while its server loads its data (started with it, say) waits for
/// it at `connect`, within the start-up retry: `HELLO` is answered while loading, so a
/// connect that trusted it would return and fail at the first declaration.
#[test]
fn a_process_started_while_the_server_loads_waits_for_it() {
    let Some(server) = restarted_and_loading() else { return };
    let options = RedisOptions::new().namespace(dingo_test_support::unique("dingo-test"));
    let started = Instant::now();
    let broker = RedisBroker::connect_with(&server.url(), options).expect("connect waits for the load");
    assert!(!server.loading(), "connect returned while the server was still loading");
    assert!(started.elapsed() > Duration::from_millis(500), "connect waited {:?}", started.elapsed());
    let app = App::builder().broker(broker).build().expect("app");
    app.allocate(started_echo, 1).expect("allocate");
    assert_eq!(started_echo::call(&app, 5).expect("call").wait_timeout(PATIENCE).expect("result"), 15);
    app.close().expect("close");
}

/// Apps that close while their server reloads its data do not wait for it: what they could
/// not store runs again after its lease, as in an outage. (A thread blocked in a read or a
/// connection attempt the busy server does not answer is joined when that times out.)
#[test]
fn apps_close_promptly_while_the_server_reloads() {
    let Some(server) = Server::start_with(&SLOW_LOAD) else { return };
    // A reload of about 14 s: closing may take a few read timeouts (1.5 s here), not that.
    fill_with(&server, 120_000);
    let (worker, caller) = apps(&server);
    worker.allocate(started_echo, 4).expect("allocate");
    assert_eq!(started_echo::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("result"), 3);
    let url = server.url();
    let reload = std::thread::spawn(move || redis_cli(&url, &["DEBUG", "RELOAD"]));
    wait_until("the server reloads", || server.loading());
    let started = Instant::now();
    // As two processes would: at the same time.
    let closing = std::thread::spawn(move || caller.close());
    let _ = worker.close();
    closing.join().expect("the caller's close").expect("close");
    let took = started.elapsed();
    // Each command of the shutdown once waited up to the command timeout (5 s) for the
    // server, in turn: closing four workers and a caller took over 20 s.
    assert!(took < Duration::from_secs(9), "closing took {took:?}");
    assert_eq!(reload.join().expect("the reload"), "OK");
}
