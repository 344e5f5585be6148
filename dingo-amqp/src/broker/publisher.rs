//! The publisher thread: every message this broker sends — task messages, reports, dead
//! letters — leaves through one channel in confirm mode, in the order it was queued (so the
//! reports of a call stay in order).
//!
//! Confirms are asynchronous: the thread publishes whatever is queued, up to
//! [`max_unconfirmed`](crate::AmqpOptions::max_unconfirmed) messages ahead of RabbitMQ's
//! confirms, and acts on each confirm as it comes ([`Then`]): a report's confirm
//! acknowledges the task it finishes. Task messages and reports are published `mandatory`;
//! one that reaches no queue comes back (a return, then its confirm) and is treated as an
//! error. Messages not yet confirmed when the connection breaks are published again on the
//! next one (at least once).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amiquip::{AmqpProperties, AmqpValue, Channel, Confirm, ConfirmSmoother, FieldTable, Publish};
use crossbeam_channel::{Receiver, Select, SendTimeoutError, Sender, TrySendError};
use dingo_core::broker::Ack;
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::{ReportBody, ReportMessage};
use dingo_core::{BrokerError, BrokerErrorKind, CallKey, TaskError, TaskErrorKind};

use super::subscription::AmqpAck;
use super::{Inner, Stop, Thread};
use crate::topology::REASON_HEADER;

/// One message to publish and what to do once RabbitMQ confirmed it.
pub(crate) struct Outgoing {
    /// `""`: the default exchange, routing straight to the queue named by `routing_key`.
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) body: Vec<u8>,
    pub(crate) persistent: bool,
    /// The correlation id (reports carry their task id).
    pub(crate) correlation: Option<String>,
    /// Why a dead letter is one (a header).
    pub(crate) reason: Option<String>,
    pub(crate) then: Then,
}

/// What a confirm (or a return, or a refusal) means for a message.
pub(crate) enum Then {
    /// A task message: one that reaches no queue fails its call.
    Task { key: CallKey, reply: Option<Arc<str>> },
    /// A report: once stored, the task it finishes (if any) is acknowledged.
    Report { key: CallKey, ack: Option<Ack>, final_report: bool },
    /// A copy of a message that cannot run, with its reason, for the dead-letter queue: once
    /// stored, the original is acknowledged.
    DeadLetter { original: AmqpAck },
}

impl Outgoing {
    fn mandatory(&self) -> bool {
        !matches!(self.then, Then::DeadLetter { .. })
    }
}

struct Pending {
    outgoing: Outgoing,
    /// Our number for the message (its `message_id`): tells which message a return is.
    number: u64,
    /// The reason RabbitMQ returned it, if it did.
    returned: Option<String>,
}

pub(crate) struct Publisher {
    requests: Sender<Outgoing>,
    thread: Thread,
}

impl Publisher {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Publisher, BrokerError> {
        let (requests, queued) = crossbeam_channel::bounded(inner.options.send_buffer);
        let thread = Thread::spawn("dingo-amqp-publish", move |stop| run(&inner, &queued, &stop))?;
        Ok(Publisher { requests, thread })
    }

    /// Queues a message; blocks while the queue is full, at most `timeout`.
    pub(crate) fn send(&self, outgoing: Outgoing, timeout: Option<Duration>) -> Result<(), BrokerError> {
        let full = || BrokerError::new(BrokerErrorKind::Full, "the AMQP publisher's queue is full");
        match timeout {
            None => self.requests.send(outgoing).map_err(|_| super::closed()),
            Some(timeout) if timeout.is_zero() => self.requests.try_send(outgoing).map_err(|e| match e {
                TrySendError::Full(_) => full(),
                TrySendError::Disconnected(_) => super::closed(),
            }),
            Some(timeout) => self.requests.send_timeout(outgoing, timeout).map_err(|e| match e {
                SendTimeoutError::Timeout(_) => full(),
                SendTimeoutError::Disconnected(_) => super::closed(),
            }),
        }
    }

    /// Publishes what is queued, waits for the confirms (at most the settle grace), stops.
    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

enum Served {
    /// Told to stop, and done (or out of time).
    Stopped,
    /// The channel broke: publish the unconfirmed messages again on a new one.
    Broken(String),
}

fn run(inner: &Arc<Inner>, queued: &Receiver<Outgoing>, stop: &Stop) {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut numbers = 0u64;
    let mut deadline = None;
    let never = AtomicBool::new(false);
    loop {
        if stop.is_set() && deadline.is_none() {
            deadline = Some(Instant::now() + inner.options.settle_grace);
        }
        if deadline.is_some() && pending.is_empty() && queued.is_empty() {
            break;
        }
        let Some(opened) = inner.session.channel_until("publisher", &never, deadline) else { break };
        match serve(inner, &opened.channel, queued, &mut pending, &mut numbers, stop, &mut deadline) {
            Served::Stopped => break,
            Served::Broken(error) => inner.session.channel_failed(opened.generation, "publisher channel", &error),
        }
    }
    // Out of time at shutdown, or the broker is gone: what is left is not published.
    let left: Vec<Outgoing> = pending.into_iter().map(|p| p.outgoing).chain(queued.try_iter()).collect();
    if !left.is_empty() {
        inner.events.emit(Event::new(
            Origin::Producer,
            Level::Error,
            EventKind::Other,
            format!("{} message(s) were not confirmed by RabbitMQ before shutdown", left.len()),
        ));
        for outgoing in left {
            if let Then::Task { key, reply } = outgoing.then {
                fail_call(inner, key, reply.as_deref(), TaskErrorKind::Shutdown, "the task message was not sent");
            }
            // Reports: their deliveries stay unacknowledged and are redelivered.
        }
    }
}

fn serve(
    inner: &Arc<Inner>,
    channel: &Channel,
    queued: &Receiver<Outgoing>,
    pending: &mut VecDeque<Pending>,
    numbers: &mut u64,
    stop: &Stop,
    deadline: &mut Option<Instant>,
) -> Served {
    let setup = || -> Result<_, amiquip::Error> {
        let confirms = channel.listen_for_publisher_confirms()?;
        let returns = channel.listen_for_returns()?;
        channel.enable_publisher_confirms()?;
        Ok((confirms, returns))
    };
    let (confirms, returns) = match setup() {
        Ok(listeners) => listeners,
        Err(e) => return Served::Broken(e.to_string()),
    };
    let mut smoother = ConfirmSmoother::new();
    // What the last channel did not confirm, again and in order (RabbitMQ may have stored
    // some of it: at least once).
    for entry in pending.iter_mut() {
        entry.returned = None;
        if let Err(e) = publish(channel, entry) {
            return Served::Broken(e.to_string());
        }
    }
    let limit = inner.options.max_unconfirmed;
    loop {
        if stop.is_set() && deadline.is_none() {
            *deadline = Some(Instant::now() + inner.options.settle_grace);
        }
        if let Some(deadline) = *deadline
            && ((pending.is_empty() && queued.is_empty()) || Instant::now() >= deadline)
        {
            return Served::Stopped;
        }
        let mut select = Select::new();
        let on_confirm = select.recv(&confirms);
        let on_return = select.recv(&returns);
        let on_queued = (pending.len() < limit).then(|| select.recv(queued));
        let on_stop = deadline.is_none().then(|| select.recv(&stop.signal));
        let Ok(ready) = select.select_timeout(Duration::from_millis(100)) else { continue };
        let index = ready.index();
        if Some(index) == on_stop {
            let _ = ready.recv(&stop.signal);
        } else if index == on_confirm {
            let Ok(confirm) = ready.recv(&confirms) else {
                return Served::Broken("the connection stopped delivering confirms".to_owned());
            };
            for confirm in smoother.process(confirm) {
                if let Some(entry) = pending.pop_front() {
                    settle(inner, entry, matches!(confirm, Confirm::Ack(_)));
                }
            }
        } else if index == on_return {
            let Ok(returned) = ready.recv(&returns) else {
                return Served::Broken("the connection stopped delivering returns".to_owned());
            };
            let number = returned.properties.message_id().as_ref().and_then(|id| id.parse::<u64>().ok());
            if let Some(entry) = pending.iter_mut().find(|p| Some(p.number) == number) {
                entry.returned = Some(format!("{} {}", returned.reply_code, returned.reply_text));
            }
        } else if Some(index) == on_queued {
            let Ok(first) = ready.recv(queued) else { return Served::Stopped };
            // Whatever else is queued goes out in the same burst.
            let mut next = Some(first);
            while let Some(outgoing) = next {
                *numbers += 1;
                let entry = Pending { outgoing, number: *numbers, returned: None };
                let published = publish(channel, &entry);
                // Kept either way: a message whose publishing failed goes out on the next channel.
                pending.push_back(entry);
                if let Err(e) = published {
                    return Served::Broken(e.to_string());
                }
                next = if pending.len() < limit { queued.try_recv().ok() } else { None };
            }
        }
    }
}

fn publish(channel: &Channel, entry: &Pending) -> Result<(), amiquip::Error> {
    let outgoing = &entry.outgoing;
    let mut properties = AmqpProperties::default().with_delivery_mode(if outgoing.persistent { 2 } else { 1 });
    if outgoing.mandatory() {
        properties = properties.with_message_id(entry.number.to_string());
    }
    if let Some(correlation) = &outgoing.correlation {
        properties = properties.with_correlation_id(correlation.clone());
    }
    if let Some(reason) = &outgoing.reason {
        let mut headers = FieldTable::new();
        headers.insert(REASON_HEADER.into(), AmqpValue::LongString(reason.clone()));
        properties = properties.with_headers(headers);
    }
    channel.basic_publish(
        outgoing.exchange.as_str(),
        Publish {
            body: &outgoing.body,
            routing_key: outgoing.routing_key.clone(),
            mandatory: outgoing.mandatory(),
            immediate: false,
            properties,
        },
    )
}

/// Acts on RabbitMQ's answer for one message: `stored` (an ack) or refused (a nack).
fn settle(inner: &Arc<Inner>, entry: Pending, stored: bool) {
    let Pending { outgoing, returned, .. } = entry;
    let stats = &inner.stats;
    match outgoing.then {
        Then::Task { key, reply } => match (stored, returned) {
            (true, None) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            (true, Some(why)) => {
                stats.returned.fetch_add(1, Ordering::Relaxed);
                let message = format!("no queue serves task `{}` (RabbitMQ returned the message: {why})", key.name);
                inner.events.emit(
                    Event::new(Origin::Producer, Level::Warning, EventKind::UnknownTask, message.clone())
                        .with_task(key.clone()),
                );
                fail_call(inner, key, reply.as_deref(), TaskErrorKind::UnknownTask, &message);
            }
            (false, _) => {
                let message = "RabbitMQ refused to store the task message".to_owned();
                inner.events.emit(
                    Event::new(Origin::Producer, Level::Error, EventKind::Other, message.clone())
                        .with_task(key.clone()),
                );
                fail_call(inner, key, reply.as_deref(), TaskErrorKind::Other, &message);
            }
        },
        Then::Report { key, ack, final_report } => {
            if !stored {
                inner.events.emit(
                    Event::new(
                        Origin::Reporter,
                        Level::Error,
                        EventKind::ReportFailed,
                        "RabbitMQ refused to store a report; its task goes back to the queue",
                    )
                    .with_task(key),
                );
                if let Some(ack) = ack
                    && let Err(e) = ack.reject(true, "its report was refused")
                {
                    ack_failed(inner, &e);
                }
                return;
            }
            stats.reports.fetch_add(1, Ordering::Relaxed);
            if let Some(why) = returned {
                stats.returned.fetch_add(1, Ordering::Relaxed);
                // The caller's reply queue is gone (it expired or was deleted): nobody waits.
                let level = if final_report { Level::Warning } else { Level::Info };
                inner.events.emit(
                    Event::new(
                        Origin::Reporter,
                        level,
                        EventKind::ReportFailed,
                        format!("a report was dropped: its caller's reply queue is gone ({why})"),
                    )
                    .with_task(key),
                );
            }
            if let Some(ack) = ack
                && let Err(e) = ack.ack()
            {
                ack_failed(inner, &e);
            }
        }
        Then::DeadLetter { original } => {
            if stored {
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                original.settle_acked();
            } else {
                // RabbitMQ's own dead-lettering still keeps it (without dingo's reason).
                original.settle_rejected();
            }
        }
    }
}

fn ack_failed(inner: &Inner, error: &BrokerError) {
    inner.events.emit(Event::new(
        Origin::Reporter,
        Level::Error,
        EventKind::AckFailed,
        format!("a delivery whose report was stored could not be acknowledged: {}", dingo_core::error::chain(error)),
    ));
}

/// Tells the caller of a task message that could not be delivered, when it waits in this
/// process (otherwise the event is all there is).
pub(crate) fn fail_call(inner: &Inner, key: CallKey, reply: Option<&str>, kind: TaskErrorKind, message: &str) {
    if reply == Some(&*inner.reply_queue) {
        let error = TaskError::new(kind, message.to_owned());
        inner.router.route(ReportMessage { name: key.name, id: key.id, body: ReportBody::Failure(error) });
    }
}
