//! Callers and workers as separate processes on Redis: the example programs run as child
//! processes, and a worker process is killed with SIGKILL in the middle of 1,000 tasks.
#![cfg(feature = "redis")]

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dingo::App;
use dingo_test_support::PATIENCE;
use dingo_test_support::redis::{Redis, held};

// The tasks the example programs share: the same names and signatures, so the test process
// can call what the worker processes run.
#[allow(dead_code)]
#[path = "../examples/shared/tasks.rs"]
mod tasks;

/// Waits until `done` holds, or fails after [`PATIENCE`] naming `what`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An example program, up to date: built once per test run into this test's own target
/// directory (`target/<profile>/examples`, next to `target/<profile>/deps/<this test>`).
/// `cargo test` builds the examples only when no `--test` filter is given, so the test
/// builds them itself (a no-op when they are fresh).
fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    BUILT.get_or_init(|| build_examples(profile_dir)).as_ref().unwrap_or_else(|e| panic!("{e}"));
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example binary {} is missing: build it with `cargo build --features redis --example {name}`",
        path.display()
    );
    path
}

/// `cargo build --example redis_worker --example redis_caller` into the target directory
/// this test was built in, with the features this test was built with (so what `cargo test`
/// built is reused, not rebuilt).
fn build_examples(profile_dir: &Path) -> Result<(), String> {
    let target_dir = profile_dir.parent().ok_or("no target directory above the profile's")?;
    let features: Vec<&str> = [
        ("json", cfg!(feature = "json")),
        ("redis", true),
        ("redis-tls", cfg!(feature = "redis-tls")),
        ("amqp", cfg!(feature = "amqp")),
    ]
    .into_iter()
    .filter_map(|(feature, on)| on.then_some(feature))
    .collect();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut build = Command::new(cargo);
    build
        .args(["build", "--example", "redis_worker", "--example", "redis_caller", "--no-default-features"])
        .args(["--features", &features.join(",")])
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        build.arg("--release");
    }
    let out =
        build.stdin(Stdio::null()).output().map_err(|e| format!("cannot run cargo to build the examples: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the example programs failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A child process, killed (SIGKILL) and reaped on drop, with its output collected as it
/// comes (so a full pipe never blocks it).
struct Proc {
    name: String,
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(example(name))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(format!("{name}-stdout"), child.stdout.take().expect("piped stdout"), stdout.clone()),
            collect(format!("{name}-stderr"), child.stderr.take().expect("piped stderr"), stderr.clone()),
        ];
        Proc { name: name.to_owned(), child: Some(child), stdout, stderr, readers }
    }

    /// Waits for the process to exit (fails after `patience`), then for its output.
    fn wait(&mut self, patience: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("still running");
        let deadline = Instant::now() + patience;
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll the child") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {patience:?}; stdout:\n{}\nstderr:\n{}",
                self.name,
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        self.child = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    /// SIGKILL: the process gets no chance to give anything back.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    fn stdout(&self) -> String {
        self.stdout.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies a pipe into a string on a thread of its own.
fn collect(name: String, mut pipe: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buffer) {
                into.lock().unwrap_or_else(|e| e.into_inner()).push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        })
        .expect("spawn a pipe reader")
}

/// The worker example serving 13 tasks on 2 threads and the caller example making its 10
/// calls and the rest: the caller prints exactly the typed results, and both exit 0.
#[test]
fn the_example_worker_and_caller_as_processes() {
    let Some(setup) = Redis::setup() else { return };
    let env = [("DINGO_REDIS_URL", setup.url()), ("DINGO_NAMESPACE", setup.options().namespace.as_str())];
    let mut worker = Proc::spawn("redis_worker", &["--tasks", "13", "--threads", "2"], &env);
    let mut caller = Proc::spawn("redis_caller", &["--calls", "10"], &env);

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
            "worker ready: 2 thread(s) serving example.add, example.total, example.slow_echo",
            "worker done after 13 task(s)"
        ]
    );
}

/// 1,000 `slow_echo` calls from this process; worker process A (4 threads, lease 1 s) is
/// killed with SIGKILL once about 150 results are in, holding running and prefetched tasks;
/// worker process B starts and, once A's leases expire, finishes everything. Each of the
/// 1,000 calls resolves to its own value, exactly once; some of A's tasks reach B marked
/// redelivered; no message, lease or in-flight entry is left behind.
#[test]
fn a_worker_process_killed_mid_run_loses_nothing() {
    const CALLS: u64 = 1000;
    let Some(setup) = Redis::setup() else { return };
    let namespace = setup.options().namespace.clone();
    let env = [("DINGO_REDIS_URL", setup.url()), ("DINGO_NAMESPACE", namespace.as_str()), ("DINGO_LEASE_MS", "1000")];
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
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

    let mut a = Proc::spawn("redis_worker", &["--threads", "4"], &env);
    wait_until("about 150 results are in", || resolved.load(Ordering::SeqCst) >= 150);
    a.kill();
    let at_kill = resolved.load(Ordering::SeqCst);
    assert!(at_kill < CALLS as usize, "worker A finished everything before it was killed");
    let mut b = Proc::spawn("redis_worker", &["--threads", "4"], &env);

    let results = collector.join().expect("the collector");
    let mut seen = HashSet::new();
    for (n, id, got) in results {
        let got = got.unwrap_or_else(|e| panic!("call {n} ({id}) got no result: {e:?}"));
        assert_eq!(got, n, "call {n}");
        assert!(seen.insert(id), "call {n} resolved twice");
    }
    assert_eq!(seen, ids, "all 1,000 calls resolved");

    let fresh = setup.broker();
    wait_until("the queue is empty and no lease is left", || {
        fresh.queue_len(tasks::slow_echo::NAME).expect("queue length") == 0
            && held(setup.url(), &namespace, tasks::slow_echo::NAME) == 0
    });
    assert!(fresh.dead_letters(tasks::slow_echo::NAME).expect("dead letters").is_empty());
    b.kill();
    let redelivered = b.stderr().lines().filter(|l| l.ends_with("was redelivered")).count();
    eprintln!("sigkill: {at_kill} result(s) in when A was killed; B ran {redelivered} task(s) redelivered from A");
    assert!(redelivered >= 1, "A's unfinished tasks reached B marked redelivered; B's stderr:\n{}", b.stderr());
    caller.close().expect("close");
}
