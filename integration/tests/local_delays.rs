//! The local broker's delayed tasks: bounded, failed with `Shutdown` when the broker shuts
//! down before they are due, and the dead letter of a call whose retries ran out.

use std::time::Duration;

use dingo::message::wire;
use dingo::{App, Backoff, CallOptions, Context, Error, LocalBroker, LocalOptions, TaskErrorKind};

const PATIENCE: Duration = Duration::from_secs(20);

fn app(broker: &LocalBroker) -> App {
    let app = App::builder().broker(broker.clone()).build().unwrap();
    app.register("double", |n: i64| n * 2).unwrap();
    app.register_with_context("fails", |_: &Context<'_>, n: i64| Err::<i64, String>(format!("no luck with {n}")))
        .unwrap();
    app
}

/// The broker's dead letters once there are any: a worker tells the caller first, then
/// buries the message.
fn letters(broker: &LocalBroker) -> Vec<dingo::DeadLetter> {
    let deadline = std::time::Instant::now() + PATIENCE;
    while broker.all_dead_letters().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50)); // and no second one
    broker.all_dead_letters()
}

#[test]
fn delayed_calls_fail_with_shutdown_when_the_broker_stops_first() {
    for broker in [LocalBroker::new(), LocalBroker::serialized()] {
        let app = app(&broker);
        app.allocate("double", 1).unwrap();
        let later = CallOptions::new().countdown(Duration::from_secs(3600));
        let mut handles: Vec<_> = (0..5i64).map(|n| app.call::<_, i64>("double", n).unwrap()).collect();
        handles.extend((0..5i64).map(|n| app.call_with::<_, i64>("double", &later, n).unwrap()));
        assert_eq!(broker.delayed_len(), 5);
        for mut handle in handles.drain(..5) {
            handle.wait_timeout(PATIENCE).unwrap();
        }
        broker.shutdown();
        for mut handle in handles {
            match handle.wait_timeout(PATIENCE) {
                Err(Error::Task(e)) => assert_eq!(e.kind(), TaskErrorKind::Shutdown, "{e:?}"),
                other => panic!("expected a Shutdown failure, got {other:?}"),
            }
        }
        assert_eq!(broker.delayed_len(), 0);
    }
}

#[test]
fn full_delays_block_then_refuse_and_lose_nothing() {
    let broker = LocalBroker::with_options(LocalOptions::new().max_delayed(3));
    let app = app(&broker);
    app.allocate("double", 1).unwrap();
    let soon = CallOptions::new().countdown(Duration::from_millis(300)).enqueue_timeout(Duration::from_millis(50));
    let handles: Vec<_> = (0..3i64).map(|n| app.call_with::<_, i64>("double", &soon, n).unwrap()).collect();
    match app.call_with::<_, i64>("double", &soon, 3i64) {
        Err(Error::QueueFull { .. }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    let results: Vec<i64> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    assert_eq!(results, [0, 2, 4], "the delayed ones all run");
    // Room again once they ran.
    assert_eq!(app.call_with::<_, i64>("double", &soon, 5i64).unwrap().wait().unwrap(), 10);
    app.close().unwrap();
}

#[test]
fn a_delay_for_an_unknown_task_is_refused_at_once() {
    let broker = LocalBroker::serialized();
    let app = app(&broker);
    let later = CallOptions::new().countdown(Duration::from_secs(1));
    let outcome = app.call_with::<_, i64>("nobody", &later, 1i64).and_then(|mut h| h.wait_timeout(PATIENCE));
    let error = outcome.expect_err("unknown task");
    assert_eq!(error.task_kind(), Some(TaskErrorKind::UnknownTask), "{error:?}");
    assert_eq!(broker.delayed_len(), 0);
}

#[test]
fn the_last_failed_attempt_is_kept_in_the_dead_letters() {
    for broker in [LocalBroker::new(), LocalBroker::serialized()] {
        let app = app(&broker);
        app.allocate("fails", 1).unwrap();
        let options = CallOptions::new().retries(2).backoff(Backoff::fixed(Duration::from_millis(5)));
        let error = match app.call_with::<_, i64>("fails", &options, 7i64).unwrap().wait_timeout(PATIENCE) {
            Err(Error::Task(error)) => error,
            other => panic!("expected a failure, got {other:?}"),
        };
        assert_eq!(error.attempts(), 3);
        assert_eq!(error.payload::<String>().unwrap().unwrap(), "no luck with 7", "the last error's value");
        let dead = letters(&broker);
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].queue, "fails");
        assert!(dead[0].reason.contains("after 3 attempt(s)"), "{}", dead[0].reason);
        // The letter is the last attempt, whole: it can be replayed.
        let letter = wire::decode_task(&dead[0].bytes).unwrap();
        assert_eq!((letter.attempt, letter.retry.retries()), (3, 2));
        app.close().unwrap();
    }
}

#[test]
fn a_retry_into_a_full_queue_does_not_wait_for_its_own_worker() {
    let broker = LocalBroker::with_options(LocalOptions::new().capacity(2));
    let app = App::builder().broker(broker.clone()).build().unwrap();
    app.register_with_context(
        "once",
        |ctx: &Context<'_>, n: i64| {
            if ctx.attempt() == 1 { Err(format!("first attempt of {n}")) } else { Ok(n) }
        },
    )
    .unwrap();
    app.allocate("once", 1).unwrap();
    let now = CallOptions::new().retries(1).backoff(Backoff::fixed(Duration::ZERO));
    let handles: Vec<_> = (0..50i64).map(|n| app.call_with::<_, i64>("once", &now, n).unwrap()).collect();
    let results: Vec<i64> = handles.into_iter().map(|mut h| h.wait_timeout(PATIENCE).unwrap()).collect();
    assert_eq!(results, (0..50).collect::<Vec<_>>());
    app.close().unwrap();
}

#[test]
fn a_worker_without_a_producer_ends_the_call_instead_of_retrying() {
    let broker = LocalBroker::serialized();
    let worker = App::builder()
        .consumer(std::sync::Arc::new(broker.clone()))
        .reporter(std::sync::Arc::new(broker.clone()))
        .build()
        .unwrap();
    worker
        .register_with_context("fails", |_: &Context<'_>, n: i64| Err::<i64, String>(format!("no luck with {n}")))
        .unwrap();
    worker.allocate("fails", 1).unwrap();
    let caller = App::builder().broker(broker.clone()).build().unwrap();
    let options = CallOptions::new().retries(3).backoff(Backoff::fixed(Duration::from_millis(5)));
    let error = match caller.call_with::<_, i64>("fails", &options, 1i64).unwrap().wait_timeout(PATIENCE) {
        Err(Error::Task(error)) => error,
        other => panic!("expected a final failure, got {other:?}"),
    };
    assert_eq!(error.attempts(), 1);
    assert!(error.message().contains("no producer"), "{}", error.message());
    assert_eq!(letters(&broker).len(), 1, "kept for a replay");
    caller.close().unwrap();
    worker.close().unwrap();
}
