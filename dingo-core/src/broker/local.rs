//! The embedded broker: bounded in-process queues, one per task, playing all four roles.
//!
//! Two modes:
//! - [`LocalBroker::new`] moves Rust values from caller to worker and results straight into
//!   the caller's handle: no serialization, no copying (Go dingo's local mode).
//! - [`LocalBroker::serialized`] turns every message into bytes through the codec and the
//!   [wire format](crate::message::wire), as a remote broker would, so codecs, malformed
//!   messages and the conformance suite can be exercised without a server (Go dingo's
//!   `NewLocalBroker` / `NewLocalBackend`).
//!
//! Queues are bounded ([`LocalOptions::capacity`]): a full queue makes `send` block (or fail
//! after its timeout), never grow. Sending to a task whose queue was never declared fails
//! as unroutable — the app turns that into an `UnknownTask` failure.
//!
//! Delayed tasks ([`CallOptions::countdown`](crate::CallOptions::countdown), retries) wait
//! in a timer wheel (one slot per millisecond for the next 4 s, a heap beyond), at most [`LocalOptions::max_delayed`] of them; one timer
//! thread, started by the first delayed send, sleeps until the earliest is due and moves it
//! to its queue (a send due earlier wakes it). Like everything of this broker they live in
//! the process: at shutdown they fail with `Shutdown` as queued tasks do.
//!
//! Clones share one broker; apps that share it may live in one process as separate callers
//! and workers. It shuts down when the last app using it closes (or on
//! [`LocalBroker::shutdown`]): queued tasks then fail with `Shutdown`.

use std::collections::VecDeque;
use std::fmt;
mod delays;

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Select, SendTimeoutError, Sender, TryRecvError, TrySendError};

use crate::broker::kit::{Lifecycle, Shutdown, Signal, closed, lock};
use crate::broker::router::{ReportRouter, Routed, UnclaimedLimit};
use crate::broker::support;
use crate::broker::{
    Ack, Acknowledge, Admin, Cancels, ConsumeSettings, Consumer, DeadLetter, Delivery, Producer, Recv, Reporter,
    Select as Letters, Store, Subscription,
};
use crate::error::{BrokerError, BrokerErrorKind, TaskError, TaskErrorKind};
use crate::event::{Event, EventKind, EventSink, EventSinks, Level, Origin};
use crate::hash::FastMap;
use crate::id::{CallKey, TaskName};
use crate::message::wire::{self, Known, MalformedTask};
use crate::message::{Payload, ReplySink, ReplyTo, ReportBody, ReportMessage, TaskMessage};
use delays::{Delays, Entry};

/// Settings of a [`LocalBroker`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "builder methods return the changed value; they do not change it in place"]
pub struct LocalOptions {
    /// Messages each task queue holds before `send` blocks. Default 4096.
    pub capacity: usize,
    /// Encode every message to bytes (see the module docs). Default off.
    pub serialized: bool,
    /// Largest encoded task message accepted in serialized mode. Default 16 MiB.
    pub max_message_size: usize,
    /// How long a report nobody waits for is kept (serialized mode). Default 1 hour.
    pub result_ttl: Duration,
    /// How many reports nobody waits for are kept at most, oldest dropped first
    /// (serialized mode). Default 100,000. See [`UnclaimedLimit`].
    pub max_unclaimed: usize,
    /// How many bytes of them are kept at most (serialized mode). Default 64 MiB.
    pub max_unclaimed_bytes: usize,
    /// How many dead letters are kept (the oldest are dropped). Default 1,000.
    pub max_dead_letters: usize,
    /// How many delayed tasks (countdowns, ETAs, retries waiting out their backoff) are kept
    /// at most, over all queues; past it a delayed send blocks like a send to a full queue.
    /// Default 1,000,000 (a few hundred bytes each).
    pub max_delayed: usize,
}

impl Default for LocalOptions {
    fn default() -> LocalOptions {
        LocalOptions {
            capacity: 4096,
            serialized: false,
            max_message_size: 16 << 20,
            result_ttl: Duration::from_secs(3600),
            max_unclaimed: UnclaimedLimit::default().reports,
            max_unclaimed_bytes: UnclaimedLimit::default().bytes,
            max_dead_letters: 1_000,
            max_delayed: 1_000_000,
        }
    }
}

impl LocalOptions {
    /// The defaults.
    pub fn new() -> LocalOptions {
        LocalOptions::default()
    }

    /// Sets [`capacity`](LocalOptions::capacity).
    pub fn capacity(mut self, capacity: usize) -> LocalOptions {
        self.capacity = capacity.max(1);
        self
    }

    /// Sets [`serialized`](LocalOptions::serialized).
    pub fn serialized(mut self, serialized: bool) -> LocalOptions {
        self.serialized = serialized;
        self
    }

    /// Sets [`max_message_size`](LocalOptions::max_message_size).
    pub fn max_message_size(mut self, bytes: usize) -> LocalOptions {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`result_ttl`](LocalOptions::result_ttl).
    pub fn result_ttl(mut self, ttl: Duration) -> LocalOptions {
        self.result_ttl = ttl;
        self
    }

    /// Sets [`max_unclaimed`](LocalOptions::max_unclaimed).
    pub fn max_unclaimed(mut self, reports: usize) -> LocalOptions {
        self.max_unclaimed = reports;
        self
    }

    /// Sets [`max_unclaimed_bytes`](LocalOptions::max_unclaimed_bytes).
    pub fn max_unclaimed_bytes(mut self, bytes: usize) -> LocalOptions {
        self.max_unclaimed_bytes = bytes;
        self
    }

    /// Sets [`max_delayed`](LocalOptions::max_delayed).
    pub fn max_delayed(mut self, tasks: usize) -> LocalOptions {
        self.max_delayed = tasks.max(1);
        self
    }
}

/// The embedded in-process broker (see the [module docs](self)).
#[derive(Clone)]
pub struct LocalBroker {
    inner: Arc<Inner>,
}

enum Item {
    Message(TaskMessage),
    Bytes(Vec<u8>),
}

#[derive(Clone)]
struct Queue {
    tx: Sender<Item>,
    rx: Receiver<Item>,
}

struct Inner {
    options: LocalOptions,
    address: Arc<str>,
    queues: ArcSwap<FastMap<TaskName, Queue>>,
    declare_lock: Mutex<()>,
    /// Its shutdown wakes every subscription too (`closing`).
    life: Lifecycle,
    events: EventSinks,
    /// The serialized store: handles waiting, and reports nobody waits for yet.
    router: ReportRouter,
    dead: Mutex<VecDeque<DeadLetter>>,
    /// The cancels of this broker's calls (its workers read them).
    cancels: Arc<Cancels>,
    /// Messages due later.
    delays: Arc<Delays<Item>>,
}

impl LocalBroker {
    /// An in-memory broker with default options.
    pub fn new() -> LocalBroker {
        LocalBroker::with_options(LocalOptions::default())
    }

    /// A broker that serializes every message (see the module docs).
    pub fn serialized() -> LocalBroker {
        LocalBroker::with_options(LocalOptions::default().serialized(true))
    }

    /// A broker with these options.
    pub fn with_options(options: LocalOptions) -> LocalBroker {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let events = EventSinks::new();
        let limit = UnclaimedLimit::new(options.max_unclaimed, options.max_unclaimed_bytes);
        let router = ReportRouter::new(options.result_ttl, limit, events.clone());
        let max_delayed = options.max_delayed;
        LocalBroker {
            inner: Arc::new_cyclic(|me: &Weak<Inner>| Inner {
                address: Arc::from(format!("local.{}", NEXT.fetch_add(1, Ordering::Relaxed))),
                delays: Arc::new(Delays::new(max_delayed, {
                    let me = me.clone();
                    move |due| {
                        if let Some(inner) = me.upgrade() {
                            inner.release(due);
                        }
                    }
                })),
                options,
                queues: ArcSwap::from_pointee(FastMap::default()),
                declare_lock: Mutex::new(()),
                life: Lifecycle::new("the local broker", events.clone()),
                events,
                router,
                dead: Mutex::new(VecDeque::new()),
                cancels: Arc::new(Cancels::new()),
            }),
        }
    }

    /// The options this broker was built with.
    pub fn options(&self) -> &LocalOptions {
        &self.inner.options
    }

    /// How many messages wait in the queue of `task` (delayed ones not counted).
    pub fn queue_len(&self, task: &str) -> usize {
        self.inner.queues.load().get(task).map(|q| q.rx.len()).unwrap_or(0)
    }

    /// How many delayed messages wait, over all queues.
    pub fn delayed_len(&self) -> usize {
        self.inner.delays.len()
    }

    /// Puts raw bytes into the queue of `task`, as a remote peer (or a corrupted network)
    /// would. Serialized mode only.
    pub fn push_raw(&self, task: &str, bytes: Vec<u8>) -> Result<(), BrokerError> {
        if !self.inner.options.serialized {
            return Err(BrokerError::new(BrokerErrorKind::Config, "push_raw needs a serialized local broker"));
        }
        let queue = self.inner.queue(task)?;
        queue.tx.send(Item::Bytes(bytes)).map_err(|_| self.inner.life.closed_error())
    }

    /// Takes the oldest message out of the queue of `task`, as bytes (serialized mode only;
    /// `None` when the queue is empty). For inspection and repair tools.
    pub fn take_raw(&self, task: &str) -> Result<Option<Vec<u8>>, BrokerError> {
        if !self.inner.options.serialized {
            return Err(BrokerError::new(BrokerErrorKind::Config, "take_raw needs a serialized local broker"));
        }
        match self.inner.queue(task)?.rx.try_recv() {
            Ok(Item::Bytes(bytes)) => Ok(Some(bytes)),
            Ok(Item::Message(_)) => {
                Err(BrokerError::new(BrokerErrorKind::Protocol, "an in-memory message in a serialized queue"))
            }
            Err(_) => Ok(None),
        }
    }

    /// The messages that could not be delivered, of every queue, oldest first (see
    /// [`Admin::dead_letters`] for one queue's).
    pub fn all_dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.inner.dead).iter().cloned().collect()
    }

    /// Shuts the broker down for every app that uses it: queued tasks fail with `Shutdown`,
    /// subscriptions stop, sends fail.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl Default for LocalBroker {
    fn default() -> LocalBroker {
        LocalBroker::new()
    }
}

impl fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalBroker")
            .field("address", &self.inner.address)
            .field("serialized", &self.inner.options.serialized)
            .field("queues", &self.inner.queues.load().len())
            .field("closed", &self.inner.life.is_closed())
            .finish()
    }
}

impl Inner {
    fn queue(&self, task: &str) -> Result<Queue, BrokerError> {
        self.life.check_open()?;
        self.queues.load().get(task).cloned().ok_or_else(|| {
            BrokerError::new(BrokerErrorKind::Unroutable, format!("no queue is declared for task `{task}`"))
        })
    }

    fn declare(&self, task: &TaskName) -> Result<(), BrokerError> {
        self.life.check_open()?;
        if self.queues.load().contains_key(task.as_str()) {
            return Ok(());
        }
        let _guard = lock(&self.declare_lock);
        let current = self.queues.load();
        if !current.contains_key(task.as_str()) {
            let (tx, rx) = crossbeam_channel::bounded(self.options.capacity);
            let mut next = FastMap::clone(&current);
            next.insert(task.clone(), Queue { tx, rx });
            self.queues.store(Arc::new(next));
        }
        Ok(())
    }

    /// Fails every queued task with `Shutdown`.
    fn drain_queues(&self) {
        for (name, queue) in self.queues.load().iter() {
            while let Ok(item) = queue.rx.try_recv() {
                self.fail_unrun(name, item);
            }
        }
    }

    /// Tells the caller of a task that will not run that the broker shut down.
    fn fail_unrun(&self, queue: &TaskName, item: Item) {
        let failure = || TaskError::new(TaskErrorKind::Shutdown, "the broker shut down before the task ran");
        match item {
            Item::Message(message) => {
                if let ReplyTo::Local(sink) = &message.reply_to {
                    sink.deliver(ReportBody::Failure(failure()));
                }
            }
            Item::Bytes(bytes) => match wire::decode_task_from(bytes, &Known::default()) {
                Ok(message) => self.fail(&message.reply_to, message.key(), failure()),
                Err(malformed) => self.reject_malformed(queue, *malformed),
            },
        }
    }

    /// Moves delayed messages that are due into their queues (waiting for room there, as a
    /// send does).
    fn release(&self, due: Vec<Entry<Item>>) {
        let queues = self.queues.load();
        for entry in due {
            let (name, item) = entry.into_parts();
            let Some(queue) = queues.get(name.as_str()) else {
                self.fail_unrun(&name, item);
                continue;
            };
            match queue.tx.try_send(item) {
                Ok(()) => {}
                Err(TrySendError::Full(item)) => self.release_blocking(&name, queue, item),
                Err(TrySendError::Disconnected(item)) => self.fail_unrun(&name, item),
            }
        }
        // A release that raced with shutdown must not leave its task stranded.
        if self.life.is_closed() {
            self.drain_queues();
        }
    }

    /// Waits for room in a full queue, giving up when the broker shuts down.
    fn release_blocking(&self, name: &TaskName, queue: &Queue, item: Item) {
        let mut item = item;
        loop {
            if self.life.is_closed() {
                return self.fail_unrun(name, item);
            }
            match queue.tx.send_timeout(item, Duration::from_millis(100)) {
                Ok(()) => return,
                Err(SendTimeoutError::Timeout(back)) => item = back,
                Err(SendTimeoutError::Disconnected(back)) => return self.fail_unrun(name, back),
            }
        }
    }

    /// Keeps a message until `due`.
    fn delay(&self, task: TaskName, due: SystemTime, item: Item, timeout: Option<Duration>) -> Result<(), BrokerError> {
        if !self.queues.load().contains_key(task.as_str()) {
            return Err(BrokerError::new(
                BrokerErrorKind::Unroutable,
                format!("no queue is declared for task `{task}`"),
            ));
        }
        self.delays.push(task, due, item, timeout)?;
        // A delay that raced with shutdown must not leave its task stranded.
        if self.life.is_closed() {
            for entry in self.delays.stop() {
                let (queue, item) = entry.into_parts();
                self.fail_unrun(&queue, item);
            }
        }
        Ok(())
    }

    /// Turns a queued item into a delivery; bytes that do not decode are dead-lettered (and
    /// their caller told, if it can be identified).
    fn delivery(self: &Arc<Self>, queue: &TaskName, item: Item) -> Option<Delivery> {
        match item {
            // Straight into the delivery: a message is a few hundred bytes, moved as little
            // as can be.
            Item::Message(message) if message.retry.retries() == 0 => Some(Delivery::new(message)),
            Item::Message(message) => Some(self.with_letter(queue, message)),
            Item::Bytes(bytes) => {
                let known = Known { name: Some(queue), address: Some(&self.address) };
                match wire::decode_task_from(bytes, &known) {
                    Ok(message) if message.retry.retries() == 0 && message.name == *queue => {
                        Some(Delivery::new(message))
                    }
                    // One that retries, or names another task than its queue's (no worker of
                    // this queue runs it): it may end in the dead letters.
                    Ok(message) => Some(self.with_letter(queue, message)),
                    Err(malformed) => {
                        self.reject_malformed(queue, *malformed);
                        None
                    }
                }
            }
        }
    }

    /// The delivery of a call that retries (it ends in the dead letters once out of
    /// attempts) or that names another task than its queue's: it gets an acknowledgement
    /// that can put it there.
    #[cold]
    fn with_letter(self: &Arc<Self>, queue: &TaskName, message: TaskMessage) -> Delivery {
        let ack = LocalAck { broker: Arc::downgrade(self), queue: queue.clone(), message: letter_bytes(&message) };
        Delivery::new(message).with_ack(Some(Ack::new(ack)))
    }

    fn bury(&self, letter: DeadLetter) {
        let letter = letter.with_time(Some(SystemTime::now()));
        let mut dead = lock(&self.dead);
        if dead.len() >= self.options.max_dead_letters {
            dead.pop_front();
        }
        dead.push_back(letter);
    }

    fn reject_malformed(&self, queue: &TaskName, malformed: MalformedTask) {
        let reason = crate::error::chain(&malformed.error);
        let MalformedTask { name, id, reply_to, bytes, .. } = malformed;
        // Kept first: whoever learns of the failure can already find the dead letter.
        self.bury(DeadLetter::new(queue.clone(), reason.clone(), bytes));
        let mut event = Event::new(
            Origin::Consumer,
            Level::Error,
            EventKind::MalformedMessage,
            format!("undecodable message in queue `{queue}` dead-lettered: {reason}"),
        );
        let mut call = None;
        if let (Some(name), Some(id)) = (name, id) {
            let key = CallKey { name, id };
            event = event.with_task(key.clone());
            call = Some(key.clone());
            if let Some(address) = reply_to {
                let error =
                    TaskError::new(TaskErrorKind::BadPayload, format!("the task message is malformed: {reason}"));
                self.fail(&ReplyTo::Address(address), key, error);
            }
        }
        self.events.emit(event);
        self.events.emit(support::dead_lettered(Origin::Consumer, queue.as_str(), &reason, call));
    }

    fn fail(&self, to: &ReplyTo, key: CallKey, error: TaskError) {
        let report = ReportMessage { name: key.name, id: key.id, body: ReportBody::Failure(error) };
        let _ = self.report(to, report);
    }

    fn report(&self, to: &ReplyTo, report: ReportMessage<'_>) -> Result<(), BrokerError> {
        match to {
            ReplyTo::None => Ok(()),
            ReplyTo::Local(sink) => {
                sink.deliver(report.body);
                Ok(())
            }
            ReplyTo::Address(address) if *address == self.address => {
                // The wire: encode and decode as a remote store would.
                let bytes = wire::encode_report(&report)?;
                let report = wire::decode_report_from(bytes, &Known { name: Some(&report.name), address: None })?;
                self.route(report);
                Ok(())
            }
            ReplyTo::Address(address) => Err(BrokerError::new(
                BrokerErrorKind::Unroutable,
                format!("reply address `{address}` is not served by this local broker ({})", self.address),
            )),
        }
    }

    /// Hands a decoded report to the handle watching its call, or keeps it until one does.
    fn route(&self, report: ReportMessage<'static>) {
        let task = report.key();
        if self.router.route(report) == Routed::Kept {
            self.events.emit(
                Event::new(
                    Origin::Store,
                    Level::Debug,
                    EventKind::UnclaimedReport,
                    "a report nobody waits for is kept",
                )
                .with_task(task),
            );
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Ends the timer thread (a broker dropped without a shutdown).
        self.delays.stop();
    }
}

/// The wire form of a delivered message, kept for its dead letter (in memory mode without
/// its reply sink, which only this process could use).
fn letter_bytes(message: &TaskMessage) -> Vec<u8> {
    let reply_to = match &message.reply_to {
        ReplyTo::Address(address) => ReplyTo::Address(address.clone()),
        _ => ReplyTo::None,
    };
    let Payload::Encoded(args) = &message.args else { return Vec::new() };
    let copy = TaskMessage {
        name: message.name.clone(),
        id: message.id.clone(),
        fingerprint: message.fingerprint,
        options: message.options,
        reply_to,
        args: Payload::Encoded(args.clone()),
        attempt: message.attempt,
        due: message.due,
        expires: message.expires,
        retry: message.retry,
        limits: message.limits,
    };
    wire::encode_task(&copy).unwrap_or_default()
}

/// The acknowledgement of a delivery that may end in the dead letters (a call with retries).
struct LocalAck {
    broker: Weak<Inner>,
    queue: TaskName,
    message: Vec<u8>,
}

impl Acknowledge for LocalAck {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        Ok(())
    }

    fn reject(self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BrokerError> {
        let Some(broker) = self.broker.upgrade() else { return Err(closed("the local broker")) };
        if requeue {
            let item = Item::Bytes(self.message);
            return broker.queue(self.queue.as_str())?.tx.send(item).map_err(|_| broker.life.closed_error());
        }
        broker.bury(DeadLetter::new(self.queue, reason, self.message));
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

impl Shutdown for Inner {
    fn shutdown(&self) {
        // SeqCst pairs with the load after enqueueing in `send`: either the sender sees the
        // flag and drains, or this drain sees the message.
        if !self.life.close() {
            return;
        }
        self.drain_queues();
        for entry in self.delays.stop() {
            let (queue, item) = entry.into_parts();
            self.fail_unrun(&queue, item);
        }
        // Pending handles of the serialized store learn that no report will come.
        self.router.close();
    }
}

impl Producer for LocalBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn declare(&self, task: &TaskName) -> Result<(), BrokerError> {
        self.inner.declare(task)
    }

    fn send(&self, message: TaskMessage, timeout: Option<Duration>) -> Result<(), BrokerError> {
        // A message due already (an app sets no due time in the past) leaves the delays at
        // the timer's next round: no need to read the clock here.
        let due = message.due;
        self.enqueue(message, due, timeout)
    }

    /// A retry always goes through the delays, even when due at once: a worker sending into
    /// its own full queue would wait for itself.
    fn retry(&self, message: TaskMessage, ack: Option<Ack>) -> Result<(), BrokerError> {
        let due = message.due.unwrap_or_else(SystemTime::now);
        self.enqueue(message, Some(due), None)?;
        ack.map_or(Ok(()), Ack::ack)
    }

    fn accepts_local(&self) -> bool {
        !self.inner.options.serialized
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

impl LocalBroker {
    /// Puts a message into its queue, or into the delays when `due` is set.
    #[inline(always)]
    fn enqueue(
        &self,
        message: TaskMessage,
        due: Option<SystemTime>,
        timeout: Option<Duration>,
    ) -> Result<(), BrokerError> {
        let inner = &*self.inner;
        inner.life.check_open()?;
        let task = message.name.clone();
        let item = if inner.options.serialized {
            let bytes = wire::encode_task(&message)?;
            if bytes.len() > inner.options.max_message_size {
                return Err(BrokerError::new(
                    BrokerErrorKind::TooLarge,
                    format!(
                        "task message of {} bytes exceeds the limit of {} bytes",
                        bytes.len(),
                        inner.options.max_message_size
                    ),
                ));
            }
            Item::Bytes(bytes)
        } else {
            Item::Message(message)
        };
        if let Some(due) = due {
            return inner.delay(task, due, item, timeout);
        }
        // The common case sends under the map guard, without touching the channel's
        // reference counts; only a full queue takes a sender of its own to block on.
        let queues = inner.queues.load();
        let full = || BrokerError::new(BrokerErrorKind::Full, "the task queue is full");
        let sent = match queues.get(task.as_str()) {
            None => {
                Err(BrokerError::new(BrokerErrorKind::Unroutable, format!("no queue is declared for task `{task}`")))
            }
            Some(queue) => match queue.tx.try_send(item) {
                Ok(()) => Ok(()),
                Err(TrySendError::Disconnected(_)) => Err(inner.life.closed_error()),
                Err(TrySendError::Full(item)) => {
                    let tx = queue.tx.clone();
                    drop(queues);
                    match timeout {
                        Some(timeout) => tx.send_timeout(item, timeout).map_err(|e| match e {
                            SendTimeoutError::Timeout(_) => full(),
                            SendTimeoutError::Disconnected(_) => inner.life.closed_error(),
                        }),
                        None => tx.send(item).map_err(|_| inner.life.closed_error()),
                    }
                }
            },
        };
        // A send that raced with shutdown must not leave its task stranded (SeqCst: see
        // `shutdown`).
        if inner.life.is_closed() {
            inner.drain_queues();
        }
        sent
    }
}

impl Consumer for LocalBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn declare(&self, task: &TaskName) -> Result<(), BrokerError> {
        self.inner.declare(task)
    }

    fn cancels(&self) -> Option<Arc<Cancels>> {
        Some(self.inner.cancels.clone())
    }

    fn consume(&self, tasks: &[TaskName], _settings: &ConsumeSettings) -> Result<Box<dyn Subscription>, BrokerError> {
        let mut queues = Vec::with_capacity(tasks.len());
        for task in tasks {
            self.inner.declare(task)?;
            queues.push((task.clone(), self.inner.queue(task.as_str())?.rx));
        }
        if queues.is_empty() {
            return Err(BrokerError::new(BrokerErrorKind::Config, "a subscription needs at least one task"));
        }
        Ok(Box::new(LocalSubscription {
            broker: self.inner.clone(),
            queues,
            next: AtomicUsize::new(0),
            stop: Signal::new(),
        }))
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

impl Reporter for LocalBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn report(&self, to: &ReplyTo, report: ReportMessage<'_>) -> Result<(), BrokerError> {
        self.inner.report(to, report)
    }

    fn finish(&self, to: &ReplyTo, report: ReportMessage<'_>, ack: Option<Ack>) -> Result<(), BrokerError> {
        self.inner.report(to, report)?;
        match ack {
            Some(ack) => ack.ack(),
            None => Ok(()),
        }
    }

    fn accepts_local(&self) -> bool {
        !self.inner.options.serialized
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

impl Store for LocalBroker {
    fn attach(&self, events: &EventSink) {
        self.inner.life.attach(events);
    }

    fn watch(&self, key: &CallKey, sink: ReplySink) -> Result<ReplyTo, BrokerError> {
        self.inner.life.check_open()?;
        if !self.inner.options.serialized {
            return Ok(ReplyTo::Local(sink));
        }
        self.inner.router.watch(key, sink);
        Ok(ReplyTo::Address(self.inner.address.clone()))
    }

    fn forget(&self, key: &CallKey) {
        if self.inner.options.serialized {
            self.inner.router.forget(key);
        }
    }

    fn wait_spin(&self) -> Duration {
        // Results come from this process: microseconds away.
        Duration::from_micros(50)
    }

    fn close(&self) {
        self.inner.life.release(&*self.inner);
    }
}

/// In process, a cancel is in the workers' set as soon as it returns; dead letters live in
/// memory (at most [`max_dead_letters`](LocalOptions::max_dead_letters), the oldest dropped).
impl Admin for LocalBroker {
    fn cancel(&self, key: &CallKey, until: SystemTime) -> Result<(), BrokerError> {
        self.inner.life.check_open()?;
        self.inner.cancels.insert(key.clone(), until);
        Ok(())
    }

    fn dead_letters(&self, queue: &TaskName, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        Ok(lock(&self.inner.dead).iter().filter(|letter| letter.queue == *queue).take(limit).cloned().collect())
    }

    fn dead_count(&self, queue: &TaskName) -> Result<usize, BrokerError> {
        Ok(lock(&self.inner.dead).iter().filter(|letter| letter.queue == *queue).count())
    }

    /// Sends the letters back without waiting: a full queue ends the replay, and the
    /// letters not sent stay dead (the count says how many went).
    fn replay(&self, queue: &TaskName, select: &Letters) -> Result<usize, BrokerError> {
        let target = self.inner.queue(queue.as_str())?;
        let mut dead = lock(&self.inner.dead);
        let mut kept = VecDeque::with_capacity(dead.len());
        let mut replayed = 0;
        let mut full = false;
        while let Some(letter) = dead.pop_front() {
            if full || letter.queue != *queue || !letter.is_selected(select) {
                kept.push_back(letter);
                continue;
            }
            match target.tx.try_send(Item::Bytes(letter.replay_bytes())) {
                Ok(()) => replayed += 1,
                Err(_) => {
                    full = true;
                    kept.push_back(letter);
                }
            }
        }
        *dead = kept;
        Ok(replayed)
    }

    fn purge_dead(&self, queue: &TaskName, select: &Letters) -> Result<usize, BrokerError> {
        let mut dead = lock(&self.inner.dead);
        let before = dead.len();
        dead.retain(|letter| letter.queue != *queue || !letter.is_selected(select));
        Ok(before - dead.len())
    }

    fn purge(&self, queue: &TaskName) -> Result<usize, BrokerError> {
        let rx = self.inner.queue(queue.as_str())?.rx;
        let mut purged = 0;
        while rx.try_recv().is_ok() {
            purged += 1;
        }
        Ok(purged)
    }
}

struct LocalSubscription {
    broker: Arc<Inner>,
    queues: Vec<(TaskName, Receiver<Item>)>,
    next: AtomicUsize,
    /// Raised by `stop`: wakes every blocked `recv`.
    stop: Signal,
}

impl LocalSubscription {
    fn stopped(&self) -> bool {
        self.stop.is_raised() || self.broker.life.is_closed()
    }

    /// Waits for a delivery, at most until `timeout`, or until `bell` rings.
    fn recv_until(&self, timeout: Option<Duration>, bell: Option<&Receiver<()>>) -> Recv {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.stopped() {
                return Recv::Stopped;
            }
            if let Recv::Delivery(d) = self.try_recv() {
                return Recv::Delivery(d);
            }
            let mut select = Select::new();
            for (_, rx) in &self.queues {
                select.recv(rx);
            }
            let stop = select.recv(self.stop.receiver());
            let shutdown = select.recv(self.broker.life.closing());
            let rung = bell.map(|bell| select.recv(bell));
            let ready = match deadline {
                Some(deadline) => match select.ready_deadline(deadline) {
                    Ok(index) => index,
                    Err(_) => return Recv::Empty,
                },
                None => select.ready(),
            };
            if ready == stop || ready == shutdown {
                return Recv::Stopped;
            }
            if let (Some(rung), Some(bell)) = (rung, bell)
                && ready == rung
            {
                let _ = bell.try_recv();
                return Recv::Empty;
            }
            let (name, rx) = &self.queues[ready];
            match rx.try_recv() {
                Ok(item) => {
                    if let Some(delivery) = self.broker.delivery(name, item) {
                        return Recv::Delivery(delivery);
                    }
                }
                // Another worker was faster; wait again.
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return Recv::Stopped,
            }
        }
    }
}

impl Subscription for LocalSubscription {
    fn try_recv(&self) -> Recv {
        if self.stop.is_raised() {
            return Recv::Stopped;
        }
        let n = self.queues.len();
        let start = if n == 1 { 0 } else { self.next.fetch_add(1, Ordering::Relaxed) % n };
        for i in 0..n {
            let (name, rx) = &self.queues[(start + i) % n];
            loop {
                match rx.try_recv() {
                    Ok(item) => match self.broker.delivery(name, item) {
                        Some(delivery) => return Recv::Delivery(delivery),
                        None => continue,
                    },
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Recv::Stopped,
                }
            }
        }
        if self.broker.life.is_closed() { Recv::Stopped } else { Recv::Empty }
    }

    fn recv(&self, timeout: Option<Duration>) -> Recv {
        self.recv_until(timeout, None)
    }

    fn recv_or_bell(&self, timeout: Option<Duration>, bell: &Receiver<()>) -> Recv {
        self.recv_until(timeout, Some(bell))
    }

    fn stop(&self) {
        self.stop.raise();
    }

    fn prefers_polling(&self) -> bool {
        true
    }
}
