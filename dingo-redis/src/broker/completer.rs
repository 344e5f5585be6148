//! The reporter's writer: workers hand over reports and acknowledgements and go on to the
//! next task; one thread stores whatever has accumulated — per queue one `COMPLETE` script
//! that checks each lease, releases it and stores the report in the same step — all in one
//! round trip. Reports of one call keep their order: they travel one channel, in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::{BrokerError, BrokerErrorKind};
use redis::Value;

use super::{DeadLetter, Inner, Thread, lock};
use crate::keys::QueueKeys;
use crate::scripts::{self, Call};

/// One thing to store.
pub(crate) enum Op {
    /// A report without a lease to release (progress, at-most-once tasks, foreign acks).
    Report { queue: Arc<QueueKeys>, reply: String, bytes: Vec<u8> },
    /// The final report (if the caller wants one) and the release of the lease `token`.
    Complete { queue: Arc<QueueKeys>, token: String, reply: Option<String>, bytes: Option<Vec<u8>> },
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
            Some(Ok(results)) => plan.done(inner, &results),
            Some(Err(e)) => error(inner, format!("{} report(s) or acknowledgement(s) were refused: {e}", batch.len())),
            // Leases of what was not stored expire and the tasks run again elsewhere.
            None => error(inner, format!("{} report(s) not stored: redis unreachable at shutdown", batch.len())),
        }
        release(inner, &batch);
    }
}

/// The script calls of one batch, with what to do with their results.
struct Plan {
    calls: Vec<Call>,
    kinds: Vec<Kind>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Complete { finals: usize },
    Dead { count: usize },
    Requeue,
}

impl Plan {
    /// Per queue, consecutive reports and completions share one `COMPLETE`; dead letters and
    /// requeues get calls of their own, in their place in the order.
    fn new(batch: &mut [Op], inner: &Inner) -> Plan {
        let ttl = inner.options.result_ttl.as_millis().to_string();
        let mut plan = Plan { calls: Vec::new(), kinds: Vec::new() };
        // Per call: its reply keys (KEYS[3..] of a COMPLETE). Per queue: its open COMPLETE.
        let mut replies: Vec<Vec<String>> = Vec::new();
        let mut open: HashMap<String, usize> = HashMap::new();
        for op in batch.iter_mut() {
            let queue = op.queue().clone();
            let queue = &queue;
            match op {
                Op::Report { reply, bytes, .. } => {
                    let index = plan.open_complete(&mut open, &mut replies, queue, &ttl);
                    let k = plan.reply_index(&mut replies[index], index, reply);
                    plan.calls[index].args.extend([Vec::new(), k.to_string().into_bytes(), std::mem::take(bytes)]);
                }
                Op::Complete { token, reply, bytes, .. } => {
                    let index = plan.open_complete(&mut open, &mut replies, queue, &ttl);
                    let k = match reply {
                        Some(reply) => plan.reply_index(&mut replies[index], index, reply),
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
                    plan.push(call, Kind::Dead { count: 1 }, &mut replies);
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
                    plan.push(call, Kind::Requeue, &mut replies);
                }
            }
        }
        plan
    }

    fn push(&mut self, call: Call, kind: Kind, replies: &mut Vec<Vec<String>>) -> usize {
        self.calls.push(call);
        self.kinds.push(kind);
        replies.push(Vec::new());
        self.calls.len() - 1
    }

    /// The queue's open `COMPLETE` call, started if there is none.
    fn open_complete(
        &mut self,
        open: &mut HashMap<String, usize>,
        replies: &mut Vec<Vec<String>>,
        queue: &QueueKeys,
        ttl: &str,
    ) -> usize {
        if let Some(&index) = open.get(&queue.prefix) {
            return index;
        }
        let call = Call::new(&scripts::COMPLETE).key(queue.leases.clone()).key(queue.inflight.clone()).arg(ttl);
        let index = self.push(call, Kind::Complete { finals: 0 }, replies);
        open.insert(queue.prefix.clone(), index);
        index
    }

    /// The 1-based index of `reply` among a `COMPLETE`'s reply keys (`KEYS[3..]`), added
    /// if new.
    fn reply_index(&mut self, replies: &mut Vec<String>, index: usize, reply: &str) -> usize {
        if let Some(i) = replies.iter().position(|r| r == reply) {
            return i + 1;
        }
        replies.push(reply.to_owned());
        self.calls[index].keys.push(reply.to_owned());
        replies.len()
    }

    fn done(&self, inner: &Inner, results: &[Value]) {
        for (kind, result) in self.kinds.iter().zip(results) {
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
                                "{lost} late report(s) rejected: the lease had expired and the task was handed to \
                                 another worker"
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
}

/// The leases settled by this batch need no renewal any more.
fn release(inner: &Inner, batch: &[Op]) {
    let mut leased = lock(&inner.leased);
    for op in batch {
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
