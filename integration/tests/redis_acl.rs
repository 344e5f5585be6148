//! Redis users denied what dingo needs, on a private server with an ACL file: connecting
//! fails at once with an error that names what is missing, and takes nothing from the
//! queues. (A least-privilege user that has everything runs the whole conformance suite, in
//! `conformance_redis.rs`, and the fencing faults, in `redis_leases.rs`.)
#![cfg(feature = "redis")]

use std::time::{Duration, Instant};

use dingo::redis::{RedisBroker, RedisOptions, acl_rules};
use dingo::{App, BrokerErrorKind, CallOptions};
use dingo_test_support::faults::wait_until;
use dingo_test_support::redis_server::Server;

const NAMESPACE: &str = "acl-test";
const TASK: &str = "acl.double";
const PASSWORD: &str = "acl-secret";

/// A private server whose users are `default` (anything, no password) and, per entry, a
/// user with `rules` appended to the least-privilege rules of [`NAMESPACE`] (or, with
/// `own: false`, `rules` alone).
fn server(users: &[(&str, bool, &str)]) -> Option<Server> {
    let mut acl = String::from("user default on nopass ~* &* +@all\n");
    for (name, own, rules) in users {
        let base = if *own { acl_rules(NAMESPACE) } else { String::new() };
        acl.push_str(&format!("user {name} on >{PASSWORD} {base} {rules}\n"));
    }
    Server::start_with_users(&acl, &[])
}

fn url(server: &Server, user: &str) -> String {
    format!("redis://{user}:{PASSWORD}@127.0.0.1:{}", server.port())
}

fn options() -> RedisOptions {
    RedisOptions::new().namespace(NAMESPACE)
}

/// Connects as `user`, which must fail at once (not after the start-up retry) with a
/// `Config` error whose message holds `expected`. Should it connect, a worker runs on it for
/// a second, and the test fails saying what the worker took.
fn refused(server: &Server, user: &str, expected: &str) {
    let started = Instant::now();
    match RedisBroker::connect_with(&url(server, user), options()) {
        Err(error) => {
            let message = error.to_string();
            assert_eq!(error.kind(), BrokerErrorKind::Config, "{user}: {message}");
            assert!(message.contains(expected), "{user}: {message:?} should name {expected:?}");
            assert!(!message.contains(PASSWORD), "{user}: the password shows: {message}");
            let took = started.elapsed();
            assert!(took < Duration::from_secs(2), "{user}: refused only after {took:?}");
        }
        Ok(broker) => {
            let worker = App::builder().broker(broker.clone()).build().expect("worker app");
            worker.register(TASK, |n: u64| n * 2).expect("register");
            worker.allocate(TASK, 1).expect("allocate");
            std::thread::sleep(Duration::from_secs(1));
            let left = broker.queue_len(TASK);
            let _ = worker.close();
            panic!("{user} connected (expected an error naming {expected}); the queue holds {left:?} of 2");
        }
    }
}

/// Users denied one command dingo needs, or two, or the namespace's keys, are refused when
/// their broker connects, by the name of what they miss — before a worker could take a
/// task: an at-most-once task waiting in the queue (which a worker takes with a plain
/// `RPOP`, and whose report it could then never store) stays there, and so does an
/// at-least-once one.
#[test]
fn a_user_denied_what_dingo_needs_cannot_connect_and_takes_nothing() {
    let Some(server) = server(&[
        ("no-evalsha", true, "-evalsha"),
        ("no-rpop", true, "-rpop"),
        ("no-script-load", true, "-script|load"),
        ("no-lpush-zadd", true, "-lpush -zadd"),
        ("other-keys", false, &acl_rules("other")),
    ]) else {
        return;
    };
    let admin = RedisBroker::connect_with(&server.url(), options()).expect("connect as default");
    let caller = App::builder().broker(admin.clone()).build().expect("caller app");
    caller.register(TASK, |n: u64| n * 2).expect("declare the task");
    let mut at_most_once =
        caller.call_with::<_, u64>(TASK, &CallOptions::new().at_most_once(true), 1u64).expect("call");
    let mut at_least_once = caller.call::<_, u64>(TASK, 2u64).expect("call");
    wait_until("both calls are queued", || admin.stats().sent == 2);
    assert_eq!(admin.queue_len(TASK).expect("queue length"), 2);

    refused(&server, "no-evalsha", "may not run EVALSHA, which dingo needs");
    refused(&server, "no-rpop", "may not run RPOP on the keys of namespace `acl-test`");
    refused(&server, "no-script-load", "may not run SCRIPT LOAD");
    refused(&server, "no-lpush-zadd", "may not run LPUSH, ZADD on the keys of namespace `acl-test`");
    refused(&server, "other-keys", "may not use the keys of namespace `acl-test`");

    assert_eq!(admin.queue_len(TASK).expect("queue length"), 2, "nothing was taken");
    // Both run once a worker that may do everything comes.
    caller.allocate(TASK, 1).expect("allocate");
    assert_eq!(at_most_once.wait_timeout(dingo_test_support::PATIENCE).expect("result"), 2);
    assert_eq!(at_least_once.wait_timeout(dingo_test_support::PATIENCE).expect("result"), 4);
    caller.close().expect("close");
}

/// The server's version comes from `HELLO`, or from `INFO` where the server does not answer
/// `HELLO` (older than 6.0, or renamed away as here): a user allowed `INFO` connects (and
/// runs a call), one denied it is told what to grant.
#[test]
fn the_version_comes_from_info_where_the_server_does_not_answer_hello() {
    let users = format!(
        "user default on nopass ~* &* +@all\nuser info on >{PASSWORD} {} +info\nuser no-info on >{PASSWORD} {}\n",
        acl_rules(NAMESPACE),
        acl_rules(NAMESPACE)
    );
    let Some(server) = Server::start_with_users(&users, &["--rename-command", "HELLO", ""]) else { return };
    let broker = RedisBroker::connect_with(&url(&server, "info"), options()).expect("connect with INFO");
    let app = App::builder().broker(broker).build().expect("app");
    app.register(TASK, |n: u64| n * 2).expect("register");
    app.allocate(TASK, 1).expect("allocate");
    let mut handle = app.call::<_, u64>(TASK, 21u64).expect("call");
    assert_eq!(handle.wait_timeout(dingo_test_support::PATIENCE).expect("result"), 42);
    app.close().expect("close");
    refused(&server, "no-info", "it does not answer HELLO, and the user may not run INFO (grant `+info`)");
}

/// The README shows the least-privilege line as `acl_rules` makes it.
#[test]
fn the_readme_shows_the_rules() {
    let line = format!("  user shop-app on >PASSWORD {}\n", acl_rules("shop"));
    assert!(include_str!("../../README.md").contains(&line), "the README should show {line}");
}
