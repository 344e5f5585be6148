//! Time limits, cancels and dead letters on the local broker, beyond the conformance rules:
//! undecodable and unknown-task letters, threads that never come back, many write-offs.

use std::time::{Duration, Instant};

use dingo::broker::Select;
use dingo::codec::{Encoded, MSGPACK};
use dingo::message::{Payload, TaskMessage, wire};
use dingo::{App, CallOptions, LocalBroker, TaskErrorKind, TaskId, TaskName};

const PATIENCE: Duration = Duration::from_secs(20);

fn worker(broker: &LocalBroker) -> App {
    let app = App::builder().broker(broker.clone()).build().unwrap();
    app.register("double", |n: i64| n * 2).unwrap();
    app.register("nap", |ms: u64| std::thread::sleep(Duration::from_millis(ms))).unwrap();
    app
}

/// The threads of this process whose names start with `prefix`.
fn threads(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

/// Garbage and a message naming a task nobody here runs are listed with their reasons
/// (the garbage without a key); replayed, they come back dead with the same reasons; purge
/// deletes them.
#[test]
fn undecodable_and_unknown_task_letters_are_listed_replayed_and_purged() {
    let broker = LocalBroker::serialized();
    let app = worker(&broker);
    app.allocate("double", 1).unwrap();
    broker.push_raw("double", b"not a message".to_vec()).unwrap();
    let args = Payload::Encoded(Encoded::new(MSGPACK, vec![0x05]));
    let stray = TaskMessage::new(TaskName::from("nobody.here"), TaskId::new("stray-1"), 0, args);
    broker.push_raw("double", wire::encode_task(&stray).unwrap()).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while app.dead_count("double").unwrap() < 2 {
        assert!(Instant::now() < deadline, "the letters were not dead-lettered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let letters = app.dead_letters("double", 10).unwrap();
    assert_eq!(letters.len(), 2);
    assert!(letters[0].key.is_none());
    assert!(letters[0].reason.contains("version"), "{}", letters[0].reason);
    assert_eq!(letters[1].key.as_ref().map(|k| k.id.as_str()), Some("stray-1"));
    assert!(letters[1].reason.starts_with("unknown task"), "{}", letters[1].reason);
    assert!(letters.iter().all(|l| l.at.is_some()));
    assert!(app.dead_letters("nap", 10).unwrap().is_empty(), "letters are per queue");

    assert_eq!(app.replay_dead("double", &Select::All).unwrap(), 2);
    let deadline = Instant::now() + PATIENCE;
    while app.dead_count("double").unwrap() < 2 {
        assert!(Instant::now() < deadline, "the replayed letters did not come back");
        std::thread::sleep(Duration::from_millis(5));
    }
    let again = app.dead_letters("double", 10).unwrap();
    assert_eq!(
        again.iter().map(|l| &l.reason).collect::<Vec<_>>(),
        letters.iter().map(|l| &l.reason).collect::<Vec<_>>()
    );
    assert_eq!(app.purge_dead("double", &Select::Ids(vec![TaskId::new("stray-1")])).unwrap(), 1);
    assert_eq!(app.purge_dead("double", &Select::All).unwrap(), 1);
    assert_eq!(app.dead_count("double").unwrap(), 0);
    assert_eq!(app.call::<_, i64>("double", 21i64).unwrap().wait().unwrap(), 42);
    app.close().unwrap();
}

/// A written-off thread whose task never comes back does not hold up `close` (its grace is
/// 30 s by default), and the pool served on meanwhile.
#[test]
fn close_does_not_wait_for_a_written_off_thread() {
    let broker = LocalBroker::new();
    let app = worker(&broker);
    app.allocate("nap", 1).unwrap();
    let limited = CallOptions::new().time_limit(Duration::from_millis(100));
    let err = app.call_with::<_, ()>("nap", &limited, 60_000u64).unwrap().wait_timeout(PATIENCE).unwrap_err();
    assert_eq!(err.task_kind(), Some(TaskErrorKind::TimeLimit));
    app.call::<_, ()>("nap", 1u64).unwrap().wait_timeout(PATIENCE).unwrap();
    let closing = Instant::now();
    app.close().unwrap();
    assert!(closing.elapsed() < Duration::from_secs(2), "close waited {:?}", closing.elapsed());
}

/// Twenty write-offs on a pool of two: every call fails in time, the pool keeps two
/// threads throughout, the written-off ones exit once their tasks return, and the counter
/// says twenty.
#[test]
fn many_write_offs_keep_the_pool_size() {
    let broker = LocalBroker::new();
    let app = worker(&broker);
    // A name of its own, so no other test's threads share its thread names.
    app.register("snooze", |ms: u64| std::thread::sleep(Duration::from_millis(ms))).unwrap();
    app.allocate("snooze", 2).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while threads("dingo-snooze-") < 2 {
        assert!(Instant::now() < deadline, "the workers did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let baseline = threads("dingo-snooze-");
    assert_eq!(baseline, 2);
    let limited = CallOptions::new().time_limit(Duration::from_millis(50));
    let started = Instant::now();
    let handles: Vec<_> = (0..20).map(|_| app.call_with::<_, ()>("snooze", &limited, 400u64).unwrap()).collect();
    for mut handle in handles {
        let err = handle.wait_timeout(PATIENCE).unwrap_err();
        assert_eq!(err.task_kind(), Some(TaskErrorKind::TimeLimit));
    }
    // Ten rounds of two at ~50 ms each: far less than twenty naps of 400 ms.
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert_eq!(app.threads_written_off(), 20);
    for _ in 0..50 {
        app.call::<_, ()>("snooze", 0u64).unwrap().wait_timeout(PATIENCE).unwrap();
    }
    std::thread::sleep(Duration::from_millis(600));
    // Two workers and the watchdog ("dingo-snooze-watchdog", cut to 15 bytes); the written-off
    // threads have returned and exited.
    assert_eq!(threads("dingo-snooze-"), baseline + 1);
    app.close().unwrap();
}
