//! The conformance suite on Redis: as task transport, as report transport, and both; and
//! the App-level suite with Redis in one role and the serialized local broker in the other;
//! all of it again as a least-privilege user. The App-level suite runs awaited (as well as
//! blocking) in `both` only: what wakes an awaiting caller is its report transport, Redis
//! there and the serialized local broker (awaited in `conformance_local`) or Redis again in
//! the other setups; the restricted user changes which commands run, not how calls wait.
#![cfg(feature = "redis")]

mod both {
    use dingo_test_support::redis::Redis;

    dingo_test_support::transport_suite!(Redis::setup());
    dingo_test_support::reports_suite!(Redis::setup());
    dingo_test_support::app_suite!(Redis::setup());
    dingo_test_support::lifecycle_suite!(Redis::setup());
    dingo_test_support::control_suite!(Redis::setup());
    dingo_test_support::async_task_suite!(Redis::setup());
}

/// The same suites as a least-privilege Redis user (`dingo::redis::acl_rules`: no
/// `@dangerous` command, no key outside the namespace) on a private server per test.
mod restricted {
    use dingo_test_support::redis::Redis;

    dingo_test_support::transport_suite!(Redis::restricted());
    dingo_test_support::reports_suite!(Redis::restricted());
    dingo_test_support::app_suite!(Redis::restricted(), waiters = [blocking]);
    dingo_test_support::lifecycle_suite!(Redis::restricted());
    dingo_test_support::control_suite!(Redis::restricted());
    dingo_test_support::async_task_suite!(Redis::restricted());
}

mod restricted_redis_tasks_local_reports {
    use dingo_test_support::redis::{Mixed, Role};

    dingo_test_support::app_suite!(Mixed::restricted(Role::Tasks), waiters = [blocking]);
    dingo_test_support::lifecycle_suite!(Mixed::restricted(Role::Tasks));
    dingo_test_support::control_suite!(Mixed::restricted(Role::Tasks));
    dingo_test_support::async_task_suite!(Mixed::restricted(Role::Tasks));
}

mod local_tasks_restricted_redis_reports {
    use dingo_test_support::redis::{Mixed, Role};

    dingo_test_support::app_suite!(Mixed::restricted(Role::Reports), waiters = [blocking]);
    dingo_test_support::lifecycle_suite!(Mixed::restricted(Role::Reports));
    dingo_test_support::control_suite!(Mixed::restricted(Role::Reports));
    dingo_test_support::async_task_suite!(Mixed::restricted(Role::Reports));
}

mod redis_tasks_local_reports {
    use dingo_test_support::redis::{Mixed, Role};

    dingo_test_support::app_suite!(Mixed::setup(Role::Tasks), waiters = [blocking]);
    dingo_test_support::lifecycle_suite!(Mixed::setup(Role::Tasks));
    dingo_test_support::control_suite!(Mixed::setup(Role::Tasks));
    dingo_test_support::async_task_suite!(Mixed::setup(Role::Tasks));
}

mod local_tasks_redis_reports {
    use dingo_test_support::redis::{Mixed, Role};

    dingo_test_support::app_suite!(Mixed::setup(Role::Reports), waiters = [blocking]);
    dingo_test_support::lifecycle_suite!(Mixed::setup(Role::Reports));
    dingo_test_support::control_suite!(Mixed::setup(Role::Reports));
    dingo_test_support::async_task_suite!(Mixed::setup(Role::Reports));
}

/// `App::connect` with a `redis://` URL (the facade's `redis` feature registers the scheme),
/// its query choosing the namespace: a worker app and a caller app meet on it.
#[test]
fn app_connects_by_url() {
    use dingo::App;
    use dingo_test_support::PATIENCE;
    use dingo_test_support::redis::Redis;

    let Some(setup) = Redis::setup() else { return };
    let url = format!("{}?namespace={}&lease_ms=2000", setup.url(), setup.options().namespace);
    let worker = App::connect(&url).expect("worker app by URL");
    worker.register("by_url.triple", |n: i64| n * 3).expect("register");
    worker.allocate("by_url.triple", 1).expect("allocate");
    let caller = App::connect(&url).expect("caller app by URL");
    let mut handle = caller.call::<_, i64>("by_url.triple", 14i64).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 42);
    // The namespace came from the URL: an app built on the setup's options reaches the worker.
    let direct = App::builder().broker(setup.broker()).build().expect("caller app by options");
    let mut handle = direct.call::<_, i64>("by_url.triple", 5i64).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 15);
    direct.close().expect("close");
    caller.close().expect("close");
    worker.close().expect("close");
    let error = App::connect("redis://127.0.0.1:6379/?lease_ms=soon").expect_err("a bad option is an error");
    let message = dingo::error::chain(&error);
    assert!(message.contains("lease_ms"), "{message}");
}

/// 2,000 calls in flight through one worker app with two threads: every task is fetched
/// exactly once and settled once, and no fetch is mistaken for the retry of a lost one
/// (settlements and fetches share a round trip; their batch numbers must rise in the order
/// they run).
#[test]
fn a_busy_worker_fetches_each_task_once() {
    use dingo::App;
    use dingo_test_support::PATIENCE;
    use dingo_test_support::redis::Redis;

    let Some(setup) = Redis::setup() else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    worker.register("busy.inc", |n: u64| n + 1).expect("register");
    worker.allocate("busy.inc", 2).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let handles: Vec<_> = (0..2_000u64).map(|n| caller.call::<_, u64>("busy.inc", n).expect("call")).collect();
    for (n, mut handle) in (0u64..).zip(handles) {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), n + 1);
    }
    caller.close().expect("close");
    worker.close().expect("close");
    assert_eq!(worker_broker.stats().fetched, 2_000, "each task fetched once");
    assert_eq!(worker_broker.stats().completed, 2_000, "each task settled once");
    assert_eq!(worker_broker.stats().fetches_replayed, 0, "no fetch was answered as a retry");
}

/// A quick task's result does not wait for the slow task fetched after it: one worker
/// thread takes both in one fetch (settlements ride with the worker's next round trip,
/// which comes only after the slow task), yet the quick call's result arrives while the
/// slow task still runs — the flusher stores parked settlements; and both settle once.
#[test]
fn a_quick_result_does_not_wait_for_the_slow_task_after_it() {
    use std::time::{Duration, Instant};

    use dingo::App;
    use dingo_test_support::PATIENCE;
    use dingo_test_support::redis::Redis;

    let Some(setup) = Redis::setup() else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    worker
        .register("flush.nap", |millis: u64| {
            std::thread::sleep(Duration::from_millis(millis));
            millis
        })
        .expect("register");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    // Both queued before the worker starts: its first fetch takes the two together.
    let mut quick = caller.call::<_, u64>("flush.nap", 0u64).expect("call");
    let mut slow = caller.call::<_, u64>("flush.nap", 3_000u64).expect("call");
    let start = Instant::now();
    worker.allocate("flush.nap", 1).expect("allocate");
    assert_eq!(quick.wait_timeout(PATIENCE).expect("the quick result"), 0);
    let quick_after = start.elapsed();
    assert!(quick_after < Duration::from_millis(1_500), "the quick result took {quick_after:?}");
    assert_eq!(slow.wait_timeout(PATIENCE).expect("the slow result"), 3_000);
    assert!(start.elapsed() >= Duration::from_millis(3_000));
    caller.close().expect("close");
    worker.close().expect("close");
    assert_eq!(worker_broker.stats().fetched, 2, "one fetch took both");
    assert_eq!(worker_broker.stats().completed, 2, "each task settled once");
}

/// A task message over `max_message_size` is refused at the call with `TooLarge`, and
/// nothing is queued; calls under the limit go on.
#[test]
fn a_task_message_over_the_size_limit_is_refused() {
    use dingo::redis::RedisOptions;
    use dingo::{App, BrokerErrorKind, Error};
    use dingo_test_support::PATIENCE;
    use dingo_test_support::redis::Redis;

    let Some(setup) = Redis::with_options(RedisOptions::new().max_message_size(1024)) else { return };
    let app = App::builder().broker(setup.broker()).build().expect("app");
    app.register("size.len", |v: Vec<u8>| v.len()).expect("register");
    app.allocate("size.len", 1).expect("allocate");
    let err = app.call::<_, usize>("size.len", vec![7u8; 4096]).expect_err("too large");
    assert!(matches!(&err, Error::Broker(e) if e.kind() == BrokerErrorKind::TooLarge), "{err:?}");
    let mut handle = app.call::<_, usize>("size.len", vec![7u8; 100]).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("result"), 100);
    app.close().expect("close");
}

/// A report for a caller that never reads it expires with the result TTL: its reply list
/// (and the list's wake-up token) carry the TTL, so a caller that went away leaves nothing
/// behind for longer.
#[test]
fn reports_nobody_reads_expire_with_the_result_ttl() {
    use std::time::{Duration, Instant};

    use dingo::broker::Reporter;
    use dingo::message::{ReplyTo, ReportBody, ReportMessage, Value};
    use dingo::redis::RedisOptions;
    use dingo_test_support::PATIENCE;
    use dingo_test_support::redis::{Redis, redis_cli};

    let ttl = Duration::from_secs(90);
    let Some(setup) = Redis::with_options(RedisOptions::new().result_ttl(ttl)) else { return };
    let broker = setup.broker();
    let report = ReportMessage {
        name: "ttl.task".into(),
        id: "call-1".into(),
        body: ReportBody::Success(Value::Encoded(dingo::codec::Encoded::new(1, vec![42]))),
    };
    broker.finish(&ReplyTo::Address("gone-caller".into()), report, None).expect("finish");
    let namespace = &setup.options().namespace;
    for list in ["reply", "notify"] {
        let key = format!("{namespace}:{{ttl.task}}:{list}:gone-caller");
        let deadline = Instant::now() + PATIENCE;
        let pttl = loop {
            let pttl: i64 = redis_cli(setup.url(), &["PTTL", &key]).parse().expect("PTTL");
            if pttl > 0 || Instant::now() > deadline {
                break pttl;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(pttl > 0 && pttl <= ttl.as_millis() as i64, "{key}: PTTL {pttl}");
    }
    broker.shutdown();
}

/// Many calls waiting at once cost no connection each: one listener per process serves
/// them all (the apps' connections at the server do not grow while 200 calls wait on 200
/// threads).
#[test]
fn many_waiting_calls_share_one_listener() {
    use std::time::Duration;

    use dingo::App;
    use dingo_test_support::PATIENCE;
    use dingo_test_support::redis::{Redis, redis_cli};

    let Some(setup) = Redis::setup() else { return };
    // This test's connections: dingo names them `dingo:NAMESPACE:PROCESS:ROLE`.
    let ours = format!("name=dingo:{}:", setup.options().namespace);
    let clients = || redis_cli(setup.url(), &["CLIENT", "LIST"]).lines().filter(|c| c.contains(&ours)).count();
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker
        .register("many.nap", |millis: u64| {
            std::thread::sleep(Duration::from_millis(millis));
            millis
        })
        .expect("register");
    worker.allocate("many.nap", 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    // Warm up: a short call, then one long enough that the worker's settlements are stored
    // by its flusher meanwhile (every thread that connects lazily has connected).
    for millis in [0, 50] {
        let mut warm = caller.call::<_, u64>("many.nap", millis).expect("call");
        assert_eq!(warm.wait_timeout(PATIENCE).expect("result"), millis);
    }
    let before = clients();
    // The worker's one thread naps for a second while 200 calls queue behind it and wait.
    let blocker = caller.call::<_, u64>("many.nap", 1_000u64).expect("call");
    let waiting: Vec<_> = (0..200)
        .map(|_| {
            let handle = caller.call::<_, u64>("many.nap", 0u64).expect("call");
            std::thread::spawn(move || handle.wait().expect("result"))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let during = clients();
    assert!(before > 0, "the connections are named");
    // A thread that connects late may add one or two; a connection per call would add 200.
    assert!(during <= before + 2, "{before} connections before, {during} with 200 calls waiting");
    assert_eq!(blocker.wait().expect("the long nap"), 1_000);
    for thread in waiting {
        assert_eq!(thread.join().expect("waiting thread"), 0);
    }
    caller.close().expect("close");
    worker.close().expect("close");
}
