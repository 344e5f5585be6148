//! The conformance suite on Redis: as task transport, as report transport, and both.
#![cfg(feature = "redis")]

mod both {
    use dingo_test_support::redis::Redis;

    dingo_test_support::transport_suite!(Redis::setup());
    dingo_test_support::reports_suite!(Redis::setup());
    dingo_test_support::app_suite!(Redis::setup());
}
