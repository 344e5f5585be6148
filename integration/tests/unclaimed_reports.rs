//! Reports nobody waits for are kept within a bound of bytes, not only of count: a flood of
//! them (forged, or of calls whose handles were dropped) costs a caller at most
//! `max_unclaimed_bytes`, and the caller is warned once it drops some. Every broker whose
//! caller side keeps reports as bytes: the serialized local broker, Redis, RabbitMQ.

use dingo::{App, EventFilter, EventKind, Level, LocalBroker, LocalOptions};
use dingo_test_support::PATIENCE;

/// A result of 1 KiB: each weighs about 1.1 KiB in the router.
#[dingo::task(name = "unclaimed.kilo")]
fn kilo(n: u64) -> String {
    format!("{n:0>1024}")
}

/// 200 reports of 1 KiB for calls whose handles are dropped at once, with a bound of 16 KiB:
/// the caller warns when it keeps half of that (and says how much: byte accounting), then
/// that it drops reports at the bound; a call made after the flood still gets its result.
/// Without the byte bound no warning comes (200 reports are far below the count bound).
fn a_flood_of_unclaimed_reports_is_bounded_by_bytes(caller: &App, worker: &App) {
    let warnings = caller.events(EventFilter::new().level(Level::Warning));
    worker.allocate(kilo, 2).expect("allocate");
    for n in 0..200 {
        drop(kilo::call(caller, n).expect("call"));
    }
    let next = || {
        let event = warnings.recv_timeout(PATIENCE).expect("a warning about unclaimed reports");
        assert_eq!(event.kind, EventKind::UnclaimedReport, "{event:?}");
        event.message
    };
    let half = next();
    let bytes: usize = half.split(['(', ' ']).nth(3).and_then(|b| b.parse().ok()).expect(&half);
    assert!((8 << 10..(8 << 10) + 1200).contains(&bytes), "{half}");
    assert!(half.ends_with("(dropped handles, or forged reports)"), "{half}");
    let dropped = next();
    assert!(
        dropped.starts_with("1 reports nobody waits for were dropped at the bound of 100000 reports and 16384 bytes"),
        "{dropped}"
    );
    assert_eq!(kilo::call(caller, 7).expect("call").wait_timeout(PATIENCE).expect("result"), format!("{:0>1024}", 7));
}

#[test]
fn serialized_local() {
    let broker = LocalBroker::with_options(LocalOptions::new().serialized(true).max_unclaimed_bytes(16 << 10));
    let app = App::builder().broker(broker).build().expect("app");
    a_flood_of_unclaimed_reports_is_bounded_by_bytes(&app, &app);
}

#[cfg(feature = "redis")]
#[test]
fn redis() {
    use dingo::redis::RedisOptions;
    let Some(setup) = dingo_test_support::redis::Redis::with_options(RedisOptions::new().max_unclaimed_bytes(16 << 10))
    else {
        return;
    };
    let caller = App::builder().broker(setup.broker()).build().expect("caller");
    let worker = App::builder().broker(setup.broker()).build().expect("worker");
    a_flood_of_unclaimed_reports_is_bounded_by_bytes(&caller, &worker);
}

#[cfg(feature = "amqp")]
#[test]
fn amqp() {
    use dingo::amqp::AmqpOptions;
    let options = AmqpOptions::new().durable(false).max_unclaimed_bytes(16 << 10);
    let Some(setup) = dingo_test_support::amqp::Amqp::with_options(options) else { return };
    let caller = App::builder().broker(setup.broker()).build().expect("caller");
    let worker = App::builder().broker(setup.broker()).build().expect("worker");
    a_flood_of_unclaimed_reports_is_bounded_by_bytes(&caller, &worker);
}
