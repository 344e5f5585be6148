//! A worker pool's subscription. A consumer thread opens the pool's channel, declares the
//! pool's task queues and consumes them with per-consumer prefetch (`global = false`, which
//! quorum queues require); then it only watches. The worker threads take deliveries
//! straight from amiquip's consumer channels (the [`Feed`]) and settle them themselves on
//! the channel, which sits behind a lock ([`AmqpAck`]): acknowledged once the final report
//! is confirmed (by the confirm thread), given back, or dead-lettered with a reason. No
//! thread stands between RabbitMQ and a worker, either way.
//!
//! The amiquip `Consumer`s are forgotten once their receivers are cloned: a `Consumer`
//! borrows its channel, which must be shared instead, and amiquip 0.4 kills the whole
//! connection when a consumer's receiver is dropped while the channel lives (see
//! `conn::cancelled`). Consuming ends with the channel: closing it requeues what was
//! delivered and not acknowledged, taken by a worker or not.
//!
//! A delivery belongs to the channel it came on: when the channel breaks, RabbitMQ requeues
//! everything it had not acknowledged (marked redelivered), and settlements for the old
//! channel are dropped. The consumer thread reconnects, declares the queues again, consumes
//! again and hands the workers a new feed.
//!
//! Redeliveries are counted before they run ([`Shared::recount`]): RabbitMQ marks a message
//! it requeued `redelivered` and nothing more (a quorum queue's `x-delivery-count` counts
//! every return, a give-back as much as a crash), so a redelivered task is published again
//! with its count in a header, confirmed, and the original acknowledged; past
//! `max_redeliveries` it goes to the dead letters instead. For the count to mean "its
//! worker stopped", nothing dingo gives back on purpose may reach the queue marked
//! redelivered: tasks never started are handed back the same way, published again unmarked
//! ([`Shared::hand_back`]). That happens when the pool stops (its consumers are cancelled
//! first, so the channel's close has nothing left to requeue) and when every thread of the
//! pool stays busy while tasks wait in its prefetch: the consumer thread, which looks every
//! few milliseconds whether the workers still take tasks, then pauses the pool (cancels its
//! consumers, hands back what they had delivered) until a worker comes for a task again —
//! provided another consumer serves those queues (handed back to nobody else, the tasks
//! would only come back here, behind newer ones). While threads are free that look is all
//! it costs.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amiquip::{Channel, ConsumerMessage};
use crossbeam_channel::{Receiver, Select, Sender};
use dingo_core::broker::kit::Signal;
use dingo_core::broker::support;
use dingo_core::broker::{Ack, ConsumeSettings, Delivery, Recv, Subscription};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::{ReplyTo, ReportBody, ReportMessage, TaskMessage, wire};
use dingo_core::{BrokerError, CallKey, TaskError, TaskErrorKind, TaskName};

mod consumer;

use consumer::ConsumerThread;

use super::ack::{AmqpAck, OnDrop};
use super::publisher::{Outgoing, Then};
use super::{Inner, Thread, delay_of, lock};
use crate::topology::{REDELIVERIES_HEADER, TaskQueues};

/// Messages up to this size are copied as they arrive, so that one a worker cannot run can
/// be dead-lettered with its reason; larger ones are dead-lettered by RabbitMQ itself
/// (reason `rejected`, dingo's reason in the event only), except those that came through the
/// delay queues (always copied: RabbitMQ would route them by the delay's routing key, to no
/// dead-letter queue).
const DEAD_COPY_LIMIT: usize = 64 << 10;

/// The pool's channel, shared by the workers, the confirm thread and the consumer thread.
pub(super) struct Line {
    /// Which channel of the subscription this is (counted from 1).
    number: u64,
    /// `None` once closed (its deliveries went back to their queues).
    channel: Mutex<Option<Channel>>,
    /// Deliveries of this channel handed to workers (at least once) and not settled yet.
    pub(super) outstanding: AtomicUsize,
}

/// What settling a delivery on a [`Line`] came to.
enum Settled {
    Done,
    /// The channel is closed: RabbitMQ requeued the delivery, nothing to do.
    Closed,
    /// Settling failed: the channel is broken (RabbitMQ requeues the delivery).
    Failed(amiquip::Error),
}

impl Line {
    fn new(number: u64, channel: Option<Channel>) -> Line {
        Line { number, channel: Mutex::new(channel), outstanding: AtomicUsize::new(0) }
    }

    /// Runs `settle` on the channel, if it is still open.
    fn settle(&self, settle: impl FnOnce(&Channel) -> Result<(), amiquip::Error>) -> Settled {
        match &*lock(&self.channel) {
            Some(channel) => match settle(channel) {
                Ok(()) => Settled::Done,
                Err(e) => Settled::Failed(e),
            },
            None => Settled::Closed,
        }
    }

    fn is_open(&self) -> bool {
        lock(&self.channel).is_some()
    }

    /// Runs `f` on the channel (for the consumer thread): why not, if it is closed or `f`
    /// failed.
    fn with<T>(&self, f: impl FnOnce(&Channel) -> Result<T, amiquip::Error>) -> Result<T, String> {
        match &*lock(&self.channel) {
            Some(channel) => f(channel).map_err(|e| e.to_string()),
            None => Err("the channel is closed".to_owned()),
        }
    }

    /// Closes the channel (RabbitMQ requeues what it had not acknowledged).
    fn close(&self) {
        let channel = lock(&self.channel).take();
        // Outside the lock: closing waits for the server.
        drop(channel);
    }
}

/// The consumers of the current channel, as the workers see them.
struct Feed {
    line: Arc<Line>,
    /// One per task, in the subscription's order.
    receivers: Vec<Receiver<ConsumerMessage>>,
    /// Disconnects when this feed is replaced.
    retired: Receiver<()>,
    /// The pool is paused (no receivers): a worker that comes for a task asks to resume.
    paused: bool,
}

/// What the consumer thread is told.
enum Note {
    /// A worker saw channel `channel` end (its consumers stopped, or settling failed).
    Lost { channel: u64, why: String },
    /// A worker came for a task while the pool was paused: consume again.
    Resume,
    /// Look at the stop flag.
    Wake,
}

pub(super) struct Shared {
    pub(super) inner: Arc<Inner>,
    tasks: Vec<TaskName>,
    queues: Vec<TaskQueues>,
    notes: Sender<Note>,
    /// Raised on stop: wakes every worker blocked in `recv`.
    pub(super) stop: Signal,
    feed: Mutex<Arc<Feed>>,
    /// Where `try_recv` starts looking, turn by turn (so no queue starves the others).
    cursor: AtomicUsize,
    /// Deliveries the workers took: while it stands still and tasks wait, every thread is
    /// busy.
    taken: AtomicU64,
    /// A worker asked to resume the paused pool (once per pause).
    resume_asked: AtomicBool,
}

impl Shared {
    fn tell(&self, note: Note) {
        // A consumer thread that is gone took its channel with it.
        let _ = self.notes.send(note);
    }

    /// Whether a delivery from queue `queue` (its index) with this routing key came some other
    /// way than straight to the queue by its name (through the delay queues).
    pub(super) fn rerouted(&self, queue: usize, routing_key: &str) -> bool {
        self.queues.get(queue).is_some_and(|queues| queues.queue != routing_key)
    }

    /// Settles one outstanding delivery on `line`: a failure means the channel broke
    /// (RabbitMQ requeues the delivery), which the consumer thread is told.
    pub(super) fn settle(&self, line: &Line, settle: impl FnOnce(&Channel) -> Result<(), amiquip::Error>) {
        if let Settled::Failed(e) = line.settle(settle) {
            self.tell(Note::Lost { channel: line.number, why: format!("settling a delivery failed: {e}") });
        }
        line.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Dead-letters a delivery: a copy with the reason to the dead letters, the original
    /// acknowledged once that is confirmed. Without a copy (too large), or if the publisher
    /// will not take it, RabbitMQ dead-letters it itself (without dingo's reason).
    pub(super) fn dead_letter(self: &Arc<Shared>, mut ack: AmqpAck, copy: Option<Vec<u8>>, reason: String) {
        let inner = &self.inner;
        // If the copy is refused or lost, RabbitMQ dead-letters the original itself: given
        // back, it would come straight back here.
        ack.on_drop = OnDrop::Reject;
        let (Some(body), Ok(publisher), Some(queues)) = (copy, inner.publisher(), self.queues.get(ack.queue)) else {
            ack.settle_rejected();
            return;
        };
        let outgoing = Outgoing {
            exchange: inner.names.dead_exchange(),
            // Routed by the task queue's name, which binds its dead-letter queue (the
            // delivery's own routing key may be another exchange's).
            routing_key: queues.queue.clone(),
            delay: None,
            body,
            persistent: true,
            correlation: None,
            reason: Some(reason),
            redeliveries: 0,
            once: false,
            then: Then::DeadLetter { original: Box::new(ack) },
        };
        // A refusal (the publisher closed, or full for the whole grace) drops the message
        // and with it the original's ack, which rejects the delivery.
        let _ = publisher.send(outgoing, Some(inner.options.settle_grace));
    }

    /// A task message of `len` bytes, over `max_message_size`, not decoded (`body`: its
    /// first bytes, all the connection kept): a copy of its first bytes goes
    /// to the dead letters with the reason (the original acknowledged once that copy is
    /// confirmed), with an event and a failure to its caller if those bytes name it.
    fn oversize(self: &Arc<Shared>, ack: AmqpAck, mut body: Vec<u8>, len: usize) {
        let inner = &self.inner;
        inner.stats.oversize.fetch_add(1, Ordering::Relaxed);
        let oversize = support::oversize_task(&body, len, inner.options.max_message_size);
        body.truncate(oversize.kept);
        body.shrink_to_fit();
        let mut event = Event::new(
            Origin::Consumer,
            Level::Error,
            EventKind::TooLarge,
            format!("{}; moved to the dead letters", oversize.reason),
        );
        if let Some(key) = &oversize.call {
            event = event.with_task(key.clone());
            if let Some(caller) = &oversize.reply_to {
                self.report_failure(key.clone(), caller, oversize.failure());
            }
        }
        inner.events.emit(event);
        let queue = self.queues.get(ack.queue).map_or("", |q| q.queue.as_str());
        inner.events.emit(support::dead_lettered(Origin::Consumer, queue, &oversize.reason, oversize.call.clone()));
        self.dead_letter(ack, Some(body), oversize.reason);
    }

    /// An undecodable message: an event, and a failure report to its caller if the message
    /// says who that is.
    fn tell_caller(&self, malformed: &wire::MalformedTask, reason: &str) {
        let inner = &self.inner;
        let mut event = Event::new(
            Origin::Consumer,
            Level::Error,
            EventKind::MalformedMessage,
            format!("{reason}; moved to the dead letters"),
        );
        if let (Some(name), Some(id)) = (&malformed.name, &malformed.id) {
            let key = CallKey { name: name.clone(), id: id.clone() };
            event = event.with_task(key.clone());
            if let Some(caller) = &malformed.reply_to {
                let error =
                    TaskError::new(TaskErrorKind::BadPayload, format!("the task message is malformed: {reason}"));
                self.report_failure(key, caller, error);
            }
        }
        inner.events.emit(event);
    }

    /// Publishes a final failure report to a caller's reply queue (no task to acknowledge
    /// with it).
    fn report_failure(&self, key: CallKey, caller: &str, error: TaskError) {
        let inner = &self.inner;
        let Ok(publisher) = inner.publisher() else { return };
        let report = ReportMessage { name: key.name.clone(), id: key.id.clone(), body: ReportBody::Failure(error) };
        if let Ok(body) = wire::encode_report(&report) {
            let _ = publisher.send(
                Outgoing {
                    exchange: String::new(),
                    routing_key: caller.to_owned(),
                    delay: None,
                    body,
                    persistent: inner.options.persistent_reports,
                    correlation: Some(key.id.as_str().to_owned()),
                    reason: None,
                    redeliveries: 0,
                    once: false,
                    then: Then::Report { key, ack: None, final_report: true },
                },
                Some(inner.options.settle_grace),
            );
        }
    }

    /// A task RabbitMQ redelivered (its worker stopped before finishing it), counted before
    /// it runs: within `max_redeliveries` it is published again to its queue with the count
    /// raised and the redelivered mark (confirmed, then the original acknowledged: a crash in
    /// between leaves the original to be counted again, never the count lost) and runs when
    /// it comes round; past it, it goes to the dead letters and its caller is told.
    fn recount(
        self: &Arc<Shared>,
        ack: AmqpAck,
        message: &TaskMessage,
        mut body: Vec<u8>,
        previous: u32,
        persistent: bool,
    ) {
        let inner = &self.inner;
        let max = inner.options.max_redeliveries;
        let count = previous.saturating_add(1);
        let key = message.key();
        if count > max {
            let reason = format!(
                "redelivered {max} times: every worker that took it stopped before finishing it (its process died or \
                 was killed, or its connection broke)"
            );
            inner.events.emit(
                Event::new(
                    Origin::Consumer,
                    Level::Error,
                    EventKind::DeadLettered,
                    format!("task `{}` {reason}; moved to the dead letters", key.name),
                )
                .with_task(key.clone()),
            );
            if let ReplyTo::Address(caller) = &message.reply_to {
                self.report_failure(key, caller, dingo_core::broker::support::worker_lost(count, max));
            }
            self.dead_letter(ack, Some(body), reason);
            return;
        }
        inner.events.emit(
            Event::new(
                Origin::Consumer,
                Level::Warning,
                EventKind::Redelivered,
                format!(
                    "task `{}` was redelivered after its worker stopped before finishing it ({count} of at most {max} \
                     times); it goes to the back of its queue",
                    key.name
                ),
            )
            .with_task(key),
        );
        // Decoded, so its last byte is the end marker.
        if !body.ends_with(wire::REDELIVERED_MARK) {
            body.pop();
            body.extend_from_slice(wire::REDELIVERED_MARK);
        }
        self.requeue(ack, body, count, persistent);
    }

    /// Gives back a delivery no worker started. One never redelivered is published again
    /// (confirmed) and the original acknowledged, so that it comes back unmarked: given back
    /// with a reject, RabbitMQ would mark it redelivered, and its next worker could not tell
    /// it from one whose worker died. The others go back with a reject: a redelivered one
    /// keeps the mark it will be counted by, an at-most-once one is never counted (it is
    /// acknowledged before it runs), an undecodable one is dead-lettered wherever it lands.
    ///
    /// The publisher waits at most until `deadline` for room (it is full during an outage or
    /// a resource alarm): past it, the delivery goes back with a reject.
    fn hand_back(
        self: &Arc<Shared>,
        line: &Arc<Line>,
        queue: usize,
        mut delivery: amiquip::Delivery,
        deadline: Instant,
    ) {
        // One over the size limit is not decoded: given back with a reject, it is
        // dead-lettered by the worker that takes it next.
        let fresh = !delivery.redelivered
            && delivery.body_size <= self.inner.options.max_message_size as u64
            && wire::decode_task(&delivery.body).is_ok_and(|message| !message.options.at_most_once);
        let persistent = *delivery.properties.delivery_mode() == Some(2);
        let count = redeliveries(&delivery.properties);
        let body = std::mem::take(&mut delivery.body);
        let ack = AmqpAck::new(self, line, queue, delivery);
        let left = deadline.saturating_duration_since(Instant::now());
        if fresh && !left.is_zero() {
            self.requeue_within(ack, body, count, persistent, left);
        }
        // (Dropped, the ack gives the delivery back.)
    }

    /// Sends a task that arrived before it is due into the delay chain again, with the rest
    /// of its delay (`body`: its bytes, if copied); the delivery (`ack`) is acknowledged once
    /// that is confirmed. Refused, the delivery goes back to its queue (and comes round
    /// again, counted as a redelivery).
    fn delay_again(&self, message: &TaskMessage, body: Option<Vec<u8>>, ack: Option<Ack>, count: u32) {
        let inner = &self.inner;
        if let Err(e) = inner.send_task(message, body, ack, count, Some(inner.options.settle_grace)) {
            inner.events.emit(
                Event::new(
                    Origin::Consumer,
                    Level::Error,
                    EventKind::SendFailed,
                    format!(
                        "a task that arrived before it was due could not be delayed again ({}); it goes back to its \
                         queue",
                        dingo_core::error::chain(&e)
                    ),
                )
                .with_task(message.key()),
            );
        }
    }

    /// Publishes `body` to the delivery's queue in its place, with `count` redeliveries;
    /// the original is acknowledged once that is confirmed, given back if it is refused.
    fn requeue(&self, ack: AmqpAck, body: Vec<u8>, count: u32, persistent: bool) {
        self.requeue_within(ack, body, count, persistent, self.inner.options.settle_grace);
    }

    /// [`requeue`](Shared::requeue), waiting at most `patience` for room in the publisher.
    fn requeue_within(&self, ack: AmqpAck, body: Vec<u8>, count: u32, persistent: bool, patience: Duration) {
        let inner = &self.inner;
        let (Ok(publisher), Some(queues)) = (inner.publisher(), self.queues.get(ack.queue)) else { return };
        let outgoing = Outgoing {
            exchange: String::new(),
            routing_key: queues.queue.clone(),
            delay: None,
            body,
            persistent,
            correlation: None,
            reason: None,
            redeliveries: count,
            once: false,
            then: Then::Requeued { original: Box::new(ack) },
        };
        // Refused, the message is dropped, and with it the ack, which gives the original back.
        let _ = publisher.send(outgoing, Some(patience));
    }
}

/// How many times a message was redelivered after its worker stopped, as dingo counted
/// (its header; 0 without).
fn redeliveries(properties: &amiquip::AmqpProperties) -> u32 {
    let value = properties.headers().as_ref().and_then(|headers| headers.get(REDELIVERIES_HEADER));
    let count = match value {
        Some(amiquip::AmqpValue::LongLongInt(n)) => u32::try_from(*n).ok(),
        Some(amiquip::AmqpValue::LongInt(n)) => u32::try_from(*n).ok(),
        Some(amiquip::AmqpValue::LongUInt(n)) => Some(*n),
        _ => None,
    };
    count.unwrap_or(0)
}

thread_local! {
    /// The at-most-once task this worker thread took last (acknowledged as delivered).
    static AT_MOST_ONCE: std::cell::RefCell<Option<CallKey>> = const { std::cell::RefCell::new(None) };
}

/// Whether this worker thread took `key` as an at-most-once task: its final report is at
/// most once too, and may go out without a confirm (see `publisher`). A report for any other
/// task — from another transport, or one this thread did not take — keeps the confirmed path.
pub(crate) fn took_at_most_once(key: &CallKey) -> bool {
    AT_MOST_ONCE.with(|taken| taken.borrow().as_ref() == Some(key))
}

pub(crate) struct AmqpSubscription {
    shared: Arc<Shared>,
    thread: Thread,
}

impl AmqpSubscription {
    pub(crate) fn start(
        inner: Arc<Inner>,
        tasks: &[TaskName],
        settings: &ConsumeSettings,
    ) -> Result<AmqpSubscription, BrokerError> {
        let queues = tasks
            .iter()
            .map(|task| TaskQueues::of(&inner.names, task.as_str()))
            .collect::<Result<Vec<_>, BrokerError>>()?;
        let prefetch = inner.options.prefetch.max(u16::try_from(settings.prefetch).unwrap_or(u16::MAX));
        let (notes, noted) = crossbeam_channel::unbounded();
        let (retire, retired) = crossbeam_channel::bounded(0);
        let none = Arc::new(Line::new(0, None));
        let shared = Arc::new(Shared {
            inner,
            tasks: tasks.to_vec(),
            queues,
            notes,
            stop: Signal::new(),
            feed: Mutex::new(Arc::new(Feed { line: none, receivers: Vec::new(), retired, paused: false })),
            cursor: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            resume_asked: AtomicBool::new(false),
        });
        let consumer = ConsumerThread { shared: shared.clone(), prefetch, noted };
        let thread = Thread::spawn("dingo-amqp-consume", move |_| consumer.run(retire))?;
        Ok(AmqpSubscription { shared, thread })
    }

    /// A delivery for a worker, or `None` when there is nothing to run (an undecodable
    /// message: dead-lettered here).
    fn take(&self, feed: &Feed, queue: usize, mut delivery: amiquip::Delivery) -> Option<Delivery> {
        let shared = &self.shared;
        let stats = &shared.inner.stats;
        shared.taken.fetch_add(1, Ordering::Relaxed);
        stats.fetched.fetch_add(1, Ordering::Relaxed);
        let redelivered = delivery.redelivered;
        if redelivered {
            stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let body = std::mem::take(&mut delivery.body);
        // Over the limit, only its first bytes were kept (see `conn`): the announced size
        // tells.
        if delivery.body_size > shared.inner.options.max_message_size as u64 {
            let len = usize::try_from(delivery.body_size).unwrap_or(usize::MAX);
            let ack = AmqpAck::new(shared, &feed.line, queue, delivery);
            shared.oversize(ack, body, len);
            return None;
        }
        // A redelivered task is published again (counted) whatever its size, and one that came
        // through the delay queues is dead-lettered by dingo whatever its size (RabbitMQ would
        // route it by the delay's routing key, to no dead-letter queue).
        let rerouted = shared.rerouted(queue, &delivery.routing_key);
        let copy = (redelivered || rerouted || body.len() <= DEAD_COPY_LIMIT).then(|| body.clone());
        let known = wire::Known { name: shared.tasks.get(queue), address: None };
        match wire::decode_delivery(body, &known) {
            Ok((message, marked)) if message.options.at_most_once => {
                // At most once: acknowledged before it runs, and not run unless it was (a
                // closed or broken channel gave it back to its queue).
                match feed.line.settle(|channel| delivery.ack(channel)) {
                    Settled::Done => {
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                        if delay_of(&message).is_some() {
                            // Published once more, without a confirm, as at most once.
                            shared.delay_again(&message, copy, None, 0);
                            return None;
                        }
                        let key = message.key();
                        AT_MOST_ONCE.with(|taken| *taken.borrow_mut() = Some(key));
                        Some(Delivery::new(message).with_redelivered(redelivered || marked))
                    }
                    Settled::Closed => None,
                    Settled::Failed(e) => {
                        let why = format!("acknowledging a delivery failed: {e}");
                        shared.tell(Note::Lost { channel: feed.line.number, why });
                        None
                    }
                }
            }
            // Its channel is closed: RabbitMQ gave it back to its queue already.
            Ok(_) if !feed.line.is_open() => None,
            // Its worker stopped before finishing it: counted first, it runs when it comes
            // round again (or goes to the dead letters).
            Ok((message, _)) if redelivered => {
                let previous = redeliveries(&delivery.properties);
                let persistent = *delivery.properties.delivery_mode() == Some(2);
                let ack = AmqpAck::new(shared, &feed.line, queue, delivery);
                match copy {
                    Some(body) => shared.recount(ack, &message, body, previous, persistent),
                    // (Unreachable: a redelivered message is always copied.)
                    None => drop(ack),
                }
                None
            }
            // Not due yet (a delay longer than one trip through the delay chain, or another
            // clock): round the chain again with the rest, never to a worker early.
            Ok((message, _)) if delay_of(&message).is_some() => {
                let count = redeliveries(&delivery.properties);
                let ack = AmqpAck::new(shared, &feed.line, queue, delivery);
                shared.delay_again(&message, copy, Some(Ack::new(ack)), count);
                None
            }
            Ok((message, marked)) => {
                let mut ack = AmqpAck::new(shared, &feed.line, queue, delivery);
                ack.copy = copy;
                Some(Delivery::new(message).with_ack(Some(Ack::new(ack))).with_redelivered(redelivered || marked))
            }
            Err(malformed) => {
                let reason = format!("undecodable message: {}", dingo_core::error::chain(&malformed.error));
                shared.tell_caller(&malformed, &reason);
                let call = malformed.name.clone().zip(malformed.id.clone()).map(|(name, id)| CallKey { name, id });
                let name = shared.queues.get(queue).map_or("", |q| q.queue.as_str());
                shared.inner.events.emit(support::dead_lettered(Origin::Consumer, name, &reason, call));
                let ack = AmqpAck::new(shared, &feed.line, queue, delivery);
                shared.dead_letter(ack, Some(malformed.bytes), reason);
                None
            }
        }
    }

    /// Whether `feed` is still the one the workers are handed (not replaced).
    fn is_current(&self, feed: &Arc<Feed>) -> bool {
        Arc::ptr_eq(&lock(&self.shared.feed), feed)
    }

    /// A worker is free while the pool is paused: the consumer thread consumes again.
    fn ask_to_resume(&self) {
        if !self.shared.resume_asked.swap(true, Ordering::AcqRel) {
            self.shared.tell(Note::Resume);
        }
    }

    /// The feed's consumers ended (the channel broke or is being replaced): tells the
    /// consumer thread, then waits for the next feed, at most until `deadline`. `false` when
    /// stopped.
    fn wait_for_new_feed(&self, feed: &Feed, why: String, deadline: Option<Instant>) -> bool {
        self.shared.tell(Note::Lost { channel: feed.line.number, why });
        crossbeam_channel::select! {
            recv(feed.retired) -> _ => true,
            recv(self.shared.stop.receiver()) -> _ => false,
            default(deadline.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(Instant::now()))) => true,
        }
    }
}

impl AmqpSubscription {
    /// Waits for a delivery, at most until `timeout`, or until `bell` rings.
    fn recv_until(&self, timeout: Option<Duration>, bell: Option<&Receiver<()>>) -> Recv {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.shared.stop.is_raised() {
                return Recv::Stopped;
            }
            let feed = lock(&self.shared.feed).clone();
            if feed.paused {
                self.ask_to_resume();
            }
            let mut select = Select::new();
            for receiver in &feed.receivers {
                select.recv(receiver);
            }
            let on_retired = select.recv(&feed.retired);
            let on_stop = select.recv(self.shared.stop.receiver());
            let on_bell = bell.map(|bell| select.recv(bell));
            let ready = match deadline {
                None => select.select(),
                Some(deadline) => match select.select_deadline(deadline) {
                    Ok(ready) => ready,
                    Err(_) => return Recv::Empty,
                },
            };
            // A selected operation must be completed, whichever it is.
            let index = ready.index();
            if index == on_stop {
                let _ = ready.recv(self.shared.stop.receiver());
                return Recv::Stopped;
            }
            if let (Some(on_bell), Some(bell)) = (on_bell, bell)
                && index == on_bell
            {
                let _ = ready.recv(bell);
                return Recv::Empty;
            }
            if index == on_retired {
                let _ = ready.recv(&feed.retired);
                continue;
            }
            let ended = match ready.recv(&feed.receivers[index]) {
                Ok(ConsumerMessage::Delivery(delivery)) => match self.take(&feed, index, delivery) {
                    Some(delivery) => return Recv::Delivery(delivery),
                    None => continue,
                },
                Ok(other) => describe(&other),
                Err(_) => "the consumer's channel closed".to_owned(),
            };
            if self.shared.stop.is_raised() {
                return Recv::Stopped;
            }
            if !self.is_current(&feed) {
                // Cancelled on purpose (a pause): the feed that replaced it is there already.
                continue;
            }
            if !self.wait_for_new_feed(&feed, ended, deadline) {
                return Recv::Stopped;
            }
            // (A dead feed's receivers are always ready: without this, a passed deadline
            // would make this loop spin until the feed is replaced.)
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Recv::Empty;
            }
        }
    }
}

impl Subscription for AmqpSubscription {
    fn try_recv(&self) -> Recv {
        if self.shared.stop.is_raised() {
            return Recv::Stopped;
        }
        let feed = lock(&self.shared.feed).clone();
        if feed.paused {
            self.ask_to_resume();
            return Recv::Empty;
        }
        let count = feed.receivers.len();
        let start = if count > 1 { self.shared.cursor.fetch_add(1, Ordering::Relaxed) % count } else { 0 };
        for queue in (start..count).chain(0..start) {
            let receiver = &feed.receivers[queue];
            loop {
                let why = match receiver.try_recv() {
                    Ok(ConsumerMessage::Delivery(delivery)) => match self.take(&feed, queue, delivery) {
                        Some(delivery) => return Recv::Delivery(delivery),
                        None => continue,
                    },
                    Ok(other) => describe(&other),
                    Err(crossbeam_channel::TryRecvError::Disconnected) => "the consumer's channel closed".to_owned(),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                };
                // (A replaced feed's consumers end because they were cancelled.)
                if self.is_current(&feed) {
                    self.shared.tell(Note::Lost { channel: feed.line.number, why });
                }
                break;
            }
        }
        Recv::Empty
    }

    fn recv(&self, timeout: Option<Duration>) -> Recv {
        self.recv_until(timeout, None)
    }

    fn recv_or_bell(&self, timeout: Option<Duration>, bell: &Receiver<()>) -> Recv {
        self.recv_until(timeout, Some(bell))
    }

    fn stop(&self) {
        self.shared.stop.raise();
        self.shared.tell(Note::Wake);
    }
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        self.stop();
        // Bounded: the thread waits at most the settle grace for outstanding settlements.
        self.thread.stop_and_join();
    }
}

fn describe(message: &ConsumerMessage) -> String {
    match message {
        ConsumerMessage::Delivery(_) => "a delivery".to_owned(),
        ConsumerMessage::ClientCancelled => "the consumer was cancelled".to_owned(),
        ConsumerMessage::ServerCancelled => "RabbitMQ cancelled the consumer (its queue was deleted?)".to_owned(),
        ConsumerMessage::ClientClosedChannel => "the channel was closed".to_owned(),
        ConsumerMessage::ServerClosedChannel(e) => format!("RabbitMQ closed the channel: {e}"),
        ConsumerMessage::ClientClosedConnection => "the connection was closed".to_owned(),
        ConsumerMessage::ServerClosedConnection(e) => format!("RabbitMQ closed the connection: {e}"),
    }
}
