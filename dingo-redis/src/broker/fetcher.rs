//! A consumer's subscription. Each worker thread of the pool talks to Redis itself, on a
//! connection of its own: it fetches a batch under lease (one `FETCH` script per queue),
//! runs the tasks, and stores their final reports with the next fetch — completions and the
//! next fetch go in one round trip. An idle worker sends the fetch pipelined behind a
//! blocking wait on the queues' wake lists, so the server fetches the moment work arrives.
//!
//! Completions wait for the next fetch only while tasks are quick: one older than
//! [`FLUSH_AFTER`] is written before the worker starts another task.

use std::any::Any;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dingo_core::broker::{Ack, Acknowledge, ConsumeSettings, Delivery, Recv, Subscription};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::id::{FastMap, IdMaker, UuidV7};
use dingo_core::message::wire::{self, Known};
use dingo_core::message::{ReportBody, ReportMessage};
use dingo_core::{BrokerError, CallKey, TaskError, TaskErrorKind, TaskName};
use redis::Value;

use super::completer::{Op, complete_calls};
use super::{Inner, lock};
use crate::conn::Conn;
use crate::keys::{self, QueueKeys};
use crate::scripts::{self, Call};

/// How long a finished task's report may wait to ride along with the next fetch.
const FLUSH_AFTER: Duration = Duration::from_micros(200);

/// The lease of one delivered task: completing it releases the lease with the final report.
pub(crate) struct RedisAck {
    pub(crate) inner: Arc<Inner>,
    pub(crate) queue: Arc<QueueKeys>,
    pub(crate) token: String,
    /// The subscription whose worker thread took the task.
    pub(crate) subscription: u64,
}

impl RedisAck {
    pub(crate) fn is_from(&self, inner: &Arc<Inner>) -> bool {
        Arc::ptr_eq(&self.inner, inner)
    }

    /// Hands the completion to the worker thread's own connection if this thread took the
    /// task; otherwise gives it back.
    pub(crate) fn complete_here(self, caller: Option<String>, bytes: Option<Vec<u8>>) -> Result<(), Completion> {
        let completion = Completion { queue: self.queue, token: self.token, caller, bytes };
        LOCAL.with(|local| match local.borrow_mut().get_mut(&self.subscription) {
            Some(state) => {
                state.done.push(completion);
                state.oldest_done.get_or_insert_with(Instant::now);
                Ok(())
            }
            None => Err(completion),
        })
    }
}

/// A final report (or a bare acknowledgement) waiting to be stored.
pub(crate) struct Completion {
    pub(crate) queue: Arc<QueueKeys>,
    pub(crate) token: String,
    /// The caller process to report to (none: a fire-and-forget call).
    pub(crate) caller: Option<String>,
    pub(crate) bytes: Option<Vec<u8>>,
}

impl Completion {
    pub(crate) fn into_op(self) -> Op {
        Op::Complete { queue: self.queue, token: self.token, caller: self.caller, bytes: self.bytes }
    }
}

impl Acknowledge for RedisAck {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let inner = self.inner.clone();
        match (*self).complete_here(None, None) {
            Ok(()) => Ok(()),
            Err(completion) => inner.completer()?.push(completion.into_op()),
        }
    }

    fn reject(self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BrokerError> {
        let op = if requeue {
            Op::Requeue { queue: self.queue.clone(), tokens: vec![self.token.clone()], amo: Vec::new() }
        } else {
            Op::Dead {
                queue: self.queue.clone(),
                token: self.token.clone(),
                reason: reason.to_owned(),
                bytes: Vec::new(),
            }
        };
        self.inner.completer()?.push(op)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

thread_local! {
    /// Per subscription: this worker thread's connection, fetched tasks and completions.
    static LOCAL: RefCell<FastMap<u64, Local>> = RefCell::new(FastMap::default());
}

struct Local {
    /// The broker this state belongs to (its process id).
    process: Arc<str>,
    conn: Conn,
    /// Wakes this thread's blocking wait (a stop).
    control: String,
    buffer: VecDeque<Delivery>,
    done: Vec<Completion>,
    oldest_done: Option<Instant>,
    /// Lease tokens are `prefix` + a counter: unique per thread and process run.
    prefix: String,
    next_token: u64,
    /// After an empty fetch, the next one waits on the wake lists first.
    idle: bool,
    round: usize,
}

pub(crate) struct RedisSubscription {
    /// Keeps the broker up while the subscription lives.
    _broker: super::RedisBroker,
    inner: Arc<Inner>,
    id: u64,
    queues: Vec<(TaskName, Arc<QueueKeys>)>,
    /// How many tasks one worker thread fetches at a time.
    per_worker: usize,
    stopped: AtomicBool,
    /// The control lists of the worker threads, to wake them on stop.
    controls: Mutex<Vec<String>>,
}

impl RedisSubscription {
    pub(crate) fn start(
        broker: super::RedisBroker,
        tasks: &[TaskName],
        settings: &ConsumeSettings,
    ) -> Result<RedisSubscription, BrokerError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let inner = broker.inner.clone();
        let queues: Vec<(TaskName, Arc<QueueKeys>)> =
            tasks.iter().map(|t| (t.clone(), inner.queue_keys(t.as_str()))).collect();
        {
            let mut consumed = lock(&inner.consumed);
            for (_, queue) in &queues {
                consumed.entry(queue.prefix.clone()).or_insert_with(|| (queue.clone(), 0)).1 += 1;
            }
        }
        let prefetch = settings.prefetch.max(inner.options.prefetch);
        let per_worker = (prefetch / settings.workers.max(1)).clamp(1, inner.options.batch);
        Ok(RedisSubscription {
            _broker: broker,
            inner,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            queues,
            per_worker,
            stopped: AtomicBool::new(false),
            controls: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f` with this thread's state for the subscription, created on first use.
    fn with_local<R>(&self, f: impl FnOnce(&mut Local) -> R) -> R {
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            let state = local.entry(self.id).or_insert_with(|| self.new_local());
            f(state)
        })
    }

    fn new_local(&self) -> Local {
        let thread = UuidV7.next_id();
        let control = keys::control(&self.inner.options.namespace, thread.as_str());
        lock(&self.controls).push(control.clone());
        Local {
            process: self.inner.process.clone(),
            conn: self.inner.conn("task fetcher", Origin::Consumer, true),
            control,
            buffer: VecDeque::new(),
            done: Vec::new(),
            oldest_done: None,
            prefix: format!("{thread}."),
            next_token: 0,
            idle: false,
            round: 0,
        }
    }

    /// The next task in this thread's buffer, storing completions that waited too long.
    fn next_buffered(&self, local: &mut Local) -> Option<Delivery> {
        let delivery = local.buffer.pop_front()?;
        if local.oldest_done.is_some_and(|t| t.elapsed() >= FLUSH_AFTER) {
            self.flush(local, None);
        }
        Some(delivery)
    }

    /// Stores this thread's completions (and runs `fetch` in the same round trip).
    fn flush(&self, local: &mut Local, fetch: Option<(Option<&redis::Cmd>, &[Call])>) -> Option<Vec<Value>> {
        let done = std::mem::take(&mut local.done);
        local.oldest_done = None;
        let (plan, settled) = complete_calls(&self.inner, done);
        let (first, fetches) = fetch.unwrap_or((None, &[]));
        let mut calls = plan.calls;
        let completes = calls.len();
        calls.extend(fetches.iter().cloned());
        let never = AtomicBool::new(false);
        let stop = if fetch.is_some() { &self.stopped } else { &never };
        let outcome = local.conn.retry(stop, &mut |c| scripts::run_after(c, first, &calls));
        let results = match outcome {
            Some(Ok(results)) => results,
            Some(Err(e)) => {
                self.event(Level::Error, EventKind::ReceiveFailed, format!("talking to redis failed: {e}"));
                return None;
            }
            None => return None,
        };
        super::completer::account(&self.inner, &plan.kinds, &results[..completes.min(results.len())]);
        super::completer::release(&self.inner, &settled);
        Some(results.into_iter().skip(completes).collect())
    }

    /// Fetches into this thread's buffer (blocking first when the last fetch was empty);
    /// `false` when nothing came.
    fn fetch(&self, local: &mut Local, block: Duration) -> bool {
        let lease = self.inner.options.lease.as_millis().to_string();
        local.round = local.round.wrapping_add(1);
        let n = self.queues.len();
        let order: Vec<usize> = (0..n).map(|i| (i + local.round) % n).collect();
        let calls: Vec<Call> = order
            .iter()
            .map(|&i| {
                let q = &self.queues[i].1;
                let base = local.next_token;
                local.next_token += self.per_worker as u64;
                Call::new(&scripts::FETCH)
                    .key(q.pending.clone())
                    .key(q.amo.clone())
                    .key(q.wake.clone())
                    .key(q.leases.clone())
                    .key(q.inflight.clone())
                    .arg(self.per_worker.to_string())
                    .arg(lease.clone())
                    .arg(local.prefix.clone())
                    .arg(base.to_string())
            })
            .collect();
        let wait = local.idle.then(|| {
            let mut wait = redis::cmd("BLPOP");
            wait.arg(&local.control);
            for (_, q) in &self.queues {
                wait.arg(&q.wake);
            }
            wait.arg(block.as_secs_f64().max(0.001));
            wait
        });
        let Some(results) = self.flush(local, Some((wait.as_ref(), &calls))) else {
            if !self.stopped.load(Ordering::SeqCst) {
                // Not a connection problem (those are retried): try again a little later.
                std::thread::sleep(self.inner.options.block_timeout.min(block));
            }
            return false;
        };
        let mut got = 0;
        for (&i, result) in order.iter().zip(results) {
            let (name, queue) = &self.queues[i];
            got += self.deliver(local, name, queue, result);
        }
        local.idle = got == 0;
        got > 0
    }

    /// Decodes one queue's fetched messages into the buffer; returns how many there were.
    fn deliver(&self, local: &mut Local, name: &TaskName, queue: &Arc<QueueKeys>, fetched: Value) -> usize {
        let Value::Array(items) = fetched else { return 0 };
        let count = items.len() / 2;
        self.inner.stats.fetched.fetch_add(count as u64, Ordering::Relaxed);
        let mut items = items.into_iter();
        let mut pairs = Vec::with_capacity(count);
        while let (Some(token), Some(bytes)) = (items.next(), items.next()) {
            let token = bulk(token).and_then(|t| String::from_utf8(t).ok()).unwrap_or_default();
            pairs.push((token, bulk(bytes).unwrap_or_default()));
        }
        {
            let mut leased = lock(&self.inner.leased);
            let held = &mut leased.entry(queue.prefix.clone()).or_insert_with(|| (queue.clone(), Default::default())).1;
            held.extend(pairs.iter().filter(|(t, _)| !t.is_empty()).map(|(t, _)| t.clone()));
        }
        for (token, bytes) in pairs {
            let known = Known { name: Some(name), address: None };
            match wire::decode_delivery(bytes, &known) {
                Ok((message, redelivered)) => {
                    let ack = (!token.is_empty()).then(|| {
                        Ack::new(RedisAck {
                            inner: self.inner.clone(),
                            queue: queue.clone(),
                            token,
                            subscription: self.id,
                        })
                    });
                    local.buffer.push_back(Delivery { message, ack, redelivered });
                }
                Err(malformed) => self.dead_letter(queue, token, *malformed),
            }
        }
        count
    }

    /// Stores this thread's completions and gives back the tasks it fetched but did not
    /// start; forgets its state.
    fn release_local(&self) {
        let state = LOCAL.with(|local| local.borrow_mut().remove(&self.id));
        let Some(mut local) = state else { return };
        if !local.done.is_empty() {
            self.flush(&mut local, None);
        }
        self.give_back(std::mem::take(&mut local.buffer));
        lock(&self.controls).retain(|c| *c != local.control);
    }

    fn give_back(&self, deliveries: VecDeque<Delivery>) {
        if deliveries.is_empty() {
            return;
        }
        let Ok(completer) = self.inner.completer() else { return };
        for delivery in deliveries {
            let name = delivery.message.name.clone();
            let Some((_, queue)) = self.queues.iter().find(|(n, _)| *n == name) else { continue };
            let op = match delivery.ack.map(|ack| ack.downcast::<RedisAck>()) {
                Some(Ok(lease)) => {
                    Op::Requeue { queue: queue.clone(), tokens: vec![lease.token.clone()], amo: Vec::new() }
                }
                _ => match wire::encode_task(&delivery.message) {
                    Ok(bytes) => Op::Requeue { queue: queue.clone(), tokens: Vec::new(), amo: vec![bytes] },
                    Err(_) => continue,
                },
            };
            let _ = completer.push(op);
        }
    }

    /// An undecodable message: to the dead letters, its caller told if it can be identified.
    fn dead_letter(&self, queue: &Arc<QueueKeys>, token: String, malformed: wire::MalformedTask) {
        let reason = format!("undecodable message: {}", dingo_core::error::chain(&malformed.error));
        let mut event = Event::new(
            Origin::Consumer,
            Level::Error,
            EventKind::MalformedMessage,
            format!("{reason}; moved to the dead letters of `{}`", queue.prefix),
        );
        let Ok(completer) = self.inner.completer() else { return };
        if let (Some(name), Some(id)) = (malformed.name, malformed.id) {
            event = event.with_task(CallKey { name: name.clone(), id: id.clone() });
            if let Some(caller) = malformed.reply_to {
                let error =
                    TaskError::new(TaskErrorKind::BadPayload, format!("the task message is malformed: {reason}"));
                let report = ReportMessage { name, id, body: ReportBody::Failure(error) };
                if let Ok(bytes) = wire::encode_report(&report) {
                    let _ = completer.push(Op::Report { queue: queue.clone(), caller: caller.to_string(), bytes });
                }
            }
        }
        self.inner.events.emit(event);
        let bytes = if token.is_empty() { malformed.bytes } else { Vec::new() };
        let _ = completer.push(Op::Dead { queue: queue.clone(), token, reason, bytes });
    }

    fn event(&self, level: Level, kind: EventKind, message: String) {
        self.inner.events.emit(Event::new(Origin::Consumer, level, kind, message));
    }
}

/// Stores a report through this thread's own connection, if this thread is a worker of a
/// subscription of `inner` — so a progress report reaches the caller before the final one,
/// which leaves by the same connection. Gives the report back otherwise.
pub(crate) fn report_here(inner: &Inner, report: Op) -> Result<Option<Op>, BrokerError> {
    LOCAL.with(|local| {
        let mut local = local.borrow_mut();
        let Some(state) = local.values_mut().find(|state| Arc::ptr_eq(&state.process, &inner.process)) else {
            return Ok(Some(report));
        };
        let (plan, _) = super::completer::plan(inner, vec![report]);
        let stored = state.conn.once(&mut |c| scripts::run_batch(c, &plan.calls));
        stored.map(|_| None).map_err(|e| crate::conn::broker_error("storing a report failed", e))
    })
}

impl Subscription for RedisSubscription {
    fn try_recv(&self) -> Recv {
        if self.stopped.load(Ordering::Acquire) {
            self.release_local();
            return Recv::Stopped;
        }
        match self.with_local(|local| self.next_buffered(local)) {
            Some(delivery) => Recv::Delivery(delivery),
            None => Recv::Empty,
        }
    }

    fn recv(&self, timeout: Option<Duration>) -> Recv {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        loop {
            if self.stopped.load(Ordering::Acquire) {
                self.release_local();
                return Recv::Stopped;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let block = left.unwrap_or(self.inner.options.block_timeout).min(self.inner.options.block_timeout);
            let next = self.with_local(|local| {
                if let Some(delivery) = self.next_buffered(local) {
                    return Some(delivery);
                }
                self.fetch(local, block);
                self.next_buffered(local)
            });
            if let Some(delivery) = next {
                return Recv::Delivery(delivery);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Recv::Empty;
            }
        }
    }

    fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let controls = lock(&self.controls).clone();
        for control in controls {
            let _ = self.inner.command(&mut |c| redis::cmd("LPUSH").arg(&control).arg("stop").query::<i64>(c));
        }
        // This thread's own state, if it served too (a single-threaded consumer).
        self.release_local();
        let mut consumed = lock(&self.inner.consumed);
        for (_, queue) in &self.queues {
            if let Some((_, users)) = consumed.get_mut(&queue.prefix) {
                *users -= 1;
                if *users == 0 {
                    consumed.remove(&queue.prefix);
                }
            }
        }
    }

    fn detach_worker(&self) {
        self.release_local();
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        self.stop();
        let controls = std::mem::take(&mut *lock(&self.controls));
        for control in controls {
            let _ = self.inner.command(&mut |c| redis::cmd("DEL").arg(&control).query::<i64>(c));
        }
    }
}

fn bulk(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}
