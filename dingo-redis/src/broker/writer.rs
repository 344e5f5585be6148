//! The producer's writer. Callers hand task messages over a bounded channel and go on; one
//! thread writes whatever has accumulated — one transaction of plain `LPUSH`es, in one
//! round trip — so many calls in flight cost few round trips.
//!
//! A caller that finds nothing queued and the connection idle writes its message itself
//! and goes on; the writer thread reads the reply later (or sends the batch again if the
//! connection broke: batches are numbered, so they apply once). Waking the writer thread
//! to write would cost a thread wake-up — about 100 µs on a small VM — on every lone call.
//!
//! The transaction holds no Lua: Redis's Lua hashes every byte it is handed. The sender's
//! batch number rides along as a plain `SET` of its sequence key, and a transaction whose
//! outcome a broken connection left unknown is sent again as numbered scripts
//! ([`PUSH`](crate::scripts::PUSH), [`Redo`]), which apply once — after the sender has ended
//! its old connection at the server with `CLIENT KILL`, so a late copy of the transaction
//! still on its way can never run after them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Select, SendTimeoutError, Sender, TryRecvError, TrySendError};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::{ReportBody, ReportMessage};
use dingo_core::{BrokerError, BrokerErrorKind, CallKey, TaskError, TaskErrorKind};

use super::{Inner, NAME, Thread, actor, lock};
use crate::conn::{Conn, is_connection_error};
use crate::keys::QueueKeys;
use crate::scripts::{self, Call, Readiness, Redo, SEQ_TTL, Sequence};
use dingo_core::broker::kit::closed;

/// A task message on its way to Redis.
pub(crate) struct Outgoing {
    pub(crate) queue: Arc<QueueKeys>,
    pub(crate) at_most_once: bool,
    pub(crate) bytes: Vec<u8>,
    /// When it is due (ms since the Unix epoch), if later than now: it goes to the queue's
    /// delayed set, not to the queue.
    pub(crate) due: Option<u64>,
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
    /// Numbers the sends, delayed ones too (under their own actor, see [`push_calls`]).
    sequence: Sequence,
    /// The actor delayed sends are numbered as (`delay.P`).
    delay_actor: String,
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
    /// Which of `calls` carries each message of `batch`.
    owners: Vec<usize>,
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
            conn: inner.conn("task sender", Origin::Producer, false).fencing(),
            sequence: Sequence::new(actor::SEND, &inner.process),
            delay_actor: format!("{}.{}", actor::DELAY, inner.process),
            unanswered: VecDeque::new(),
            closed: false,
        }));
        let thread = {
            let (inner, line) = (inner.clone(), line.clone());
            Thread::spawn("dingo-redis-send", move |stop| write_loop(&inner, &rx, &line, &stop.flag))?
        };
        Ok(Writer { inner, tx, line, thread })
    }

    pub(crate) fn send(&self, outgoing: Outgoing, timeout: Option<Duration>) -> Result<(), BrokerError> {
        let Some(outgoing) = self.write_here(outgoing) else { return Ok(()) };
        let full = || BrokerError::new(BrokerErrorKind::Full, "the redis send buffer is full");
        let gone = || closed(NAME);
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
        let Ok(mut guard) = self.line.try_lock() else { return Some(outgoing) };
        let line = &mut *guard;
        let generation = line.conn.generation();
        if line.closed || !self.tx.is_empty() || !line.unanswered.is_empty() || generation.is_none() {
            return Some(outgoing);
        }
        let mut batch = vec![outgoing];
        let scripted = !line.conn.fenced();
        let (calls, owners) =
            push_calls(&mut batch, self.inner.options.batch, &mut line.sequence, &line.delay_actor, scripted);
        let packed = scripts::pack(&calls);
        let written = line.conn.once(&mut |c| c.send_packed_command(&packed));
        let generation = if written.is_ok() { generation } else { None };
        // Written or not, the writer thread reads the reply, or sends the batch again.
        line.unanswered.push_back(Written { calls, batch, owners, generation });
        drop(guard);
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
        let scripted = !line.conn.fenced();
        let (calls, owners) =
            push_calls(&mut batch, inner.options.batch, &mut line.sequence, &line.delay_actor, scripted);
        write(inner, line, stop, Written { calls, batch, owners, generation: None }, false);
    }
}

/// Writes a batch's calls until they go through; `sent_before`: they were written once
/// already, and may have been applied (what was answered is left out).
fn write(inner: &Inner, line: &mut Line, stop: &AtomicBool, written: Written, sent_before: bool) {
    let Written { mut calls, mut batch, owners, generation: _ } = written;
    if sent_before {
        unrepeatable(inner, &mut calls, &mut batch);
        if calls.is_empty() {
            // Nothing left to send (what was answered needs nothing more).
            count_sent(inner, &batch);
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
        scripts::run(c, &mut calls, Some(&mut *sequence))
    });
    match result {
        Some(Ok(replies)) => {
            // The transaction, if it went as written: `EXEC`'s reply comes last.
            if is_transaction(&calls)
                && let Some(exec) = replies.last()
            {
                settle_transaction(inner, &calls, exec, &owners, &mut batch);
            }
            count_sent(inner, &batch);
        }
        Some(Err(e)) => fail(inner, batch, &format!("redis refused the task messages: {e}")),
        None => fail(inner, batch, "the broker shut down while redis was unreachable"),
    }
}

/// Reads the replies to what callers wrote; a batch whose transaction did not answer (the
/// connection broke, or a reply is an error) is sent again the ordinary way — its
/// at-least-once messages as numbered scripts, which apply once; its at-most-once messages
/// not at all (see [`unrepeatable`]). A batch the server refused whole because it was not
/// ready (loading its data after a restart, …) ran nothing: it goes again as it was, once
/// the server is ready.
fn answer(inner: &Inner, line: &mut Line, stop: &AtomicBool) {
    while let Some(Written { mut calls, mut batch, owners, generation }) = line.unanswered.pop_front() {
        let mut replies = Vec::with_capacity(calls.len());
        if generation.is_some() && generation == line.conn.generation() {
            while replies.len() < calls.len() {
                match line.conn.once(&mut |c| c.recv_response()) {
                    Ok(value) => replies.push(Some(value)),
                    // `once` dropped the connection; what follows was written on it too.
                    Err(e) if is_connection_error(&e) => break,
                    Err(_) => replies.push(None),
                }
            }
        }
        let whole: Option<Vec<redis::Value>> = replies.iter().cloned().collect();
        if let Some(whole) = whole.filter(|whole| whole.len() == calls.len()) {
            match scripts::readiness(calls.iter(), &whole) {
                Readiness::Refused(_) => {
                    write(inner, line, stop, Written { calls, batch, owners, generation: None }, false);
                    continue;
                }
                // What was refused runs after what followed it: new numbers (else it would
                // look applied, see `scripts::SEEN`), then as below.
                Readiness::Partly(_) => {
                    let all: Vec<usize> = (0..calls.len()).collect();
                    scripts::keep_what_ran(&mut calls, &all, whole, Some(&mut line.sequence));
                }
                Readiness::Ready => {}
            }
        }
        // An error reply (a script cache flushed, …) leaves its call unanswered.
        let done: Vec<bool> = (0..calls.len())
            .map(|i| matches!(replies.get(i), Some(Some(value)) if !matches!(value, redis::Value::ServerError(_))))
            .collect();
        let last = replies.last().cloned().flatten().filter(|_| replies.len() == calls.len());
        // `EXEC` (the last call, if there is a transaction) answered: the transaction's
        // messages were queued, or refused.
        let settled = is_transaction(&calls) && done.last() == Some(&true);
        if settled && let Some(exec) = &last {
            settle_transaction(inner, &calls, exec, &owners, &mut batch);
        }
        // Left to send: the scripts not answered, and the whole transaction if its outcome
        // is unknown — even the steps Redis acknowledged with `QUEUED` (`write` sends its
        // at-least-once messages again as scripts and fails the rest).
        let mut answered = done.into_iter();
        calls.retain(|call| {
            let answered = answered.next().unwrap_or(false);
            match call.script {
                Some(_) => !answered,
                None => !settled,
            }
        });
        if calls.is_empty() {
            count_sent(inner, &batch);
            continue;
        }
        write(inner, line, stop, Written { calls, batch, owners, generation: None }, true);
    }
}

/// Counts messages written.
fn count_sent(inner: &Inner, batch: &[Outgoing]) {
    inner.stats.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
    let delayed = batch.iter().filter(|o| o.due.is_some()).count();
    if delayed > 0 {
        inner.stats.delayed.fetch_add(delayed as u64, Ordering::Relaxed);
    }
}

/// One transaction (`MULTI` … `EXEC`) of plain commands: an `LPUSH` per queue list, in
/// order, at most `max` messages each, and one wake token per queue. No script: Lua hashes
/// every byte it is handed, which costs Redis more than the push. The messages' bytes move
/// into the calls; the second vector says which call carries each message of `batch`.
///
/// At-least-once messages are numbered per queue: a `SET` of the sender's sequence key
/// goes before their `LPUSH`, which carries how to send it again as a numbered `PUSH`
/// script ([`scripts::Redo`]) should the outcome be unknown — it then applies once. That
/// holds only if the transaction cannot run after the script: the sender's connection is
/// fenced ([`Conn::fencing`]). Where the server does not allow that (`scripted`), the
/// at-least-once messages go as numbered `PUSH` scripts from the start, ahead of the
/// transaction. At-most-once messages have no number and are never sent twice (see
/// [`unrepeatable`]).
///
/// Delayed messages (of either delivery mode) go ahead of the transaction as numbered
/// [`DELAY`](scripts::DELAY) scripts, at most `max` messages each, under the actor
/// `delay_actor` of their own: the transaction's plain `SET` of the sender's sequence key
/// does not check the number it overwrites, so scripts run before it on that key would
/// look unapplied when sent again. Both actors take their numbers from one `sequence`, so
/// that a call sent again after `NOSCRIPT` (renumbered from it) stays below what follows.
fn push_calls(
    batch: &mut [Outgoing],
    max: usize,
    sequence: &mut Sequence,
    delay_actor: &str,
    scripted: bool,
) -> (Vec<Call>, Vec<usize>) {
    let mut pushes: Vec<(Call, usize)> = Vec::new();
    let mut delays: Vec<(Call, usize)> = Vec::new();
    let mut owners = Vec::with_capacity(batch.len());
    let mut wakes: Vec<&str> = Vec::new();
    for outgoing in batch.iter_mut() {
        let bytes = std::mem::take(&mut outgoing.bytes);
        if let Some(due) = outgoing.due {
            let queue = &outgoing.queue;
            let open = delays.iter().rposition(|(call, n)| call.keys[0] == queue.delayed && *n < max);
            let at = match open {
                Some(at) => at,
                None => {
                    let (seq_key, seq) = sequence.next_for(queue.seq(delay_actor));
                    let call = Call::new(&scripts::DELAY)
                        .key(queue.delayed.clone())
                        .key(queue.delayed_wake.clone())
                        .key(seq_key)
                        .numbered(seq)
                        .arg(SEQ_TTL);
                    delays.push((call, 0));
                    delays.len() - 1
                }
            };
            let (call, n) = &mut delays[at];
            call.args.push(due.to_string().into_bytes());
            call.args.push(bytes);
            *n += 1;
            owners.push(Owner::Delay(at));
            continue;
        }
        let list = if outgoing.at_most_once { &outgoing.queue.amo } else { &outgoing.queue.pending };
        let open = pushes.iter().rposition(|(call, n)| call.args[0] == list.as_bytes() && *n < max);
        let at = match open {
            Some(at) => {
                pushes[at].0.args.push(bytes);
                pushes[at].1 += 1;
                at
            }
            None => {
                let mut call = Call::command("LPUSH").arg(list.as_bytes()).arg(bytes);
                if !outgoing.at_most_once {
                    let (seq_key, seq) = sequence.next(&outgoing.queue);
                    call.redo = Some(Redo { list: list.clone(), wake: outgoing.queue.wake.clone(), seq_key, seq });
                }
                pushes.push((call, 1));
                pushes.len() - 1
            }
        };
        owners.push(Owner::Push(at));
        if outgoing.at_most_once || !scripted {
            // The scripts leave their own wake tokens.
            if !wakes.contains(&outgoing.queue.wake.as_str()) {
                wakes.push(&outgoing.queue.wake);
            }
        }
    }
    let mut calls = Vec::new();
    let mut call_of = vec![0; pushes.len()];
    let (scripts, plain): (Vec<_>, Vec<_>) =
        pushes.into_iter().enumerate().partition(|(_, (call, _))| scripted && call.redo.is_some());
    for (i, (call, _)) in scripts {
        call_of[i] = calls.len();
        calls.extend(call.redone());
    }
    let delay_at = calls.len();
    calls.extend(delays.into_iter().map(|(call, _)| call));
    if !plain.is_empty() {
        calls.push(Call::command("MULTI"));
        for (i, (call, _)) in plain {
            if let Some(redo) = &call.redo {
                let set = Call::command("SET").arg(redo.seq_key.as_bytes()).numbered(redo.seq.clone());
                calls.push(set.arg("PX").arg(SEQ_TTL));
            }
            call_of[i] = calls.len();
            calls.push(call);
        }
        for wake in wakes {
            // One token, as the scripts leave it: what idle consumers block on.
            calls.push(Call::command("LPUSH").arg(wake.as_bytes()).arg("1"));
            calls.push(Call::command("LTRIM").arg(wake.as_bytes()).arg("0").arg("0"));
        }
        calls.push(Call::command("EXEC"));
    }
    let owners = owners
        .into_iter()
        .map(|owner| match owner {
            Owner::Push(at) => call_of[at],
            Owner::Delay(at) => delay_at + at,
        })
        .collect();
    (calls, owners)
}

/// Which call of [`push_calls`] carries a message, while they are put together.
enum Owner {
    /// The `at`-th list push.
    Push(usize),
    /// The `at`-th `DELAY`.
    Delay(usize),
}

/// Whether `calls` are a transaction as [`push_calls`] wrote it (not yet sent again as
/// scripts).
fn is_transaction(calls: &[Call]) -> bool {
    calls.last().is_some_and(|call| call.script.is_none())
}

/// Before `calls` are sent again after the connection broke with them on their way: turns
/// the transaction's at-least-once pushes into numbered `PUSH` scripts (they apply once,
/// whether the transaction went or not) and drops the rest of it; fails the at-most-once
/// messages, whose fate is unknown and which must not be queued twice. Scripts stay as
/// they are.
fn unrepeatable(inner: &Inner, calls: &mut Vec<Call>, batch: &mut Vec<Outgoing>) {
    // A transaction known to have run (its `EXEC` answered in a partly refused round trip,
    // see `Call::done`) is settled from that answer.
    if !is_transaction(calls) || calls.iter().any(|call| call.is("EXEC") && call.done.is_some()) {
        return;
    }
    *calls = std::mem::take(calls)
        .into_iter()
        .filter_map(|call| if call.script.is_some() { Some(call) } else { call.redone() })
        .collect();
    let amo = at_most_once(batch);
    if !amo.is_empty() {
        fail(
            inner,
            amo,
            "the connection broke while these at-most-once messages were on their way: they may or may not have \
             been queued, and are not sent twice",
        );
    }
}

/// Takes the at-most-once messages sent with plain commands out of `batch` (delayed ones
/// went as numbered scripts, which apply once however often they are sent).
fn at_most_once(batch: &mut Vec<Outgoing>) -> Vec<Outgoing> {
    let (amo, rest) = std::mem::take(batch).into_iter().partition(|o| o.at_most_once && o.due.is_none());
    *batch = rest;
    amo
}

/// Reads `EXEC`'s reply to the transaction in `calls`: fails its messages if Redis refused
/// the whole transaction, else the messages of each step it refused (a step that fails does
/// not undo the others), and leaves in `batch` the messages that were queued.
fn settle_transaction(inner: &Inner, calls: &[Call], exec: &redis::Value, owners: &[usize], batch: &mut Vec<Outgoing>) {
    let multi = calls.iter().position(|call| call.script.is_none() && call.command == "MULTI").unwrap_or(0);
    let refused: Vec<(Option<usize>, String)> = match exec {
        redis::Value::ServerError(e) => vec![(None, format!("{e:?}"))],
        redis::Value::Nil => vec![(None, "the transaction was aborted".to_owned())],
        // Step j of the transaction is the call j + 1 after `MULTI`.
        redis::Value::Array(results) => results
            .iter()
            .enumerate()
            .filter_map(|(j, r)| match r {
                redis::Value::ServerError(e) => Some((Some(multi + 1 + j), format!("{e:?}"))),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if refused.is_empty() {
        return;
    }
    let mut failed: Vec<Vec<Outgoing>> = refused.iter().map(|_| Vec::new()).collect();
    let mut kept = Vec::with_capacity(batch.len());
    for (outgoing, &owner) in std::mem::take(batch).into_iter().zip(owners) {
        let in_transaction = owner > multi;
        match refused.iter().position(|(at, _)| in_transaction && at.is_none_or(|at| at == owner)) {
            Some(i) => failed[i].push(outgoing),
            None => kept.push(outgoing),
        }
    }
    *batch = kept;
    for ((_, why), messages) in refused.iter().zip(failed) {
        if !messages.is_empty() {
            fail(inner, messages, &format!("redis refused the task messages: {why}"));
        }
    }
}

/// Tells the callers of messages that could not be written (their handles would wait
/// forever otherwise).
fn fail(inner: &Inner, batch: Vec<Outgoing>, why: &str) {
    inner.events.emit(Event::new(
        Origin::Producer,
        Level::Error,
        EventKind::SendFailed,
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
