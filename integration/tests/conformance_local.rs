//! The conformance suite on the embedded broker, in both of its modes.

mod memory {
    use dingo_test_support::local::Local;

    dingo_test_support::transport_suite!(Some(Local::memory()));
    dingo_test_support::reports_suite!(Some(Local::memory()));
    dingo_test_support::app_suite!(Some(Local::memory()));
    dingo_test_support::lifecycle_suite!(Some(Local::memory()));
    dingo_test_support::control_suite!(Some(Local::memory()));
    dingo_test_support::async_task_suite!(Some(Local::memory()));
}

mod serialized {
    use dingo_test_support::local::Local;

    dingo_test_support::transport_suite!(Some(Local::serialized()));
    dingo_test_support::reports_suite!(Some(Local::serialized()));
    dingo_test_support::app_suite!(Some(Local::serialized()));
    dingo_test_support::lifecycle_suite!(Some(Local::serialized()));
    dingo_test_support::control_suite!(Some(Local::serialized()));
    dingo_test_support::async_task_suite!(Some(Local::serialized()));
}
