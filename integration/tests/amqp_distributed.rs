//! Callers and workers as separate processes on RabbitMQ: the example programs run as child
//! processes, and a worker process is killed with SIGKILL in the middle of 1,000 tasks.
#![cfg(feature = "amqp")]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dingo::amqp::AmqpOptions;
use dingo::broker::Admin as _;
use dingo::{App, TaskErrorKind};
use dingo_test_support::PATIENCE;
use dingo_test_support::amqp::Amqp;
use dingo_test_support::faults::wait_until;
use dingo_test_support::process::{Examples, Proc, example};

// The tasks the example programs share: the same names and signatures, so the test process
// can call what the worker processes run.
#[allow(dead_code)]
#[path = "../../examples/shared/tasks.rs"]
mod tasks;

/// The example programs, built with this test's features.
const EXAMPLES: Examples = dingo_test_support::examples!["amqp_worker", "amqp_caller"];

/// A setup with the examples' options (durable queues: the declarations must agree), and
/// the environment that points the example programs at it. Reply queues of the example
/// callers expire a minute after their process is gone.
fn setup() -> Option<(Amqp, Vec<(&'static str, String)>)> {
    setup_with(AmqpOptions::new(), "")
}

/// [`setup`] with these options, and `query` added to the example programs' URL (options of
/// their own, and those that must agree with `options`).
fn setup_with(options: AmqpOptions, query: &str) -> Option<(Amqp, Vec<(&'static str, String)>)> {
    let setup = Amqp::with_options(options)?;
    let env = vec![
        ("DINGO_AMQP_URL", format!("{}?result_ttl_s=60{query}", setup.url())),
        ("DINGO_NAMESPACE", setup.options().namespace.clone()),
    ];
    Some((setup, env))
}

fn as_env<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// The worker example serving 13 tasks on 2 threads and the caller example making its 10
/// calls and the rest: the caller prints exactly the typed results, and both exit 0.
#[test]
fn the_example_worker_and_caller_as_processes() {
    let Some((setup, env)) = setup() else { return };
    // Declared here too, so the test's cleanup deletes the queues.
    let broker = setup.broker();
    for task in [tasks::add::NAME, tasks::total::NAME, tasks::slow_echo::NAME] {
        dingo::broker::Consumer::declare(&broker, &dingo::TaskName::from(task)).expect("declare");
    }
    let env = as_env(&env);
    let mut worker = Proc::spawn(&EXAMPLES, "amqp_worker", &["--tasks", "13", "--threads", "2"], &env);
    let mut caller = Proc::spawn(&EXAMPLES, "amqp_caller", &["--calls", "10"], &env);

    let status = caller.wait(Duration::from_secs(30));
    assert!(status.success(), "the caller failed: {status}; stderr:\n{}", caller.stderr());
    let mut expected: Vec<String> = (0..10).map(|i| format!("add({i}, 1000) = {}", 1000 + i)).collect();
    expected.push("total = Invoice { order: 7, total_cents: 700 }".into());
    expected.push(r#"total failed: order 8 has no items (payload Some(Ok("order 8 has no items")))"#.into());
    expected.push("slow_echo = 42".into());
    assert_eq!(caller.stdout().lines().collect::<Vec<_>>(), expected);

    let status = worker.wait(Duration::from_secs(30));
    assert!(status.success(), "the worker failed: {status}; stderr:\n{}", worker.stderr());
    assert_eq!(
        worker.stdout().lines().collect::<Vec<_>>(),
        [
            "worker ready: 2 thread(s) serving example.add, example.total, example.slow_echo, example.crash_if",
            "worker done after 13 task(s)"
        ]
    );
}

/// 1,000 `slow_echo` calls from this process; worker process A (4 threads) is killed with
/// SIGKILL once about 150 results are in, holding running and prefetched tasks; RabbitMQ
/// requeues what A had not acknowledged, and worker process B finishes everything. Each of
/// the 1,000 calls resolves to its own value, exactly once; some of A's tasks reach B marked
/// redelivered; nothing is left in the queue or its dead letters.
#[test]
fn a_worker_process_killed_mid_run_loses_nothing() {
    const CALLS: u64 = 1000;
    let Some((setup, env)) = setup() else { return };
    let env = as_env(&env);
    let caller_broker = setup.broker();
    // Built before any call waits: a first build takes longer than a call's patience.
    example(&EXAMPLES, "amqp_worker");
    let caller = App::builder().broker(caller_broker.clone()).build().expect("caller app");
    let handles: Vec<_> = (0..CALLS).map(|n| (n, tasks::slow_echo::call(&caller, n, 5).expect("call"))).collect();
    let ids: HashSet<String> = handles.iter().map(|(_, h)| h.id().to_string()).collect();
    assert_eq!(ids.len(), CALLS as usize, "every call has its own id");

    // Results are taken in call order on a thread of their own while the workers come and go.
    let resolved = Arc::new(AtomicUsize::new(0));
    let counter = resolved.clone();
    let collector = std::thread::Builder::new()
        .name("results".into())
        .spawn(move || {
            handles
                .into_iter()
                .map(|(n, mut handle)| {
                    let got = handle.wait_timeout(PATIENCE);
                    counter.fetch_add(1, Ordering::SeqCst);
                    (n, handle.id().to_string(), got)
                })
                .collect::<Vec<_>>()
        })
        .expect("spawn the collector");

    let mut a = Proc::spawn(&EXAMPLES, "amqp_worker", &["--threads", "4"], &env);
    wait_until("about 150 results are in", || resolved.load(Ordering::SeqCst) >= 150);
    a.kill();
    let at_kill = resolved.load(Ordering::SeqCst);
    assert!(at_kill < CALLS as usize, "worker A finished everything before it was killed");
    let mut b = Proc::spawn(&EXAMPLES, "amqp_worker", &["--threads", "4"], &env);

    let results = collector.join().expect("the collector");
    let mut seen = HashSet::new();
    for (n, id, got) in results {
        let got = got.unwrap_or_else(|e| panic!("call {n} ({id}) got no result: {e:?}"));
        assert_eq!(got, n, "call {n}");
        assert!(seen.insert(id), "call {n} resolved twice");
    }
    assert_eq!(seen, ids, "all 1,000 calls resolved");

    let fresh = setup.broker();
    wait_until("the queue is empty", || fresh.queue_len(tasks::slow_echo::NAME).expect("queue length") == 0);
    assert!(
        fresh
            .dead_letters(&dingo::TaskName::from(tasks::slow_echo::NAME), usize::MAX)
            .expect("dead letters")
            .is_empty()
    );
    b.kill();
    let redelivered = b.stderr().lines().filter(|l| l.ends_with("was redelivered")).count();
    eprintln!("sigkill: {at_kill} result(s) in when A was killed; B ran {redelivered} task(s) redelivered from A");
    assert!(redelivered >= 1, "A's unfinished tasks reached B marked redelivered; B's stderr:\n{}", b.stderr());
    caller.close().expect("close");
}

/// A task that aborts the process running it, among 200 healthy `slow_echo` calls, with two
/// worker processes (one thread, prefetch 1) that are started again whenever one dies, and
/// `max_redeliveries=2`: the task kills exactly 3 workers (it runs, and is redelivered twice),
/// is then dead-lettered with its reason, and its caller gets `WorkerLost`; every healthy call
/// resolves to its own value, exactly once, and none is in the dead letters. (Prefetch 1:
/// tasks a dying worker had prefetched count as redelivered too, as RabbitMQ cannot tell
/// them apart, and with a deep prefetch the same bystanders may die with the crashing task
/// every time.)
fn a_task_that_kills_its_workers_is_dead_lettered(quorum: bool) {
    const HEALTHY: u64 = 200;
    let query = if quorum { "&max_redeliveries=2&prefetch=1&quorum=true" } else { "&max_redeliveries=2&prefetch=1" };
    let Some((setup, env)) = setup_with(AmqpOptions::new().quorum(quorum), query) else { return };
    let env = as_env(&env);
    example(&EXAMPLES, "amqp_worker");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let mut poison = tasks::crash_if::call(&caller, 7, true).expect("call");
    let healthy: Vec<_> = (0..HEALTHY).map(|n| (n, tasks::slow_echo::call(&caller, n, 10).expect("call"))).collect();
    let ids: HashSet<String> = healthy.iter().map(|(_, h)| h.id().to_string()).collect();
    let collector = std::thread::Builder::new()
        .name("results".into())
        .spawn(move || {
            healthy
                .into_iter()
                .map(|(n, mut handle)| (n, handle.id().to_string(), handle.wait_timeout(PATIENCE * 2)))
                .collect::<Vec<_>>()
        })
        .expect("spawn the collector");

    // Two worker slots, each filled again as soon as its process dies.
    let spawn = || Proc::spawn(&EXAMPLES, "amqp_worker", &["--threads", "1"], &env);
    let mut workers = [spawn(), spawn()];
    let mut crashed = Vec::new();
    let deadline = Instant::now() + PATIENCE * 2;
    let outcome = loop {
        for worker in &mut workers {
            if let Some(status) = worker.exited() {
                crashed.push((status, worker.stderr()));
                *worker = spawn();
            }
        }
        match poison.wait_timeout(Duration::from_millis(20)) {
            Err(dingo::Error::Timeout(_)) => assert!(Instant::now() < deadline, "the crashing task never resolved"),
            outcome => break outcome,
        }
    };
    match outcome {
        Err(dingo::Error::Task(e)) => {
            assert_eq!(e.kind(), TaskErrorKind::WorkerLost, "{e:?}");
            assert_eq!(
                e.message(),
                "the workers that took this task stopped before finishing it 3 times (max_redeliveries is 2): it may \
                 crash its worker process; it was moved to the dead letters"
            );
        }
        other => panic!("the crashing task's caller got {other:?}, not WorkerLost"),
    }

    let mut seen = HashSet::new();
    for (n, id, got) in collector.join().expect("the collector") {
        assert_eq!(got.unwrap_or_else(|e| panic!("call {n} ({id}) got no result: {e:?}")), n, "call {n}");
        assert!(seen.insert(id), "call {n} resolved twice");
    }
    assert_eq!(seen, ids, "every healthy call resolved");
    // (The third worker it killed may have died since the loop last looked.)
    for worker in &mut workers {
        match worker.exited() {
            Some(status) => crashed.push((status, worker.stderr())),
            None => worker.kill(),
        }
    }
    let aborted: Vec<_> =
        crashed.iter().filter(|(_, stderr)| stderr.contains("example.crash_if aborts this process")).collect();
    assert_eq!(aborted.len(), 3, "the task ran and killed its worker 3 times: {crashed:?}");
    assert!(aborted.iter().all(|(status, _)| !status.success()));

    let fresh = setup.broker();
    let dead = fresh.dead_letters(&dingo::TaskName::from(tasks::crash_if::NAME), usize::MAX).expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].reason,
        "redelivered 2 times: every worker that took it stopped before finishing it (its process died or was \
         killed, or its connection broke)"
    );
    assert!(
        fresh
            .dead_letters(&dingo::TaskName::from(tasks::slow_echo::NAME), usize::MAX)
            .expect("dead letters")
            .is_empty()
    );
    assert_eq!(fresh.queue_len(tasks::crash_if::NAME).expect("queue length"), 0);
    caller.close().expect("close");
}

#[test]
fn a_task_that_kills_its_workers_is_dead_lettered_after_max_redeliveries() {
    a_task_that_kills_its_workers_is_dead_lettered(false);
}

#[test]
fn a_task_that_kills_its_workers_is_dead_lettered_on_quorum_queues() {
    a_task_that_kills_its_workers_is_dead_lettered(true);
}

/// Two worker processes of one thread each (the default prefetch, 128): one long task (8 s),
/// then 100 short ones. Whichever worker takes the long task has prefetched about half the
/// short ones behind it; they must not wait for it: it hands them back, and the other worker
/// runs them. The short tasks' p99 latency (call to result) stays under a second, and every
/// call resolves to its own value.
#[test]
fn short_tasks_do_not_wait_behind_a_long_one() {
    const SHORT: u64 = 100;
    let Some((setup, env)) = setup() else { return };
    let env = as_env(&env);
    example(&EXAMPLES, "amqp_worker");
    let mut workers: Vec<Proc> =
        (0..2).map(|_| Proc::spawn(&EXAMPLES, "amqp_worker", &["--threads", "1"], &env)).collect();
    wait_until("both workers are ready", || workers.iter().all(|w| w.stdout().contains("worker ready")));
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let broker = setup.broker();
    let mut long = tasks::slow_echo::call(&caller, 1_000_000, 8000).expect("call");
    wait_until("a worker took the long task", || broker.queue_len(tasks::slow_echo::NAME).expect("queue length") == 0);

    let sent = Instant::now();
    let mut short: Vec<_> =
        (0..SHORT).map(|n| (n, tasks::slow_echo::call(&caller, n, 1).expect("call"), None)).collect();
    let deadline = sent + PATIENCE;
    while short.iter().any(|(_, _, latency)| latency.is_none()) {
        assert!(Instant::now() < deadline, "short tasks still unfinished after {PATIENCE:?}");
        for (n, handle, latency) in short.iter_mut().filter(|(_, _, latency)| latency.is_none()) {
            if let Some(got) = handle.try_get() {
                assert_eq!(got.expect("a short task's result"), *n);
                *latency = Some(sent.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut latencies: Vec<Duration> = short.iter().filter_map(|(_, _, latency)| *latency).collect();
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    eprintln!("short tasks behind a long one: p50 {:?}, p99 {p99:?}", latencies[latencies.len() / 2]);
    assert!(p99 < Duration::from_secs(1), "short tasks waited behind the long one: p99 {p99:?}");
    assert_eq!(long.wait_timeout(PATIENCE).expect("the long task's result"), 1_000_000);
    for worker in &mut workers {
        worker.kill();
    }
    caller.close().expect("close");
}
