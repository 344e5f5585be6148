//! Starting with the broker down: `connect` waits for a server that is not up yet (its
//! `connect_retry`), fails at once on what waiting cannot fix (bad credentials, a bad URL),
//! and, when it gives up, says which URL and why — in the error's `Display`, and in what the
//! example programs print.
#![cfg(any(feature = "redis", feature = "amqp"))]

use std::net::TcpListener;
use std::time::Duration;

/// A port nothing listens on (bound, then released: connections to it are refused).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port()
}

/// Asserts that `took` is about `patience`: not shorter, and not much longer.
fn about(took: Duration, patience: Duration) {
    assert!(took >= patience, "gave up after {took:?}, before its {patience:?}");
    assert!(took < patience + Duration::from_secs(2), "gave up after {took:?}, long after its {patience:?}");
}

// The tasks of the example programs, to call what the worker process runs.
#[cfg(feature = "redis")]
#[allow(dead_code)]
#[path = "../../examples/shared/tasks.rs"]
mod tasks;

#[cfg(feature = "redis")]
mod redis {
    use std::time::{Duration, Instant};

    use dingo::redis::{RedisBroker, RedisOptions};
    use dingo::{App, BrokerErrorKind, Error};
    use dingo_test_support::PATIENCE;
    use dingo_test_support::faults::wait_until;
    use dingo_test_support::process::{Examples, Proc};
    use dingo_test_support::redis::Redis;
    use dingo_test_support::redis_server::Server;

    use super::{about, closed_port, tasks};

    /// The example programs, built with this test's features.
    const EXAMPLES: Examples = dingo_test_support::examples!["redis_worker", "redis_caller"];

    /// A private `redis-server` on `port`, started now (it answers, if only `NOAUTH`), killed
    /// on drop.
    fn start(port: u16, args: &[&str]) -> Server {
        let mut server = Server::on(port, args);
        server.spawn();
        server
    }

    fn patient(patience: Duration) -> RedisOptions {
        RedisOptions::new().namespace(dingo_test_support::unique("dingo-test")).connect_retry(patience)
    }

    /// Nothing listens: `connect` tries for its `connect_retry`, then fails with the URL (no
    /// password) and the reason in its message; `App::connect` takes the same from the URL.
    #[test]
    fn connecting_to_a_closed_port_fails_after_the_deadline_saying_where_and_why() {
        let port = closed_port();
        let patience = Duration::from_millis(700);
        let started = Instant::now();
        let error = RedisBroker::connect_with(&format!("redis://:secret@127.0.0.1:{port}/0"), patient(patience))
            .expect_err("nothing listens");
        about(started.elapsed(), patience);
        assert_eq!(error.kind(), BrokerErrorKind::Connection);
        assert_eq!(
            error.to_string(),
            format!(
                "cannot reach redis at redis://:***@127.0.0.1:{port}/0: connection refused \
                 (tried for 700ms; is the server running and the URL right?)"
            )
        );

        let started = Instant::now();
        let error = App::connect(&format!("redis://127.0.0.1:{port}?connect_retry_s=1")).expect_err("nothing listens");
        about(started.elapsed(), Duration::from_secs(1));
        assert_eq!(
            dingo::error::chain(&error),
            format!(
                "broker failure: cannot reach redis at redis://127.0.0.1:{port}: connection refused \
                 (tried for 1s; is the server running and the URL right?): Connection refused (os error 111)"
            )
        );
    }

    /// Bad credentials and a misspelt option fail at once, not after the deadline.
    #[test]
    fn bad_credentials_and_unknown_options_fail_at_once() {
        let Some(setup) = Redis::setup() else { return };
        let url = setup.url().replacen("redis://", "redis://dingo-nobody:wrong@", 1);
        let started = Instant::now();
        let error = RedisBroker::connect_with(&url, patient(Duration::from_secs(20))).expect_err("wrong password");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert_eq!(error.kind(), BrokerErrorKind::Config);
        let shown = setup.url().replacen("redis://", "redis://dingo-nobody:***@", 1);
        assert_eq!(
            error.to_string(),
            format!("redis at {shown} refused the credentials: check the user and password in the URL")
        );

        let started = Instant::now();
        let error = App::connect(&format!("{}?namespace=a&nmespace=b", setup.url())).expect_err("misspelt option");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        let Error::Broker(error) = error else { panic!("not a broker error: {error:?}") };
        assert_eq!(error.kind(), BrokerErrorKind::Config);
        assert!(
            error.to_string().ends_with(
                ": unknown option `nmespace` (known: namespace, lease_ms, prefetch, batch, \
                 result_ttl_s, block_timeout_ms, max_redeliveries, wait_spin_us, connect_retry_s, max_unclaimed, \
                 max_unclaimed_bytes, cacertfile, certfile, keyfile, max_message_size, max_dead_letters, \
                 max_dead_letter_bytes, protocol, db, user, pass)"
            ),
            "{error}"
        );
    }

    /// A server that wants a password, given none (`NOAUTH`): at once too.
    #[test]
    fn a_missing_password_fails_at_once() {
        if !Server::installed() {
            return;
        }
        let port = closed_port();
        let _server = start(port, &["--requirepass", "secret"]);
        let started = Instant::now();
        let error = RedisBroker::connect_with(&format!("redis://127.0.0.1:{port}"), patient(Duration::from_secs(20)))
            .expect_err("no password");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        assert_eq!(error.kind(), BrokerErrorKind::Config);
        assert_eq!(
            error.to_string(),
            format!(
                "redis at redis://127.0.0.1:{port} refused the credentials: check the user and password in the URL"
            )
        );
        let broker = RedisBroker::connect_with(&format!("redis://:secret@127.0.0.1:{port}"), patient(Duration::ZERO));
        broker.expect("the right password");
    }

    /// The server starts a second after `connect` began: `connect` waits for it, and calls
    /// through the broker work.
    #[test]
    fn a_server_that_comes_up_during_the_wait_is_connected_and_serves() {
        if !Server::installed() {
            return;
        }
        let port = closed_port();
        let url = format!("redis://127.0.0.1:{port}");
        let options = patient(Duration::from_secs(20));
        let started = Instant::now();
        let connecting = std::thread::spawn(move || RedisBroker::connect_with(&url, options));
        std::thread::sleep(Duration::from_secs(1));
        assert!(!connecting.is_finished(), "connect returned before the server was there");
        let _server = start(port, &[]);
        let broker = connecting.join().expect("the connecting thread").expect("connected once the server came up");
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "connected after {took:?}");

        let app = App::builder().broker(broker).build().expect("app");
        app.register("startup.double", |n: u64| n * 2).expect("register");
        app.allocate("startup.double", 2).expect("workers");
        let doubled: Vec<u64> = (0..5u64)
            .map(|n| app.call::<_, u64>("startup.double", n).expect("call").wait_timeout(PATIENCE).expect("result"))
            .collect();
        assert_eq!(doubled, [0, 2, 4, 6, 8]);
        app.close().expect("close");
    }

    /// A replica refuses every write (`READONLY`): `connect` waits for it to become the
    /// primary (a failover), as for a server not up yet, then says what is wrong; promoted
    /// meanwhile, it is used.
    #[test]
    fn a_replica_is_waited_for_then_refused_and_used_once_promoted() {
        let Some(primary) = Server::start_fresh() else { return };
        let port = primary.port().to_string();
        let Some(replica) = Server::start_with(&["--replicaof", "127.0.0.1", &port]) else { return };
        let started = Instant::now();
        let Err(error) = RedisBroker::connect_with(&replica.url(), patient(Duration::from_millis(600))) else {
            panic!("a replica is refused")
        };
        about(started.elapsed(), Duration::from_millis(600));
        assert_eq!(error.kind(), BrokerErrorKind::Connection);
        assert!(
            error
                .to_string()
                .contains(": the server is a replica, which refuses writes: dingo needs the primary (tried"),
            "{error}"
        );

        let promote = {
            let url = replica.url();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(500));
                dingo_test_support::redis::redis_cli(&url, &["REPLICAOF", "NO", "ONE"])
            })
        };
        let broker = RedisBroker::connect_with(&replica.url(), patient(PATIENCE)).expect("promoted meanwhile");
        assert_eq!(promote.join().expect("promote"), "OK");
        let app = App::builder().broker(broker).build().expect("app");
        app.register("startup.double", |(n,): (u64,)| n * 2).expect("register");
        app.allocate("startup.double", 1).expect("allocate");
        let doubled = app.call::<_, u64>("startup.double", (21u64,)).expect("call").wait_timeout(PATIENCE);
        assert_eq!(doubled.expect("result"), 42);
        app.close().expect("close");
    }

    /// The example caller with nothing at its URL: prints where it connects, then the
    /// error with its chain (the variable, the URL, the reason), and exits with code 1.
    #[test]
    fn the_example_caller_against_a_closed_port_says_which_url_and_why() {
        let port = closed_port();
        let url = format!("redis://127.0.0.1:{port}");
        let env = [("DINGO_REDIS_URL", url.as_str()), ("DINGO_CONNECT_RETRY_S", "1")];
        let mut caller = Proc::spawn(&EXAMPLES, "redis_caller", &["--calls", "1"], &env);
        let status = caller.wait(Duration::from_secs(30));
        assert_eq!(status.code(), Some(1), "stdout:\n{}\nstderr:\n{}", caller.stdout(), caller.stderr());
        assert_eq!(caller.stdout(), "");
        assert_eq!(
            caller.stderr().lines().collect::<Vec<_>>(),
            [
                format!("connecting to {url} (from DINGO_REDIS_URL; waiting up to 1s for it)"),
                format!(
                    "Error: connecting to the server of DINGO_REDIS_URL: cannot reach redis at {url}: connection \
                     refused (tried for 1s; is the server running and the URL right?): Connection refused (os error 111)"
                ),
            ]
        );
    }

    /// The example worker started two seconds before its Redis server: it waits, and once
    /// the server is up it serves (three calls from this process), then stops as told.
    #[test]
    fn the_example_worker_started_before_its_broker_waits_and_then_serves() {
        if !Server::installed() {
            return;
        }
        let port = closed_port();
        // Built before the clock starts: a first build takes longer than the wait.
        dingo_test_support::process::example(&EXAMPLES, "redis_worker");
        let url = format!("redis://127.0.0.1:{port}");
        let namespace = dingo_test_support::unique("dingo-test");
        let env = [("DINGO_REDIS_URL", url.as_str()), ("DINGO_NAMESPACE", namespace.as_str())];
        let mut worker = Proc::spawn(&EXAMPLES, "redis_worker", &["--tasks", "3", "--threads", "2"], &env);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(worker.stdout(), "", "the worker is not ready without its server");
        let _server = start(port, &[]);
        wait_until("the worker is ready", || worker.stdout().contains("worker ready"));

        let options = RedisOptions::new().namespace(namespace.as_str());
        let caller = App::builder().broker(RedisBroker::connect_with(&url, options).expect("connect")).build();
        let caller = caller.expect("caller app");
        let sums: Vec<i64> = (0..3)
            .map(|i| tasks::add::call(&caller, i, 10).expect("call").wait_timeout(PATIENCE).expect("served"))
            .collect();
        assert_eq!(sums, [10, 11, 12]);
        let status = worker.wait(Duration::from_secs(30));
        assert!(status.success(), "the worker failed: {status}; stderr:\n{}", worker.stderr());
        assert_eq!(
            worker.stdout().lines().collect::<Vec<_>>(),
            [
                "worker ready: 2 thread(s) serving example.add, example.total, example.slow_echo, example.crash_if",
                "worker done after 3 task(s)"
            ]
        );
        assert_eq!(
            worker.stderr().lines().collect::<Vec<_>>(),
            [format!("connecting to {url} (from DINGO_REDIS_URL; waiting up to 30s for it)")]
        );
        caller.close().expect("close");
    }
}

#[cfg(feature = "amqp")]
mod amqp {
    use std::time::{Duration, Instant};

    use dingo::amqp::{AmqpBroker, AmqpOptions};
    use dingo::{App, BrokerErrorKind};
    use dingo_test_support::PATIENCE;
    use dingo_test_support::amqp::Amqp;
    use dingo_test_support::faults::{server_addr, via};
    use dingo_test_support::proxy::Proxy;

    use super::{about, closed_port};

    /// Nothing listens: `connect` tries for its `connect_retry`, then says where and why.
    #[test]
    fn connecting_to_a_closed_port_fails_after_the_deadline_saying_where_and_why() {
        let port = closed_port();
        let patience = Duration::from_millis(700);
        let started = Instant::now();
        let options = AmqpOptions::new().connect_retry(patience);
        let error = AmqpBroker::connect_with(&format!("amqp://guest:secret@127.0.0.1:{port}/%2f"), options)
            .expect_err("nothing listens");
        about(started.elapsed(), patience);
        assert_eq!(error.kind(), BrokerErrorKind::Connection);
        assert_eq!(
            error.to_string(),
            format!(
                "cannot reach RabbitMQ at amqp://guest@127.0.0.1:{port}/%2F: connection refused \
                 (tried for 700ms; is the server running and the URL right?)"
            )
        );
    }

    /// A wrong password and a virtual host that does not exist fail at once.
    #[test]
    fn bad_credentials_and_a_missing_virtual_host_fail_at_once() {
        let Some(setup) = Amqp::setup() else { return };
        let addr = server_addr(setup.url());
        let options = AmqpOptions::new().connect_retry(Duration::from_secs(20));
        let started = Instant::now();
        let error = AmqpBroker::connect_with(&format!("amqp://guest:wrong@{addr}/%2f"), options.clone())
            .expect_err("wrong password");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert_eq!(error.kind(), BrokerErrorKind::Config);
        assert_eq!(
            error.to_string(),
            format!(
                "RabbitMQ at amqp://guest@{addr}/%2F refused the credentials: check the user and password in the URL"
            )
        );

        let started = Instant::now();
        let error = AmqpBroker::connect_with(&format!("amqp://guest:guest@{addr}/dingo-no-such-vhost"), options)
            .expect_err("no such virtual host");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert_eq!(error.kind(), BrokerErrorKind::Config);
        assert_eq!(
            error.to_string(),
            format!(
                "RabbitMQ at amqp://guest@{addr}/dingo-no-such-vhost refused access to virtual host \
                 `dingo-no-such-vhost`: check that it exists and that user `guest` may use it"
            )
        );
    }

    /// RabbitMQ behind a proxy that refuses connections, then forwards them a second after
    /// `connect` began: `connect` waits, and calls through the broker work.
    #[test]
    fn a_server_that_comes_up_during_the_wait_is_connected_and_serves() {
        let Some(setup) = Amqp::setup() else { return };
        let proxy = Proxy::start(server_addr(setup.url())).expect("proxy");
        proxy.pause();
        let url = via(&proxy, setup.url());
        let options = setup.options().clone().connect_retry(Duration::from_secs(20));
        let started = Instant::now();
        let connecting = std::thread::spawn(move || AmqpBroker::connect_with(&url, options));
        std::thread::sleep(Duration::from_secs(1));
        assert!(!connecting.is_finished(), "connect returned while every connection was refused");
        assert!(proxy.refused() >= 2, "tried again: {} refusal(s)", proxy.refused());
        proxy.resume();
        let broker = connecting.join().expect("the connecting thread").expect("connected once the proxy forwards");
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "connected after {took:?}");
        setup.adopt(broker.clone());

        let worker = App::builder().broker(setup.broker()).build().expect("worker app");
        worker.register("startup.triple", |n: u64| n * 3).expect("register");
        worker.allocate("startup.triple", 2).expect("workers");
        let caller = App::builder().broker(broker).build().expect("caller app");
        caller.register("startup.triple", |n: u64| n * 3).expect("register");
        let tripled: Vec<u64> = (0..4u64)
            .map(|n| caller.call::<_, u64>("startup.triple", n).expect("call").wait_timeout(PATIENCE).expect("result"))
            .collect();
        assert_eq!(tripled, [0, 3, 6, 9]);
        caller.close().expect("close the caller");
        worker.close().expect("close the worker");
    }
}
