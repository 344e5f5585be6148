//! Garbage in a queue: messages that do not decode, are cut short, have another signature
//! or name a task the worker does not have go to the dead letters, byte for byte (lost dead
//! letter bytes were once a defect), and the worker goes on.
#![cfg(feature = "redis")]

use std::sync::atomic::Ordering;

use dingo::message::ReplyTo;
use dingo::{App, Event, EventFilter, EventKind, Level, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{Seen, crafted, failure, wait_until, watch};
use dingo_test_support::redis::{Redis, held};

#[dingo::task(name = "faults.plus")]
fn plus(n: i64) -> i64 {
    n + 1
}

/// Four bad messages pushed straight into a queue: bytes that do not decode, a message cut
/// short (its caller can be identified), one with another signature, and one naming a task
/// the worker does not have. Each goes to the dead letters with its reason and an event;
/// callers that can be identified get a failure of the right kind; the worker's single
/// thread goes on serving.
#[test]
fn garbage_in_a_queue_is_dead_lettered_and_the_worker_goes_on() {
    let Some(setup) = Redis::setup() else { return };
    let worker_broker = setup.broker();
    let caller_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut events = Seen::watch(&worker);
    worker.allocate(plus, 1).expect("allocate");
    assert_eq!(plus::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 2);

    // Not a dingo message at all.
    let garbage = b"\xff\x00 definitely not a task message".to_vec();
    worker_broker.push_raw(plus::NAME, garbage.clone()).expect("push garbage");
    let event = events.wait_for(EventKind::MalformedMessage);
    assert_eq!(event.level, Level::Error);
    assert!(event.message.contains("undecodable"), "{}", event.message);

    // A message cut short after its name, id and reply address: its caller is told.
    let (reply_to, cut_inbox) = watch(&caller_broker, plus::NAME, "cut-1");
    let whole = crafted(&caller, plus::NAME, "cut-1", <plus as dingo::Task>::fingerprint(), reply_to);
    let cut_short = whole[..whole.len() - 6].to_vec();
    worker_broker.push_raw(plus::NAME, cut_short.clone()).expect("push a truncated message");
    let (kind, message) = failure(&cut_inbox);
    assert_eq!(kind, TaskErrorKind::BadPayload, "{message}");

    // Another signature: decodes, but must not run.
    let (reply_to, sig_inbox) = watch(&caller_broker, plus::NAME, "sig-1");
    let wrong_signature = crafted(&caller, plus::NAME, "sig-1", 0x0bad_5eed_0bad_5eed, reply_to);
    worker_broker.push_raw(plus::NAME, wrong_signature.clone()).expect("push a wrong signature");
    let (kind, message) = failure(&sig_inbox);
    assert_eq!(kind, TaskErrorKind::SignatureMismatch, "{message}");
    events.wait_for(EventKind::SignatureMismatch);

    // A task nobody serves, in this queue.
    let (reply_to, ghost_inbox) = watch(&caller_broker, "faults.ghost", "ghost-1");
    let ghost = crafted(&caller, "faults.ghost", "ghost-1", <plus as dingo::Task>::fingerprint(), reply_to);
    worker_broker.push_raw(plus::NAME, ghost.clone()).expect("push an unknown task");
    let (kind, message) = failure(&ghost_inbox);
    assert_eq!(kind, TaskErrorKind::UnknownTask, "{message}");
    events.wait_for(EventKind::UnknownTask);

    // The worker's one thread still serves.
    for n in [41, 99] {
        assert_eq!(plus::call(&caller, n).expect("call").wait_timeout(PATIENCE).expect("works"), n + 1);
    }

    wait_until("four dead letters", || worker_broker.dead_letters(plus::NAME).expect("dead letters").len() >= 4);
    let dead = worker_broker.dead_letters(plus::NAME).expect("dead letters");
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(dead.len(), 4, "{reasons:#?}");
    // Oldest first.
    assert!(reasons[0].starts_with("undecodable message"), "{reasons:#?}");
    assert!(reasons[1].starts_with("undecodable message"), "{reasons:#?}");
    assert!(reasons[2].starts_with("signature mismatch"), "{reasons:#?}");
    assert!(reasons[3].starts_with("unknown task"), "{reasons:#?}");
    assert_eq!(events.count(EventKind::MalformedMessage), 2);
    // One `DeadLettered` per dead letter, whatever the cause, in order, naming the calls known.
    wait_until("a DeadLettered event per dead letter", || events.count(EventKind::DeadLettered) == 4);
    let dead_events = events.of_kind(EventKind::DeadLettered);
    let calls: Vec<Option<&str>> = dead_events.iter().map(|e| e.task.as_ref().map(|k| k.id.as_str())).collect();
    assert_eq!(calls, [None, Some("cut-1"), Some("sig-1"), Some("ghost-1")], "{dead_events:#?}");
    for inbox in [&cut_inbox, &sig_inbox, &ghost_inbox] {
        assert_eq!(inbox.other.load(Ordering::SeqCst), 0, "only the failure report");
    }
    assert_eq!(worker_broker.queue_len(plus::NAME).expect("queue length"), 0);
    assert_eq!(held(setup.url(), &setup.options().namespace, plus::NAME), 0);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Dead letters keep the message as it was queued, byte for byte, so it can be replayed,
/// and name their queue; dead-lettering is counted and raises no error.
#[test]
fn dead_letters_keep_the_message_bytes() {
    let Some(setup) = Redis::setup() else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let errors = worker.events(EventFilter::new().level(Level::Error));
    worker.allocate(plus, 1).expect("allocate");
    let garbage = b"\xff\x00 not a task message either".to_vec();
    worker_broker.push_raw(plus::NAME, garbage.clone()).expect("push garbage");
    let wrong_signature = crafted(&worker, plus::NAME, "sig-2", 0x0bad_5eed_0bad_5eed, ReplyTo::None);
    worker_broker.push_raw(plus::NAME, wrong_signature.clone()).expect("push a wrong signature");
    wait_until("two dead letters", || worker_broker.dead_letters(plus::NAME).expect("dead letters").len() >= 2);
    let dead = worker_broker.dead_letters(plus::NAME).expect("dead letters");
    assert_eq!(dead.len(), 2, "{dead:#?}");
    assert!(dead[1].reason.starts_with("signature mismatch"), "{dead:#?}");
    assert_eq!(dead[1].bytes, wrong_signature, "the wrong-signature message, as queued");
    assert!(dead[0].reason.starts_with("undecodable message"), "{dead:#?}");
    assert_eq!(dead[0].bytes, garbage, "the garbage, as queued");
    assert!(dead.iter().all(|d| d.queue.as_str() == plus::NAME), "each names its queue: {dead:#?}");
    wait_until("the dead letters are counted", || worker_broker.stats().dead_lettered == 2);
    let failed: Vec<Event> =
        std::iter::from_fn(|| errors.try_recv()).filter(|e| e.kind == EventKind::ReportFailed).collect();
    assert!(failed.is_empty(), "dead-lettering failed: {failed:#?}");
    worker.close().expect("close");
}
