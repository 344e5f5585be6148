//! The report writer: a background thread that stores what does not come from a worker
//! thread of this broker — reports of mixed transports, dead letters of messages without a
//! lease, at-most-once tasks given back — planned as worker threads plan their own (see
//! [`settle`](super::settle)).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dingo_core::BrokerError;
use dingo_core::broker::Ack;
use dingo_core::event::{Event, EventKind, Level, Origin};

use super::settle::{Op, account, plan};
use super::{Inner, NAME, Thread, actor};
use crate::scripts::Sequence;
use dingo_core::broker::kit::closed;

pub(crate) struct Completer {
    tx: Sender<Op>,
    thread: Thread,
}

impl Completer {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Completer, BrokerError> {
        let (tx, rx) = crossbeam_channel::bounded(inner.options.send_buffer);
        let thread = Thread::spawn("dingo-redis-done", move |stop| complete_loop(&inner, &rx, &stop.flag))?;
        Ok(Completer { tx, thread })
    }

    pub(crate) fn push(&self, op: Op) -> Result<(), BrokerError> {
        self.tx.send(op).map_err(|_| closed(NAME))
    }

    /// Stores what is queued, then stops.
    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

fn complete_loop(inner: &Arc<Inner>, rx: &Receiver<Op>, stop: &AtomicBool) {
    let mut conn = inner.conn("report writer", Origin::Reporter, false);
    let mut sequence = Sequence::new(actor::DONE, &inner.process);
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(op) => op,
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => return,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < inner.options.batch * 4
            && let Ok(op) = rx.try_recv()
        {
            batch.push(op);
        }
        let count = batch.len();
        let acks: Vec<Ack> = batch
            .iter_mut()
            .filter_map(|op| match op {
                Op::Report { then, .. } => then.take(),
                _ => None,
            })
            .collect();
        let mut plan = plan(inner, batch, &mut sequence);
        match plan.run(inner, &mut conn, stop, &mut sequence) {
            Some(Ok(results)) => {
                account(inner, &results);
                for ack in acks {
                    if let Err(e) = ack.ack() {
                        error(inner, format!("a delivery whose report was stored could not be acknowledged: {e}"));
                    }
                }
            }
            // Deliveries waiting for their report (`acks`) are not acknowledged: their
            // transport hands them out again.
            Some(Err(e)) => error(inner, format!("{count} report(s) or settlement(s) were refused: {e}")),
            // What was not settled expires with its consumer's lease and runs again elsewhere.
            None => error(inner, format!("{count} report(s) not stored: redis unreachable at shutdown")),
        }
    }
}

fn error(inner: &Inner, message: String) {
    inner.events.emit(Event::new(Origin::Reporter, Level::Error, EventKind::ReportFailed, message));
}
