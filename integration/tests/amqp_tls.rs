//! TLS on the RabbitMQ broker, against a RabbitMQ node of the test's own with a TLS listener
//! only (the shared node is never touched), with a throwaway CA made at test time: a custom
//! CA trusted and a whole call over TLS, an untrusted CA and a certificate for another host
//! refused, mutual TLS (client
//! certificate) refused without the certificate and accepted with it, and bad TLS files as
//! configuration errors that name the file and never the password.
#![cfg(feature = "amqp-tls")]

use std::time::Duration;

use dingo::amqp::{AmqpBroker, AmqpOptions};
use dingo::{App, BrokerError, BrokerErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::certs::Certs;
use dingo_test_support::rabbitmq_node::Node;

/// Options that fail at once instead of waiting for a server that will not come, in a
/// namespace of the test's own.
fn options() -> AmqpOptions {
    AmqpOptions::new().namespace(dingo_test_support::unique("dingo-tls")).connect_retry(Duration::ZERO)
}

fn connect(url: &str, options: AmqpOptions) -> Result<AmqpBroker, BrokerError> {
    AmqpBroker::connect_with(url, options)
}

/// A worker and a caller app on `broker`: one call of `tls.triple` comes back right.
fn round_trip(broker: AmqpBroker) {
    let app = App::builder().broker(broker).build().expect("app");
    app.register("tls.triple", |(n,): (u64,)| n * 3).expect("register");
    app.allocate("tls.triple", 1).expect("allocate");
    let mut handle = app.call::<_, u64>("tls.triple", (14u64,)).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the call ran"), 42);
    app.close().expect("close");
}

/// The error of a refused connection: a configuration error (not retried) whose message is
/// `expected` with `{server}` for the node's address.
fn assert_refused(result: Result<AmqpBroker, BrokerError>, node: &Node, expected: &str) {
    let error = result.expect_err(expected);
    assert_eq!(error.kind(), BrokerErrorKind::Config, "{error:?}");
    let server = format!("RabbitMQ at {}", node.url().replace("guest:guest@", "guest@").replace("%2f", "%2F"));
    assert_eq!(error.to_string(), expected.replace("{server}", &server));
}

#[test]
fn a_custom_ca_is_trusted_and_an_untrusted_one_or_another_host_refused() {
    let Some(certs) = Certs::generate() else { return };
    let Some(node) = Node::start_tls(&certs, certs.server(), false) else { return };
    let url = format!("{}?cacertfile={}", node.url(), certs.ca().display());
    round_trip(connect(&url, options()).expect("connect with the CA in the URL"));
    let refused = "{server}: the server's TLS certificate was refused (self-signed certificate in certificate chain): \
                   give the CA that signed it with `cacertfile` (`tls_ca_file`), and connect by a name the \
                   certificate holds";
    assert_refused(connect(&node.url(), options().tls_ca_file(certs.other_ca())), &node, refused);
    assert_refused(connect(&node.url(), options()), &node, refused);
    drop(node);
    // The right CA, a certificate for another host (the URL names 127.0.0.1).
    let Some(elsewhere) = Node::start_tls(&certs, certs.elsewhere(), false) else { return };
    assert_refused(
        connect(&elsewhere.url(), options().tls_ca_file(certs.ca())),
        &elsewhere,
        &refused.replace("self-signed certificate in certificate chain", "IP address mismatch"),
    );
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let Some(certs) = Certs::generate() else { return };
    let Some(node) = Node::start_tls(&certs, certs.server(), true) else { return };
    // TLS 1.3 checks the client's certificate after the client's side of the handshake: the
    // refusal may be overtaken by the reset of a connection the client has written to.
    let error = connect(&node.url(), options().tls_ca_file(certs.ca())).expect_err("no client certificate");
    if error.kind() == BrokerErrorKind::Connection {
        let message = error.to_string();
        assert!(message.starts_with("cannot reach RabbitMQ at ") && message.contains("closed"), "{error:?}");
    } else {
        assert_refused(
            Err(error),
            &node,
            "{server} refused the TLS connection (`certificate required`): it asks for a client certificate its CA \
             signed; give it with `certfile` and `keyfile` (`tls_client_cert`)",
        );
    }
    let (cert, key) = certs.client();
    round_trip(connect(&node.url(), options().tls_ca_file(certs.ca()).tls_client_cert(cert, key)).expect("with it"));
}

/// Bad TLS settings fail at connect, before any connection is tried, as configuration errors
/// that name the file — and never show the URL's password.
#[test]
fn bad_tls_files_are_configuration_errors_naming_them() {
    let Some(certs) = Certs::generate() else { return };
    let dir = certs.dir().display().to_string();
    let (cert, _) = certs.client();
    let cert = cert.display().to_string();
    let (_, server_key) = certs.server();
    let base = "amqps://guest:sekrit@127.0.0.1:1/%2f";
    let cases = [
        (
            format!("{base}?cacertfile={dir}/missing.pem"),
            format!("cannot read the TLS CA file `{dir}/missing.pem`: No such file or directory (os error 2)"),
        ),
        (
            format!("{base}?cacertfile={dir}/ca.key"),
            format!("the TLS CA file `{dir}/ca.key` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"),
        ),
        (
            format!("{base}?certfile={cert}"),
            format!("the TLS client certificate `{cert}` has no key: give `keyfile` too"),
        ),
        (
            format!("amqp://guest:sekrit@127.0.0.1:1/%2f?cacertfile={dir}/ca.pem"),
            "amqp://guest@127.0.0.1:1/%2F: TLS files (`cacertfile`, `certfile`, `keyfile`) need an `amqps://` URL"
                .to_owned(),
        ),
    ];
    for (url, expected) in cases {
        let error = connect(&url, options()).expect_err(&url);
        assert_eq!(error.kind(), BrokerErrorKind::Config, "{url}: {error:?}");
        assert_eq!(error.to_string(), expected, "{url}");
        assert!(!format!("{error:?}").contains("sekrit"), "{error:?}");
    }
    let garbled = certs.dir().join("garbled.pem");
    std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
        .expect("write");
    let error = connect(base, options().tls_ca_file(&garbled)).expect_err("garbled");
    assert_eq!(error.kind(), BrokerErrorKind::Config, "{error:?}");
    let prefix = format!("the TLS CA file `{}` is not usable: ", garbled.display());
    assert!(error.to_string().starts_with(&prefix), "{error}");
    // A certificate with a key that is not its own.
    let error = connect(base, options().tls_client_cert(&cert, &server_key)).expect_err("not its key");
    assert_eq!(error.kind(), BrokerErrorKind::Config, "{error:?}");
    let message = error.to_string();
    let prefix = format!("the TLS client certificate `{cert}` with key `{}` is not usable: ", server_key.display());
    assert!(message.starts_with(&prefix) && message.contains("key values mismatch"), "{message}");
}
