//! The conformance suite on RabbitMQ: as task transport, as report transport, and both; and
//! the App-level suite with tasks on RabbitMQ and reports on Redis.
#![cfg(feature = "amqp")]

mod both {
    use dingo_test_support::amqp::Amqp;

    dingo_test_support::transport_suite!(Amqp::setup());
    dingo_test_support::reports_suite!(Amqp::setup());
    dingo_test_support::app_suite!(Amqp::setup());
}

#[cfg(feature = "redis")]
mod amqp_tasks_redis_reports {
    use dingo_test_support::amqp::WithRedisReports;

    dingo_test_support::app_suite!(WithRedisReports::setup());
}

mod durable_queues {
    use dingo_test_support::amqp::Amqp;

    dingo_test_support::app_suite!(Amqp::with_options(dingo::amqp::AmqpOptions::new()));
}
