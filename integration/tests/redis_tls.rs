//! TLS on the Redis broker, against a `redis-server` of the test's own that speaks TLS only,
//! with a throwaway CA made at test time: a custom CA trusted, an untrusted one refused,
//! mutual TLS (client certificate) refused without the certificate and accepted with it, a
//! whole call over TLS, `#insecure` warned about, and bad TLS files as configuration errors
//! that name the file and never the password.
#![cfg(feature = "redis-tls")]

use std::time::Duration;

use dingo::redis::{RedisBroker, RedisOptions};
use dingo::{App, BrokerError, BrokerErrorKind, EventKind, Level};
use dingo_test_support::PATIENCE;
use dingo_test_support::certs::Certs;
use dingo_test_support::faults::Seen;
use dingo_test_support::redis_server::Server;

/// Options that fail at once instead of waiting for a server that will not come.
fn options() -> RedisOptions {
    RedisOptions::new().namespace(dingo_test_support::unique("dingo-tls")).connect_retry(Duration::ZERO)
}

fn connect(url: &str, options: RedisOptions) -> Result<RedisBroker, BrokerError> {
    RedisBroker::connect_with(url, options)
}

/// A worker and a caller app on `broker`: one call of `tls.double` comes back right.
fn round_trip(broker: RedisBroker) {
    let app = App::builder().broker(broker).build().expect("app");
    app.register("tls.double", |(n,): (u64,)| n * 2).expect("register");
    app.allocate("tls.double", 1).expect("allocate");
    let mut handle = app.call::<_, u64>("tls.double", (21u64,)).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the call ran"), 42);
    app.close().expect("close");
}

#[test]
fn a_custom_ca_is_trusted_and_a_call_goes_over_tls() {
    let Some(certs) = Certs::generate() else { return };
    let Some(server) = Server::start_tls(&certs, certs.server(), false) else { return };
    let url = format!("{}/?cacertfile={}", server.url(), certs.ca().display());
    round_trip(connect(&url, options()).expect("connect with the CA in the URL"));
    round_trip(connect(&server.url(), options().tls_ca_file(certs.ca())).expect("connect with the CA option"));
}

/// The error of a refused connection: a configuration error (waiting would not help, so it
/// is not retried) whose message is `expected` with `{server}` for the server's URL.
fn assert_refused(result: Result<RedisBroker, BrokerError>, server: &Server, expected: &str) {
    let error = result.expect_err(expected);
    assert_eq!(error.kind(), BrokerErrorKind::Config, "{error:?}");
    assert_eq!(error.to_string(), expected.replace("{server}", &format!("redis at {}", server.url())));
}

/// A client without a certificate learns why only if the server's refusal reaches it: in
/// TLS 1.3 the server checks the client's certificate after the client's side of the
/// handshake is done, and its alert may be overtaken by the reset of a connection the client
/// has already written to. Then the error is the closed connection.
fn assert_refused_or_reset(result: Result<RedisBroker, BrokerError>, server: &Server, expected: &str) {
    let error = result.expect_err(expected);
    if error.kind() == BrokerErrorKind::Connection {
        let reset = format!(
            "cannot reach redis at {}: the connection was closed (not retried; is the server running and the URL right?)",
            server.url()
        );
        assert_eq!(error.to_string(), reset, "{error:?}");
        return;
    }
    assert_refused(Err(error), server, expected);
}

#[test]
fn an_untrusted_ca_is_refused() {
    let Some(certs) = Certs::generate() else { return };
    let Some(server) = Server::start_tls(&certs, certs.server(), false) else { return };
    let refused = "{server}: the server's TLS certificate was refused (self-signed certificate in certificate chain): \
                   give the CA that signed it with `cacertfile` (`tls_ca_file`), and connect by a name the \
                   certificate holds";
    // Another CA in place of the system's roots, and the system's roots (which know neither).
    assert_refused(connect(&server.url(), options().tls_ca_file(certs.other_ca())), &server, refused);
    assert_refused(connect(&server.url(), options()), &server, refused);
    // The right CA, a certificate for another host (the URL names 127.0.0.1).
    let Some(elsewhere) = Server::start_tls(&certs, certs.elsewhere(), false) else { return };
    assert_refused(
        connect(&elsewhere.url(), options().tls_ca_file(certs.ca())),
        &elsewhere,
        &refused.replace("self-signed certificate in certificate chain", "IP address mismatch"),
    );
}

#[test]
fn mutual_tls_needs_the_client_certificate() {
    let Some(certs) = Certs::generate() else { return };
    let Some(server) = Server::start_tls(&certs, certs.server(), true) else { return };
    assert_refused_or_reset(
        connect(&server.url(), options().tls_ca_file(certs.ca())),
        &server,
        "{server} refused the TLS connection (`certificate required`): it asks for a client certificate its CA \
         signed; give it with `certfile` and `keyfile` (`tls_client_cert`)",
    );
    let (cert, key) = certs.client();
    let url = format!(
        "{}/?cacertfile={}&certfile={}&keyfile={}",
        server.url(),
        certs.ca().display(),
        cert.display(),
        key.display()
    );
    round_trip(connect(&url, options()).expect("connect with the client certificate in the URL"));
    let options = options().tls_ca_file(certs.ca()).tls_client_cert(cert, key);
    round_trip(connect(&server.url(), options).expect("connect with the client certificate options"));
}

/// `#insecure` (the client library's URL fragment) turns verification off: the server's
/// certificate, from a CA nobody trusts here, is accepted, and every connection opened says
/// so to the apps' subscribers. A verified connection says nothing.
#[test]
fn insecure_is_warned_about() {
    let Some(certs) = Certs::generate() else { return };
    let Some(server) = Server::start_tls(&certs, certs.server(), false) else { return };
    let run = |broker: RedisBroker| {
        let app = App::builder().broker(broker).build().expect("app");
        let seen = Seen::watch(&app);
        app.register("tls.double", |(n,): (u64,)| n * 2).expect("register");
        app.allocate("tls.double", 1).expect("allocate");
        let mut handle = app.call::<_, u64>("tls.double", (21u64,)).expect("call");
        assert_eq!(handle.wait_timeout(PATIENCE).expect("the call ran"), 42);
        app.close().expect("close");
        seen
    };
    let mut seen = run(connect(&format!("{}#insecure", server.url()), options()).expect("no checks"));
    let warning = seen.wait_for(EventKind::TlsUnverified);
    assert_eq!(warning.level, Level::Warning);
    let (role, rest) = warning
        .message
        .strip_prefix("redis ")
        .and_then(|m| m.split_once(" connection to "))
        .unwrap_or_else(|| panic!("{}", warning.message));
    assert!(!role.is_empty());
    assert_eq!(
        rest,
        format!(
            "127.0.0.1:{} opened without TLS verification: the URL's `#insecure` turns the certificate and host \
             name checks off",
            server.port()
        )
    );
    let mut seen = run(connect(&server.url(), options().tls_ca_file(certs.ca())).expect("verified"));
    assert_eq!(seen.count(EventKind::TlsUnverified), 0);
}

/// Bad TLS settings fail at connect, before any connection is tried, as configuration errors
/// that name the file — and never show the URL's password.
#[test]
fn bad_tls_files_are_configuration_errors_naming_them() {
    let Some(certs) = Certs::generate() else { return };
    let dir = certs.dir().display().to_string();
    let garbled = certs.dir().join("garbled.pem");
    std::fs::write(&garbled, "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
        .expect("write");
    let (cert, key) = certs.client();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let base = "rediss://:sekrit@127.0.0.1:1";
    let cases = [
        (
            format!("{base}/?cacertfile={dir}/missing.pem"),
            format!("cannot read the TLS CA file `{dir}/missing.pem`: No such file or directory (os error 2)"),
        ),
        (
            format!("{base}/?cacertfile={dir}/ca.key"),
            format!("the TLS CA file `{dir}/ca.key` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"),
        ),
        (format!("{base}/?certfile={cert}"), format!("the TLS client certificate `{cert}` has no key: give `keyfile` too")),
        (
            format!("{base}/?certfile={cert}&keyfile={cert}"),
            format!("the TLS client key file `{cert}` holds no PEM private key (`-----BEGIN PRIVATE KEY-----`)"),
        ),
        (
            format!("redis://:sekrit@127.0.0.1:1/?cacertfile={dir}/ca.pem"),
            "redis URL redis://:***@127.0.0.1:1/: TLS files (`cacertfile`, `certfile`, `keyfile`) need a `rediss://` URL"
                .to_owned(),
        ),
        (
            format!("{base}/?certfile={cert}&keyfile={key}#insecure"),
            "redis URL rediss://:***@127.0.0.1:1/#insecure: `#insecure` turns certificate checks off, and the TLS files \
             given (`cacertfile`, `certfile`, `keyfile`) would be ignored: give one or the other"
                .to_owned(),
        ),
    ];
    for (url, expected) in cases {
        let error = connect(&url, options()).expect_err(&url);
        assert_eq!(error.kind(), BrokerErrorKind::Config, "{url}: {error:?}");
        assert_eq!(error.to_string(), expected, "{url}");
        assert!(!format!("{error:?}").contains("sekrit"), "{error:?}");
    }
    // A file that looks right but is not a certificate: the TLS library's words, and the file.
    let error = connect(&format!("{base}/?cacertfile={}", garbled.display()), options()).expect_err("garbled");
    assert_eq!(error.kind(), BrokerErrorKind::Config, "{error:?}");
    let prefix = format!("the TLS CA file `{}` is not usable: ", garbled.display());
    assert!(error.to_string().starts_with(&prefix), "{error}");
    // A certificate with a key that is not its own.
    let (_, server_key) = certs.server();
    let options = options().tls_client_cert(&cert, &server_key);
    let error = connect(&format!("{base}/"), options).expect_err("not its key");
    assert_eq!(error.kind(), BrokerErrorKind::Config, "{error:?}");
    let message = error.to_string();
    let prefix = format!("the TLS client certificate `{cert}` with key `{}` is not usable: ", server_key.display());
    assert!(message.starts_with(&prefix) && message.contains("key values mismatch"), "{message}");
}
