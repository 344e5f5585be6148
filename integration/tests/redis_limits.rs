//! Limits on the receiving side of the Redis broker: a task message or a report over
//! `max_message_size` pushed straight into Redis (behind the sender's own check) is not
//! decoded — the task dead-lettered with its first 4 KiB and its caller told, the report
//! dropped or turned into a failure of its call — and dead letters stay within their count
//! and byte bounds, the oldest dropped first.
#![cfg(feature = "redis")]

use std::sync::atomic::Ordering;

use dingo::codec::Encoded;
use dingo::message::{Payload, ReplyTo, ReportBody, ReportMessage, TaskMessage, Value, wire};
use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, EventKind, Level, TaskErrorKind, TaskId, TaskName, TaskOptions};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{Seen, failure, wait_until, watch};
use dingo_test_support::redis::{Redis, held, redis_cli, redis_cli_with};

#[dingo::task(name = "limits.plus")]
fn plus(n: i64) -> i64 {
    n + 1
}

/// A task message of `plus` whose arguments are `args` bytes (they need not decode: a
/// message over the limit is never decoded).
fn message(id: &str, reply_to: ReplyTo, args: usize, at_most_once: bool) -> Vec<u8> {
    let mut options = TaskOptions::new();
    options.at_most_once = at_most_once;
    let message = TaskMessage::new(
        TaskName::from(plus::NAME),
        TaskId::from(id),
        <plus as dingo::Task>::fingerprint(),
        Payload::Encoded(Encoded::new(dingo::codec::MSGPACK, vec![0xc0; args])),
    )
    .with_options(options)
    .with_reply_to(reply_to);
    wire::encode_task(&message).expect("encode the message")
}

fn key(setup: &Redis, kind: &str) -> String {
    format!("{}:{{{}}}:{kind}", setup.options().namespace, plus::NAME)
}

/// A message one byte over the worker's limit, pushed straight into its queue (leased) and
/// into its at-most-once list: neither runs; each goes to the dead letters with its first
/// 4,096 bytes only and a reason giving its length; its caller gets a `BadPayload` failure
/// naming both sizes; a `TooLarge` event each; the worker's one thread serves the next task,
/// and nothing is left in the queue or held.
#[test]
fn an_oversize_task_is_dead_lettered_with_its_first_bytes_and_the_worker_goes_on() {
    let Some(probe) = Redis::setup() else { return };
    let (reply_probe, _) = watch(&probe.broker(), plus::NAME, "x");
    let limit = message("big-1", reply_probe, 100_000, false).len() - 1;
    drop(probe);
    let Some(setup) = Redis::with_options(RedisOptions::new().max_message_size(limit)) else { return };
    let worker_broker = setup.broker();
    let caller_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut events = Seen::watch(&worker);
    worker.allocate(plus, 1).expect("allocate");

    let (reply_to, leased_inbox) = watch(&caller_broker, plus::NAME, "big-1");
    let leased = message("big-1", reply_to, 100_000, false);
    assert_eq!(leased.len(), limit + 1, "one byte over");
    worker_broker.push_raw(plus::NAME, leased.clone()).expect("push");
    let (kind, text) = failure(&leased_inbox);
    assert_eq!(kind, TaskErrorKind::BadPayload);
    let reason = format!(
        "task message of {} bytes exceeds the limit of {limit} bytes (max_message_size); its dead letter keeps its \
         first 4096 bytes only",
        limit + 1
    );
    assert_eq!(text, format!("the worker refused the task message: {reason}"));
    let event = events.wait_for(EventKind::TooLarge);
    assert_eq!(event.level, Level::Error);
    assert_eq!(event.task.as_ref().map(|k| k.id.as_str()), Some("big-1"));

    let (reply_to, amo_inbox) = watch(&caller_broker, plus::NAME, "big-2");
    let at_most_once = message("big-2", reply_to, 100_000, true);
    redis_cli_with(setup.url(), &["LPUSH", &key(&setup, "amo")], &at_most_once);
    redis_cli(setup.url(), &["LPUSH", &key(&setup, "wake"), "1"]);
    let (kind, _) = failure(&amo_inbox);
    assert_eq!(kind, TaskErrorKind::BadPayload);

    assert_eq!(plus::call(&caller, 41).expect("call").wait_timeout(PATIENCE).expect("the worker goes on"), 42);
    wait_until("two dead letters", || worker_broker.dead_letters(plus::NAME).expect("dead letters").len() >= 2);
    let dead = worker_broker.dead_letters(plus::NAME).expect("dead letters");
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|letter| letter.reason == reason), "{dead:#?}");
    let mut kept: Vec<&[u8]> = dead.iter().map(|letter| letter.bytes.as_slice()).collect();
    kept.sort();
    let mut expected = [&leased[..4096], &at_most_once[..4096]];
    expected.sort();
    assert_eq!(kept, expected, "the first 4 KiB of each, as queued");
    assert_eq!(worker_broker.stats().oversize, 2);
    assert_eq!(worker_broker.stats().dead_lettered, 2);
    assert_eq!(events.count(EventKind::TooLarge), 2);
    for inbox in [&leased_inbox, &amo_inbox] {
        assert_eq!(inbox.other.load(Ordering::SeqCst), 0, "only the failure report");
    }
    assert_eq!(worker_broker.queue_len(plus::NAME).expect("queue length"), 0);
    assert_eq!(held(setup.url(), &setup.options().namespace, plus::NAME), 0);
    caller.close().expect("close");
    worker.close().expect("close");
}

fn report(id: &str, body: ReportBody<'static>) -> Vec<u8> {
    let report = ReportMessage { name: TaskName::from(plus::NAME), id: TaskId::from(id), body };
    wire::encode_report(&report).expect("encode the report")
}

fn payload(bytes: usize) -> Encoded {
    Encoded::new(dingo::codec::MSGPACK, vec![0xc0; bytes])
}

/// Reports forged into a caller's reply list: a result over the caller's limit fails its
/// call (`Encode`, naming both sizes) instead of arriving; a progress report over it is
/// dropped with an event; a small report stored in the same element as an oversize one
/// (back to back, as a batch is stored) still arrives; real calls go on.
#[test]
fn an_oversize_report_is_dropped_and_fails_its_call() {
    let limit = 20_000;
    let Some(setup) = Redis::with_options(RedisOptions::new().max_message_size(limit)) else { return };
    let caller_broker = setup.broker();
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut events = Seen::watch(&caller);
    worker.allocate(plus, 1).expect("allocate");
    assert_eq!(plus::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 2);

    let (reply_to, result_inbox) = watch(&caller_broker, plus::NAME, "r-1");
    let (_, progress_inbox) = watch(&caller_broker, plus::NAME, "r-2");
    let ReplyTo::Address(process) = reply_to else { panic!("a reply address") };
    let reply = key(&setup, &format!("reply:{process}"));
    let notify = key(&setup, &format!("notify:{process}"));
    let big_result = report("r-1", ReportBody::Success(Value::Encoded(payload(limit))));
    assert!(big_result.len() > limit);
    let mut element = report("r-2", ReportBody::Progress(Some(payload(10))));
    element.extend_from_slice(&report("r-2", ReportBody::Progress(Some(payload(limit)))));
    element.extend_from_slice(&big_result);
    redis_cli_with(setup.url(), &["RPUSH", &reply], &element);
    redis_cli(setup.url(), &["LPUSH", &notify, "1"]);

    let (kind, text) = failure(&result_inbox);
    assert_eq!(kind, TaskErrorKind::Encode);
    assert_eq!(
        text,
        format!(
            "the result of {} bytes exceeds this caller's limit of {limit} bytes (max_message_size)",
            big_result.len()
        )
    );
    wait_until("the small progress report arrives", || progress_inbox.other.load(Ordering::SeqCst) == 1);
    wait_until("two oversize reports", || caller_broker.stats().oversize == 2);
    assert_eq!(events.count(EventKind::TooLarge), 2);
    assert!(lock_failures_empty(&progress_inbox), "the oversize progress report is dropped, nothing in its place");
    assert_eq!(plus::call(&caller, 7).expect("call").wait_timeout(PATIENCE).expect("calls go on"), 8);
    caller.close().expect("close");
    worker.close().expect("close");
}

fn lock_failures_empty(inbox: &dingo_test_support::faults::Inbox) -> bool {
    dingo_test_support::faults::lock(&inbox.failures).is_empty()
}

/// Dead letters past `max_dead_letters`: the newest kept, the oldest dropped, counted, with
/// an event; past `max_dead_letter_bytes` likewise.
#[test]
fn dead_letters_are_bounded_by_count_and_by_bytes() {
    let garbage = |n: usize| format!("\u{ff} not a task message {n:02}").into_bytes();
    for (options, kept) in [
        (RedisOptions::new().max_dead_letters(3), 3),
        // Each entry: a 4-byte length, an 8-byte time, the reason, the message; room for two.
        (RedisOptions::new().max_dead_letter_bytes(2 * entry_len(&garbage(0)) + 10), 2),
    ] {
        let Some(setup) = Redis::with_options(options) else { return };
        let broker: RedisBroker = setup.broker();
        let worker = App::builder().broker(broker.clone()).build().expect("worker app");
        let mut events = Seen::watch(&worker);
        worker.allocate(plus, 1).expect("allocate");
        for n in 1..=5 {
            broker.push_raw(plus::NAME, garbage(n)).expect("push garbage");
        }
        wait_until("five dead-lettered", || broker.stats().dead_lettered == 5);
        let dead = broker.dead_letters(plus::NAME).expect("dead letters");
        let kept_bytes: Vec<Vec<u8>> = dead.iter().map(|d| d.bytes.clone()).collect();
        let newest: Vec<Vec<u8>> = (5 - kept + 1..=5).map(garbage).collect();
        assert_eq!(kept_bytes, newest, "the newest {kept}, oldest first");
        assert_eq!(broker.stats().dead_letters_dropped, 5 - kept as u64);
        let event = events.wait_for(EventKind::DeadLettersDropped);
        assert_eq!(event.level, Level::Warning);
        assert!(event.message.contains("dropped, oldest first"), "{}", event.message);
        let counted: usize = redis_cli(setup.url(), &["GET", &key(&setup, "dead:bytes")]).parse().expect("a count");
        assert_eq!(counted, dead.iter().map(|d| 12 + d.reason.len() + d.bytes.len()).sum::<usize>());
        worker.close().expect("close");
    }
}

/// The bytes a dead letter of this garbage takes (its reason is the decoder's).
fn entry_len(garbage: &[u8]) -> usize {
    let reason = format!(
        "undecodable message: {}",
        dingo::error::chain(&wire::decode_task(garbage).expect_err("garbage").error)
    );
    12 + reason.len() + garbage.len()
}

/// The probe's case at the default limit (16 MiB): a 50 MB task message pushed straight
/// into a queue is refused unread, its dead letter 4 KiB, its caller told.
#[test]
fn a_50_mb_task_at_the_default_limit_is_refused_unread() {
    let Some(setup) = Redis::setup() else { return };
    assert_eq!(setup.options().max_message_size, 16 << 20);
    let worker_broker = setup.broker();
    let caller_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    worker.allocate(plus, 1).expect("allocate");
    let (reply_to, inbox) = watch(&caller_broker, plus::NAME, "huge-1");
    let huge = message("huge-1", reply_to, 50 << 20, false);
    let len = huge.len();
    worker_broker.push_raw(plus::NAME, huge).expect("push");
    let (kind, text) = failure(&inbox);
    assert_eq!(kind, TaskErrorKind::BadPayload);
    assert!(text.contains(&format!("task message of {len} bytes exceeds the limit of 16777216 bytes")), "{text}");
    wait_until("one dead letter", || worker_broker.stats().dead_lettered == 1);
    let dead = worker_broker.dead_letters(plus::NAME).expect("dead letters");
    assert_eq!(dead.iter().map(|d| d.bytes.len()).collect::<Vec<_>>(), [4096]);
    assert_eq!(worker_broker.queue_len(plus::NAME).expect("queue length"), 0);
    worker.close().expect("close");
}
