//! Redis refuses a command: a task message whose list key holds a string fails its call at
//! once, and a least-privilege user, refused `SORT` and `CLIENT KILL`, still runs tasks.
#![cfg(feature = "redis")]

use dingo::App;
use dingo_test_support::PATIENCE;
use dingo_test_support::redis::{Redis, command_stats, redis_cli};

/// A least-privilege Redis user (`dingo::redis::acl_rules`: no `@dangerous` command, so
/// neither `CLIENT KILL` nor `SORT`, and no key outside the namespace) still runs tasks, at
/// least once and at most once: sends go as scripts from the start and fetches move tasks
/// through Lua.
#[test]
fn a_user_without_dangerous_commands_still_runs_tasks() {
    let Some(setup) = Redis::restricted() else { return };
    let app = App::builder().broker(setup.broker()).build().expect("app");
    app.register("faults.restricted", |(n,): (u64,)| n * 2).expect("register");
    app.allocate("faults.restricted", 2).expect("allocate");
    let at_most_once = dingo::CallOptions::new().at_most_once(true);
    let handles: Vec<_> = (0..200u64)
        .map(|n| {
            let options = if n % 2 == 0 { dingo::CallOptions::new() } else { at_most_once.clone() };
            (n, app.call_with::<_, u64>("faults.restricted", &options, (n,)).expect("call"))
        })
        .collect();
    for (n, mut handle) in handles {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("the call ran"), n * 2);
    }
    app.close().expect("close");
    let sort = command_stats(setup.admin_url()).remove("sort").expect("fetches tried SORT");
    assert_eq!(sort.calls, 0, "{sort:?}");
    assert!(sort.rejected >= 1, "SORT was refused: {sort:?}");
}

/// Redis refuses a task message (the key of its list holds a string): the call fails at
/// once saying so, instead of waiting for a result — at most once or at least once; with
/// the key fixed, calls work.
#[test]
fn a_refused_send_fails_its_call() {
    let Some(setup) = Redis::setup() else { return };
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    worker.register("faults.refused", |(n,): (u64,)| n).expect("register");
    let at_most_once = dingo::CallOptions::new().at_most_once(true);
    let at_least_once = dingo::CallOptions::new();
    for (options, list) in [(&at_most_once, "amo"), (&at_least_once, "pending")] {
        let list = format!("{}:{{faults.refused}}:{list}", setup.options().namespace);
        assert_eq!(redis_cli(setup.url(), &["SET", &list, "not a list"]), "OK");
        let mut handle = caller.call_with::<_, u64>("faults.refused", options, (1u64,)).expect("call");
        match handle.wait_timeout(PATIENCE) {
            Err(dingo::Error::Task(error)) => assert!(error.message().contains("refused"), "{list}: {error:?}"),
            other => panic!("the call must fail, refused ({list}), got {other:?}"),
        }
        redis_cli(setup.url(), &["DEL", &list]);
    }
    worker.allocate("faults.refused", 1).expect("allocate");
    for (options, n) in [(&at_most_once, 2u64), (&at_least_once, 3u64)] {
        let mut handle = caller.call_with::<_, u64>("faults.refused", options, (n,)).expect("call");
        assert_eq!(handle.wait_timeout(PATIENCE).expect("works once the key is a list"), n);
    }
    caller.close().expect("close");
    worker.close().expect("close");
}
