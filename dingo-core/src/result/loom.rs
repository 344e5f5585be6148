//! Model test of the waker hand-off between a polled handle and the thread delivering its
//! reports: loom runs every interleaving of the two, and a lost wake-up (the classic bug:
//! the report lands between the poll's check and its waker being stored) shows as a
//! deadlock of `block_on`.
//!
//! `RUSTFLAGS="--cfg dingo_loom" cargo test -p dingo-core --lib --release result::loom`

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;

use super::{Handle, Route, Slot, decode_value};
use crate::codec::Codecs;
use crate::id::{CallKey, TaskId, TaskName};
use crate::message::{ReportBody, ReportSink, Value};
use crate::report::Report;

fn handle(slot: &Arc<Slot<i64>>) -> Handle<i64> {
    let key = CallKey { name: TaskName::from("model"), id: TaskId::new("1") };
    let route = Arc::new(Route { store: None, admin: None, cancel_ttl: Duration::from_secs(1) });
    Handle::new(key, slot.clone(), route, false)
}

fn slot() -> Arc<Slot<i64>> {
    Arc::new(Slot::new(Arc::new(Codecs::new()), decode_value::<i64>))
}

fn succeed(slot: &Slot<i64>, value: i64) {
    let mut value = Some(value);
    slot.deliver(ReportBody::Success(Value::Local(&mut value)));
}

#[test]
fn an_awaited_result_is_never_missed() {
    loom::model(|| {
        let slot = slot();
        let handle = handle(&slot);
        let delivering = loom::thread::spawn(move || succeed(&slot, 5));
        assert_eq!(loom::future::block_on(handle.into_future()).unwrap(), 5);
        delivering.join().unwrap();
    });
}

#[test]
fn a_stream_sees_every_report_then_ends() {
    loom::model(|| {
        let slot = slot();
        let mut reports = handle(&slot).report_stream();
        let delivering = loom::thread::spawn(move || {
            slot.deliver(ReportBody::Sent);
            succeed(&slot, 7);
        });
        let next = |reports: &mut super::ReportStream<i64>| {
            loom::future::block_on(std::future::poll_fn(|cx| std::pin::Pin::new(&mut *reports).poll_next(cx)))
        };
        assert_eq!(next(&mut reports), Some(Report::Sent));
        assert_eq!(next(&mut reports), Some(Report::Success(7)));
        assert_eq!(next(&mut reports), None);
        delivering.join().unwrap();
    });
}

#[test]
fn a_shutdown_wakes_the_awaiting_task() {
    loom::model(|| {
        let slot = slot();
        let handle = handle(&slot);
        let closing = loom::thread::spawn(move || slot.disconnect());
        let outcome = loom::future::block_on(handle.into_future());
        assert!(matches!(outcome, Err(crate::Error::Task(e)) if e.kind() == crate::TaskErrorKind::Shutdown));
        closing.join().unwrap();
    });
}
