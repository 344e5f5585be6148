//! Storing reports and settling leases: the plan of script calls for a batch (shared by
//! worker threads, which store their own completions with their next fetch), and a
//! background thread for what does not come from a worker thread of this broker — progress
//! of foreign deliveries, dead letters, tasks given back, reports of mixed transports.
//!
//! Per queue, consecutive reports and completions share one `COMPLETE` script that checks
//! each lease, releases it and stores the report in the same step. Reports of one call
//! keep their order: they leave in order, by one channel or one connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::id::{IdMaker, UuidV7};
use dingo_core::{BrokerError, BrokerErrorKind};
use redis::Value;

use super::fetcher::Completion;
use super::{DeadLetter, Inner, Thread, lock};
use crate::keys::QueueKeys;
use crate::scripts::{self, Call};

/// How long markers of applied batches live (longer than any retry of the batch).
pub(crate) const MARKER_TTL: &str = "600000";

/// One thing to store.
pub(crate) enum Op {
    /// A report without a lease to release (progress, at-most-once tasks, foreign acks), for
    /// caller process `caller`.
    Report { queue: Arc<QueueKeys>, caller: String, bytes: Vec<u8> },
    /// The final report (if the caller wants one) and the release of the lease `token`.
    Complete { queue: Arc<QueueKeys>, token: String, caller: Option<String>, bytes: Option<Vec<u8>> },
    /// A message to the dead letters: by lease token (the server has the bytes), or the
    /// bytes themselves (`token` empty).
    Dead { queue: Arc<QueueKeys>, token: String, reason: String, bytes: Vec<u8> },
    /// Leased tokens and at-most-once messages given back unstarted.
    Requeue { queue: Arc<QueueKeys>, tokens: Vec<String>, amo: Vec<Vec<u8>> },
}

impl Op {
    fn queue(&self) -> &Arc<QueueKeys> {
        match self {
            Op::Report { queue, .. }
            | Op::Complete { queue, .. }
            | Op::Dead { queue, .. }
            | Op::Requeue { queue, .. } => queue,
        }
    }
}

pub(crate) struct Completer {
    tx: Sender<Op>,
    thread: Thread,
}

impl Completer {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Completer, BrokerError> {
        let (tx, rx) = crossbeam_channel::bounded(inner.options.send_buffer);
        let thread = Thread::spawn("dingo-redis-done", move |stop| complete_loop(&inner, &rx, &stop))?;
        Ok(Completer { tx, thread })
    }

    pub(crate) fn push(&self, op: Op) -> Result<(), BrokerError> {
        self.tx.send(op).map_err(|_| BrokerError::new(BrokerErrorKind::Closed, "the redis broker is shut down"))
    }

    /// Stores what is queued, then stops.
    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

fn complete_loop(inner: &Arc<Inner>, rx: &Receiver<Op>, stop: &AtomicBool) {
    let mut conn = inner.conn("report writer", Origin::Reporter, false);
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
        let plan = Plan::new(&mut batch, inner);
        match conn.retry(stop, &mut |c| scripts::run_batch(c, &plan.calls)) {
            Some(Ok(results)) => account(inner, &plan.kinds, &results),
            Some(Err(e)) => error(inner, format!("{} report(s) or acknowledgement(s) were refused: {e}", batch.len())),
            // Leases of what was not stored expire and the tasks run again elsewhere.
            None => error(inner, format!("{} report(s) not stored: redis unreachable at shutdown", batch.len())),
        }
        release(inner, &batch);
    }
}

/// The plan for a worker thread's completions; also returns them as operations (to
/// [`release`] once stored).
pub(crate) fn complete_calls(inner: &Inner, done: Vec<Completion>) -> (Plan, Vec<Op>) {
    plan(inner, done.into_iter().map(Completion::into_op).collect())
}

/// The plan for some operations, which it returns (their bytes moved into the plan).
pub(crate) fn plan(inner: &Inner, mut ops: Vec<Op>) -> (Plan, Vec<Op>) {
    let plan = Plan::new(&mut ops, inner);
    (plan, ops)
}

/// The script calls of one batch, with what to do with their results.
pub(crate) struct Plan {
    pub(crate) calls: Vec<Call>,
    pub(crate) kinds: Vec<Kind>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Complete { finals: usize },
    Dead { count: usize },
    Requeue,
}

impl Plan {
    /// Per queue, consecutive reports and completions share one `COMPLETE`; dead letters and
    /// requeues get calls of their own, in their place in the order. Report bytes move
    /// into the calls.
    fn new(batch: &mut [Op], inner: &Inner) -> Plan {
        let ttl = inner.options.result_ttl.as_millis().to_string();
        let mut plan = Plan { calls: Vec::new(), kinds: Vec::new() };
        // Per call: its callers (reply index k is callers[k - 1]). Per queue: its open COMPLETE.
        let mut callers: Vec<Vec<String>> = Vec::new();
        let mut open: HashMap<String, usize> = HashMap::new();
        for op in batch.iter_mut() {
            let queue = op.queue().clone();
            match op {
                Op::Report { caller, bytes, .. } => {
                    let index = plan.open_complete(&mut open, &mut callers, &queue, &ttl);
                    let k = plan.reply_index(&mut callers[index], index, &queue, caller);
                    plan.calls[index].args.extend([Vec::new(), k.to_string().into_bytes(), std::mem::take(bytes)]);
                }
                Op::Complete { token, caller, bytes, .. } => {
                    let index = plan.open_complete(&mut open, &mut callers, &queue, &ttl);
                    let k = match caller {
                        Some(caller) => plan.reply_index(&mut callers[index], index, &queue, caller),
                        None => 0,
                    };
                    let report = bytes.take().unwrap_or_default();
                    plan.calls[index].args.extend([token.clone().into_bytes(), k.to_string().into_bytes(), report]);
                    if let Kind::Complete { finals } = &mut plan.kinds[index] {
                        *finals += 1;
                    }
                }
                Op::Dead { token, reason, bytes, .. } => {
                    open.remove(&queue.prefix);
                    let call = Call::new(&scripts::DEAD)
                        .key(queue.leases.clone())
                        .key(queue.inflight.clone())
                        .key(queue.dead.clone())
                        .arg(inner.options.max_dead_letters.to_string())
                        .arg(token.clone())
                        .arg(DeadLetter::prefix(reason))
                        .arg(std::mem::take(bytes));
                    plan.push(call, Kind::Dead { count: 1 }, &mut callers);
                }
                Op::Requeue { tokens, amo, .. } => {
                    open.remove(&queue.prefix);
                    let mut call = Call::new(&scripts::REQUEUE)
                        .key(queue.leases.clone())
                        .key(queue.inflight.clone())
                        .key(queue.pending.clone())
                        .key(queue.wake.clone())
                        .key(queue.amo.clone())
                        .arg(tokens.len().to_string());
                    call.args.extend(tokens.iter().map(|t| t.clone().into_bytes()));
                    call.args.append(amo);
                    plan.push(call, Kind::Requeue, &mut callers);
                }
            }
        }
        plan
    }

    fn push(&mut self, call: Call, kind: Kind, callers: &mut Vec<Vec<String>>) -> usize {
        self.calls.push(call);
        self.kinds.push(kind);
        callers.push(Vec::new());
        self.calls.len() - 1
    }

    /// The queue's open `COMPLETE` call, started if there is none.
    fn open_complete(
        &mut self,
        open: &mut HashMap<String, usize>,
        callers: &mut Vec<Vec<String>>,
        queue: &QueueKeys,
        ttl: &str,
    ) -> usize {
        if let Some(&index) = open.get(&queue.prefix) {
            return index;
        }
        let batch = UuidV7.next_id();
        let call = Call::new(&scripts::COMPLETE)
            .key(queue.leases.clone())
            .key(queue.inflight.clone())
            .key(queue.marker("done", batch.as_str()))
            .arg(MARKER_TTL)
            .arg(ttl);
        let index = self.push(call, Kind::Complete { finals: 0 }, callers);
        open.insert(queue.prefix.clone(), index);
        index
    }

    /// The 1-based index of `caller`'s reply list among a `COMPLETE`'s (`KEYS[2 + 2k]`, its
    /// notify list `KEYS[3 + 2k]`), added if new.
    fn reply_index(&mut self, callers: &mut Vec<String>, index: usize, queue: &QueueKeys, caller: &str) -> usize {
        if let Some(i) = callers.iter().position(|c| c == caller) {
            return i + 1;
        }
        callers.push(caller.to_owned());
        self.calls[index].keys.push(queue.reply(caller));
        self.calls[index].keys.push(queue.notify(caller));
        callers.len()
    }
}

/// Counts what a batch did, and warns about reports rejected by fencing.
pub(crate) fn account(inner: &Inner, kinds: &[Kind], results: &[Value]) {
    for (kind, result) in kinds.iter().zip(results) {
        match kind {
            Kind::Complete { finals } => {
                let lost = match result {
                    Value::Array(tokens) => tokens.len(),
                    _ => 0,
                };
                inner.stats.completed.fetch_add((finals - lost.min(*finals)) as u64, Ordering::Relaxed);
                if lost > 0 {
                    inner.stats.rejected_reports.fetch_add(lost as u64, Ordering::Relaxed);
                    inner.events.emit(Event::new(
                        Origin::Reporter,
                        Level::Warning,
                        EventKind::ReportFailed,
                        format!(
                            "{lost} late report(s) rejected: the lease had expired and the task was handed to another \
                             worker"
                        ),
                    ));
                }
            }
            Kind::Dead { count } => {
                inner.stats.dead_lettered.fetch_add(*count as u64, Ordering::Relaxed);
            }
            Kind::Requeue => {}
        }
    }
}

/// The leases settled by these operations need no renewal any more.
pub(crate) fn release(inner: &Inner, ops: &[Op]) {
    let mut leased = lock(&inner.leased);
    for op in ops {
        let (queue, tokens): (&Arc<QueueKeys>, Vec<&str>) = match op {
            Op::Complete { queue, token, .. } | Op::Dead { queue, token, .. } => (queue, vec![token.as_str()]),
            Op::Requeue { queue, tokens, .. } => (queue, tokens.iter().map(String::as_str).collect()),
            Op::Report { .. } => continue,
        };
        if let Some((_, held)) = leased.get_mut(queue.prefix.as_str()) {
            for token in tokens {
                held.remove(token);
            }
        }
    }
}

fn error(inner: &Inner, message: String) {
    inner.events.emit(Event::new(Origin::Reporter, Level::Error, EventKind::ReportFailed, message));
}
