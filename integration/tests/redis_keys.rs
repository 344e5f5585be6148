//! What a process leaves in Redis: nothing of its own once it has shut down, and nothing
//! that stays forever if it dies instead (the key layout in the `dingo-redis` docs says what
//! exists and how long).
#![cfg(feature = "redis")]

use std::time::Duration;

use dingo::App;
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::wait_until;
use dingo_test_support::process::{Examples, Proc};
use dingo_test_support::redis::{Redis, redis_cli};

const EXAMPLES: Examples = dingo_test_support::examples!["redis_worker", "redis_caller"];

#[allow(dead_code)]
#[path = "../../examples/shared/tasks.rs"]
mod tasks;

#[dingo::task(name = "keys.first")]
fn first(n: u64) -> u64 {
    n
}

#[dingo::task(name = "keys.second")]
fn second(n: u64) -> u64 {
    n
}

/// Every key of a namespace, with its time to live in milliseconds (-1: none).
fn keys(url: &str, namespace: &str) -> Vec<(String, i64)> {
    redis_cli(url, &["--scan", "--pattern", &format!("{namespace}:*")])
        .lines()
        .filter(|key| !key.is_empty())
        .map(|key| (key.to_owned(), redis_cli(url, &["PTTL", key]).parse().expect("PTTL")))
        .collect()
}

/// Whether a key holds a process's (or a thread's) own state rather than a queue's.
fn per_process(key: &str) -> bool {
    [":ctl:", ":reply:", ":notify:", ":seq:"].iter().any(|part| key.contains(part))
}

/// A caller that shuts down while its report listener is busy (running a slow `on_ok`
/// callback), after a call to a task it had not called before (which wakes the listener
/// through its control list): the wake-ups nobody took, its reply lists and its sequence
/// keys all go with it. Only the queues' keys remain.
#[test]
fn a_process_that_shuts_down_leaves_no_keys_of_its_own() {
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker.allocate(first, 1).expect("allocate");
    worker.allocate(second, 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let (busy, busy_seen) = std::sync::mpsc::sync_channel(1);
    first::call(&caller, 1).expect("call").on_ok(move |_| {
        let _ = busy.send(());
        std::thread::sleep(Duration::from_millis(1500));
    });
    busy_seen.recv_timeout(PATIENCE).expect("the listener runs the callback");
    let late = second::call(&caller, 2).expect("a call to a task new to this caller");
    caller.close().expect("close");
    drop(late);
    worker.close().expect("close");

    let left = keys(setup.url(), &namespace);
    let own: Vec<_> = left.iter().filter(|(key, _)| per_process(key)).collect();
    assert!(own.is_empty(), "keys of processes that shut down: {own:?}");
    assert!(left.iter().any(|(key, _)| key.ends_with(":tasks")), "the declarations stay: {left:?}");
}

/// A caller process killed (SIGKILL) with calls in flight, and a worker process that keeps
/// serving and then stops: every key the dead caller left expires.
#[test]
fn every_key_a_killed_process_leaves_expires() {
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let env = [("DINGO_REDIS_URL", setup.url()), ("DINGO_NAMESPACE", namespace.as_str())];
    let mut worker = Proc::spawn(&EXAMPLES, "redis_worker", &["--seconds", "4", "--threads", "2"], &env);
    wait_until("the worker is ready", || worker.stdout().contains("worker ready"));
    let mut caller = Proc::spawn(&EXAMPLES, "redis_caller", &["--calls", "300"], &env);
    wait_until("the caller has results", || caller.stdout().contains("add(0, 1000) = 1000"));
    caller.kill();
    let status = worker.wait(Duration::from_secs(30));
    assert!(status.success(), "the worker failed: {status}; stderr:\n{}", worker.stderr());

    let left = keys(setup.url(), &namespace);
    assert!(left.iter().any(|(key, _)| key.contains(":seq:send.")), "the dead caller left state: {left:?}");
    let forever: Vec<_> = left.iter().filter(|(key, ttl)| per_process(key) && *ttl < 0).collect();
    assert!(forever.is_empty(), "per-process keys without an expiry: {forever:?}");
}
