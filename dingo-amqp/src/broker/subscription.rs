//! A worker pool's subscription: one consumer thread owning one channel, consuming the
//! pool's task queues with per-consumer prefetch (`global = false`, which quorum queues
//! require), handing deliveries to the workers over a crossbeam channel, and settling them
//! when told ([`AmqpAck`]): acknowledged once the final report is confirmed, given back, or
//! dead-lettered with a reason.
//!
//! A delivery belongs to the channel it came on: when the channel breaks, RabbitMQ requeues
//! everything it had not acknowledged (marked redelivered), and settlements for the old
//! channel are ignored. The thread reconnects, declares the queues again and consumes again.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use amiquip::{Channel, Consumer, ConsumerMessage, ConsumerOptions};
use crossbeam_channel::{Receiver, Select, Sender};
use dingo_core::broker::{Ack, Acknowledge, ConsumeSettings, Delivery, Recv, Subscription};
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::id::FastMap;
use dingo_core::message::{ReportBody, ReportMessage, wire};
use dingo_core::{BrokerError, CallKey, TaskError, TaskErrorKind, TaskName};

use super::publisher::{Outgoing, Then};
use super::{Inner, Thread, lock};
use crate::topology::{self, TaskQueues};

/// Messages up to this size are copied as they arrive, so that one a worker cannot run can
/// be dead-lettered with its reason; larger ones are dead-lettered by RabbitMQ itself
/// (reason `rejected`, dingo's reason in the event only).
const DEAD_COPY_LIMIT: usize = 64 << 10;

/// What the consumer thread is told to do with a delivery of channel `channel`.
enum Settle {
    Ack {
        channel: u64,
        tag: u64,
    },
    Requeue {
        channel: u64,
        tag: u64,
    },
    /// Dead-lettered by RabbitMQ (the queue's dead-letter exchange), without dingo's reason.
    Reject {
        channel: u64,
        tag: u64,
    },
    /// Dead-lettered by dingo: a copy with the reason, then the original acknowledged.
    Dead {
        channel: u64,
        tag: u64,
        reason: String,
    },
    /// Look at the stop flag.
    Wake,
}

struct Shared {
    inner: Arc<Inner>,
    settle: Sender<Settle>,
    stopped: AtomicBool,
    /// Dropped on stop: wakes every worker blocked in `recv`.
    stop_signal: Mutex<Option<Sender<()>>>,
    /// Which channel the thread consumes on (counted per subscription).
    channel: AtomicU64,
}

/// Acknowledges one delivery: tells the consumer thread, which owns its channel.
pub(crate) struct AmqpAck {
    shared: Arc<Shared>,
    channel: u64,
    tag: u64,
}

impl AmqpAck {
    fn tell(&self, settle: Settle) -> Result<(), BrokerError> {
        // A subscription that is gone took its channel with it: RabbitMQ redelivers.
        self.shared.settle.send(settle).map_err(|_| super::closed())
    }

    /// Its dead letter was stored: acknowledge the original.
    pub(crate) fn settle_acked(self) {
        let _ = self.tell(Settle::Ack { channel: self.channel, tag: self.tag });
    }

    /// Its dead letter was refused: let RabbitMQ dead-letter the original itself.
    pub(crate) fn settle_rejected(self) {
        let _ = self.tell(Settle::Reject { channel: self.channel, tag: self.tag });
    }
}

impl Acknowledge for AmqpAck {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        self.tell(Settle::Ack { channel: self.channel, tag: self.tag })
    }

    fn reject(self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BrokerError> {
        let (channel, tag) = (self.channel, self.tag);
        let settle = if requeue {
            Settle::Requeue { channel, tag }
        } else {
            Settle::Dead { channel, tag, reason: reason.to_owned() }
        };
        self.tell(settle)
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
    deliveries: Receiver<Delivery>,
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
            .map(|task| Ok((task.clone(), TaskQueues::of(&inner.names, task.as_str())?)))
            .collect::<Result<Vec<_>, BrokerError>>()?;
        let prefetch = inner.options.prefetch.max(u16::try_from(settings.prefetch).unwrap_or(u16::MAX));
        let (settle, settles) = crossbeam_channel::unbounded();
        let (stop_signal, stop_seen) = crossbeam_channel::bounded(0);
        let (to_workers, deliveries) = crossbeam_channel::unbounded();
        let shared = Arc::new(Shared {
            inner,
            settle,
            stopped: AtomicBool::new(false),
            stop_signal: Mutex::new(Some(stop_signal)),
            channel: AtomicU64::new(0),
        });
        let consumer = ConsumerThread {
            shared: shared.clone(),
            queues,
            prefetch,
            to_workers,
            undelivered: deliveries.clone(),
            settles,
        };
        let thread = Thread::spawn("dingo-amqp-consume", move |stop| consumer.run(&stop.flag))?;
        Ok(AmqpSubscription { shared, deliveries, stop_seen, thread })
    }
}

impl Subscription for AmqpSubscription {
    fn try_recv(&self) -> Recv {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Recv::Stopped;
        }
        match self.deliveries.try_recv() {
            Ok(delivery) => Recv::Delivery(delivery),
            Err(_) => Recv::Empty,
        }
    }

    fn recv(&self, timeout: Option<Duration>) -> Recv {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Recv::Stopped;
        }
        let mut select = Select::new();
        let on_delivery = select.recv(&self.deliveries);
        select.recv(&self.stop_seen);
        let ready = match timeout {
            None => select.select(),
            Some(timeout) => match select.select_timeout(timeout) {
                Ok(ready) => ready,
                Err(_) => return Recv::Empty,
            },
        };
        // A selected operation must be completed, whichever it is.
        if ready.index() == on_delivery {
            return match ready.recv(&self.deliveries) {
                Ok(delivery) => Recv::Delivery(delivery),
                Err(_) => Recv::Stopped,
            };
        }
        let _ = ready.recv(&self.stop_seen);
        Recv::Stopped
    }

    fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        drop(lock(&self.shared.stop_signal).take());
        let _ = self.shared.settle.send(Settle::Wake);
    }
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        self.stop();
        // Bounded: the thread waits at most the settle grace for outstanding settlements.
        self.thread.stop_and_join();
    }
}

/// A delivery handed out and not yet settled.
struct Held {
    delivery: amiquip::Delivery,
    /// A copy of the message, for dead-lettering it with a reason.
    copy: Option<Vec<u8>>,
}

enum Served {
    Stopped,
    Broken(String),
}

struct ConsumerThread {
    shared: Arc<Shared>,
    queues: Vec<(TaskName, TaskQueues)>,
    prefetch: u16,
    to_workers: Sender<Delivery>,
    /// The workers' end too: what they have not taken goes back to the queue on stop.
    undelivered: Receiver<Delivery>,
    settles: Receiver<Settle>,
}

impl ConsumerThread {
    fn run(self, stop: &AtomicBool) {
        let inner = self.shared.inner.clone();
        let stopping = || stop.load(Ordering::Acquire) || self.shared.stopped.load(Ordering::Acquire);
        let never = AtomicBool::new(false);
        while !stopping() {
            let Some(opened) = inner.session.channel("task consumer", &never) else { break };
            let number = self.shared.channel.fetch_add(1, Ordering::AcqRel) + 1;
            match self.serve(&opened.channel, number, &stopping) {
                Served::Stopped => break,
                Served::Broken(error) => {
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
        // Whatever the workers did not take: its channel is gone or closing, RabbitMQ
        // requeues it; the stale acknowledgements are dropped with the receiver.
        self.undelivered.try_iter().for_each(drop);
    }

    fn serve(&self, channel: &Channel, number: u64, stopping: &dyn Fn() -> bool) -> Served {
        let inner = &self.shared.inner;
        let consumers = match self.consume(channel) {
            Ok(consumers) => consumers,
            Err(e) => return Served::Broken(e.to_string()),
        };
        let mut held: FastMap<u64, Held> = FastMap::default();
        let mut open = vec![true; consumers.len()];
        let mut deadline: Option<Instant> = None;
        loop {
            if deadline.is_none() && stopping() {
                deadline = Some(Instant::now() + inner.options.settle_grace);
                for consumer in &consumers {
                    let _ = consumer.cancel();
                }
                // Not started: back to the queue now (their settlements come back to us).
                for delivery in self.undelivered.try_iter() {
                    if let Some(ack) = delivery.ack {
                        let _ = ack.reject(true, "the worker pool stopped");
                    }
                }
            }
            if let Some(deadline) = deadline
                && ((held.is_empty() && self.settles.is_empty()) || Instant::now() >= deadline)
            {
                for (i, consumer) in consumers.iter().enumerate() {
                    if open[i] {
                        crate::conn::cancelled(consumer, |delivery| {
                            let _ = delivery.nack(channel, true);
                        });
                    }
                }
                // Closing the channel requeues whatever is still unacknowledged.
                return Served::Stopped;
            }
            let mut select = Select::new();
            let on_settle = select.recv(&self.settles);
            let mut indices = Vec::with_capacity(consumers.len());
            for (i, consumer) in consumers.iter().enumerate() {
                if open[i] {
                    indices.push((select.recv(consumer.receiver()), i));
                }
            }
            let Ok(ready) = select.select_timeout(Duration::from_millis(100)) else { continue };
            if ready.index() == on_settle {
                let Ok(settle) = ready.recv(&self.settles) else { return Served::Stopped };
                if let Err(e) = self.settle(channel, number, &mut held, settle) {
                    return Served::Broken(e.to_string());
                }
                continue;
            }
            let Some(&(_, i)) = indices.iter().find(|(index, _)| *index == ready.index()) else { continue };
            match ready.recv(consumers[i].receiver()) {
                Ok(ConsumerMessage::Delivery(delivery)) => {
                    if deadline.is_some() {
                        // Arrived as the consumer was being cancelled.
                        let _ = delivery.nack(channel, true);
                        continue;
                    }
                    if let Err(e) = self.deliver(channel, number, &mut held, i, delivery) {
                        return Served::Broken(e.to_string());
                    }
                }
                Ok(ConsumerMessage::ClientCancelled) => open[i] = false,
                Ok(ConsumerMessage::ServerCancelled) => {
                    return Served::Broken(format!("RabbitMQ cancelled the consumer of `{}`", self.queues[i].1.queue));
                }
                Ok(ConsumerMessage::ServerClosedChannel(e) | ConsumerMessage::ServerClosedConnection(e)) => {
                    return Served::Broken(e.to_string());
                }
                Ok(ConsumerMessage::ClientClosedChannel | ConsumerMessage::ClientClosedConnection) | Err(_) => {
                    return Served::Broken("the channel was closed".to_owned());
                }
            }
        }
    }

    /// Declares the queues (again: one may have been deleted meanwhile) and consumes them.
    fn consume<'c>(&self, channel: &'c Channel) -> Result<Vec<Consumer<'c>>, amiquip::Error> {
        let inner = &self.shared.inner;
        for (_, queues) in &self.queues {
            topology::declare_task(channel, &inner.options, queues)?;
        }
        channel.qos(0, self.prefetch, false)?;
        self.queues
            .iter()
            .map(|(_, queues)| channel.basic_consume(queues.queue.clone(), ConsumerOptions::default()))
            .collect()
    }

    /// Hands a delivery to the workers (acknowledging an at-most-once task at once), or
    /// dead-letters it if it does not decode.
    fn deliver(
        &self,
        channel: &Channel,
        number: u64,
        held: &mut FastMap<u64, Held>,
        queue: usize,
        mut delivery: amiquip::Delivery,
    ) -> Result<(), amiquip::Error> {
        let inner = &self.shared.inner;
        inner.stats.fetched.fetch_add(1, Ordering::Relaxed);
        let redelivered = delivery.redelivered;
        if redelivered {
            inner.stats.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        let tag = delivery.delivery_tag();
        let body = std::mem::take(&mut delivery.body);
        let copy = (body.len() <= DEAD_COPY_LIMIT).then(|| body.clone());
        let known = wire::Known { name: Some(&self.queues[queue].0), address: None };
        match wire::decode_delivery(body, &known) {
            Ok((message, marked)) if message.options.at_most_once => {
                delivery.ack(channel)?;
                inner.stats.acked.fetch_add(1, Ordering::Relaxed);
                let _ = self.to_workers.send(Delivery { message, ack: None, redelivered: redelivered || marked });
            }
            Ok((message, marked)) => {
                held.insert(tag, Held { delivery, copy });
                let ack = AmqpAck { shared: self.shared.clone(), channel: number, tag };
                let _ = self.to_workers.send(Delivery {
                    message,
                    ack: Some(Ack::new(ack)),
                    redelivered: redelivered || marked,
                });
            }
            Err(malformed) => {
                let reason = format!("undecodable message: {}", dingo_core::error::chain(&malformed.error));
                self.tell_caller(&malformed, &reason);
                held.insert(tag, Held { delivery, copy: Some(malformed.bytes) });
                self.settle(channel, number, held, Settle::Dead { channel: number, tag, reason })?;
            }
        }
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
                        None,
                    );
                }
            }
        }
        inner.events.emit(event);
    }

    fn settle(
        &self,
        channel: &Channel,
        number: u64,
        held: &mut FastMap<u64, Held>,
        settle: Settle,
    ) -> Result<(), amiquip::Error> {
        let inner = &self.shared.inner;
        let stats = &inner.stats;
        match settle {
            Settle::Wake => {}
            // For a channel that is gone: RabbitMQ requeued the delivery already.
            Settle::Ack { channel: c, .. }
            | Settle::Requeue { channel: c, .. }
            | Settle::Reject { channel: c, .. }
            | Settle::Dead { channel: c, .. }
                if c != number => {}
            Settle::Ack { tag, .. } => {
                if let Some(entry) = held.remove(&tag) {
                    entry.delivery.ack(channel)?;
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Settle::Requeue { tag, .. } => {
                if let Some(entry) = held.remove(&tag) {
                    entry.delivery.reject(channel, true)?;
                    stats.requeued.fetch_add(1, Ordering::Relaxed);
                }
            }
            Settle::Reject { tag, .. } => {
                if let Some(entry) = held.remove(&tag) {
                    entry.delivery.reject(channel, false)?;
                    stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Settle::Dead { tag, reason, .. } => {
                let Some(entry) = held.get_mut(&tag) else { return Ok(()) };
                let publisher = inner.publisher();
                match (entry.copy.take(), publisher) {
                    (Some(body), Ok(publisher)) => {
                        // Kept until the dead letter is confirmed; then acknowledged.
                        let original = AmqpAck { shared: self.shared.clone(), channel: number, tag };
                        let outgoing = Outgoing {
                            exchange: inner.names.dead_exchange(),
                            routing_key: entry.delivery.routing_key.clone(),
                            body,
                            persistent: true,
                            correlation: None,
                            reason: Some(reason),
                            then: Then::DeadLetter { original },
                        };
                        if publisher.send(outgoing, None).is_err() {
                            return self.settle(channel, number, held, Settle::Reject { channel: number, tag });
                        }
                    }
                    _ => return self.settle(channel, number, held, Settle::Reject { channel: number, tag }),
                }
            }
        }
        Ok(())
    }
}
