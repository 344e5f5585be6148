//! Example programs as child processes, for the distributed tests: built once per test
//! run, spawned with their output collected, killed with SIGKILL on drop.

use dingo::broker::kit::lock;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How to build the example programs: the features the test was built with (so what
/// `cargo test` built is reused, not rebuilt) and the examples it needs. Made with
/// [`examples!`](crate::examples), which reads the features where it is used.
#[derive(Debug, Clone, Copy)]
pub struct Examples {
    /// Features of the `dingo` package, as the test crate was built (`cfg!(feature = …)`).
    pub features: &'static [&'static str],
    /// The example programs to build.
    pub names: &'static [&'static str],
}

/// The [`Examples`] named, with the `dingo` features of the crate this is expanded in (every
/// feature that changes the build must be listed, or the examples are built anew with
/// other features — slow, and a test waiting meanwhile may time out).
#[macro_export]
macro_rules! examples {
    ($($name:literal),+ $(,)?) => {
        $crate::process::Examples {
            features: &[
                #[cfg(feature = "json")]
                "json",
                #[cfg(feature = "redis")]
                "redis",
                #[cfg(feature = "redis-tls")]
                "redis-tls",
                #[cfg(feature = "amqp")]
                "amqp",
                #[cfg(feature = "amqp-tls")]
                "amqp-tls",
            ],
            names: &[$($name),+],
        }
    };
}

/// An example program, up to date: built once per test run into the test's own target
/// directory (`target/<profile>/examples`, next to `target/<profile>/deps/<the test>`).
/// `cargo test` builds the examples only when no `--test` filter is given, so the test
/// builds them itself (a no-op when they are fresh).
pub fn example(examples: &Examples, name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    BUILT.get_or_init(|| build_examples(examples, profile_dir)).as_ref().unwrap_or_else(|e| panic!("{e}"));
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "example binary {} is missing: build it with `cargo build --all-features --example {name}`",
        path.display()
    );
    path
}

/// `cargo build --example …` into the target directory the test was built in.
fn build_examples(examples: &Examples, profile_dir: &Path) -> Result<(), String> {
    let target_dir = profile_dir.parent().ok_or("no target directory above the profile's")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut build = Command::new(cargo);
    build.arg("build").arg("--no-default-features").args(["--features", &examples.features.join(",")]);
    for name in examples.names {
        build.args(["--example", name]);
    }
    build
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
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
pub struct Proc {
    name: String,
    child: Option<Child>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Starts example `name` (built first if needed) with `args` and `env`.
    pub fn spawn(examples: &Examples, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut command = Command::new(example(examples, name));
        command.args(args);
        Proc::start(name, command, env)
    }

    /// Starts this test binary again to run the test `test` alone (a worker process's part,
    /// which does nothing unless `env` tells it what to do), with `env`.
    pub fn this_test(test: &str, env: &[(&str, &str)]) -> Proc {
        let mut command = Command::new(std::env::current_exe().expect("the test binary"));
        command.args([test, "--exact", "--nocapture", "--test-threads=1"]);
        Proc::start(test, command, env)
    }

    /// Waits until the process printed a line ending with `line` (a test binary's own
    /// output follows `test NAME ... ` on its line), failing after `patience` or if it exits.
    pub fn wait_for_line(&mut self, line: &str, patience: Duration) {
        let deadline = Instant::now() + patience;
        while !self.stdout().lines().any(|l| l.ends_with(line)) {
            if let Some(status) = self.exited() {
                panic!("{} exited ({status}) before printing {line:?}; stderr:\n{}", self.name, self.stderr());
            }
            assert!(Instant::now() < deadline, "{} did not print {line:?} within {patience:?}", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn start(name: &str, mut command: Command, env: &[(&str, &str)]) -> Proc {
        let mut child = command
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
    pub fn wait(&mut self, patience: Duration) -> ExitStatus {
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

    /// Its exit status, if it has exited (without waiting); its output is then complete.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("poll the child")?;
        self.child = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        Some(status)
    }

    /// Sends the process a signal by name (`"TERM"`, `"INT"`), as `kill -NAME` does.
    pub fn signal(&self, name: &str) {
        let child = self.child.as_ref().expect("still running");
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(child.id().to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(status.success(), "kill -{name} {} failed: {status}", child.id());
    }

    /// SIGKILL: the process gets no chance to give anything back.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }

    /// What it printed so far.
    pub fn stdout(&self) -> String {
        lock(&self.stdout).clone()
    }

    /// What it printed to stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
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
                lock(&into).push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        })
        .expect("spawn a pipe reader")
}
