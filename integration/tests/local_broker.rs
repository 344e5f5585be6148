//! The serialized local broker under bad input: garbage and truncated messages in a queue,
//! messages over the size limit, reports nobody waits for yet.

use std::time::Duration;

use dingo::broker::{Reporter, Store};
use dingo::message::{ReportBody, ReportMessage, Value};
use dingo::{
    App, BrokerErrorKind, CallKey, Encoded, Error, EventFilter, EventKind, Handle, Level, LocalBroker, LocalOptions,
    Origin, TaskErrorKind,
};
use dingo_test_support::reports::{collector, next};

const PATIENCE: Duration = Duration::from_secs(20);

fn worker(broker: &LocalBroker) -> App {
    let app = App::builder().broker(broker.clone()).build().unwrap();
    app.register("double", |n: i64| n * 2).unwrap();
    app
}

#[test]
fn garbage_in_a_queue_is_dead_lettered_and_the_worker_goes_on() {
    let broker = LocalBroker::serialized();
    let app = worker(&broker);
    let events = app.events(EventFilter::new().origins(Origin::Consumer).level(Level::Error));
    let dead_events = app.events(EventFilter::new().kinds([EventKind::DeadLettered]));
    app.allocate("double", 1).unwrap();
    for garbage in [&b"not a message"[..], b"", b"\x01\x01\x05\xff"] {
        broker.push_raw("double", garbage.to_vec()).unwrap();
    }
    let event = events.recv_timeout(PATIENCE).unwrap();
    assert_eq!(event.kind, EventKind::MalformedMessage);
    assert!(event.task.is_none(), "nothing identifies a caller");
    assert_eq!(app.call::<_, i64>("double", 21i64).unwrap().wait().unwrap(), 42);
    let dead = broker.all_dead_letters();
    assert_eq!(dead.len(), 3);
    // One `DeadLettered` per dead letter (a warning), after each one's `MalformedMessage`.
    let kinds: Vec<EventKind> = std::iter::from_fn(|| dead_events.try_recv()).map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::DeadLettered; 3]);
    assert_eq!(dead[0].bytes, b"not a message");
    assert_eq!(dead[0].queue, "double");
    assert!(dead[0].reason.contains("version"), "{}", dead[0].reason);
    app.close().unwrap();
}

#[test]
fn a_truncated_message_still_tells_its_caller() {
    let broker = LocalBroker::serialized();
    let app = worker(&broker);
    let events = app.events(EventFilter::new().level(Level::Error));
    // Queued while no worker runs; then damaged in the queue.
    let handle: Handle<i64> = app.call("double", 5i64).unwrap();
    let bytes = broker.take_raw("double").unwrap().unwrap();
    broker.push_raw("double", bytes[..bytes.len() - 3].to_vec()).unwrap();
    app.allocate("double", 1).unwrap();
    let err = handle.wait().unwrap_err();
    assert_eq!(err.task_kind(), Some(TaskErrorKind::BadPayload), "{err:?}");
    let event = events.recv_timeout(PATIENCE).unwrap();
    assert_eq!(event.kind, EventKind::MalformedMessage);
    assert_eq!(event.task.unwrap().name, "double");
    assert_eq!(broker.all_dead_letters().len(), 1);
    app.close().unwrap();
}

#[test]
fn a_message_over_the_size_limit_is_refused() {
    let broker = LocalBroker::with_options(LocalOptions::new().serialized(true).max_message_size(1024));
    let app = App::builder().broker(broker).build().unwrap();
    app.register("len", |v: Vec<u8>| v.len()).unwrap();
    app.allocate("len", 1).unwrap();
    let err = app.call::<_, usize>("len", vec![7u8; 4096]).unwrap_err();
    assert!(matches!(&err, Error::Broker(e) if e.kind() == BrokerErrorKind::TooLarge), "{err:?}");
    assert_eq!(app.call::<_, usize>("len", vec![7u8; 100]).unwrap().wait().unwrap(), 100);
    app.close().unwrap();
}

#[test]
fn a_report_published_before_the_watch_is_kept() {
    let broker = LocalBroker::serialized();
    let key = CallKey::new("early", "1");
    // Learn the store's address from one call, then publish for another key before watching it.
    let (sink, _rx) = collector();
    let reply_to = broker.watch(&CallKey::new("early", "0"), sink).unwrap();
    let report = ReportMessage {
        name: key.name.clone(),
        id: key.id.clone(),
        body: ReportBody::Success(Value::Encoded(Encoded::new(1, vec![42]))),
    };
    broker.report(&reply_to, report).unwrap();
    let (sink, rx) = collector();
    broker.watch(&key, sink).unwrap();
    match next(&rx) {
        ReportBody::Success(Value::Encoded(v)) => assert_eq!(v.bytes, [42]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn shutting_the_broker_down_fails_queued_calls() {
    for broker in [LocalBroker::new(), LocalBroker::serialized()] {
        let app = worker(&broker);
        let queued: Handle<i64> = app.call("double", 1i64).unwrap();
        broker.shutdown();
        let err = queued.wait().unwrap_err();
        assert_eq!(err.task_kind(), Some(TaskErrorKind::Shutdown));
        assert!(matches!(app.call::<_, i64>("double", 1i64), Err(Error::Shutdown)));
        app.close().unwrap();
    }
}

/// A message naming a task its pool does not serve, found in the queue of one it does (only
/// a message written by hand gets there): its caller is told what the pool serves.
#[test]
fn a_message_for_another_task_in_a_queue_says_what_the_pool_serves() {
    use dingo_test_support::faults::{crafted, failure, watch};

    let broker = LocalBroker::serialized();
    let app = worker(&broker);
    app.allocate("double", 1).unwrap();
    let (reply_to, inbox) = watch(&broker, "ghost", "ghost-1");
    broker.push_raw("double", crafted(&app, "ghost", "ghost-1", 0, reply_to)).unwrap();
    let (kind, message) = failure(&inbox);
    assert_eq!(kind, TaskErrorKind::UnknownTask);
    assert_eq!(
        message,
        "no worker here runs task `ghost` (this pool serves `double`); the message came through one of their queues"
    );
    assert_eq!(app.call::<_, i64>("double", 4i64).unwrap().wait().unwrap(), 8);
    app.close().unwrap();
}
