//! A worker pool's subscription. One consumer thread owns the pool's channel: it declares
//! the pool's task queues, consumes them with per-consumer prefetch (`global = false`, which
//! quorum queues require), and settles deliveries when told ([`AmqpAck`]): acknowledged
//! once the final report is confirmed, given back, or dead-lettered with a reason. The
//! worker threads take deliveries straight from amiquip's consumer channels (the [`Feed`]),
//! with no thread in between.
//!
//! A delivery belongs to the channel it came on: when the channel breaks, RabbitMQ requeues
//! everything it had not acknowledged (marked redelivered), and settlements for the old
//! channel are dropped. The consumer thread reconnects, declares the queues again, consumes
//! again and hands the workers a new feed.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amiquip::{Channel, Consumer, ConsumerMessage, ConsumerOptions};
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

/// What the consumer thread is told; `channel` names the channel a delivery came on.
enum Settle {
    /// Acknowledge; `counted`: the delivery was counted as outstanding (not at most once).
    Ack {
        channel: u64,
        delivery: amiquip::Delivery,
        counted: bool,
    },
    Requeue {
        channel: u64,
        delivery: amiquip::Delivery,
    },
    /// Dead-lettered by RabbitMQ (the queue's dead-letter exchange), without dingo's reason.
    Reject {
        channel: u64,
        delivery: amiquip::Delivery,
    },
    /// Dead-lettered by dingo: a copy with the reason, then the original acknowledged.
    /// `queue`: the index of the delivery's queue in the subscription.
    Dead {
        channel: u64,
        queue: usize,
        delivery: amiquip::Delivery,
        copy: Option<Vec<u8>>,
        reason: String,
    },
    /// A message that does not decode.
    Malformed {
        channel: u64,
        queue: usize,
        delivery: amiquip::Delivery,
        malformed: Box<wire::MalformedTask>,
    },
    /// A worker saw the channel's consumers end.
    Lost {
        channel: u64,
        why: String,
    },
    /// Look at the stop flag.
    Wake,
}

/// The consumers of the current channel, as the workers see them.
struct Feed {
    channel: u64,
    /// One per task, in the subscription's order.
    receivers: Vec<Receiver<ConsumerMessage>>,
    /// Disconnects when this feed is replaced.
    retired: Receiver<()>,
}

struct Shared {
    inner: Arc<Inner>,
    tasks: Vec<TaskName>,
    settle: Sender<Settle>,
    stopped: AtomicBool,
    /// Dropped on stop: wakes every worker blocked in `recv`.
    stop_signal: Mutex<Option<Sender<()>>>,
    feed: Mutex<Arc<Feed>>,
    /// Deliveries handed to workers (at least once) and not settled yet.
    outstanding: AtomicUsize,
}

impl Shared {
    fn tell(&self, settle: Settle) {
        // A consumer thread that is gone took its channel with it: RabbitMQ redelivers.
        let _ = self.settle.send(settle);
    }
}

/// Acknowledges one delivery: tells the consumer thread, which owns its channel. Dropped
/// unused, it gives the delivery back.
pub(crate) struct AmqpAck {
    shared: Arc<Shared>,
    channel: u64,
    /// The index of the delivery's queue in the subscription.
    queue: usize,
    delivery: Option<amiquip::Delivery>,
    /// A copy of the message, for dead-lettering it with a reason.
    copy: Option<Vec<u8>>,
}

impl AmqpAck {
    fn settle(mut self, settle: impl FnOnce(u64, amiquip::Delivery, Option<Vec<u8>>) -> Settle) {
        if let Some(delivery) = self.delivery.take() {
            self.shared.tell(settle(self.channel, delivery, self.copy.take()));
        }
    }

    /// Its dead letter was stored: acknowledge the original.
    pub(crate) fn settle_acked(self) {
        self.settle(|channel, delivery, _| Settle::Ack { channel, delivery, counted: true });
    }

    /// Its dead letter was refused: let RabbitMQ dead-letter the original itself.
    pub(crate) fn settle_rejected(self) {
        self.settle(|channel, delivery, _| Settle::Reject { channel, delivery });
    }
}

impl Drop for AmqpAck {
    fn drop(&mut self) {
        if let Some(delivery) = self.delivery.take() {
            self.shared.tell(Settle::Requeue { channel: self.channel, delivery });
        }
    }
}

impl Acknowledge for AmqpAck {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        self.settle(|channel, delivery, _| Settle::Ack { channel, delivery, counted: true });
        Ok(())
    }

    fn reject(self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BrokerError> {
        if requeue {
            self.settle(|channel, delivery, _| Settle::Requeue { channel, delivery });
        } else {
            let queue = self.queue;
            self.settle(|channel, delivery, copy| Settle::Dead {
                channel,
                queue,
                delivery,
                copy,
                reason: reason.to_owned(),
            });
        }
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
        let (settle, settles) = crossbeam_channel::unbounded();
        let (stop_signal, stop_seen) = crossbeam_channel::bounded(0);
        let (retire, retired) = crossbeam_channel::bounded(0);
        let shared = Arc::new(Shared {
            inner,
            tasks: tasks.to_vec(),
            settle,
            stopped: AtomicBool::new(false),
            stop_signal: Mutex::new(Some(stop_signal)),
            feed: Mutex::new(Arc::new(Feed { channel: 0, receivers: Vec::new(), retired })),
            outstanding: AtomicUsize::new(0),
        });
        let consumer = ConsumerThread { shared: shared.clone(), queues, prefetch, settles };
        let thread = Thread::spawn("dingo-amqp-consume", move |_| consumer.run(retire))?;
        Ok(AmqpSubscription { shared, stop_seen, thread })
    }

    /// A delivery for a worker, or `None` when there is nothing to run (an undecodable
    /// message, handed to the consumer thread for the dead letters).
    fn take(&self, feed: &Feed, queue: usize, mut delivery: amiquip::Delivery) -> Option<Delivery> {
        let shared = &self.shared;
        let stats = &shared.inner.stats;
        stats.fetched.fetch_add(1, Ordering::Relaxed);
        let redelivered = delivery.redelivered;
        if redelivered {
            stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let channel = feed.channel;
        let body = std::mem::take(&mut delivery.body);
        let copy = (body.len() <= DEAD_COPY_LIMIT).then(|| body.clone());
        let known = wire::Known { name: shared.tasks.get(queue), address: None };
        match wire::decode_delivery(body, &known) {
            Ok((message, marked)) if message.options.at_most_once => {
                // At most once: acknowledged before it runs.
                shared.tell(Settle::Ack { channel, delivery, counted: false });
                Some(Delivery { message, ack: None, redelivered: redelivered || marked })
            }
            Ok((message, marked)) => {
                shared.outstanding.fetch_add(1, Ordering::AcqRel);
                let ack = AmqpAck { shared: shared.clone(), channel, queue, delivery: Some(delivery), copy };
                Some(Delivery { message, ack: Some(Ack::new(ack)), redelivered: redelivered || marked })
            }
            Err(malformed) => {
                shared.outstanding.fetch_add(1, Ordering::AcqRel);
                shared.tell(Settle::Malformed { channel, queue, delivery, malformed });
                None
            }
        }
    }

    /// The feed's consumers ended (the channel broke or is being replaced): tells the
    /// consumer thread, then waits for the next feed, at most until `deadline`. `false` when
    /// stopped.
    fn wait_for_new_feed(&self, feed: &Feed, why: String, deadline: Option<Instant>) -> bool {
        self.shared.tell(Settle::Lost { channel: feed.channel, why });
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
        for (queue, receiver) in feed.receivers.iter().enumerate() {
            loop {
                match receiver.try_recv() {
                    Ok(ConsumerMessage::Delivery(delivery)) => {
                        if let Some(delivery) = self.take(&feed, queue, delivery) {
                            return Recv::Delivery(delivery);
                        }
                    }
                    Ok(other) => {
                        self.shared.tell(Settle::Lost { channel: feed.channel, why: describe(&other) });
                        break;
                    }
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        let why = "the consumer's channel closed".to_owned();
                        self.shared.tell(Settle::Lost { channel: feed.channel, why });
                        break;
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                }
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
        }
    }

    fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        drop(lock(&self.shared.stop_signal).take());
        self.shared.tell(Settle::Wake);
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

enum Served {
    Stopped,
    Broken(String),
}

struct ConsumerThread {
    shared: Arc<Shared>,
    queues: Vec<TaskQueues>,
    prefetch: u16,
    settles: Receiver<Settle>,
}

impl ConsumerThread {
    /// `retire` retires the current feed when dropped.
    fn run(self, mut retire: Sender<()>) {
        let inner = self.shared.inner.clone();
        // `AmqpSubscription::stop` sets it (dropping the subscription stops it first).
        let stopping = || self.shared.stopped.load(Ordering::Acquire);
        let mut backoff = Backoff::new(&inner.options);
        let mut number = 0;
        while !stopping() {
            let Some(opened) = inner.session.channel("task consumer", &self.shared.stopped) else { break };
            number += 1;
            let since = Instant::now();
            match self.serve(&opened.channel, number, &stopping, &mut retire) {
                Served::Stopped => break,
                Served::Broken(error) => {
                    backoff.broke(since, &self.shared.stopped);
                    inner.events.emit(Event::new(
                        Origin::Consumer,
                        Level::Warning,
                        EventKind::ReceiveFailed,
                        format!("consuming tasks failed ({error}); unacknowledged tasks go back to their queues"),
                    ));
                    inner.session.channel_failed(opened.generation, "task consumer", &error);
                }
            }
        }
        // The workers' feed ends with this thread, and so does the subscription (the broker
        // may have shut down under it): workers waiting in `recv` learn it now.
        self.shared.stopped.store(true, Ordering::Release);
        drop(lock(&self.shared.stop_signal).take());
        self.install(Feed { channel: number + 1, receivers: Vec::new(), retired: crossbeam_channel::never() });
        drop(retire);
    }

    /// Hands the workers a new feed (the old one retires: workers waiting on it look again).
    fn install(&self, feed: Feed) {
        *lock(&self.shared.feed) = Arc::new(feed);
    }

    fn serve(&self, channel: &Channel, number: u64, stopping: &dyn Fn() -> bool, retire: &mut Sender<()>) -> Served {
        let consumers = match self.consume(channel) {
            Ok(consumers) => consumers,
            Err(e) => return Served::Broken(e.to_string()),
        };
        let (next_retire, retired) = crossbeam_channel::bounded(0);
        self.install(Feed {
            channel: number,
            receivers: consumers.iter().map(|c| c.receiver().clone()).collect(),
            retired,
        });
        // Dropping the previous feed's sender wakes the workers waiting on it.
        drop(std::mem::replace(retire, next_retire));
        let served = self.settle_until_done(channel, number, stopping, &consumers);
        if matches!(served, Served::Broken(_)) {
            // Cancelled and confirmed before they are dropped (amiquip 0.4 kills the whole
            // connection otherwise, see `conn::cancelled`); on a dead channel this returns at
            // once. What arrives meanwhile is requeued when the channel closes.
            for consumer in &consumers {
                crate::conn::cancelled(consumer, drop);
            }
            // An empty feed until the next channel (the workers wait on it, not spin on the
            // dead one).
            let (next_retire, retired) = crossbeam_channel::bounded(0);
            self.install(Feed { channel: number, receivers: Vec::new(), retired });
            drop(std::mem::replace(retire, next_retire));
        }
        served
    }

    fn settle_until_done(
        &self,
        channel: &Channel,
        number: u64,
        stopping: &dyn Fn() -> bool,
        consumers: &[Consumer<'_>],
    ) -> Served {
        let inner = &self.shared.inner;
        let mut deadline: Option<Instant> = None;
        loop {
            if deadline.is_none() && stopping() {
                deadline = Some(Instant::now() + inner.options.settle_grace);
                // The workers have stopped taking: what arrives now goes back to the queue.
                for consumer in consumers {
                    crate::conn::cancelled(consumer, |delivery| {
                        let _ = delivery.nack(channel, true);
                    });
                }
                for receiver in &lock(&self.shared.feed).receivers {
                    for message in receiver.try_iter() {
                        if let ConsumerMessage::Delivery(delivery) = message {
                            let _ = delivery.nack(channel, true);
                        }
                    }
                }
            }
            if let Some(deadline) = deadline {
                let settled = self.shared.outstanding.load(Ordering::Acquire) == 0 && self.settles.is_empty();
                if settled || Instant::now() >= deadline {
                    // Closing the channel requeues whatever is still unacknowledged.
                    return Served::Stopped;
                }
            }
            let settle = match self.settles.recv_timeout(Duration::from_millis(100)) {
                Ok(settle) => settle,
                Err(_) => continue,
            };
            if let Err(why) = self.settle(channel, number, settle) {
                return Served::Broken(why);
            }
        }
    }

    /// Declares the queues (again: one may have been deleted meanwhile) and consumes them.
    fn consume<'c>(&self, channel: &'c Channel) -> Result<Vec<Consumer<'c>>, amiquip::Error> {
        let inner = &self.shared.inner;
        for queues in &self.queues {
            topology::declare_task(channel, &inner.options, queues)?;
        }
        channel.qos(0, self.prefetch, false)?;
        self.queues
            .iter()
            .map(|queues| channel.basic_consume(queues.queue.clone(), ConsumerOptions::default()))
            .collect()
    }

    fn settle(&self, channel: &Channel, number: u64, settle: Settle) -> Result<(), String> {
        let shared = &self.shared;
        let stats = &shared.inner.stats;
        let done = || {
            shared.outstanding.fetch_sub(1, Ordering::AcqRel);
        };
        let failed = |e: amiquip::Error| e.to_string();
        match settle {
            Settle::Wake => {}
            // (When stopping, the consumers end because they were cancelled.)
            Settle::Lost { channel: c, why } => {
                if c == number && !shared.stopped.load(Ordering::Acquire) {
                    return Err(why);
                }
            }
            // For a channel that is gone: RabbitMQ requeued the delivery already.
            Settle::Ack { channel: c, counted, .. } if c != number => {
                if counted {
                    done();
                }
            }
            Settle::Requeue { channel: c, .. }
            | Settle::Reject { channel: c, .. }
            | Settle::Dead { channel: c, .. }
            | Settle::Malformed { channel: c, .. }
                if c != number =>
            {
                done();
            }
            Settle::Ack { delivery, counted, .. } => {
                if counted {
                    done();
                }
                delivery.ack(channel).map_err(failed)?;
                stats.acked.fetch_add(1, Ordering::Relaxed);
            }
            Settle::Requeue { delivery, .. } => {
                done();
                delivery.reject(channel, true).map_err(failed)?;
                stats.requeued.fetch_add(1, Ordering::Relaxed);
            }
            Settle::Reject { delivery, .. } => {
                done();
                delivery.reject(channel, false).map_err(failed)?;
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Settle::Dead { queue, delivery, copy, reason, .. } => {
                self.dead_letter(channel, number, queue, delivery, copy, reason)?;
            }
            Settle::Malformed { queue, delivery, malformed, .. } => {
                let reason = format!("undecodable message: {}", dingo_core::error::chain(&malformed.error));
                self.tell_caller(&malformed, &reason);
                self.dead_letter(channel, number, queue, delivery, Some(malformed.bytes), reason)?;
            }
        }
        Ok(())
    }

    /// Publishes a copy of the message with its reason to the dead letters; the original is
    /// acknowledged once that is confirmed. Without a copy, RabbitMQ dead-letters it.
    fn dead_letter(
        &self,
        channel: &Channel,
        number: u64,
        queue: usize,
        delivery: amiquip::Delivery,
        copy: Option<Vec<u8>>,
        reason: String,
    ) -> Result<(), String> {
        let inner = &self.shared.inner;
        let publisher = inner.publisher();
        let (Some(body), Ok(publisher), Some(queues)) = (copy, publisher, self.queues.get(queue)) else {
            return self.settle(channel, number, Settle::Reject { channel: number, delivery });
        };
        // Routed by the task queue's name, which binds its dead-letter queue (the delivery's
        // own routing key may be another exchange's).
        let routing_key = queues.queue.clone();
        let original = Box::new(AmqpAck {
            shared: self.shared.clone(),
            channel: number,
            queue,
            delivery: Some(delivery),
            copy: None,
        });
        let outgoing = Outgoing {
            exchange: inner.names.dead_exchange(),
            routing_key,
            body,
            persistent: true,
            correlation: None,
            reason: Some(reason),
            then: Then::DeadLetter { original },
        };
        // A refusal (the publisher full for the whole grace: RabbitMQ away) drops the outgoing
        // message and with it the original's ack, which gives the delivery back (it is tried
        // again).
        let _ = publisher.send(outgoing, Some(inner.options.settle_grace));
        Ok(())
    }

    /// An undecodable message: an event, and a failure report to its caller if the message
    /// says who that is.
    fn tell_caller(&self, malformed: &wire::MalformedTask, reason: &str) {
        let inner = &self.shared.inner;
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
