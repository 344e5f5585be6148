//! Limits on the receiving side of the RabbitMQ broker: a task message or a report over
//! `max_message_size` published straight into a queue (behind the sender's own check) is not
//! decoded — the task dead-lettered with its first 4 KiB and its caller told, the report
//! dropped or turned into a failure of its call — and dead-letter queues are declared with
//! their bounds (`x-max-length`, `x-max-length-bytes`: RabbitMQ drops the oldest), a queue
//! declared without them by an older version refusing the declaration until told.
#![cfg(feature = "amqp")]

use std::sync::atomic::Ordering;

use dingo::amqp::AmqpOptions;
use dingo::broker::Admin as _;
use dingo::codec::Encoded;
use dingo::message::{Payload, ReplyTo, ReportBody, ReportMessage, TaskMessage, Value, wire};
use dingo::{App, EventKind, Level, TaskErrorKind, TaskId, TaskName, TaskOptions};
use dingo_test_support::PATIENCE;
use dingo_test_support::amqp::Amqp;
use dingo_test_support::faults::{Seen, failure, lock, wait_until, watch};

#[dingo::task(name = "amqp_limits.plus")]
fn plus(n: i64) -> i64 {
    n + 1
}

/// A task message of `plus` for `id`, exactly `len` bytes long (its arguments padded: a
/// message over the limit is never decoded).
fn message_of_len(id: &str, reply_to: ReplyTo, len: usize) -> Vec<u8> {
    let ReplyTo::Address(address) = reply_to else { panic!("a reply address") };
    let build = |args: usize| {
        let message = TaskMessage::new(
            TaskName::from(plus::NAME),
            TaskId::from(id),
            <plus as dingo::Task>::fingerprint(),
            Payload::Encoded(Encoded::new(dingo::codec::MSGPACK, vec![0xc0; args])),
        )
        .with_options(TaskOptions::new())
        .with_reply_to(ReplyTo::Address(address.clone()));
        wire::encode_task(&message).expect("encode the message")
    };
    // The arguments' length field grows by a byte at most once on the way.
    let mut args = len - build(0).len();
    loop {
        let bytes = build(args);
        match bytes.len().cmp(&len) {
            std::cmp::Ordering::Equal => return bytes,
            std::cmp::Ordering::Greater => args -= bytes.len() - len,
            std::cmp::Ordering::Less => args += len - bytes.len(),
        }
    }
}

/// A message one byte over the worker's limit, published straight into its queue, is not
/// run: a copy of its first 4,096 bytes goes to the dead letters with a reason giving its
/// length, its caller gets a `BadPayload` failure naming both sizes, a `TooLarge` event
/// comes, the original is acknowledged, and the worker's one thread serves the next task.
#[test]
fn an_oversize_task_is_dead_lettered_with_its_first_bytes_and_the_worker_goes_on() {
    let limit = 100_000;
    let Some(setup) = Amqp::with_options(AmqpOptions::new().durable(false).max_message_size(limit)) else { return };
    let worker_broker = setup.broker();
    let caller_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut events = Seen::watch(&worker);
    worker.allocate(plus, 1).expect("allocate");
    assert_eq!(plus::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 2);

    let (reply_to, inbox) = watch(&caller_broker, plus::NAME, "big-1");
    let oversize = message_of_len("big-1", reply_to, limit + 1);
    worker_broker.publish_raw(plus::NAME, oversize.clone()).expect("publish");
    let (kind, text) = failure(&inbox);
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

    assert_eq!(plus::call(&caller, 41).expect("call").wait_timeout(PATIENCE).expect("the worker goes on"), 42);
    wait_until("one dead letter", || worker_broker.stats().dead_lettered == 1);
    let dead = worker_broker.dead_letters(&dingo::TaskName::from(plus::NAME), usize::MAX).expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, reason);
    assert_eq!(dead[0].bytes, oversize[..4096], "the first 4 KiB, as published");
    assert_eq!(worker_broker.stats().oversize, 1);
    assert_eq!(inbox.other.load(Ordering::SeqCst), 0, "only the failure report");
    assert_eq!(worker_broker.queue_len(plus::NAME).expect("queue length"), 0, "the original was acknowledged");
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

/// Reports forged into a caller's reply queue: a result over the caller's limit fails its
/// call (`Encode`, naming both sizes) instead of arriving; a progress report over it is
/// dropped with an event; a small one arrives; real calls go on.
#[test]
fn an_oversize_report_is_dropped_and_fails_its_call() {
    let limit = 20_000;
    let Some(setup) = Amqp::with_options(AmqpOptions::new().durable(false).max_message_size(limit)) else { return };
    let caller_broker = setup.broker();
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let mut events = Seen::watch(&caller);
    worker.allocate(plus, 1).expect("allocate");
    assert_eq!(plus::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 2);

    let (_, result_inbox) = watch(&caller_broker, plus::NAME, "r-1");
    let (_, progress_inbox) = watch(&caller_broker, plus::NAME, "r-2");
    let reply_queue = caller_broker.reply_queue().to_owned();
    let big_result = report("r-1", ReportBody::Success(Value::Encoded(payload(limit))));
    let forged = [
        report("r-2", ReportBody::Progress(Some(payload(limit)))),
        report("r-2", ReportBody::Progress(Some(payload(10)))),
        big_result.clone(),
    ];
    for bytes in forged {
        caller_broker.publish_raw_to(&reply_queue, bytes).expect("publish a forged report");
    }

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
    assert!(lock(&progress_inbox.failures).is_empty(), "the oversize progress report is dropped, nothing in its place");
    assert_eq!(plus::call(&caller, 7).expect("call").wait_timeout(PATIENCE).expect("calls go on"), 8);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Dead-letter queues keep their bounds: past `max_dead_letters`, and past
/// `max_dead_letter_bytes` (message bodies), RabbitMQ drops the oldest.
#[test]
fn dead_letters_are_bounded_by_count_and_by_bytes() {
    let garbage = |n: usize| format!("\u{ff} not a task message {n:02}").into_bytes();
    let len = garbage(0).len() as u64;
    for (options, kept) in
        [(AmqpOptions::new().max_dead_letters(3), 3), (AmqpOptions::new().max_dead_letter_bytes(2 * len + 1), 2)]
    {
        let Some(setup) = Amqp::with_options(options.durable(false)) else { return };
        let broker = setup.broker();
        let worker = App::builder().broker(broker.clone()).build().expect("worker app");
        worker.allocate(plus, 1).expect("allocate");
        for n in 1..=5 {
            broker.publish_raw(plus::NAME, garbage(n)).expect("publish garbage");
        }
        wait_until("five dead-lettered", || broker.stats().dead_lettered == 5);
        let dead = broker.dead_letters(&dingo::TaskName::from(plus::NAME), usize::MAX).expect("dead letters");
        let bytes: Vec<Vec<u8>> = dead.iter().map(|d| d.bytes.clone()).collect();
        let newest: Vec<Vec<u8>> = (5 - kept + 1..=5).map(garbage).collect();
        assert_eq!(bytes, newest, "the newest {kept}, oldest first");
        worker.close().expect("close");
    }
}

/// A dead-letter queue declared without bounds (as an older dingo declared it) refuses a
/// declaration with them: the app does not start, its error saying so beside RabbitMQ's
/// `PRECONDITION_FAILED`. With both bounds 0 (left out), the same queue is used as it is.
#[test]
fn a_dead_letter_queue_declared_without_bounds_is_refused_until_told() {
    let unbounded = AmqpOptions::new().durable(false).max_dead_letters(0).max_dead_letter_bytes(0);
    let Some(setup) = Amqp::with_options(unbounded.clone()) else { return };
    let old = setup.broker();
    let old_app = App::builder().broker(old.clone()).build().expect("app");
    old_app.allocate(plus, 1).expect("allocate: declares the queues without bounds");
    assert_eq!(plus::call(&old_app, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 2);

    let bounded = dingo::amqp::AmqpBroker::connect_with(setup.url(), setup.options().clone().max_dead_letters(10))
        .expect("connect");
    setup.adopt(bounded.clone());
    let error = App::builder().broker(bounded).build().expect_err("the declaration is refused");
    let text = dingo::error::chain(&error);
    assert!(text.contains("a dead-letter queue exists with other bounds"), "{text}");
    assert!(text.contains("PRECONDITION_FAILED - inequivalent arg 'x-max-length"), "{text}");

    let told = dingo::amqp::AmqpBroker::connect_with(setup.url(), unbounded.namespace(&setup.options().namespace))
        .expect("connect");
    setup.adopt(told.clone());
    let told_app = App::builder().broker(told).build().expect("app");
    assert_eq!(plus::call(&told_app, 3).expect("call").wait_timeout(PATIENCE).expect("works"), 4);
    for app in [told_app, old_app] {
        app.close().expect("close");
    }
}

/// The connection keeps only the first 4 KiB of a body over `max_message_size` as it
/// arrives (amiquip, as vendored, reads the rest and drops it): a 1 MB message read from a
/// queue by a broker whose limit is 100 kB comes with its first 4,096 bytes, never whole.
#[test]
fn a_body_over_the_limit_is_kept_to_its_first_bytes_as_it_arrives() {
    let Some(setup) = Amqp::with_options(AmqpOptions::new().durable(false).max_message_size(100_000)) else { return };
    let broker = setup.broker();
    let app = App::builder().broker(broker.clone()).build().expect("app: declares the queues");
    let dead_queue = format!("{}.dead.{}", setup.options().namespace, plus::NAME);
    let big: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    broker.publish_raw_to(&dead_queue, big.clone()).expect("publish");
    broker.publish_raw_to(&dead_queue, big[..100_000].to_vec()).expect("publish");
    let dead = broker.dead_letters(&dingo::TaskName::from(plus::NAME), usize::MAX).expect("dead letters");
    let lengths: Vec<usize> = dead.iter().map(|d| d.bytes.len()).collect();
    assert_eq!(lengths, [4096, 100_000], "over the limit: its first 4 KiB; at the limit: whole");
    assert_eq!(dead[0].bytes, big[..4096]);
    app.close().expect("close");
}
