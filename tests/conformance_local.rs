//! The conformance suite on the embedded broker, in both of its modes.

mod memory {
    use dingo_test_support::local::Local;

    dingo_test_support::transport_suite!(Local::memory());
    dingo_test_support::reports_suite!(Local::memory());
    dingo_test_support::app_suite!(Local::memory());
}

mod serialized {
    use dingo_test_support::local::Local;

    dingo_test_support::transport_suite!(Local::serialized());
    dingo_test_support::reports_suite!(Local::serialized());
    dingo_test_support::app_suite!(Local::serialized());
}
