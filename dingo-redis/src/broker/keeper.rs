//! The lease keeper: renews the leases of the tasks this process holds (so a long task is
//! not handed to another worker), and returns the expired leases of the queues it serves to
//! their queue (so the tasks of a worker that died run again), and polls the cancel
//! generations of the queues it serves every [`CANCEL_POLL`], loading new cancels into the
//! process's set (so a running task sees its cancel, and a task fetched before the cancel
//! does not start). Runs for as long as the process consumes anything, not only at start-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::wire::{self, Known, REDELIVERED_MARK};
use dingo_core::message::{ReplyTo, ReportBody, ReportMessage};
use dingo_core::{BrokerError, CallKey};

use super::settle::Op;
use super::{CANCEL_POLL, Inner, Thread, dead_entry, lock};
use crate::keys::QueueKeys;
use crate::scripts::{self, Call};

pub(crate) struct Keeper {
    thread: Thread,
}

impl Keeper {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Keeper, BrokerError> {
        let thread = Thread::spawn("dingo-redis-leases", move |stop| keep(&inner, &stop.flag))?;
        Ok(Keeper { thread })
    }

    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

fn keep(inner: &Arc<Inner>, stop: &AtomicBool) {
    let mut conn = inner.conn("lease keeper", Origin::Consumer, false);
    let renew_every = inner.options.lease / 3;
    let reap_every = inner.options.reap_interval;
    let mut next_renew = Instant::now() + renew_every;
    let mut next_reap = Instant::now();
    let mut next_poll = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= next_poll {
            poll_cancels(inner, &mut conn, stop);
            next_poll = now + CANCEL_POLL;
        }
        if now >= next_renew {
            renew(inner, &mut conn, stop);
            next_renew = now + renew_every;
        }
        if now >= next_reap {
            reap(inner, &mut conn, stop);
            next_reap = now + reap_every;
        }
        // A timer, not a poll for work: wake at the next deadline, in short slices so a
        // stop is seen promptly.
        let next = next_renew.min(next_reap).min(next_poll);
        std::thread::sleep(next.saturating_duration_since(Instant::now()).min(Duration::from_millis(50)));
    }
}

/// Loads the cancels this process lacks of the queues it consumes: one script per queue,
/// in one round trip, that answers with the generation alone while nothing changed.
fn poll_cancels(inner: &Inner, conn: &mut crate::conn::Conn, stop: &AtomicBool) {
    // Lapsed cancels are pruned by the set itself as it grows (and never count).
    let queues: Vec<Arc<QueueKeys>> = lock(&inner.consumed).values().map(|(queue, _)| queue.clone()).collect();
    if queues.is_empty() {
        return;
    }
    let calls: Vec<Call> = queues.iter().map(|q| inner.cancels_call(q)).collect();
    let Some(Ok(results)) = conn.retry(stop, &mut |c| scripts::run_batch(c, &calls)) else {
        return;
    };
    for (queue, result) in queues.iter().zip(results) {
        inner.load_cancels(queue, result);
    }
}

fn renew(inner: &Inner, conn: &mut crate::conn::Conn, stop: &AtomicBool) {
    let lease = inner.options.lease.as_millis().to_string();
    let held: Vec<(Arc<QueueKeys>, Vec<Arc<str>>)> = lock(&inner.leases)
        .values()
        .filter(|(_, consumers)| !consumers.is_empty())
        .map(|(queue, consumers)| (queue.clone(), consumers.iter().cloned().collect()))
        .collect();
    let calls: Vec<Call> = held
        .iter()
        .map(|(queue, consumers)| {
            let mut call = Call::new(&scripts::RENEW).key(queue.consumers.clone()).arg(lease.clone());
            call.args.extend(consumers.iter().map(|c| c.as_bytes().to_vec()));
            call
        })
        .collect();
    if calls.is_empty() {
        return;
    }
    let Some(Ok(results)) = conn.retry(stop, &mut |c| scripts::run_batch(c, &calls)) else {
        return;
    };
    let mut lost_total = 0;
    for ((queue, consumers), result) in held.iter().zip(results) {
        let lost: Vec<String> = redis::from_redis_value(result).unwrap_or_default();
        inner.stats.renewed.fetch_add((consumers.len() - lost.len().min(consumers.len())) as u64, Ordering::Relaxed);
        if !lost.is_empty()
            && let Some((_, held)) = lock(&inner.leases).get_mut(&queue.prefix)
        {
            // Consumers gone since the list was taken (threads that stopped) are not lost.
            for consumer in &lost {
                if held.remove(consumer.as_str()) {
                    lost_total += 1;
                }
            }
        }
    }
    if lost_total > 0 {
        inner.events.emit(Event::new(
            Origin::Consumer,
            Level::Warning,
            EventKind::LeaseLost,
            format!(
                "{lost_total} worker lease(s) expired before renewal (this process was stalled longer than the lease): \
                 their tasks were handed to other workers and their reports from here will be rejected"
            ),
        ));
    }
}

/// How much of a dead-lettered message the reaper reads back: its name, id and reply
/// address come first (see `wire`), so its caller can be told.
const HEAD: usize = 4096;

fn reap(inner: &Arc<Inner>, conn: &mut crate::conn::Conn, stop: &AtomicBool) {
    let queues: Vec<Arc<QueueKeys>> = lock(&inner.consumed).values().map(|(queue, _)| queue.clone()).collect();
    if queues.is_empty() {
        return;
    }
    // Declared again and again: a server that restarted without its data forgot the tasks,
    // and callers would find them unroutable.
    let tasks = crate::keys::tasks(&inner.options.namespace);
    let mut declare = redis::cmd("SADD");
    declare.arg(&tasks);
    for queue in &queues {
        declare.arg(&queue.task);
    }
    let _ = conn.once(&mut |c| declare.query::<i64>(c));
    let reason = dead_entry::prefix(&format!(
        "redelivered {} times: every worker that took it stopped renewing its lease (died or stalled)",
        inner.options.max_redeliveries
    ));
    let calls: Vec<Call> = queues
        .iter()
        .map(|q| {
            Call::new(&scripts::REAP)
                .key(q.consumers.clone())
                .key(q.pending.clone())
                .key(q.wake.clone())
                .key(q.dead.clone())
                .key(q.dead_bytes.clone())
                .arg("100")
                .arg(REDELIVERED_MARK.to_vec())
                .arg(inner.options.max_redeliveries.to_string())
                .arg(inner.options.max_dead_letters.to_string())
                .arg(reason.clone())
                .arg(q.processing.clone())
                .arg(HEAD.to_string())
                .arg(inner.options.max_dead_letter_bytes.to_string())
        })
        .collect();
    let Some(Ok(results)) = conn.retry(stop, &mut |c| scripts::run_batch(c, &calls)) else {
        return;
    };
    for (queue, result) in queues.iter().zip(results) {
        let (requeued, dead, heads, dropped): (u64, u64, Vec<Vec<u8>>, u64) =
            redis::from_redis_value(result).unwrap_or((0, 0, Vec::new(), 0));
        super::settle::dropped_dead_letters(inner, &queue.prefix, dropped);
        if requeued > 0 {
            inner.stats.requeued_expired.fetch_add(requeued, Ordering::Relaxed);
            inner.events.emit(Event::new(
                Origin::Consumer,
                Level::Warning,
                EventKind::Redelivered,
                format!(
                    "{requeued} task(s) of `{}` held by worker(s) whose lease expired went back to the queue",
                    queue.prefix
                ),
            ));
        }
        if dead > 0 {
            inner.stats.dead_lettered.fetch_add(dead, Ordering::Relaxed);
            for head in heads {
                given_up(inner, queue, head);
            }
        }
    }
}

/// A task whose workers kept dying went to the dead letters: an event, and a `WorkerLost`
/// failure to its caller (who would otherwise wait for a result that never comes).
fn given_up(inner: &Arc<Inner>, queue: &Arc<QueueKeys>, head: Vec<u8>) {
    let (name, id, caller) = match wire::decode_delivery(head, &Known::default()) {
        Ok((message, _)) => {
            let caller = match message.reply_to {
                ReplyTo::Address(caller) => Some(caller),
                _ => None,
            };
            (Some(message.name), Some(message.id), caller)
        }
        // Only its head was read: the rest (its arguments) is cut off.
        Err(cut) => (cut.name, cut.id, cut.reply_to),
    };
    let max = inner.options.max_redeliveries;
    let lost = dingo_core::broker::support::worker_lost(max.saturating_add(1), max);
    let mut event = Event::new(
        Origin::Consumer,
        Level::Error,
        EventKind::DeadLettered,
        format!("a task of `{}` given up: {}", queue.task, lost.message()),
    );
    if let (Some(name), Some(id)) = (name, id) {
        event = event.with_task(CallKey { name: name.clone(), id: id.clone() });
        if let Some(caller) = caller {
            let report = ReportMessage { name, id, body: ReportBody::Failure(lost) };
            let sent = wire::encode_report(&report).and_then(|bytes| {
                inner.completer()?.push(Op::Report { queue: queue.clone(), caller, bytes, then: None })
            });
            if let Err(e) = sent {
                inner.events.emit(Event::new(
                    Origin::Consumer,
                    Level::Error,
                    EventKind::ReportFailed,
                    format!("the caller of a dead-lettered task could not be told: {}", dingo_core::error::chain(&e)),
                ));
            }
        }
    }
    inner.events.emit(event);
}
