//! A consumer's subscription: one thread fetches batches under lease (one `FETCH` script
//! per queue, all in one round trip) into a bounded channel the pool's workers share; when
//! every queue is empty it blocks on their wake lists (`BLPOP`, never a sleep).

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, SendTimeoutError, Sender, TryRecvError};
use dingo_core::broker::{Ack, Acknowledge, ConsumeSettings, Delivery, Recv, Subscription};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::wire::{self, Known};
use dingo_core::message::{ReportBody, ReportMessage};
use dingo_core::{BrokerError, CallKey, TaskError, TaskErrorKind, TaskName};
use redis::Value;

use super::completer::Op;
use super::{Inner, Thread, lock};
use crate::keys::{self, QueueKeys};
use crate::scripts::{self, Call};

/// The lease of one delivered task: completing it releases the lease with the final report.
pub(crate) struct RedisAck {
    inner: Arc<Inner>,
    queue: Arc<QueueKeys>,
    token: String,
}

impl RedisAck {
    pub(crate) fn is_from(&self, inner: &Arc<Inner>) -> bool {
        Arc::ptr_eq(&self.inner, inner)
    }

    pub(crate) fn queue(&self) -> &Arc<QueueKeys> {
        &self.queue
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }
}

impl Acknowledge for RedisAck {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let op = Op::Complete { queue: self.queue.clone(), token: self.token.clone(), reply: None, bytes: None };
        self.inner.completer()?.push(op)
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

pub(crate) struct RedisSubscription {
    /// Keeps the broker up while the subscription lives.
    _broker: super::RedisBroker,
    inner: Arc<Inner>,
    queues: Vec<(TaskName, Arc<QueueKeys>)>,
    rx: Receiver<Delivery>,
    stopped: Arc<AtomicBool>,
    control: String,
    fetcher: Thread,
}

impl RedisSubscription {
    pub(crate) fn start(
        broker: super::RedisBroker,
        tasks: &[TaskName],
        settings: &ConsumeSettings,
    ) -> Result<RedisSubscription, BrokerError> {
        let inner = broker.inner.clone();
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let queues: Vec<(TaskName, Arc<QueueKeys>)> =
            tasks.iter().map(|t| (t.clone(), inner.queue_keys(t.as_str()))).collect();
        {
            let mut consumed = lock(&inner.consumed);
            for (_, queue) in &queues {
                consumed.entry(queue.prefix.clone()).or_insert_with(|| (queue.clone(), 0)).1 += 1;
            }
        }
        let capacity = settings.prefetch.max(inner.options.prefetch).max(1);
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let control = keys::control(
            &inner.options.namespace,
            &format!("{}:{}", inner.process, NEXT.fetch_add(1, Ordering::Relaxed)),
        );
        let stopped = Arc::new(AtomicBool::new(false));
        let fetch = Fetch { inner: inner.clone(), queues: queues.clone(), tx, control: control.clone(), capacity };
        let fetcher = Thread::spawn("dingo-redis-fetch", move |stop| fetch.run(&stop))?;
        Ok(RedisSubscription { _broker: broker, inner, queues, rx, stopped, control, fetcher })
    }

    /// Gives back what was fetched but never handed to a worker.
    fn give_back(&self) {
        let Ok(completer) = self.inner.completer() else { return };
        while let Ok(delivery) = self.rx.try_recv() {
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
}

impl Subscription for RedisSubscription {
    fn try_recv(&self) -> Recv {
        if self.stopped.load(Ordering::Acquire) {
            return Recv::Stopped;
        }
        match self.rx.try_recv() {
            Ok(delivery) => Recv::Delivery(delivery),
            Err(TryRecvError::Empty) => Recv::Empty,
            Err(TryRecvError::Disconnected) => Recv::Stopped,
        }
    }

    fn recv(&self, timeout: Option<Duration>) -> Recv {
        // Short slices, so a stop is seen promptly even while no task arrives.
        let slice = Duration::from_millis(100);
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return Recv::Stopped;
            }
            let wait = match deadline {
                Some(deadline) => deadline.saturating_duration_since(std::time::Instant::now()).min(slice),
                None => slice,
            };
            match self.rx.recv_timeout(wait) {
                Ok(delivery) => return Recv::Delivery(delivery),
                Err(RecvTimeoutError::Disconnected) => return Recv::Stopped,
                Err(RecvTimeoutError::Timeout) => {
                    if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                        return Recv::Empty;
                    }
                }
            }
        }
    }

    fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        let control = self.control.clone();
        let _ = self.inner.command(&mut |c| redis::cmd("LPUSH").arg(&control).arg("stop").query::<i64>(c));
        self.fetcher.stop_and_join();
        self.give_back();
        let _ = self.inner.command(&mut |c| redis::cmd("DEL").arg(&control).query::<i64>(c));
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
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The fetcher thread's state.
struct Fetch {
    inner: Arc<Inner>,
    queues: Vec<(TaskName, Arc<QueueKeys>)>,
    tx: Sender<Delivery>,
    control: String,
    capacity: usize,
}

impl Fetch {
    fn run(&self, stop: &AtomicBool) {
        let mut fetching = self.inner.conn("task fetcher", Origin::Consumer, true);
        let lease = self.inner.options.lease.as_millis().to_string();
        let mut wake_keys: Vec<&str> = vec![self.control.as_str()];
        wake_keys.extend(self.queues.iter().map(|(_, q)| q.wake.as_str()));
        let timeout = self.inner.options.block_timeout.as_secs_f64();
        let mut wait = redis::cmd("BLPOP");
        wait.arg(&wake_keys).arg(timeout);
        let mut idle = false;
        let mut round = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let free = self.capacity.saturating_sub(self.tx.len());
            let each = (free / self.queues.len()).clamp(1, self.inner.options.batch).to_string();
            round = round.wrapping_add(1);
            let calls: Vec<Call> = (0..self.queues.len())
                .map(|i| &self.queues[(i + round) % self.queues.len()].1)
                .map(|q| {
                    Call::new(&scripts::FETCH)
                        .key(q.pending.clone())
                        .key(q.amo.clone())
                        .key(q.wake.clone())
                        .key(q.leases.clone())
                        .key(q.inflight.clone())
                        .key(q.seq.clone())
                        .arg(each.clone())
                        .arg(lease.clone())
                })
                .collect();
            // Idle: wait on the wake lists with the fetch pipelined behind the wait, so the
            // server fetches the moment work arrives (one round trip, not two).
            let first = idle.then_some(&wait);
            let results = match fetching.retry(stop, &mut |c| scripts::run_after(c, first, &calls)) {
                Some(Ok(results)) => results,
                Some(Err(e)) => {
                    // Not a connection problem (those are retried with backoff): something
                    // is wrong with the data; report it and try again a little later.
                    self.event(Level::Error, EventKind::ReceiveFailed, format!("fetching tasks failed: {e}"));
                    std::thread::sleep(self.inner.options.block_timeout);
                    idle = false;
                    continue;
                }
                None => return,
            };
            let mut got = 0;
            for (i, result) in results.into_iter().enumerate() {
                let (name, queue) = &self.queues[(i + round) % self.queues.len()];
                got += self.deliver(name, queue, result, stop);
            }
            idle = got == 0;
        }
    }

    /// Hands the fetched messages of one queue to the workers; returns how many there were.
    fn deliver(&self, name: &TaskName, queue: &Arc<QueueKeys>, fetched: Value, stop: &AtomicBool) -> usize {
        let Value::Array(items) = fetched else { return 0 };
        let count = items.len() / 2;
        self.inner.stats.fetched.fetch_add(count as u64, Ordering::Relaxed);
        let mut items = items.into_iter();
        let mut tokens = Vec::with_capacity(count);
        let mut pairs = Vec::with_capacity(count);
        while let (Some(token), Some(bytes)) = (items.next(), items.next()) {
            let token = bulk(token).and_then(|t| String::from_utf8(t).ok()).unwrap_or_default();
            if !token.is_empty() {
                tokens.push(token.clone());
            }
            pairs.push((token, bulk(bytes).unwrap_or_default()));
        }
        if !tokens.is_empty() {
            let mut leased = lock(&self.inner.leased);
            leased.entry(queue.prefix.clone()).or_insert_with(|| (queue.clone(), Default::default())).1.extend(tokens);
        }
        for (token, bytes) in pairs {
            let known = Known { name: Some(name), address: None };
            match wire::decode_delivery(bytes, &known) {
                Ok((message, redelivered)) => {
                    let ack = (!token.is_empty())
                        .then(|| Ack::new(RedisAck { inner: self.inner.clone(), queue: queue.clone(), token }));
                    self.hand_over(Delivery { message, ack, redelivered }, queue, stop);
                }
                Err(malformed) => self.dead_letter(queue, token, *malformed),
            }
        }
        count
    }

    fn hand_over(&self, delivery: Delivery, queue: &Arc<QueueKeys>, stop: &AtomicBool) {
        let mut delivery = delivery;
        loop {
            match self.tx.send_timeout(delivery, Duration::from_millis(100)) {
                Ok(()) => return,
                Err(SendTimeoutError::Timeout(back)) if !stop.load(Ordering::SeqCst) => delivery = back,
                Err(SendTimeoutError::Timeout(back) | SendTimeoutError::Disconnected(back)) => {
                    // Stopping with the workers busy: the task goes back to its queue.
                    let op = match back.ack.map(|ack| ack.downcast::<RedisAck>()) {
                        Some(Ok(lease)) => {
                            Op::Requeue { queue: queue.clone(), tokens: vec![lease.token.clone()], amo: Vec::new() }
                        }
                        _ => match wire::encode_task(&back.message) {
                            Ok(bytes) => Op::Requeue { queue: queue.clone(), tokens: Vec::new(), amo: vec![bytes] },
                            Err(_) => return,
                        },
                    };
                    if let Ok(completer) = self.inner.completer() {
                        let _ = completer.push(op);
                    }
                    return;
                }
            }
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
                    let _ = completer.push(Op::Report { queue: queue.clone(), reply: queue.reply(&caller), bytes });
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

fn bulk(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}
