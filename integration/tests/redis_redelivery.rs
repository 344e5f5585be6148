//! Tasks whose workers keep dying, on Redis: each time a worker's lease expires its tasks go
//! back to the queue marked redelivered; after `max_redeliveries` a task goes to the dead
//! letters instead, and its caller is told (`WorkerLost`) rather than left waiting.
//!
//! The dead workers are ghosts: a consumer whose lease ran out long ago, holding messages
//! that carry their earlier redeliveries, written into Redis by hand — what a worker process
//! killed mid-task leaves behind, without the minutes of killing one over and over.
#![cfg(feature = "redis")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dingo::message::wire::REDELIVERED_MARK;
use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, EventKind, TaskErrorKind};
use dingo_test_support::faults::{Seen, crafted, failure, lock, wait_until, watch};
use dingo_test_support::redis::{redis_cli, redis_cli_with};

static RUNS: AtomicUsize = AtomicUsize::new(0);

#[dingo::task(name = "redelivery.doubled")]
fn doubled(n: i64) -> i64 {
    RUNS.fetch_add(1, Ordering::SeqCst);
    n * 2
}

/// `message` as a broker leaves it after redelivering it `times` times.
fn redelivered(mut message: Vec<u8>, times: usize) -> Vec<u8> {
    message.pop(); // the end marker
    for _ in 0..times {
        message.extend_from_slice(&REDELIVERED_MARK[..REDELIVERED_MARK.len() - 1]);
    }
    message.push(0);
    message
}

#[test]
fn a_task_whose_workers_keep_dying_fails_its_call_with_worker_lost() {
    let Some(url) = dingo_test_support::redis::url() else { return };
    let namespace = dingo_test_support::unique("dingo-test");
    let options =
        RedisOptions::new().namespace(namespace.as_str()).max_redeliveries(2).reap_interval(Duration::from_millis(50));
    let worker_broker = RedisBroker::connect_with(&url, options.clone()).expect("connect");
    let caller_broker = RedisBroker::connect_with(&url, options).expect("connect");
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut events = Seen::watch(&worker);

    // A ghost worker died holding two tasks: one already redelivered twice (its workers died
    // three times in all: it gives up), one redelivered once (it runs again).
    let (doomed_to, doomed) = watch(&caller_broker, doubled::NAME, "doomed");
    let (survivor_to, survivor) = watch(&caller_broker, doubled::NAME, "survivor");
    let prefix = format!("{namespace}:{{{}}}", doubled::NAME);
    let processing = format!("{prefix}:processing:ghost");
    redis_cli_with(
        &url,
        &["RPUSH", &processing],
        &redelivered(crafted(&caller, doubled::NAME, "doomed", 0, doomed_to), 2),
    );
    redis_cli_with(
        &url,
        &["LPUSH", &processing],
        &redelivered(crafted(&caller, doubled::NAME, "survivor", 0, survivor_to), 1),
    );
    assert_eq!(redis_cli(&url, &["ZADD", &format!("{prefix}:consumers"), "0", "ghost"]), "1");
    worker.allocate(doubled, 1).expect("allocate");

    let (kind, message) = failure(&doomed);
    assert_eq!(kind, TaskErrorKind::WorkerLost, "{message}");
    assert_eq!(
        message,
        "the workers that took this task stopped before finishing it 3 times (max_redeliveries is 2): it may crash \
         its worker process; it was moved to the dead letters"
    );
    let event = events.wait_for(EventKind::DeadLettered);
    assert_eq!(event.task.as_ref().map(|k| k.id.as_str()), Some("doomed"), "{event:?}");

    wait_until("the survivor ran", || survivor.other.load(Ordering::SeqCst) == 1);
    assert!(lock(&survivor.failures).is_empty(), "{:?}", lock(&survivor.failures));
    assert_eq!(RUNS.load(Ordering::SeqCst), 1, "the doomed task never ran again");
    assert_eq!(worker_broker.stats().dead_lettered, 1);
    let dead = worker_broker.dead_letters(doubled::NAME).expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.starts_with("redelivered 2 times"), "{}", dead[0].reason);
    // The ghost is gone; nothing is held.
    assert_eq!(redis_cli(&url, &["EXISTS", &processing]), "0");
    assert_eq!(redis_cli(&url, &["ZSCORE", &format!("{prefix}:consumers"), "ghost"]), "");
    caller.close().expect("close");
    worker.close().expect("close");
}
