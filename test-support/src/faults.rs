//! Helpers of the fault tests, shared by every broker's: waiting for conditions, URLs
//! through a [`Proxy`], the events an app emitted, calls watched by hand, task messages
//! crafted by hand and a task that waits for the test ([`Gate`]).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dingo::broker::Store;
use dingo::message::{Payload, ReplySink, ReplyTo, ReportBody, ReportSink, TaskMessage, wire};
use dingo::{App, CallKey, Event, EventFilter, EventKind, Events, Level, TaskErrorKind, TaskId, TaskName};

use crate::PATIENCE;
use crate::proxy::Proxy;

/// Locks, whether or not a holder panicked (test state stays readable): the brokers' own.
pub use dingo::broker::kit::lock;

/// Waits until `done` holds, or fails after [`PATIENCE`] naming `what`.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {PATIENCE:?} waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Splits `scheme://[user:pass@]host[:port][/path]` into what comes before the address
/// (`scheme://user:pass@`), `host:port` (the scheme's default port if none), and what comes
/// after (`/path`).
fn split_url(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let port = match scheme {
        "amqp" => 5672,
        "amqps" => 5671,
        _ => 6379,
    };
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:{port}") };
    (format!("{scheme}://{auth}"), hostport, path.to_owned())
}

/// Closes `caller`, then `worker`, and asserts that both returned within seconds: closing
/// must not wait for a broker that is away.
pub fn close_promptly(caller: &App, worker: &App) {
    let started = Instant::now();
    caller.close().expect("close the caller");
    worker.close().expect("close the worker");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "closing took {took:?}");
}

/// The socket address of the server a URL names.
pub fn server_addr(url: &str) -> SocketAddr {
    let (_, hostport, _) = split_url(url);
    hostport.to_socket_addrs().expect("resolve the host").next().expect("an address")
}

/// The same URL, through `proxy`.
pub fn via(proxy: &Proxy, url: &str) -> String {
    let (front, _, path) = split_url(url);
    format!("{front}127.0.0.1:{}{path}", proxy.port())
}

/// Every event of an app, kept for questions asked later.
pub struct Seen {
    events: Events,
    seen: Vec<Event>,
}

impl Seen {
    /// Starts keeping `app`'s events (Info and above).
    pub fn watch(app: &App) -> Seen {
        Seen { events: app.events(EventFilter::new().level(Level::Info).capacity(100_000)), seen: Vec::new() }
    }

    fn drain(&mut self) {
        while let Some(event) = self.events.try_recv() {
            self.seen.push(event);
        }
    }

    /// How many events of `kind` came so far.
    pub fn count(&mut self, kind: EventKind) -> usize {
        self.drain();
        self.seen.iter().filter(|e| e.kind == kind).count()
    }

    /// The events of `kind` seen so far, in order.
    pub fn of_kind(&mut self, kind: EventKind) -> Vec<Event> {
        self.drain();
        self.seen.iter().filter(|e| e.kind == kind).cloned().collect()
    }

    /// The first event of `kind`, waited for (fails after [`PATIENCE`]).
    pub fn wait_for(&mut self, kind: EventKind) -> Event {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.drain();
            if let Some(event) = self.seen.iter().find(|e| e.kind == kind) {
                return event.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {kind:?} event within {PATIENCE:?}; saw {:#?}", self.seen);
            if let Some(event) = self.events.recv_timeout(left) {
                self.seen.push(event);
            }
        }
    }
}

/// Collects the failure reports of calls watched by hand.
#[derive(Default)]
pub struct Inbox {
    /// The failures, in order.
    pub failures: Mutex<Vec<(TaskErrorKind, String)>>,
    /// How many reports of other kinds came.
    pub other: AtomicUsize,
}

impl ReportSink for Inbox {
    fn deliver(&self, body: ReportBody<'_>) {
        match body {
            ReportBody::Failure(error) => lock(&self.failures).push((error.kind(), error.message().to_owned())),
            _ => {
                self.other.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn disconnect(&self) {}
}

/// Watches a call by hand on `store`: the reply address to put in a crafted message, and
/// where its reports land.
pub fn watch(store: &dyn Store, task: &str, id: &str) -> (ReplyTo, Arc<Inbox>) {
    let inbox = Arc::new(Inbox::default());
    let key = CallKey { name: TaskName::from(task), id: TaskId::from(id) };
    let reply_to = store.watch(&key, ReplySink::new(inbox.clone())).expect("watch");
    (reply_to, inbox)
}

/// A task message built by hand, as a caller from other code would send it.
pub fn crafted(app: &App, task: &str, id: &str, fingerprint: u64, reply_to: ReplyTo) -> Vec<u8> {
    let args = app.codecs().encode(dingo::codec::MSGPACK, &5i64).expect("encode the arguments");
    let message = TaskMessage::new(TaskName::from(task), TaskId::from(id), fingerprint, Payload::Encoded(args))
        .with_options(dingo::TaskOptions::new())
        .with_reply_to(reply_to);
    wire::encode_task(&message).expect("encode the message")
}

/// The one failure an inbox got, waited for.
pub fn failure(inbox: &Inbox) -> (TaskErrorKind, String) {
    wait_until("a failure report arrives", || !lock(&inbox.failures).is_empty());
    let failures = lock(&inbox.failures);
    assert_eq!(failures.len(), 1, "{failures:?}");
    failures[0].clone()
}

/// A task that waits for the test to let it finish; returns `n + 1`.
pub struct Gate {
    /// The argument of each run, as it starts.
    pub started: std::sync::mpsc::Receiver<u64>,
    /// One message lets one run finish.
    pub release: std::sync::mpsc::SyncSender<()>,
}

impl Gate {
    /// Registers `name` on `app` as a gated task.
    pub fn register(app: &App, name: &str) -> Gate {
        let (started_tx, started) = std::sync::mpsc::sync_channel::<u64>(16);
        let (release, release_rx) = std::sync::mpsc::sync_channel::<()>(16);
        let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
        app.register(name, move |(n,): (u64,)| {
            let _ = lock(&started_tx).send(n);
            let _ = lock(&release_rx).recv_timeout(PATIENCE);
            n + 1
        })
        .expect("register the gated task");
        Gate { started, release }
    }
}
