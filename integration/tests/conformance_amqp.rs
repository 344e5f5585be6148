//! The conformance suite on RabbitMQ: as task transport, as report transport, and both; and
//! the App-level suite with tasks on RabbitMQ and reports on Redis. The App-level suite runs
//! awaited (as well as blocking) in `both` and `amqp_tasks_redis_reports`; durable queues
//! change how messages are kept, not how calls wait, so `durable_queues` only blocks.
#![cfg(feature = "amqp")]

mod both {
    use dingo_test_support::amqp::Amqp;

    dingo_test_support::transport_suite!(Amqp::setup());
    dingo_test_support::reports_suite!(Amqp::setup());
    dingo_test_support::app_suite!(Amqp::setup());
    dingo_test_support::lifecycle_suite!(Amqp::setup());
    dingo_test_support::control_suite!(Amqp::setup());
    dingo_test_support::async_task_suite!(Amqp::setup());
}

#[cfg(feature = "redis")]
mod amqp_tasks_redis_reports {
    use dingo_test_support::amqp::WithRedisReports;

    dingo_test_support::app_suite!(WithRedisReports::setup());
    dingo_test_support::lifecycle_suite!(WithRedisReports::setup());
    dingo_test_support::control_suite!(WithRedisReports::setup());
    dingo_test_support::async_task_suite!(WithRedisReports::setup());
}

mod durable_queues {
    use dingo_test_support::amqp::Amqp;

    dingo_test_support::app_suite!(Amqp::with_options(dingo::amqp::AmqpOptions::new()), waiters = [blocking]);
    dingo_test_support::lifecycle_suite!(Amqp::with_options(dingo::amqp::AmqpOptions::new()));
    dingo_test_support::control_suite!(Amqp::with_options(dingo::amqp::AmqpOptions::new()));
    dingo_test_support::async_task_suite!(Amqp::with_options(dingo::amqp::AmqpOptions::new()));
}

/// `App::connect` with an `amqp://` URL (the facade's `amqp` feature registers the scheme),
/// its query choosing the namespace: a worker app and a caller app meet on it. A bad option
/// is an error naming it.
#[test]
fn app_connects_by_url() {
    use dingo::App;
    use dingo_test_support::PATIENCE;
    use dingo_test_support::amqp::Amqp;

    let Some(setup) = Amqp::setup() else { return };
    // Reply queues of apps made by URL expire a minute after their apps close.
    let url =
        format!("{}?namespace={}&durable=false&prefetch=16&result_ttl_s=60", setup.url(), setup.options().namespace);
    let worker = App::connect(&url).expect("worker app by URL");
    worker.register("by_url.triple", |n: i64| n * 3).expect("register");
    worker.allocate("by_url.triple", 1).expect("allocate");
    let caller = App::connect(&url).expect("caller app by URL");
    let mut handle = caller.call::<_, i64>("by_url.triple", 14i64).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 42);
    // The namespace came from the URL: an app built on the setup's options reaches the worker.
    let direct = App::builder().broker(setup.broker()).build().expect("caller app by options");
    let mut handle = direct.call::<_, i64>("by_url.triple", 5i64).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 15);
    direct.close().expect("close");
    caller.close().expect("close");
    worker.close().expect("close");
    let error = App::connect("amqp://127.0.0.1:5672/%2f?prefetch=lots").expect_err("a bad option is an error");
    let message = dingo::error::chain(&error);
    assert!(message.contains("prefetch"), "{message}");
    let error = App::connect("amqp://guest:wrong@127.0.0.1:5672/%2f").expect_err("bad credentials are an error");
    assert!(matches!(error, dingo::Error::Broker(_)), "{error:?}");
}

/// An at-most-once task is acknowledged as it is delivered: once it runs, RabbitMQ holds
/// nothing for it (a worker dying now would not get it back), and its result arrives.
#[test]
fn an_at_most_once_task_is_acknowledged_when_delivered() {
    use std::sync::mpsc;

    use dingo::{App, CallOptions};
    use dingo_test_support::PATIENCE;
    use dingo_test_support::amqp::Amqp;

    let Some(setup) = Amqp::setup() else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let (started, running) = mpsc::sync_channel::<()>(1);
    let (release, released) = mpsc::sync_channel::<()>(1);
    let (started, released) = (std::sync::Mutex::new(started), std::sync::Mutex::new(released));
    worker
        .register("amo.gated", move |n: u64| {
            let _ = started.lock().expect("lock").send(());
            let _ = released.lock().expect("lock").recv_timeout(PATIENCE);
            n + 1
        })
        .expect("register");
    worker.allocate("amo.gated", 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let options = CallOptions::new().at_most_once(true);
    let mut handle = caller.call_with::<_, u64>("amo.gated", &options, 7u64).expect("call");
    running.recv_timeout(PATIENCE).expect("the task started");
    let acked = || worker_broker.stats().acked;
    dingo_test_support::faults::wait_until("the delivery is acknowledged", || acked() == 1);
    release.send(()).expect("release");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 8);
    assert_eq!(acked(), 1, "acknowledged once, before it ran");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// At-most-once calls with progress: each call's reports arrive complete and in order
/// (Sent, its progress, then its result), although final reports of at-most-once tasks
/// take a channel without confirms and progress reports the confirmed one: a final report
/// never overtakes its call's progress.
#[test]
fn at_most_once_reports_keep_their_order() {
    use dingo::{App, CallOptions, Context, Report};
    use dingo_test_support::amqp::Amqp;

    let Some(setup) = Amqp::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker
        .register_with_context("amo.steps", |ctx: &Context<'_>, n: u64| {
            for step in 0..3u64 {
                ctx.progress(step);
            }
            Ok::<u64, String>(n * 10)
        })
        .expect("register");
    worker.allocate("amo.steps", 2).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let options = CallOptions::new().at_most_once(true).monitor_progress(true);
    let handles: Vec<_> =
        (0..200u64).map(|n| (n, caller.call_with::<_, u64>("amo.steps", &options, n).expect("call"))).collect();
    for (n, handle) in handles {
        let reports: Vec<Report<u64>> = handle.reports().collect();
        assert_eq!(reports.first(), Some(&Report::Sent), "call {n}: {reports:?}");
        assert_eq!(reports.last(), Some(&Report::Success(n * 10)), "call {n}: {reports:?}");
        let progress = reports.iter().filter(|r| matches!(r, Report::Progress(_))).count();
        // The start of the task, then its three steps.
        assert_eq!(progress, 4, "call {n}: every progress report, before the result: {reports:?}");
    }
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Quorum queues (`quorum=true`): declared with `x-queue-type=quorum`, consumed with
/// per-consumer prefetch (quorum queues refuse global QoS); calls and a dead letter work.
#[test]
fn quorum_queues_work() {
    use dingo::App;
    use dingo::amqp::AmqpOptions;
    use dingo_test_support::PATIENCE;
    use dingo_test_support::amqp::Amqp;
    use dingo_test_support::faults::wait_until;

    let Some(setup) = Amqp::with_options(AmqpOptions::new().quorum(true)) else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    worker.register("quorum.square", |n: i64| n * n).expect("register");
    worker.allocate("quorum.square", 2).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let handles: Vec<_> = (0..20i64).map(|n| (n, caller.call::<_, i64>("quorum.square", n).expect("call"))).collect();
    for (n, mut handle) in handles {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), n * n);
    }
    worker_broker.publish_raw("quorum.square", b"not a task".to_vec()).expect("publish garbage");
    wait_until("the garbage is dead-lettered", || worker_broker.stats().dead_lettered == 1);
    let dead = dingo::broker::Admin::dead_letters(&worker_broker, &dingo::TaskName::from("quorum.square"), usize::MAX)
        .expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].bytes, b"not a task");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// A subscription to two queues with a backlog in both: `try_recv` takes turns between
/// them, so a busy task cannot starve the others (their deliveries would wait, prefetched
/// and unavailable to other consumers, behind it).
#[test]
fn try_recv_takes_turns_between_queues() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use dingo::broker::{ConsumeSettings, Consumer, Producer, Recv};
    use dingo::message::{Payload, ReplyTo, TaskMessage};
    use dingo::{Encoded, TaskId, TaskName, TaskOptions};
    use dingo_test_support::PATIENCE;
    use dingo_test_support::amqp::Amqp;
    use dingo_test_support::faults::wait_until;

    let Some(setup) = Amqp::setup() else { return };
    let broker = setup.broker();
    let (busy, other) = (TaskName::from("turns.busy"), TaskName::from("turns.other"));
    for name in [&busy, &other] {
        Consumer::declare(&broker, name).expect("declare");
    }
    let send = |name: &TaskName, i: usize| {
        let message = TaskMessage::new(
            name.clone(),
            TaskId::new(&format!("{name}-{i}")),
            0,
            Payload::Encoded(Encoded::new(1, vec![i as u8])),
        )
        .with_options(TaskOptions::new())
        .with_reply_to(ReplyTo::Address(Arc::from("nobody")));
        broker.send(message, Some(PATIENCE)).expect("send");
    };
    for i in 0..20 {
        send(&busy, i);
    }
    for i in 0..20 {
        send(&other, i);
    }
    wait_until("all 40 are queued", || {
        broker.queue_len(busy.as_str()).expect("length") + broker.queue_len(other.as_str()).expect("length") == 40
    });
    let subscription = broker.consume(&[busy.clone(), other.clone()], &ConsumeSettings::new(1)).expect("consume");
    wait_until("all 40 are delivered to the subscription", || {
        broker.queue_len(busy.as_str()).expect("length") + broker.queue_len(other.as_str()).expect("length") == 0
    });
    std::thread::sleep(Duration::from_millis(200)); // on their way from the socket to amiquip's receivers
    let mut names = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while names.len() < 20 && Instant::now() < deadline {
        match subscription.try_recv() {
            Recv::Delivery(delivery) => {
                names.push(delivery.message.name.clone());
                if let Some(ack) = delivery.ack {
                    ack.ack().expect("ack");
                }
            }
            Recv::Empty => std::thread::sleep(Duration::from_millis(1)),
            Recv::Stopped => panic!("the subscription stopped"),
            other => panic!("an unexpected {other:?}"),
        }
    }
    let first_other = names.iter().position(|name| *name == other);
    assert!(first_other.is_some_and(|i| i < 4), "the second queue waited behind the first: {names:?}");
    subscription.stop();
}

/// A task message over `max_message_size` is refused at the call with `TooLarge`, nothing is
/// published; calls under the limit go on. A result over the limit fails its call instead
/// of never arriving.
#[test]
fn messages_over_the_size_limit_are_refused() {
    use dingo::amqp::AmqpOptions;
    use dingo::{App, BrokerErrorKind, Error};
    use dingo_test_support::PATIENCE;
    use dingo_test_support::amqp::Amqp;

    let Some(setup) = Amqp::with_options(AmqpOptions::new().durable(false).max_message_size(1024)) else { return };
    let app = App::builder().broker(setup.broker()).build().expect("app");
    app.register("size.len", |v: Vec<u8>| v.len()).expect("register");
    app.register("size.grow", |n: usize| vec![7u8; n]).expect("register");
    app.allocate_all(1).expect("allocate");
    let err = app.call::<_, usize>("size.len", vec![7u8; 4096]).expect_err("too large");
    assert!(matches!(&err, Error::Broker(e) if e.kind() == BrokerErrorKind::TooLarge), "{err:?}");
    let mut handle = app.call::<_, usize>("size.len", vec![7u8; 100]).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 100);
    let mut grown = app.call::<_, Vec<u8>>("size.grow", 4096usize).expect("call");
    let err = grown.wait_timeout(PATIENCE).expect_err("a result over the limit cannot travel");
    assert_eq!(err.task_kind(), Some(dingo::TaskErrorKind::Encode), "{err:?}");
    assert!(dingo::error::chain(&err).contains("max_message_size"), "{err:?}");
    let mut handle = app.call::<_, usize>("size.len", vec![7u8; 10]).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the worker goes on"), 10);
    app.close().expect("close");
}
