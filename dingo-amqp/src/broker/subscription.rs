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

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amiquip::{Channel, ConsumerMessage, ConsumerOptions};
use crossbeam_channel::{Receiver, Select, Sender};
use dingo_core::broker::{Ack, Acknowledge, ConsumeSettings, Delivery, Recv, Subscription};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::{ReportBody, ReportMessage, wire};
use dingo_core::{BrokerError, CallKey, TaskError, TaskErrorKind, TaskName};

use super::publisher::{Outgoing, Then};
use super::{Inner, Thread, lock};
use crate::conn::Backoff;
use crate::topology::{self, TaskQueues};

/// Messages up to this size are copied as they arrive, so that one a worker cannot run can
/// be dead-lettered with its reason; larger ones are dead-lettered by RabbitMQ itself
/// (reason `rejected`, dingo's reason in the event only).
const DEAD_COPY_LIMIT: usize = 64 << 10;

/// The pool's channel, shared by the workers, the confirm thread and the consumer thread.
struct Line {
    /// Which channel of the subscription this is (counted from 1).
    number: u64,
    /// `None` once closed (its deliveries went back to their queues).
    channel: Mutex<Option<Channel>>,
    /// Deliveries of this channel handed to workers (at least once) and not settled yet.
    outstanding: AtomicUsize,
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
}

/// What the consumer thread is told.
enum Note {
    /// A worker saw channel `channel` end (its consumers stopped, or settling failed).
    Lost { channel: u64, why: String },
    /// Look at the stop flag.
    Wake,
}

struct Shared {
    inner: Arc<Inner>,
    tasks: Vec<TaskName>,
    queues: Vec<TaskQueues>,
    notes: Sender<Note>,
    stopped: AtomicBool,
    /// Dropped on stop: wakes every worker blocked in `recv`.
    stop_signal: Mutex<Option<Sender<()>>>,
    feed: Mutex<Arc<Feed>>,
    /// Where `try_recv` starts looking, turn by turn (so no queue starves the others).
    cursor: AtomicUsize,
}

impl Shared {
    fn tell(&self, note: Note) {
        // A consumer thread that is gone took its channel with it.
        let _ = self.notes.send(note);
    }

    /// Settles one outstanding delivery on `line`: a failure means the channel broke
    /// (RabbitMQ requeues the delivery), which the consumer thread is told.
    fn settle(&self, line: &Line, settle: impl FnOnce(&Channel) -> Result<(), amiquip::Error>) {
        if let Settled::Failed(e) = line.settle(settle) {
            self.tell(Note::Lost { channel: line.number, why: format!("settling a delivery failed: {e}") });
        }
        line.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Dead-letters a delivery: a copy with the reason to the dead letters, the original
    /// acknowledged once that is confirmed. Without a copy (too large), or if the publisher
    /// will not take it, RabbitMQ dead-letters it itself (without dingo's reason).
    fn dead_letter(self: &Arc<Shared>, mut ack: AmqpAck, copy: Option<Vec<u8>>, reason: String) {
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
            body,
            persistent: true,
            correlation: None,
            reason: Some(reason),
            once: false,
            then: Then::DeadLetter { original: Box::new(ack) },
        };
        // A refusal (the publisher closed, or full for the whole grace) drops the message
        // and with it the original's ack, which rejects the delivery.
        let _ = publisher.send(outgoing, Some(inner.options.settle_grace));
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
            if let (Some(caller), Ok(publisher)) = (&malformed.reply_to, inner.publisher()) {
                let error =
                    TaskError::new(TaskErrorKind::BadPayload, format!("the task message is malformed: {reason}"));
                let report = ReportMessage { name: name.clone(), id: id.clone(), body: ReportBody::Failure(error) };
                if let Ok(body) = wire::encode_report(&report) {
                    let _ = publisher.send(
                        Outgoing {
                            exchange: String::new(),
                            routing_key: caller.to_string(),
                            body,
                            persistent: inner.options.persistent_reports,
                            correlation: Some(id.as_str().to_owned()),
                            reason: None,
                            once: false,
                            then: Then::Report { key, ack: None, final_report: true },
                        },
                        Some(inner.options.settle_grace),
                    );
                }
            }
        }
        inner.events.emit(event);
    }
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

/// Acknowledges one delivery on the channel it came on. Dropped unused, it gives the
/// delivery back.
pub(crate) struct AmqpAck {
    shared: Arc<Shared>,
    line: Arc<Line>,
    /// The index of the delivery's queue in the subscription.
    queue: usize,
    delivery: Option<amiquip::Delivery>,
    /// A copy of the message, for dead-lettering it with a reason.
    copy: Option<Vec<u8>>,
    on_drop: OnDrop,
}

/// What an [`AmqpAck`] dropped unused does with its delivery.
#[derive(Clone, Copy)]
enum OnDrop {
    /// Gives it back to its queue (a worker that never ran it).
    Requeue,
    /// Lets RabbitMQ dead-letter it (its dead letter copy was not stored).
    Reject,
}

impl AmqpAck {
    fn new(shared: &Arc<Shared>, line: &Arc<Line>, queue: usize, delivery: amiquip::Delivery) -> AmqpAck {
        line.outstanding.fetch_add(1, Ordering::AcqRel);
        AmqpAck {
            shared: shared.clone(),
            line: line.clone(),
            queue,
            delivery: Some(delivery),
            copy: None,
            on_drop: OnDrop::Requeue,
        }
    }

    fn settle(mut self, settle: impl FnOnce(&Channel, amiquip::Delivery) -> Result<(), amiquip::Error>) {
        if let Some(delivery) = self.delivery.take() {
            self.shared.settle(&self.line, |channel| settle(channel, delivery));
        }
    }

    /// Its dead letter was stored (and counted): acknowledge the original.
    pub(crate) fn settle_acked(self) {
        self.settle(|channel, delivery| delivery.ack(channel));
    }

    /// Its dead letter was refused: let RabbitMQ dead-letter the original itself.
    pub(crate) fn settle_rejected(self) {
        let inner = self.shared.inner.clone();
        self.settle(|channel, delivery| {
            delivery.reject(channel, false)?;
            inner.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
    }
}

impl Drop for AmqpAck {
    fn drop(&mut self) {
        if let Some(delivery) = self.delivery.take() {
            let inner = self.shared.inner.clone();
            let on_drop = self.on_drop;
            self.shared.settle(&self.line, |channel| {
                match on_drop {
                    OnDrop::Requeue => {
                        delivery.reject(channel, true)?;
                        inner.stats.requeued.fetch_add(1, Ordering::Relaxed);
                    }
                    OnDrop::Reject => {
                        delivery.reject(channel, false)?;
                        inner.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            });
        }
    }
}

impl Acknowledge for AmqpAck {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let inner = self.shared.inner.clone();
        self.settle(|channel, delivery| {
            delivery.ack(channel)?;
            inner.stats.acked.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        Ok(())
    }

    fn reject(mut self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BrokerError> {
        if requeue {
            // Dropping it gives it back.
            return Ok(());
        }
        let copy = self.copy.take();
        let shared = self.shared.clone();
        shared.dead_letter(*self, copy, reason.to_owned());
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

pub(crate) struct AmqpSubscription {
    shared: Arc<Shared>,
    stop_seen: Receiver<()>,
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
        let (stop_signal, stop_seen) = crossbeam_channel::bounded(0);
        let (retire, retired) = crossbeam_channel::bounded(0);
        let none = Arc::new(Line::new(0, None));
        let shared = Arc::new(Shared {
            inner,
            tasks: tasks.to_vec(),
            queues,
            notes,
            stopped: AtomicBool::new(false),
            stop_signal: Mutex::new(Some(stop_signal)),
            feed: Mutex::new(Arc::new(Feed { line: none, receivers: Vec::new(), retired })),
            cursor: AtomicUsize::new(0),
        });
        let consumer = ConsumerThread { shared: shared.clone(), prefetch, noted };
        let thread = Thread::spawn("dingo-amqp-consume", move |_| consumer.run(retire))?;
        Ok(AmqpSubscription { shared, stop_seen, thread })
    }

    /// A delivery for a worker, or `None` when there is nothing to run (an undecodable
    /// message: dead-lettered here).
    fn take(&self, feed: &Feed, queue: usize, mut delivery: amiquip::Delivery) -> Option<Delivery> {
        let shared = &self.shared;
        let stats = &shared.inner.stats;
        stats.fetched.fetch_add(1, Ordering::Relaxed);
        let redelivered = delivery.redelivered;
        if redelivered {
            stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let body = std::mem::take(&mut delivery.body);
        let copy = (body.len() <= DEAD_COPY_LIMIT).then(|| body.clone());
        let known = wire::Known { name: shared.tasks.get(queue), address: None };
        match wire::decode_delivery(body, &known) {
            Ok((message, marked)) if message.options.at_most_once => {
                // At most once: acknowledged before it runs, and not run unless it was (a
                // closed or broken channel gave it back to its queue).
                match feed.line.settle(|channel| delivery.ack(channel)) {
                    Settled::Done => {
                        stats.acked.fetch_add(1, Ordering::Relaxed);
                        let key = message.key();
                        AT_MOST_ONCE.with(|taken| *taken.borrow_mut() = Some(key));
                        Some(Delivery { message, ack: None, redelivered: redelivered || marked })
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
            Ok((message, marked)) => {
                let mut ack = AmqpAck::new(shared, &feed.line, queue, delivery);
                ack.copy = copy;
                Some(Delivery { message, ack: Some(Ack::new(ack)), redelivered: redelivered || marked })
            }
            Err(malformed) => {
                let reason = format!("undecodable message: {}", dingo_core::error::chain(&malformed.error));
                shared.tell_caller(&malformed, &reason);
                let ack = AmqpAck::new(shared, &feed.line, queue, delivery);
                shared.dead_letter(ack, Some(malformed.bytes), reason);
                None
            }
        }
    }

    /// The feed's consumers ended (the channel broke or is being replaced): tells the
    /// consumer thread, then waits for the next feed, at most until `deadline`. `false` when
    /// stopped.
    fn wait_for_new_feed(&self, feed: &Feed, why: String, deadline: Option<Instant>) -> bool {
        self.shared.tell(Note::Lost { channel: feed.line.number, why });
        crossbeam_channel::select! {
            recv(feed.retired) -> _ => true,
            recv(self.stop_seen) -> _ => false,
            default(deadline.map_or(Duration::from_secs(1), |d| d.saturating_duration_since(Instant::now()))) => true,
        }
    }
}

impl Subscription for AmqpSubscription {
    fn try_recv(&self) -> Recv {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Recv::Stopped;
        }
        let feed = lock(&self.shared.feed).clone();
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
                self.shared.tell(Note::Lost { channel: feed.line.number, why });
                break;
            }
        }
        Recv::Empty
    }

    fn recv(&self, timeout: Option<Duration>) -> Recv {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.shared.stopped.load(Ordering::Acquire) {
                return Recv::Stopped;
            }
            let feed = lock(&self.shared.feed).clone();
            let mut select = Select::new();
            for receiver in &feed.receivers {
                select.recv(receiver);
            }
            let on_retired = select.recv(&feed.retired);
            let on_stop = select.recv(&self.stop_seen);
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
                let _ = ready.recv(&self.stop_seen);
                return Recv::Stopped;
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
            if self.shared.stopped.load(Ordering::Acquire) {
                return Recv::Stopped;
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

    fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        drop(lock(&self.shared.stop_signal).take());
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

struct ConsumerThread {
    shared: Arc<Shared>,
    prefetch: u16,
    noted: Receiver<Note>,
}

impl ConsumerThread {
    /// `retire` retires the current feed when dropped.
    fn run(self, mut retire: Sender<()>) {
        let inner = self.shared.inner.clone();
        let mut backoff = Backoff::new(&inner.options);
        let mut number = 0;
        // `AmqpSubscription::stop` sets it (dropping the subscription stops it first).
        while !self.shared.stopped.load(Ordering::Acquire) {
            let Some(opened) = inner.session.channel("task consumer", &self.shared.stopped) else { break };
            number += 1;
            let since = Instant::now();
            let generation = opened.generation;
            match self.serve(opened.channel, number, &mut retire) {
                None => break,
                Some(error) => {
                    backoff.broke(since, &self.shared.stopped);
                    inner.events.emit(Event::new(
                        Origin::Consumer,
                        Level::Warning,
                        EventKind::ReceiveFailed,
                        format!("consuming tasks failed ({error}); unacknowledged tasks go back to their queues"),
                    ));
                    inner.session.channel_failed(generation, "task consumer", &error);
                }
            }
        }
        // The workers' feed ends with this thread, and so does the subscription (the broker
        // may have shut down under it): workers waiting in `recv` learn it now.
        self.shared.stopped.store(true, Ordering::Release);
        drop(lock(&self.shared.stop_signal).take());
        self.install(Feed {
            line: Arc::new(Line::new(number + 1, None)),
            receivers: Vec::new(),
            retired: crossbeam_channel::never(),
        });
        drop(retire);
    }

    /// Hands the workers a new feed; the old one's receivers are emptied (what they held
    /// was requeued with its channel).
    fn install(&self, feed: Feed) {
        let old = std::mem::replace(&mut *lock(&self.shared.feed), Arc::new(feed));
        for receiver in &old.receivers {
            receiver.try_iter().for_each(drop);
        }
    }

    /// Consumes on `channel` until stopped (`None`) or the channel breaks (why).
    fn serve(&self, channel: Channel, number: u64, retire: &mut Sender<()>) -> Option<String> {
        let receivers = match self.consume(&channel) {
            Ok(receivers) => receivers,
            Err(e) => return Some(e.to_string()),
        };
        let line = Arc::new(Line::new(number, Some(channel)));
        let (next_retire, retired) = crossbeam_channel::bounded(0);
        self.install(Feed { line: line.clone(), receivers, retired });
        // Dropping the previous feed's sender wakes the workers waiting on it.
        drop(std::mem::replace(retire, next_retire));
        let broken = self.watch(&line);
        // Closing the channel requeues whatever it had not acknowledged.
        line.close();
        if broken.is_some() {
            // An empty feed until the next channel (the workers wait on it, not spin on the
            // dead one).
            let (next_retire, retired) = crossbeam_channel::bounded(0);
            let closed = Arc::new(Line::new(number, None));
            self.install(Feed { line: closed, receivers: Vec::new(), retired });
            drop(std::mem::replace(retire, next_retire));
        }
        broken
    }

    /// Waits until stopped and every delivery handed out is settled (or the settle grace
    /// passed): `None`; or until a worker reports the channel broken: why.
    fn watch(&self, line: &Line) -> Option<String> {
        let shared = &self.shared;
        let number = line.number;
        let mut deadline: Option<Instant> = None;
        loop {
            if deadline.is_none() && shared.stopped.load(Ordering::Acquire) {
                deadline = Some(Instant::now() + shared.inner.options.settle_grace);
            }
            if let Some(deadline) = deadline
                && (line.outstanding.load(Ordering::Acquire) == 0 || Instant::now() >= deadline)
            {
                return None;
            }
            match self.noted.recv_timeout(Duration::from_millis(100)) {
                // (When stopping, the consumers end because the channel is closing.)
                Ok(Note::Lost { channel, why }) if channel == number && deadline.is_none() => return Some(why),
                Ok(_) | Err(_) => {}
            }
        }
    }

    /// Declares the queues (again: one may have been deleted meanwhile), consumes them, and
    /// returns the consumers' receivers. The `Consumer`s themselves are forgotten: they
    /// borrow the channel, and dropping one would cancel it and drop its receiver (which
    /// kills the connection in amiquip 0.4, see `conn::cancelled`); closing the channel ends
    /// them.
    fn consume(&self, channel: &Channel) -> Result<Vec<Receiver<ConsumerMessage>>, amiquip::Error> {
        let inner = &self.shared.inner;
        for queues in &self.shared.queues {
            topology::declare_task(channel, &inner.options, queues)?;
        }
        channel.qos(0, self.prefetch, false)?;
        let mut receivers = Vec::with_capacity(self.shared.queues.len());
        for queues in &self.shared.queues {
            let consumer = channel.basic_consume(queues.queue.clone(), ConsumerOptions::default())?;
            receivers.push(consumer.receiver().clone());
            std::mem::forget(consumer);
        }
        Ok(receivers)
    }
}
