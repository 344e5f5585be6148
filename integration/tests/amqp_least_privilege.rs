//! The least-privilege RabbitMQ set-up the README shows, tested as written: a virtual host
//! of the app's own and a user whose permissions cover its namespace's queues and
//! exchanges and the default exchange, nothing else. Calls, dead letters and reports work;
//! another namespace is refused with a clear error.
#![cfg(feature = "amqp")]

use std::process::Command;

use dingo::amqp::{AmqpBroker, AmqpOptions};
use dingo::broker::Admin as _;
use dingo::{App, BrokerErrorKind, Error};
use dingo_test_support::PATIENCE;

#[dingo::task(name = "shop.total")]
fn total(items: Vec<u64>) -> u64 {
    items.iter().sum()
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("run rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A virtual host and a user of this test's own, removed when dropped.
struct Tenant {
    vhost: String,
    user: String,
}

impl Tenant {
    /// The README's commands, with this test's names: `NS` is the namespace.
    fn create(namespace: &str) -> Tenant {
        let tenant =
            Tenant { vhost: dingo_test_support::unique("dingo-lp"), user: dingo_test_support::unique("dingo-lp") };
        rabbitmqctl(&["add_vhost", &tenant.vhost]);
        rabbitmqctl(&["add_user", &tenant.user, "lp-secret"]);
        let own = format!("^{}\\.", namespace.replace('.', "\\."));
        let write = format!("^({}\\..*|amq\\.default)$", namespace.replace('.', "\\."));
        rabbitmqctl(&["set_permissions", "-p", &tenant.vhost, &tenant.user, &own, &write, &own]);
        tenant
    }

    fn url(&self) -> String {
        format!("amqp://{}:lp-secret@127.0.0.1:5672/{}", self.user, self.vhost)
    }
}

impl Drop for Tenant {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.vhost]).output();
        let _ = Command::new("rabbitmqctl").args(["delete_user", &self.user]).output();
    }
}

#[test]
fn a_user_limited_to_its_namespace_runs_everything_and_nothing_else() {
    if dingo_test_support::amqp::url().is_none() {
        return;
    }
    let tenant = Tenant::create("shop");
    let options = AmqpOptions::new().namespace("shop").durable(false);
    let broker = AmqpBroker::connect_with(&tenant.url(), options.clone()).expect("connect as the limited user");
    let app = App::builder().broker(broker.clone()).build().expect("app");
    app.allocate(total, 2).expect("allocate");
    assert_eq!(total::call(&app, vec![1, 2, 3]).expect("call").wait_timeout(PATIENCE).expect("result"), 6);
    total::send(&app, vec![4]).expect("fire and forget");
    // Dead letters: published to the namespace's dead-letter exchange, read back.
    broker.publish_raw("shop.total", b"not a task message".to_vec()).expect("publish garbage");
    let deadline = std::time::Instant::now() + PATIENCE;
    while broker
        .dead_letters(&dingo::TaskName::from("shop.total"), usize::MAX)
        .expect("read the dead letters")
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "the garbage was not dead-lettered");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(total::call(&app, vec![5, 5]).expect("call").wait_timeout(PATIENCE).expect("result"), 10);
    app.close().expect("close");

    // Another namespace on the same virtual host: refused, saying so.
    let other = AmqpOptions::new().namespace("billing").durable(false).connect_retry(std::time::Duration::ZERO);
    let refused = AmqpBroker::connect_with(&tenant.url(), other)
        .map_err(Error::from)
        .and_then(|broker| App::builder().broker(broker).build())
        .and_then(|app| app.allocate(total, 1).map(|_| app));
    let error = match refused {
        Ok(_) => panic!("a namespace outside the user's permissions was usable"),
        Err(e) => e,
    };
    let text = dingo::error::chain(&error);
    assert!(text.contains("ACCESS_REFUSED") && text.contains("'billing."), "{text}");
    if let Error::Broker(e) = &error {
        assert_ne!(e.kind(), BrokerErrorKind::Other, "{text}");
    }
}
