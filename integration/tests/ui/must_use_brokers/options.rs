// The broker crates' option builders, as `must_use_builders.rs` (built with the `redis` and
// `amqp` features only).
#![deny(unused_must_use)]

use std::time::Duration;

fn main() {
    dingo::redis::RedisOptions::new().lease(Duration::from_secs(1));
    dingo::redis::RedisOptions::new().tls_ca_file("/ca.pem");
    dingo::amqp::AmqpOptions::new().prefetch(8);
    dingo::amqp::AmqpOptions::new().tls_ca_file("/ca.pem");
}
