//! Report transport rules (Go dingo's `BackendTestSuite`): a report published before the
//! caller reads is kept and arrives equal; 100 calls whose Sent/Progress/Success reports are
//! published concurrently on one reporter each get exactly their three, in order; the same
//! ids under 10 task names never mix.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use dingo::broker::{Reporter, Store};
use dingo::message::{ReplySink, ReplyTo, ReportBody, ReportMessage, ReportSink, Value};
use dingo::{CallKey, Encoded, IdMaker, Sequential, TaskError, TaskErrorKind, TaskName};

use crate::PATIENCE;

/// One connection to the report transport under test.
#[derive(Clone)]
pub struct ReportTransport {
    /// Publishes (worker side).
    pub reporter: Arc<dyn Reporter>,
    /// Routes to handles (caller side).
    pub store: Arc<dyn Store>,
}

impl ReportTransport {
    /// Both roles from one broker value.
    pub fn of<B: Reporter + Store>(broker: B) -> ReportTransport {
        let broker = Arc::new(broker);
        ReportTransport { reporter: broker.clone(), store: broker }
    }
}

/// Opens connections to one fresh broker (or namespace) per test.
pub trait ReportSetup {
    /// A new connection; all connections of one setup share their reports.
    fn connect(&self) -> ReportTransport;
}

impl<F: Fn() -> ReportTransport> ReportSetup for F {
    fn connect(&self) -> ReportTransport {
        self()
    }
}

/// What a test handle received.
#[derive(Debug)]
pub enum Got {
    /// A report (an in-process success value is replaced by `Got::LocalValue`).
    Report(ReportBody<'static>),
    /// A success report lending an in-process value.
    LocalValue,
    /// The writer went away.
    Disconnected,
}

/// A handle for tests: collects what the store delivers.
pub struct Collector {
    tx: Sender<Got>,
}

impl ReportSink for Collector {
    fn deliver(&self, body: ReportBody<'_>) {
        let got = match body {
            ReportBody::Sent => Got::Report(ReportBody::Sent),
            ReportBody::Progress(value) => Got::Report(ReportBody::Progress(value)),
            ReportBody::Success(Value::Encoded(value)) => Got::Report(ReportBody::Success(Value::Encoded(value))),
            ReportBody::Success(Value::Local(_)) => Got::LocalValue,
            ReportBody::Failure(error) => Got::Report(ReportBody::Failure(error)),
            ReportBody::Retrying { attempt, after, error } => {
                Got::Report(ReportBody::Retrying { attempt, after, error })
            }
        };
        let _ = self.tx.send(got);
    }

    fn disconnect(&self) {
        let _ = self.tx.send(Got::Disconnected);
    }
}

/// A sink and the receiver of what it collects.
pub fn collector() -> (ReplySink, Receiver<Got>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (ReplySink::new(Arc::new(Collector { tx })), rx)
}

/// The next report, or fails the test.
pub fn next(rx: &Receiver<Got>) -> ReportBody<'static> {
    match rx.recv_timeout(PATIENCE) {
        Ok(Got::Report(body)) => body,
        Ok(Got::LocalValue) => panic!("an in-process value where bytes were expected"),
        Ok(Got::Disconnected) => panic!("the store disconnected before the report"),
        Err(_) => panic!("no report within {PATIENCE:?}"),
    }
}

fn report<'a>(key: &CallKey, body: ReportBody<'a>) -> ReportMessage<'a> {
    ReportMessage { name: key.name.clone(), id: key.id.clone(), body }
}

fn value(bytes: &[u8]) -> Value<'static> {
    Value::Encoded(Encoded::new(1, bytes.to_vec()))
}

/// Reports published after the caller registered but before it reads are kept, and arrive
/// equal to what was published.
pub fn report_before_wait_is_kept(setup: &dyn ReportSetup) {
    let caller = setup.connect();
    let worker = setup.connect();
    let key = CallKey::new("basic", "0190a5b2-0000-7000-8000-000000000001");
    let (sink, rx) = collector();
    let reply_to = caller.store.watch(&key, sink).expect("watch");

    worker.reporter.report(&reply_to, report(&key, ReportBody::Sent)).expect("report sent");
    worker
        .reporter
        .report(&reply_to, report(&key, ReportBody::Progress(Some(Encoded::new(1, vec![0xcb, 0x3f])))))
        .expect("report progress");
    let failure = TaskError::with_payload(TaskErrorKind::Failed, "no luck", Encoded::new(1, b"\x01\x02".to_vec()));
    worker.reporter.finish(&reply_to, report(&key, ReportBody::Failure(failure.clone())), None).expect("finish");

    assert!(matches!(next(&rx), ReportBody::Sent));
    match next(&rx) {
        ReportBody::Progress(Some(v)) => assert_eq!(v, Encoded::new(1, vec![0xcb, 0x3f])),
        other => panic!("expected the progress report, got {other:?}"),
    }
    match next(&rx) {
        ReportBody::Failure(got) => {
            assert_eq!(got.kind(), TaskErrorKind::Failed);
            assert_eq!(got.message(), "no luck");
            assert_eq!(got.raw_payload(), Some(&Encoded::new(1, b"\x01\x02".to_vec())));
        }
        other => panic!("expected the failure report, got {other:?}"),
    }
    caller.store.forget(&key);
}

/// 100 calls, each with Sent/Progress/Success published concurrently and interleaved on one
/// reporter: each caller gets exactly its three, in order.
pub fn order_of_100_interleaved_calls(setup: &dyn ReportSetup) {
    let caller = setup.connect();
    let worker = setup.connect();
    let ids = dingo::UuidV7;
    let calls: Vec<(CallKey, ReplyTo, Receiver<Got>)> = (0..100)
        .map(|_| {
            let key = CallKey { name: TaskName::from("order"), id: ids.next_id() };
            let (sink, rx) = collector();
            let reply_to = caller.store.watch(&key, sink).expect("watch");
            (key, reply_to, rx)
        })
        .collect();
    std::thread::scope(|s| {
        for (key, reply_to, _) in &calls {
            let reporter = &worker.reporter;
            s.spawn(move || {
                reporter.report(reply_to, report(key, ReportBody::Sent)).expect("sent");
                reporter.report(reply_to, report(key, ReportBody::Progress(None))).expect("progress");
                let bytes = key.id.as_str().as_bytes();
                reporter.finish(reply_to, report(key, ReportBody::Success(value(bytes))), None).expect("success");
            });
        }
    });
    std::thread::scope(|s| {
        for (key, _, rx) in &calls {
            s.spawn(move || {
                assert!(matches!(next(rx), ReportBody::Sent), "{key}: Sent first");
                assert!(matches!(next(rx), ReportBody::Progress(None)), "{key}: Progress second");
                match next(rx) {
                    ReportBody::Success(Value::Encoded(v)) => assert_eq!(v.bytes, key.id.as_str().as_bytes()),
                    other => panic!("{key}: expected its own Success, got {other:?}"),
                }
                assert!(!matches!(rx.try_recv(), Ok(Got::Report(_))), "{key}: more than three reports");
            });
        }
    });
    for (key, _, _) in &calls {
        caller.store.forget(key);
    }
}

/// 10 task names, each issuing ids "1".."10" (a sequential id maker per name): results are
/// keyed by (name, id) and never mix.
pub fn same_ids_under_10_names(setup: &dyn ReportSetup) {
    let caller = setup.connect();
    let worker = setup.connect();
    let mut calls = Vec::new();
    for n in 0..10 {
        let name = TaskName::from(format!("SameID.{n}"));
        let ids = Sequential::new();
        for _ in 0..10 {
            let key = CallKey { name: name.clone(), id: ids.next_id() };
            let (sink, rx) = collector();
            let reply_to = caller.store.watch(&key, sink).expect("watch");
            calls.push((key, reply_to, rx));
        }
    }
    std::thread::scope(|s| {
        for chunk in calls.chunks(10) {
            let reporter = &worker.reporter;
            s.spawn(move || {
                for (key, reply_to, _) in chunk {
                    reporter.report(reply_to, report(key, ReportBody::Sent)).expect("sent");
                    reporter.report(reply_to, report(key, ReportBody::Progress(None))).expect("progress");
                    let tag = key.to_string();
                    reporter
                        .finish(reply_to, report(key, ReportBody::Success(value(tag.as_bytes()))), None)
                        .expect("success");
                }
            });
        }
    });
    for (key, _, rx) in &calls {
        assert!(matches!(next(rx), ReportBody::Sent), "{key}");
        assert!(matches!(next(rx), ReportBody::Progress(None)), "{key}");
        match next(rx) {
            ReportBody::Success(Value::Encoded(v)) => assert_eq!(v.bytes, key.to_string().as_bytes(), "mixed up"),
            other => panic!("{key}: expected Success, got {other:?}"),
        }
        caller.store.forget(key);
    }
    assert_eq!(calls.iter().map(|(k, _, _)| k.id.as_str()).filter(|id| *id == "10").count(), 10);
}
