//! Delayed tasks and retries on Redis, in one process: several promoters on one queue move
//! each due task once, a delayed call starts no earlier than due (and soon after), delayed
//! at-most-once calls keep their delivery mode, a malformed member of the delayed set is
//! dead-lettered instead of looping, and a retry settles its attempt and queues the next in
//! one step. Faults (killed workers, a restarted server) are in `redis_delay_faults.rs`.
#![cfg(feature = "redis")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dingo::redis::RedisBroker;
use dingo::{App, Backoff, CallOptions, Context, Error, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::faults::{lock, wait_until};
use dingo_test_support::redis::{Redis, redis_cli_with};

/// Milliseconds since the Unix epoch, as due times travel.
fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).expect("after 1970").as_millis() as u64
}

/// The value at quantile `q` of `values` (sorted here).
fn quantile(values: &mut [u64], q: f64) -> u64 {
    values.sort_unstable();
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// Start times of each call, by its number: who ran it when.
type Starts = Arc<Mutex<HashMap<u64, Vec<u64>>>>;

/// A worker app on its own broker (its own promoter) serving `delay.stamp`, which records
/// when each call started.
fn stamping_worker(setup: &Redis, starts: &Starts, threads: usize) -> (App, RedisBroker) {
    let broker = setup.broker();
    let app = App::builder().broker(broker.clone()).build().expect("worker app");
    let starts = starts.clone();
    app.register("delay.stamp", move |(n, _due): (u64, u64)| {
        lock(&starts).entry(n).or_default().push(millis(SystemTime::now()));
        n
    })
    .expect("register");
    app.allocate("delay.stamp", threads).expect("allocate");
    (app, broker)
}

/// Three worker processes' worth of promoters (three brokers, each consuming the queue) and
/// 2,000 delayed calls: 1,000 due at one instant — every promoter wakes for it — and 1,000
/// spread over the second after. Each runs exactly once, none before it is due; the
/// promoters moved 2,000 in all.
#[test]
fn several_promoters_move_each_due_task_once() {
    const CALLS: u64 = 2_000;
    let Some(setup) = Redis::setup() else { return };
    let starts: Starts = Arc::default();
    let workers: Vec<(App, RedisBroker)> = (0..3).map(|_| stamping_worker(&setup, &starts, 2)).collect();
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    // Long enough that every promoter has learnt the due time (they look every second).
    let together = SystemTime::now() + Duration::from_millis(2_500);
    let handles: Vec<_> = (0..CALLS)
        .map(|n| {
            let due = match n % 2 {
                0 => together,
                _ => together + Duration::from_millis(n / 2),
            };
            let options = CallOptions::new().eta(due);
            (n, caller.call_with::<_, u64>("delay.stamp", &options, (n, millis(due))).expect("call"), millis(due))
        })
        .collect();
    let mut lateness = Vec::new();
    for (n, mut handle, due) in handles {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("a result"), n);
        let runs = lock(&starts).get(&n).cloned().unwrap_or_default();
        assert_eq!(runs.len(), 1, "call {n} ran {} times", runs.len());
        assert!(runs[0] >= due, "call {n} started {} ms before it was due", due - runs[0]);
        lateness.push(runs[0] - due);
    }
    assert_eq!(lock(&starts).len(), CALLS as usize);
    // Counted as each promoter reads its script's reply, which may come after the results.
    let promoted = || workers.iter().map(|(_, broker)| broker.stats().promoted).collect::<Vec<u64>>();
    wait_until("the promoters counted what they moved", || promoted().iter().sum::<u64>() >= CALLS);
    let promoted = promoted();
    assert_eq!(promoted.iter().sum::<u64>(), CALLS, "each promoted once: {promoted:?}");
    let (p50, p99) = (quantile(&mut lateness, 0.5), quantile(&mut lateness, 0.99));
    eprintln!("lateness over {CALLS} tasks: p50 {p50} ms, p99 {p99} ms; promoted per process {promoted:?}");
    assert!(p99 < 1_000, "due tasks waited for a promoter's safety tick (p99 {p99} ms)");
    assert_eq!(workers[0].1.delayed_len("delay.stamp").expect("ZCARD"), 0);
    caller.close().expect("close");
    for (app, _) in workers {
        app.close().expect("close");
    }
}

/// A call delayed by 300 ms starts no earlier, and soon after (the promoter sleeps until it
/// is due, not to the next tick); an ETA in the past runs at once; the caller's broker
/// counts the delayed send. Sent while the worker's promoter sleeps on a later task: the
/// earlier one wakes it.
#[test]
fn a_delayed_call_starts_when_due() {
    let Some(setup) = Redis::setup() else { return };
    let starts: Starts = Arc::default();
    let (worker, _broker) = stamping_worker(&setup, &starts, 1);
    let caller_broker = setup.broker();
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let far = SystemTime::now() + Duration::from_secs(60);
    let _later = caller.call_with::<_, u64>("delay.stamp", &CallOptions::new().eta(far), (0u64, millis(far)));
    // Let the promoter learn of the far one and go to sleep on it.
    std::thread::sleep(Duration::from_millis(200));
    for round in 1..=5u64 {
        let due = SystemTime::now() + Duration::from_millis(300);
        let options = CallOptions::new().eta(due);
        let mut handle = caller.call_with::<_, u64>("delay.stamp", &options, (round, millis(due))).expect("call");
        assert_eq!(handle.wait_timeout(PATIENCE).expect("a result"), round);
        let started = lock(&starts)[&round][0];
        let late = started.checked_sub(millis(due)).unwrap_or_else(|| panic!("started before it was due"));
        assert!(late < 250, "round {round}: started {late} ms after it was due");
    }
    let past = SystemTime::now() - Duration::from_secs(10);
    let started = SystemTime::now();
    let mut handle =
        caller.call_with::<_, u64>("delay.stamp", &CallOptions::new().eta(past), (99u64, 0u64)).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("a result"), 99);
    assert!(started.elapsed().expect("clock") < Duration::from_millis(500), "an ETA in the past runs at once");
    wait_until("the sender counted its sends", || caller_broker.stats().sent >= 7);
    let stats = caller_broker.stats();
    assert_eq!((stats.sent, stats.delayed), (7, 6), "the call due in the past was sent as an immediate one");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Delayed at-most-once calls wait in the delayed set like the others and are promoted to
/// the at-most-once list: they run, without a lease.
#[test]
fn delayed_at_most_once_calls_keep_their_delivery_mode() {
    let Some(setup) = Redis::setup() else { return };
    let starts: Starts = Arc::default();
    let (worker, broker) = stamping_worker(&setup, &starts, 1);
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let due = SystemTime::now() + Duration::from_millis(400);
    let options = CallOptions::new().eta(due).at_most_once(true);
    let handles: Vec<_> = (0..20u64)
        .map(|n| caller.call_with::<_, u64>("delay.stamp", &options, (n, millis(due))).expect("call"))
        .collect();
    wait_until("the calls are delayed", || broker.delayed_len("delay.stamp").expect("ZCARD") == 20);
    for (n, mut handle) in (0u64..).zip(handles) {
        assert_eq!(handle.wait_timeout(PATIENCE).expect("a result"), n);
        assert!(lock(&starts)[&n][0] >= millis(due));
    }
    // Counted as the promoter reads its script's reply, which may come after the results.
    wait_until("the promoter counted them", || broker.stats().promoted >= 20);
    assert_eq!(broker.stats().promoted, 20);
    assert_eq!(broker.stats().completed, 0, "no lease was settled: they ran at most once");
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Members of the delayed set that no caller of dingo wrote — plain garbage, and garbage
/// that ends like an at-most-once message — are promoted like any other, then dead-lettered
/// by the fetch that cannot decode them: nothing loops, and the worker goes on serving.
#[test]
fn a_malformed_delayed_member_is_dead_lettered() {
    let Some(setup) = Redis::setup() else { return };
    let starts: Starts = Arc::default();
    let (worker, broker) = stamping_worker(&setup, &starts, 1);
    let key = format!("{}:{{delay.stamp}}:delayed", setup.options().namespace);
    let due = (millis(SystemTime::now()) + 300).to_string();
    redis_cli_with(setup.admin_url(), &["ZADD", &key, &due], b"\x01\x01garbage");
    redis_cli_with(setup.admin_url(), &["ZADD", &key, &due], b"\x01\x01\x07\xff\x04\x01\x04\x00");
    wait_until("both are dead-lettered", || broker.dead_letters("delay.stamp").expect("dead letters").len() == 2);
    for letter in broker.dead_letters("delay.stamp").expect("dead letters") {
        assert!(letter.reason.contains("undecodable"), "{}", letter.reason);
    }
    assert_eq!(broker.delayed_len("delay.stamp").expect("ZCARD"), 0);
    assert_eq!(broker.queue_len("delay.stamp").expect("LLEN"), 0);
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let options = CallOptions::new().countdown(Duration::from_millis(50));
    let mut handle = caller.call_with::<_, u64>("delay.stamp", &options, (5u64, 0u64)).expect("call");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the worker goes on"), 5);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// `retries = 2` on a task that always fails, on Redis as task and report transport: three
/// attempts (each seen by the task as `ctx.attempt()`), the final failure names them, the
/// message lands once in the dead letters, and both retries were queued by the step that
/// settled their failed attempt (the broker's own `retry`, not a send and an ack).
#[test]
fn retries_settle_and_queue_the_next_attempt_in_one_step() {
    let Some(setup) = Redis::setup() else { return };
    let worker_broker = setup.broker();
    let worker = App::builder().broker(worker_broker.clone()).build().expect("worker app");
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let seen = attempts.clone();
    worker
        .register_with_context("delay.fail", move |ctx: &Context<'_>, n: u64| -> Result<u64, String> {
            lock(&seen).push(ctx.attempt());
            Err(format!("call {n} fails on attempt {}", ctx.attempt()))
        })
        .expect("register");
    worker.allocate("delay.fail", 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let options = CallOptions::new().retries(2).backoff(Backoff::fixed(Duration::from_millis(200)));
    let mut handle = caller.call_with::<_, u64>("delay.fail", &options, 7u64).expect("call");
    match handle.wait_timeout(PATIENCE) {
        Err(Error::Task(e)) => {
            assert_eq!((e.kind(), e.attempts()), (TaskErrorKind::Failed, 3), "{e}");
            assert!(e.message().contains("3 attempt"), "{e}");
        }
        other => panic!("expected the final failure, got {other:?}"),
    }
    assert_eq!(*lock(&attempts), [1, 2, 3]);
    wait_until("the message is dead-lettered", || {
        worker_broker.dead_letters("delay.fail").expect("dead letters").len() == 1
    });
    wait_until("the promoter counted the retries", || worker_broker.stats().promoted >= 2);
    let stats = worker_broker.stats();
    assert_eq!((stats.retried, stats.promoted), (2, 2), "{stats:?}");
    assert_eq!(worker_broker.delayed_len("delay.fail").expect("ZCARD"), 0);
    caller.close().expect("close");
    worker.close().expect("close");
}

/// Processes that delayed calls and retried them leave nothing of their own once they shut
/// down — not the sender's sequence key of its delayed sends, nor the control list of the
/// worker's delay listener; what stays is the queue's, and of the documented kinds.
#[test]
fn delays_leave_no_keys_of_a_process_behind() {
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let starts: Starts = Arc::default();
    let (worker, _broker) = stamping_worker(&setup, &starts, 1);
    worker
        .register_with_context("delay.twice", |ctx: &Context<'_>, n: u64| -> Result<u64, String> {
            if ctx.attempt() == 1 { Err("once more".to_owned()) } else { Ok(n) }
        })
        .expect("register");
    worker.allocate("delay.twice", 1).expect("allocate");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let options = CallOptions::new().countdown(Duration::from_millis(100));
    let mut stamped = caller.call_with::<_, u64>("delay.stamp", &options, (1u64, 0u64)).expect("call");
    let options = options.retries(1).backoff(Backoff::fixed(Duration::from_millis(50)));
    let mut retried = caller.call_with::<_, u64>("delay.twice", &options, 2u64).expect("call");
    assert_eq!(stamped.wait_timeout(PATIENCE).expect("a result"), 1);
    assert_eq!(retried.wait_timeout(PATIENCE).expect("a result"), 2);
    caller.close().expect("close");
    worker.close().expect("close");
    let keys =
        dingo_test_support::redis::redis_cli(setup.admin_url(), &["--scan", "--pattern", &format!("{namespace}:*")]);
    let queue_wide = [":pending", ":amo", ":wake", ":delayed", ":delayed:wake", ":consumers", ":dead", ":dead:bytes"];
    for key in keys.lines().filter(|key| !key.is_empty()) {
        let documented = key == format!("{namespace}:tasks") || queue_wide.iter().any(|kind| key.ends_with(kind));
        assert!(documented, "{key} is left behind");
    }
}
