//! Delayed tasks across a restart of RabbitMQ's application (`rabbitmqctl stop_app` /
//! `start_app`). A test binary of its own with a single test: the restart takes the shared
//! server away from every other test, so nothing else may run meanwhile (cargo runs test
//! binaries one after another).
#![cfg(feature = "amqp")]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use dingo::amqp::AmqpOptions;
use dingo::{App, CallOptions};
use dingo_test_support::amqp::Amqp;
use dingo_test_support::faults::{lock, wait_until};

/// When each call of `stamp` started, by id.
static STARTS: Mutex<BTreeMap<String, Vec<SystemTime>>> = Mutex::new(BTreeMap::new());

#[dingo::task(name = "amqp_delay_restart.stamp")]
fn stamp(ctx: &dingo::Context, n: u64) -> u64 {
    lock(&STARTS).entry(ctx.id().to_string()).or_default().push(SystemTime::now());
    n
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl must be installed for this test");
    assert!(out.status.success(), "rabbitmqctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// RabbitMQ's application, stopped; started again on drop (even if the test fails).
struct Stopped;

impl Stopped {
    fn stop() -> Stopped {
        rabbitmqctl(&["stop_app"]);
        Stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
        let _ = Command::new("rabbitmqctl").args(["await_startup", "--timeout", "60"]).output();
    }
}

/// The queues of a namespace whose names start with `prefix`, with their types.
fn queue_types(prefix: &str) -> BTreeMap<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(["list_queues", "--quiet", "--no-table-headers", "name", "type"])
        .output()
        .expect("rabbitmqctl must be installed for this test");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// 200 calls delayed by 4–6 s on classic (durable) task queues; RabbitMQ's application is
/// stopped while every one of them waits in the delay queues, and started again (their due
/// times pass while it is down): the worker and the caller reconnect, and each call runs
/// exactly once, none before its due time. The delay queues are quorum queues, which
/// dead-letter at least once (classic ones dead-letter at most once: a stop in the middle of
/// a hop lost one call of 200 once in CI).
#[test]
fn delayed_tasks_survive_a_restart_of_rabbitmq() {
    const CALLS: u64 = 200;
    let Some(setup) = Amqp::with_options(AmqpOptions::new()) else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    worker.allocate(stamp, 4).expect("allocate");
    let started = Instant::now();
    let calls: Vec<_> = (0..CALLS)
        .map(|n| {
            let wait = Duration::from_millis(4000 + n * 10);
            let due = SystemTime::now() + wait;
            (n, due, stamp::call_with(&caller, &CallOptions::new().countdown(wait), n).expect("call"))
        })
        .collect();
    wait_until("every call waits in the delay queues", || {
        caller_broker.delayed_len().expect("delayed length") == CALLS as usize
    });
    let stopped = Stopped::stop();
    assert!(
        lock(&STARTS).is_empty(),
        "nothing ran before RabbitMQ stopped ({:?} after the first call)",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_secs(1));
    drop(stopped);
    eprintln!("RabbitMQ was restarted {:?} after the first call", started.elapsed());
    for (n, due, mut handle) in calls {
        let got = handle.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|e| panic!("call {n}: {e:?}"));
        assert_eq!(got, n);
        let starts = lock(&STARTS).get(handle.id().as_str()).cloned().unwrap_or_default();
        assert_eq!(starts.len(), 1, "call {n} ran {} times", starts.len());
        assert!(starts[0] >= due, "call {n} ran before its due time");
    }
    wait_until("the delay queues are empty", || caller_broker.delayed_len().is_ok_and(|len| len == 0));
    let namespace = setup.options().namespace.clone();
    let types = queue_types(&format!("{namespace}."));
    assert_eq!(types.get(&format!("{namespace}.task.amqp_delay_restart.stamp")).map(String::as_str), Some("classic"));
    let delay_levels: Vec<_> = types.iter().filter(|(name, _)| name.contains(".delay.")).collect();
    assert!(delay_levels.len() >= 10, "the delays of 4–6 s use levels 0 to 9: {types:?}");
    assert!(delay_levels.iter().all(|(_, kind)| *kind == "quorum"), "delay queues not quorum: {types:?}");
    caller.close().expect("close");
    worker.close().expect("close");
}
