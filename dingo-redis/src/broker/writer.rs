//! The producer's writer: callers hand task messages over a bounded channel and go on; one
//! thread writes whatever has accumulated — one `PUSH` script per queue, all in one round
//! trip — so many calls in flight cost few round trips.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::{ReportBody, ReportMessage};
use dingo_core::{BrokerError, BrokerErrorKind, CallKey, TaskError, TaskErrorKind};

use super::{Inner, Thread};
use crate::keys::QueueKeys;
use crate::scripts::{self, Call, SEQ_TTL, Sequence};

/// A task message on its way to Redis.
pub(crate) struct Outgoing {
    pub(crate) queue: Arc<QueueKeys>,
    pub(crate) at_most_once: bool,
    pub(crate) bytes: Vec<u8>,
    pub(crate) key: CallKey,
    /// The caller to tell if the message cannot be written.
    pub(crate) reply: Option<Arc<str>>,
}

pub(crate) struct Writer {
    tx: Sender<Outgoing>,
    thread: Thread,
}

impl Writer {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Writer, BrokerError> {
        let (tx, rx) = crossbeam_channel::bounded(inner.options.send_buffer);
        let thread = Thread::spawn("dingo-redis-send", move |stop| write_loop(&inner, &rx, &stop))?;
        Ok(Writer { tx, thread })
    }

    pub(crate) fn send(&self, outgoing: Outgoing, timeout: Option<Duration>) -> Result<(), BrokerError> {
        let full = || BrokerError::new(BrokerErrorKind::Full, "the redis send buffer is full");
        let gone = || BrokerError::new(BrokerErrorKind::Closed, "the redis broker is shut down");
        match self.tx.try_send(outgoing) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(_)) => Err(gone()),
            Err(TrySendError::Full(outgoing)) => match timeout {
                Some(timeout) => self.tx.send_timeout(outgoing, timeout).map_err(|e| match e {
                    SendTimeoutError::Timeout(_) => full(),
                    SendTimeoutError::Disconnected(_) => gone(),
                }),
                None => self.tx.send(outgoing).map_err(|_| gone()),
            },
        }
    }

    /// Writes what is queued, then stops.
    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

fn write_loop(inner: &Arc<Inner>, rx: &Receiver<Outgoing>, stop: &AtomicBool) {
    let mut conn = inner.conn("task sender", Origin::Producer, false);
    let mut sequence = Sequence::new("send", &inner.process);
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(outgoing) => outgoing,
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::SeqCst) => return,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < inner.options.batch * 4
            && let Ok(outgoing) = rx.try_recv()
        {
            batch.push(outgoing);
        }
        let calls = push_calls(&mut batch, inner.options.batch, &mut sequence);
        match conn.retry(stop, &mut |c| scripts::run_batch(c, &calls)) {
            Some(Ok(_)) => {
                inner.stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Some(Err(e)) => fail(inner, batch, &format!("redis refused the task messages: {e}")),
            None => fail(inner, batch, "the broker shut down while redis was unreachable"),
        }
    }
}

/// One `PUSH` per queue and delivery mode, in order, at most `batch` messages each. The
/// messages' bytes move into the calls.
fn push_calls(batch: &mut [Outgoing], max: usize, sequence: &mut Sequence) -> Vec<Call> {
    let mut calls: Vec<(String, Call, usize)> = Vec::new();
    for outgoing in batch {
        let bytes = std::mem::take(&mut outgoing.bytes);
        let list = if outgoing.at_most_once { &outgoing.queue.amo } else { &outgoing.queue.pending };
        let open = calls.iter_mut().rev().find(|(key, _, n)| key == list && *n < max);
        match open {
            Some((_, call, n)) => {
                call.args.push(bytes);
                *n += 1;
            }
            None => {
                // Numbered, so a retry after a lost reply does not queue it twice.
                let (seq_key, seq) = sequence.next(&outgoing.queue);
                let call = Call::new(&scripts::PUSH)
                    .key(list.clone())
                    .key(outgoing.queue.wake.clone())
                    .key(seq_key)
                    .arg(seq)
                    .arg(SEQ_TTL)
                    .arg(bytes);
                calls.push((list.clone(), call, 1));
            }
        }
    }
    calls.into_iter().map(|(_, call, _)| call).collect()
}

/// Tells the callers of messages that could not be written (their handles would wait
/// forever otherwise).
fn fail(inner: &Inner, batch: Vec<Outgoing>, why: &str) {
    inner.events.emit(Event::new(
        Origin::Producer,
        Level::Error,
        EventKind::Other,
        format!("{} task message(s) could not be sent: {why}", batch.len()),
    ));
    for outgoing in batch {
        if outgoing.reply.as_deref() == Some(&*inner.process) {
            let error = TaskError::new(TaskErrorKind::Other, format!("the task message could not be sent: {why}"));
            let report =
                ReportMessage { name: outgoing.key.name, id: outgoing.key.id, body: ReportBody::Failure(error) };
            inner.router.route(report);
        }
    }
}
