//! The producer's writer. Callers hand task messages over a bounded channel and go on; one
//! thread writes whatever has accumulated — one `PUSH` script per queue, all in one round
//! trip — so many calls in flight cost few round trips.
//!
//! A caller that finds nothing queued and the connection idle writes its message itself
//! and goes on; the writer thread reads the reply later (or sends the batch again if the
//! connection broke: batches are numbered, so they apply once). Waking the writer thread
//! to write would cost a thread wake-up — about 100 µs on a small VM — on every lone call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Select, SendTimeoutError, Sender, TryRecvError, TrySendError};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::{ReportBody, ReportMessage};
use dingo_core::{BrokerError, BrokerErrorKind, CallKey, TaskError, TaskErrorKind};

use super::{Inner, Thread, lock};
use crate::conn::{Conn, is_connection_error};
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

/// What the writer thread is woken for.
enum Msg {
    Send(Outgoing),
    /// A caller wrote a batch itself: read its reply.
    Replies,
}

/// The connection task messages go out on, shared by the writer thread and callers.
struct Line {
    conn: Conn,
    sequence: Sequence,
    /// Batches callers wrote whose replies nobody has read yet, oldest first.
    unanswered: VecDeque<Written>,
    /// The writer thread has stopped: nobody would read a reply any more.
    closed: bool,
}

/// A batch a caller wrote.
struct Written {
    calls: Vec<Call>,
    /// Its messages (their bytes moved into `calls`), to tell their callers if it fails.
    batch: Vec<Outgoing>,
    /// The connection it was written on (`None`: the write failed).
    generation: Option<u64>,
}

pub(crate) struct Writer {
    inner: Arc<Inner>,
    tx: Sender<Msg>,
    line: Arc<Mutex<Line>>,
    thread: Thread,
}

impl Writer {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Writer, BrokerError> {
        let (tx, rx) = crossbeam_channel::bounded(inner.options.send_buffer);
        let line = Arc::new(Mutex::new(Line {
            conn: inner.conn("task sender", Origin::Producer, false),
            sequence: Sequence::new("send", &inner.process),
            unanswered: VecDeque::new(),
            closed: false,
        }));
        let thread = {
            let (inner, line) = (inner.clone(), line.clone());
            Thread::spawn("dingo-redis-send", move |stop| write_loop(&inner, &rx, &line, &stop))?
        };
        Ok(Writer { inner, tx, line, thread })
    }

    pub(crate) fn send(&self, outgoing: Outgoing, timeout: Option<Duration>) -> Result<(), BrokerError> {
        let Some(outgoing) = self.write_here(outgoing) else { return Ok(()) };
        let full = || BrokerError::new(BrokerErrorKind::Full, "the redis send buffer is full");
        let gone = || BrokerError::new(BrokerErrorKind::Closed, "the redis broker is shut down");
        match self.tx.try_send(Msg::Send(outgoing)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Disconnected(_)) => Err(gone()),
            Err(TrySendError::Full(msg)) => match timeout {
                Some(timeout) => self.tx.send_timeout(msg, timeout).map_err(|e| match e {
                    SendTimeoutError::Timeout(_) => full(),
                    SendTimeoutError::Disconnected(_) => gone(),
                }),
                None => self.tx.send(msg).map_err(|_| gone()),
            },
        }
    }

    /// Writes `outgoing` on the caller's thread when nothing is queued before it and the
    /// connection is up and idle; gives it back otherwise. Nothing a caller queued earlier
    /// can be overtaken: the writer thread takes messages from the channel only while it
    /// holds the line.
    fn write_here(&self, outgoing: Outgoing) -> Option<Outgoing> {
        if !self.tx.is_empty() {
            return Some(outgoing);
        }
        let Ok(mut line) = self.line.try_lock() else { return Some(outgoing) };
        let generation = line.conn.generation();
        if line.closed || !self.tx.is_empty() || !line.unanswered.is_empty() || generation.is_none() {
            return Some(outgoing);
        }
        let mut batch = vec![outgoing];
        let calls = push_calls(&mut batch, self.inner.options.batch, &mut line.sequence);
        let packed = scripts::pack(&calls);
        let written = line.conn.once(&mut |c| c.send_packed_command(&packed));
        let generation = if written.is_ok() { generation } else { None };
        // Written or not, the writer thread reads the reply, or sends the batch again.
        line.unanswered.push_back(Written { calls, batch, generation });
        drop(line);
        // A full channel means the writer thread is awake and will see it anyway.
        let _ = self.tx.try_send(Msg::Replies);
        None
    }

    /// Writes what is queued, then stops.
    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

fn write_loop(inner: &Arc<Inner>, rx: &Receiver<Msg>, line: &Mutex<Line>, stop: &AtomicBool) {
    let mut select = Select::new();
    select.recv(rx);
    loop {
        // Messages are taken only while holding the line (see `Writer::write_here`).
        let _ = select.ready_timeout(Duration::from_millis(50));
        let mut line = lock(line);
        let line = &mut *line;
        answer(inner, line, stop);
        let mut batch = Vec::new();
        let mut closed = false;
        while batch.len() < inner.options.batch * 4 {
            match rx.try_recv() {
                Ok(Msg::Send(outgoing)) => batch.push(outgoing),
                Ok(Msg::Replies) => {}
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if batch.is_empty() {
            if closed || stop.load(Ordering::SeqCst) {
                line.closed = true;
                return;
            }
            continue;
        }
        let calls = push_calls(&mut batch, inner.options.batch, &mut line.sequence);
        write(inner, line, stop, calls, batch, false);
    }
}

/// Writes `calls` (carrying `batch`) until they go through; `sent_before`: they were
/// written once already, and may have been applied (what was answered is left out).
fn write(
    inner: &Inner,
    line: &mut Line,
    stop: &AtomicBool,
    mut calls: Vec<Call>,
    mut batch: Vec<Outgoing>,
    sent_before: bool,
) {
    if sent_before {
        unrepeatable(inner, &mut calls, &mut batch);
        if calls.is_empty() {
            // Nothing left to send (what was answered needs nothing more).
            inner.stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
            return;
        }
    }
    let sequence = &mut line.sequence;
    let result = line.conn.retry_tracked(stop, &mut |c, again| {
        if again {
            unrepeatable(inner, &mut calls, &mut batch);
        }
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        scripts::run_after(c, None, &mut calls, Some(&mut *sequence))
    });
    let transaction = calls.last().is_some_and(|call| call.script.is_none());
    match result {
        Some(Ok(replies)) => {
            // The at-most-once transaction, if it went: `EXEC`'s reply comes last.
            if transaction && let Some(refused) = replies.last().and_then(refused_transaction) {
                fail(inner, at_most_once(&mut batch), &format!("redis refused the task messages: {refused}"));
            }
            inner.stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        Some(Err(e)) => fail(inner, batch, &format!("redis refused the task messages: {e}")),
        None => fail(inner, batch, "the broker shut down while redis was unreachable"),
    }
}

/// Reads the replies to what callers wrote; the calls of a batch whose replies cannot all
/// be read (the connection broke, or a reply is an error) are sent again the ordinary way
/// — those that were answered are not, and neither is an at-most-once transaction whose
/// outcome is unknown.
fn answer(inner: &Inner, line: &mut Line, stop: &AtomicBool) {
    while let Some(Written { mut calls, mut batch, generation }) = line.unanswered.pop_front() {
        let mut done = vec![false; calls.len()];
        let mut last = None;
        if generation.is_some() && generation == line.conn.generation() {
            for answered in done.iter_mut() {
                match line.conn.once(&mut |c| c.recv_response()) {
                    // An error reply (a script cache flushed, …): read on, to stay in step.
                    Ok(redis::Value::ServerError(e)) => last = Some(redis::Value::ServerError(e)),
                    Ok(value) => {
                        *answered = true;
                        last = Some(value);
                    }
                    // `once` dropped the connection; what follows was written on it too.
                    Err(e) if is_connection_error(&e) => {
                        last = None;
                        break;
                    }
                    Err(_) => last = None,
                }
            }
        }
        // `EXEC` (the last call, if there is a transaction) answered: the transaction's
        // messages were queued, or refused.
        let settled = calls.last().is_some_and(|call| call.script.is_none()) && done.last() == Some(&true);
        if settled && let Some(refused) = last.as_ref().and_then(refused_transaction) {
            fail(inner, at_most_once(&mut batch), &format!("redis refused the task messages: {refused}"));
        }
        // Left to send: the scripts not answered, and the transaction if its outcome is
        // unknown (`write` drops it and fails its messages).
        let mut answered = done.into_iter();
        calls.retain(|call| {
            let answered = answered.next().unwrap_or(false);
            let in_settled_transaction = settled && call.script.is_none();
            !(answered || in_settled_transaction)
        });
        if calls.is_empty() {
            inner.stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
            continue;
        }
        write(inner, line, stop, calls, batch, true);
    }
}

/// One `PUSH` per queue, in order, at most `max` messages each; the messages' bytes move
/// into the calls.
///
/// At-most-once messages follow, in one transaction (`MULTI` … `EXEC`) of plain `LPUSH`es
/// and their queues' wake tokens: no script (Lua copies every message it is handed, which
/// costs Redis more than the push), no batch number — and so never sent twice; all of them
/// are queued, or none, and `EXEC`'s reply says which (see [`unrepeatable`]).
fn push_calls(batch: &mut [Outgoing], max: usize, sequence: &mut Sequence) -> Vec<Call> {
    let mut calls: Vec<(String, Call, usize)> = Vec::new();
    let mut plain: Vec<(String, Call, usize)> = Vec::new();
    let mut wakes: Vec<&str> = Vec::new();
    for outgoing in batch.iter_mut() {
        let bytes = std::mem::take(&mut outgoing.bytes);
        let list = if outgoing.at_most_once { &outgoing.queue.amo } else { &outgoing.queue.pending };
        let group = if outgoing.at_most_once { &mut plain } else { &mut calls };
        let open = group.iter_mut().rev().find(|(key, _, n)| key == list && *n < max);
        match open {
            Some((_, call, n)) => {
                call.args.push(bytes);
                *n += 1;
            }
            None if outgoing.at_most_once => {
                plain.push((list.clone(), Call::command("LPUSH").arg(list.as_bytes()).arg(bytes), 1));
                if !wakes.contains(&outgoing.queue.wake.as_str()) {
                    wakes.push(&outgoing.queue.wake);
                }
            }
            None => {
                // Numbered, so a retry after a lost reply does not queue it twice.
                let (seq_key, seq) = sequence.next(&outgoing.queue);
                let call = Call::new(&scripts::PUSH)
                    .key(list.clone())
                    .key(outgoing.queue.wake.clone())
                    .key(seq_key)
                    .numbered(seq)
                    .arg(SEQ_TTL)
                    .arg(bytes);
                calls.push((list.clone(), call, 1));
            }
        }
    }
    let mut calls: Vec<Call> = calls.into_iter().map(|(_, call, _)| call).collect();
    if !plain.is_empty() {
        calls.push(Call::command("MULTI"));
        calls.extend(plain.into_iter().map(|(_, call, _)| call));
        for wake in wakes {
            // One token, as the scripts leave it: what idle consumers block on.
            calls.push(Call::command("LPUSH").arg(wake.as_bytes()).arg("1"));
            calls.push(Call::command("LTRIM").arg(wake.as_bytes()).arg("0").arg("0"));
        }
        calls.push(Call::command("EXEC"));
    }
    calls
}

/// Before `calls` are sent again after the connection broke with them on their way: drops
/// the at-most-once transaction (it may have been applied, and must not be applied twice)
/// and fails its messages, whose fate is unknown. The scripts stay: numbered, they apply
/// once.
fn unrepeatable(inner: &Inner, calls: &mut Vec<Call>, batch: &mut Vec<Outgoing>) {
    let before = calls.len();
    calls.retain(|call| call.script.is_some());
    if calls.len() == before {
        return;
    }
    fail(
        inner,
        at_most_once(batch),
        "the connection broke while these at-most-once messages were on their way: they may or may not have been \
         queued, and are not sent twice",
    );
}

/// Takes the at-most-once messages (the transaction's) out of `batch`.
fn at_most_once(batch: &mut Vec<Outgoing>) -> Vec<Outgoing> {
    let (amo, rest) = std::mem::take(batch).into_iter().partition(|o| o.at_most_once);
    *batch = rest;
    amo
}

/// Why Redis refused an at-most-once transaction, from `EXEC`'s reply (`None`: it was
/// applied, or the reply is a script's).
fn refused_transaction(reply: &redis::Value) -> Option<String> {
    match reply {
        redis::Value::ServerError(e) => Some(format!("{e:?}")),
        redis::Value::Nil => Some("the transaction was aborted".to_owned()),
        redis::Value::Array(results) => results.iter().find_map(|r| match r {
            redis::Value::ServerError(e) => Some(format!("{e:?}")),
            _ => None,
        }),
        _ => None,
    }
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
