//! Publishing: every message this broker sends — task messages, reports, dead letters —
//! leaves through one channel in confirm mode, published by the thread that sends it (under
//! a lock, so the reports of a call stay in order) without waiting for RabbitMQ.
//!
//! At-most-once messages (tasks called `at_most_once`, and their final reports) take a
//! second channel of the same connection without confirms: RabbitMQ's confirms cost it
//! about a fifth of its work per message, and a message that must never be published twice
//! cannot be published again after a break anyway. Once handed to the connection, such a
//! message is on its own: if the connection dies before RabbitMQ read it, it is lost
//! without a word (its caller's `wait_timeout` is the guard). One that cannot be published
//! there (the channel is down, or RabbitMQ blocks the connection) waits with the others,
//! goes out once on the next confirmed channel, and is given up — its caller told its fate
//! is unknown — if that channel breaks before the confirm.
//!
//! Confirms are asynchronous: up to [`max_unconfirmed`](crate::AmqpOptions::max_unconfirmed)
//! messages may wait for theirs; the confirm thread acts on each confirm as it comes
//! ([`Then`]): a report's confirm acknowledges the task it finishes. Every message is published `mandatory`;
//! one that reaches no queue comes back (a return, then its confirm) and is treated as an
//! error. Messages not yet confirmed when the connection breaks are published again on the
//! next one (at least once).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use amiquip::{
    AmqpProperties, AmqpValue, Channel, Confirm, ConfirmSmoother, ConnectionBlockedNotification, FieldTable, Publish,
};
use crossbeam_channel::{Receiver, Sender};
use dingo_core::broker::Ack;
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::{ReportBody, ReportMessage};
use dingo_core::{BrokerError, BrokerErrorKind, CallKey, TaskError, TaskErrorKind};

use super::{Inner, Stop, Thread, lock};
use crate::conn::Backoff;
use crate::topology::{self, DEAD_AT_HEADER, DESTINATION_HEADER, Names, REASON_HEADER, REDELIVERIES_HEADER};
use dingo_core::broker::kit::{wait, wait_timeout};

/// One message to publish and what to do once RabbitMQ confirmed it.
pub(crate) struct Outgoing {
    /// `""`: the default exchange, routing straight to the queue named by `routing_key`.
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    /// A delayed task message's queue and due time: its routing key spells the delay (see
    /// `topology`).
    pub(crate) delay: Option<Delay>,
    pub(crate) body: Vec<u8>,
    pub(crate) persistent: bool,
    /// The correlation id (reports carry their task id).
    pub(crate) correlation: Option<String>,
    /// Why a dead letter is one (a header).
    pub(crate) reason: Option<String>,
    /// How many times the task was redelivered after its worker stopped (a header, when
    /// not 0).
    pub(crate) redeliveries: u32,
    /// At most once (see the module's docs): a task message is never published twice; a
    /// report takes the channel without confirms when it cannot overtake its call's
    /// progress.
    pub(crate) once: bool,
    pub(crate) then: Then,
}

/// Where a delayed task message goes once due, and when.
pub(crate) struct Delay {
    /// Its task queue (a header matched at the delay chain's exit).
    pub(crate) queue: String,
    pub(crate) due: SystemTime,
    /// The levels its first route passes (declared before it was published).
    pub(crate) levels: u32,
}

/// What a confirm (or a return, or a refusal) means for a message.
pub(crate) enum Then {
    /// A task message: one that reaches no queue fails its call. With `ack` (a retry's next
    /// attempt, or a message sent round the delay chain again), the delivery it replaces:
    /// acknowledged once the message is stored, given back if it is not (the call goes on).
    Task { key: CallKey, reply: Option<Arc<str>>, ack: Option<Ack> },
    /// A report: once stored, the task it finishes (if any) is acknowledged.
    Report { key: CallKey, ack: Option<Ack>, final_report: bool },
    /// A copy of a message that cannot run, with its reason, for the dead-letter queue: once
    /// stored, the original is acknowledged.
    DeadLetter { original: Box<dyn Original> },
    /// A copy of a task message published to its own queue in the original's place (handed
    /// back unstarted, or with its redelivery count raised): once stored, the original is
    /// acknowledged; if not, the original goes back to its queue as it is.
    Requeued { original: Box<dyn Original> },
}

/// The delivery a republished copy stands for (a dead letter's or a requeued task's), settled
/// once the copy's confirm says whether it was stored. A trait, so that the publisher needs
/// nothing of the subscriptions that deliver (an `AmqpAck` is one).
pub(crate) trait Original: Send {
    /// The copy was stored: acknowledge the original (a dead letter, counted).
    fn acked(self: Box<Self>);
    /// The copy in the original's queue was stored: acknowledge the original (counted as
    /// requeued).
    fn requeued(self: Box<Self>);
    /// The dead letter was refused: RabbitMQ dead-letters the original itself.
    fn rejected(self: Box<Self>);
}

/// How [`Publisher::send`] sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Published, or waiting for a channel; it will be confirmed (see [`Then`]).
    Confirmed,
    /// Published on the channel without confirms: nothing more will be heard of it, unless
    /// RabbitMQ returns it.
    Unconfirmed,
}

impl Outgoing {
    /// A delayed message published again (its channel broke before the confirm) waits only
    /// what is left of its delay, or none: its route is spelled again from its due time. A
    /// shorter delay passes no level the first route did not (unless the clock went back:
    /// then the first route stands, as the levels above it may not be declared).
    fn reroute(&mut self, names: &Names) {
        let Some(delay) = &self.delay else { return };
        let left = delay.due.duration_since(SystemTime::now()).ok().and_then(topology::delay_units);
        match left {
            None => {
                self.exchange = String::new();
                self.routing_key = delay.queue.clone();
            }
            Some(units) => {
                let route = topology::delay_route(names, units);
                if route.levels <= delay.levels {
                    self.exchange = route.exchange;
                    self.routing_key = route.routing_key;
                }
            }
        }
    }

    fn is_task(&self) -> bool {
        matches!(self.then, Then::Task { .. })
    }

    fn is_progress(&self) -> bool {
        matches!(self.then, Then::Report { final_report: false, .. })
    }
}

/// How many channels a message may go out on, each breaking before RabbitMQ confirmed it,
/// before it is given up (a message the server refuses by closing the channel would
/// otherwise be published again forever, with everything queued behind it).
const MAX_ATTEMPTS: u32 = 5;

struct Pending {
    outgoing: Outgoing,
    /// Our number for the message (its `message_id`): tells which message a return is.
    number: u64,
    /// The reason RabbitMQ returned it, if it did.
    returned: Option<String>,
    /// Whether it went out on a channel (else it waits for one).
    sent: bool,
    /// Channels it went out on that broke before it was confirmed.
    attempts: u32,
}

/// The publishing channel, shared: callers and workers publish on it themselves (under the
/// lock, no thread hop), the confirm thread reads RabbitMQ's answers and replaces the
/// channel when it breaks.
pub(crate) struct Publisher {
    shared: Arc<Shared>,
    thread: Thread,
}

struct Shared {
    state: Mutex<State>,
    /// RabbitMQ blocks publishing on the connection (a resource alarm).
    blocked: AtomicBool,
    /// Signalled when confirms make room under `max_unconfirmed`.
    room: Condvar,
    /// Tells the confirm thread that publishing failed (the channel is broken).
    broken: Sender<()>,
    limit: usize,
}

struct State {
    /// `None` while (re)connecting: messages wait in `pending` and go out on the next channel.
    channel: Option<Channel>,
    /// The channel without confirms, for at-most-once messages; opened and dropped with
    /// `channel`.
    fast: Option<Channel>,
    /// How many progress reports in `pending` wait for their confirm. While any does, a
    /// final report takes the confirmed channel too: on another channel it could overtake
    /// its call's progress.
    progress_unconfirmed: usize,
    /// Published (or waiting for a channel), not yet confirmed; in publishing order, which is
    /// the order of the channel's delivery tags.
    pending: VecDeque<Pending>,
    numbers: u64,
    /// The confirm thread has stopped: nothing more is published.
    closed: bool,
}

impl Publisher {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Publisher, BrokerError> {
        let (broken, failures) = crossbeam_channel::bounded(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                channel: None,
                fast: None,
                progress_unconfirmed: 0,
                pending: VecDeque::new(),
                numbers: 0,
                closed: false,
            }),
            room: Condvar::new(),
            blocked: AtomicBool::new(false),
            broken,
            limit: inner.options.max_unconfirmed,
        });
        let confirmer = shared.clone();
        let thread = Thread::spawn("dingo-amqp-confirm", move |stop| run(&inner, &confirmer, &failures, &stop))?;
        Ok(Publisher { shared, thread })
    }

    /// Publishes a message (on this thread); blocks while `max_unconfirmed` messages wait for
    /// their confirms, at most `timeout`.
    pub(crate) fn send(&self, outgoing: Outgoing, timeout: Option<Duration>) -> Result<Sent, BrokerError> {
        let shared = &*self.shared;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&shared.state);
        while state.pending.len() >= shared.limit && !state.closed {
            state = match deadline {
                None => wait(&shared.room, state),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(BrokerError::new(
                            BrokerErrorKind::Full,
                            "too many messages wait for RabbitMQ's confirms",
                        ));
                    }
                    wait_timeout(&shared.room, state, left)
                }
            };
        }
        if state.closed {
            return Err(dingo_core::broker::kit::closed(super::NAME));
        }
        state.numbers += 1;
        let mut entry = Pending { outgoing, number: state.numbers, returned: None, sent: false, attempts: 0 };
        let mut broken = None;
        // While RabbitMQ blocks the connection (an alarm) everything takes the confirmed
        // path, whose `max_unconfirmed` holds senders back.
        let fast = entry.outgoing.once
            && !shared.blocked.load(Ordering::Acquire)
            && (entry.outgoing.is_task() || state.progress_unconfirmed == 0);
        if let (true, Some(channel)) = (fast, &state.fast) {
            match publish(channel, &entry) {
                Ok(()) => return Ok(Sent::Unconfirmed),
                // Not handed to the connection: it waits for the next channel, below.
                Err(_) => {
                    broken = Some((state.channel.take(), state.fast.take()));
                    let _ = shared.broken.try_send(());
                }
            }
        }
        if entry.outgoing.is_progress() {
            state.progress_unconfirmed += 1;
        }
        if let Some(channel) = state.channel.as_ref().filter(|_| broken.is_none()) {
            match publish(channel, &entry) {
                Ok(()) => entry.sent = true,
                Err(_) => {
                    // Kept: it goes out again on the next channel.
                    broken = Some((state.channel.take(), state.fast.take()));
                    let _ = shared.broken.try_send(());
                }
            }
        }
        state.pending.push_back(entry);
        drop(state);
        // Closed outside the lock.
        drop(broken);
        Ok(Sent::Confirmed)
    }

    /// Waits until RabbitMQ has answered for every message published (on the confirmed
    /// path) before this call, at most `timeout`: `false` if some still wait. So a queue
    /// operation that follows on another channel (a purge) sees them in their queues.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let shared = &*self.shared;
        let deadline = Instant::now() + timeout;
        let mut state = lock(&shared.state);
        let last = state.numbers;
        loop {
            let settled = state.pending.front().is_none_or(|first| first.number > last);
            if settled || state.closed {
                return settled;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = wait_timeout(&shared.room, state, left);
        }
    }

    /// Whether RabbitMQ blocks publishing on the connection (a resource alarm).
    pub(crate) fn is_blocked(&self) -> bool {
        self.shared.blocked.load(Ordering::Acquire)
    }

    /// Waits for the confirms of what was published (at most the settle grace), stops.
    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

/// The confirm thread: (re)opens the channel, acts on confirms and returns, and at stop
/// waits for the last confirms.
fn run(inner: &Arc<Inner>, shared: &Shared, failures: &Receiver<()>, stop: &Stop) {
    let mut deadline = None;
    let never = AtomicBool::new(false);
    let mut backoff = Backoff::new(&inner.options);
    loop {
        if stop.is_set() && deadline.is_none() {
            deadline = Some(Instant::now() + inner.options.settle_grace);
        }
        let late = deadline.is_some_and(|d| Instant::now() >= d);
        if (deadline.is_some() && lock(&shared.state).pending.is_empty()) || late || inner.session.is_closed() {
            break;
        }
        // Until told to stop, reconnecting waits for RabbitMQ as long as it takes; after,
        // until the deadline.
        let interrupt = if deadline.is_some() { &never } else { &*stop.flag };
        let Some(opened) = inner.session.channel_until("publisher", interrupt, deadline) else { continue };
        let fast = inner.session.channel_until("publisher (at most once)", interrupt, deadline);
        let since = Instant::now();
        match confirm(inner, shared, opened.channel, fast.map(|f| f.channel), failures, stop, &mut deadline) {
            None => break,
            Some(error) => {
                inner.session.channel_failed(opened.generation, "publisher channel", &error);
                backoff.broke(since, interrupt);
            }
        }
    }
    // Out of time at shutdown, or the broker is gone: what is left is not published.
    let (left, channels): (Vec<Pending>, _) = {
        let mut state = lock(&shared.state);
        state.closed = true;
        state.progress_unconfirmed = 0;
        (state.pending.drain(..).collect(), (state.channel.take(), state.fast.take()))
    };
    // Closed outside the lock: closing waits for the server.
    drop(channels);
    shared.room.notify_all();
    if !left.is_empty() {
        inner.events.emit(Event::new(
            Origin::Producer,
            Level::Error,
            EventKind::UnconfirmedAtShutdown,
            format!("{} message(s) were not confirmed by RabbitMQ before shutdown", left.len()),
        ));
        for entry in left {
            if let Then::Task { key, reply, ack: None } = entry.outgoing.then {
                fail_call(inner, key, reply.as_deref(), TaskErrorKind::Shutdown, "the task message was not sent");
            }
            // Reports and retries: their deliveries stay unacknowledged and are redelivered.
        }
    }
}

/// Serves one channel (and `fast`, its companion without confirms, if it opened): `None`
/// when stopped, else why the channel broke.
fn confirm(
    inner: &Arc<Inner>,
    shared: &Shared,
    channel: Channel,
    fast: Option<Channel>,
    failures: &Receiver<()>,
    stop: &Stop,
    deadline: &mut Option<Instant>,
) -> Option<String> {
    let setup = || -> Result<_, amiquip::Error> {
        let confirms = channel.listen_for_publisher_confirms()?;
        let returns = channel.listen_for_returns()?;
        channel.enable_publisher_confirms()?;
        let fast_returns = match &fast {
            Some(fast) => fast.listen_for_returns()?,
            None => crossbeam_channel::never(),
        };
        Ok((confirms, returns, fast_returns))
    };
    let (confirms, returns, fast_returns) = match setup() {
        Ok(listeners) => listeners,
        Err(e) => return Some(e.to_string()),
    };
    let (given_up, unknown, failed) = {
        let mut state = lock(&shared.state);
        let (given_up, unknown) = take_given_up(&mut state);
        let failed = republish(inner, &channel, &mut state.pending).err();
        if failed.is_none() {
            state.channel = Some(channel);
            state.fast = fast;
            // A new connection starts unblocked (a block would be notified again).
            shared.blocked.store(false, Ordering::Release);
            while failures.try_recv().is_ok() {}
        }
        (given_up, unknown, failed)
    };
    give_up(inner, given_up);
    lost_on_the_way(inner, unknown);
    if let Some(error) = failed {
        return Some(error);
    }
    let mut smoother = ConfirmSmoother::new();
    let mut settled = Vec::new();
    let mut blocked = inner.session.blocked();
    loop {
        if stop.is_set() && deadline.is_none() {
            *deadline = Some(Instant::now() + inner.options.settle_grace);
        }
        if let Some(deadline) = *deadline
            && (lock(&shared.state).pending.is_empty() || Instant::now() >= deadline)
        {
            return None;
        }
        crossbeam_channel::select! {
            recv(confirms) -> confirm => {
                let Ok(confirm) = confirm else {
                    return Some(broken(shared, "the connection stopped delivering confirms"));
                };
                {
                    let mut state = lock(&shared.state);
                    // A return comes before its message's confirm, but on another channel of
                    // amiquip's: take the returns that have come first.
                    for returned in returns.try_iter() {
                        mark_returned(&mut state, &returned);
                    }
                    for confirm in smoother.process(confirm) {
                        if let Some(entry) = state.pending.pop_front() {
                            if entry.outgoing.is_progress() {
                                state.progress_unconfirmed -= 1;
                            }
                            settled.push((entry, matches!(confirm, Confirm::Ack(_))));
                        }
                    }
                }
                shared.room.notify_all();
                // Outside the lock: settling acknowledges deliveries, fails calls.
                for (entry, stored) in settled.drain(..) {
                    settle(inner, entry, stored);
                }
            }
            recv(returns) -> returned => {
                let Ok(returned) = returned else {
                    return Some(broken(shared, "the connection stopped delivering returns"));
                };
                mark_returned(&mut lock(&shared.state), &returned);
            }
            recv(fast_returns) -> returned => {
                let Ok(returned) = returned else {
                    return Some(broken(shared, "the connection stopped delivering returns"));
                };
                returned_unconfirmed(inner, returned);
            }
            recv(blocked) -> notification => match notification {
                Ok(ConnectionBlockedNotification::Blocked(reason)) => {
                    shared.blocked.store(true, Ordering::Release);
                    inner.events.emit(Event::new(
                        Origin::Producer,
                        Level::Warning,
                        EventKind::ConnectionBlocked,
                        format!(
                            "RabbitMQ blocks publishing on this connection ({reason}): messages wait until it unblocks"
                        ),
                    ))
                }
                Ok(ConnectionBlockedNotification::Unblocked) => {
                    shared.blocked.store(false, Ordering::Release);
                    inner.events.emit(Event::new(
                        Origin::Producer,
                        Level::Info,
                        EventKind::ConnectionUnblocked,
                        "RabbitMQ unblocked publishing on this connection",
                    ))
                }
                Err(_) => blocked = crossbeam_channel::never(),
            },
            recv(failures) -> _ => return Some(broken(shared, "publishing failed")),
            recv(stop.signal) -> _ => {}
            default(Duration::from_millis(100)) => {}
        }
    }
}

/// Takes out the messages that went out on [`MAX_ATTEMPTS`] channels, each breaking before
/// it was confirmed (counting the channel that just broke), and the at-most-once ones that
/// went out once: those are never published again (their fate is unknown).
fn take_given_up(state: &mut State) -> (Vec<Pending>, Vec<Pending>) {
    for entry in state.pending.iter_mut().filter(|entry| entry.sent) {
        entry.attempts += 1;
    }
    let (mut given_up, mut unknown) = (Vec::new(), Vec::new());
    let mut kept = VecDeque::with_capacity(state.pending.len());
    for entry in state.pending.drain(..) {
        if entry.outgoing.once && entry.outgoing.is_task() && entry.sent {
            unknown.push(entry);
        } else if entry.attempts >= MAX_ATTEMPTS {
            given_up.push(entry);
        } else {
            kept.push_back(entry);
        }
    }
    state.pending = kept;
    state.progress_unconfirmed = state.pending.iter().filter(|entry| entry.outgoing.is_progress()).count();
    (given_up, unknown)
}

/// Settles at-most-once messages that went out on a channel which broke before RabbitMQ
/// confirmed them: they may or may not have been stored, and are not published again.
fn lost_on_the_way(inner: &Arc<Inner>, entries: Vec<Pending>) {
    if entries.is_empty() {
        return;
    }
    inner.events.emit(Event::new(
        Origin::Producer,
        Level::Warning,
        EventKind::InDoubt,
        format!(
            "{} at-most-once message(s) were on their way when the channel broke: they may or may not have \
             been stored, and are not published twice",
            entries.len()
        ),
    ));
    for entry in entries {
        if let Then::Task { key, reply, .. } = entry.outgoing.then {
            fail_call(
                inner,
                key,
                reply.as_deref(),
                TaskErrorKind::Other,
                "the connection broke while this at-most-once task message was on its way: it may or may not have \
                 been queued, and is not published twice",
            );
        }
    }
}

/// RabbitMQ returned a message published without confirms: a task message no queue took
/// fails its call; a report whose reply queue is gone is dropped, as on the confirmed path.
fn returned_unconfirmed(inner: &Arc<Inner>, returned: amiquip::Return) {
    inner.stats.returned.fetch_add(1, Ordering::Relaxed);
    let why = format!("{} {}", returned.reply_code, returned.reply_text);
    if returned.properties.correlation_id().is_some() {
        report_dropped(inner, None, Level::Warning, &why);
        return;
    }
    match dingo_core::message::wire::decode_task(&returned.content) {
        Ok(message) => {
            let reply = match &message.reply_to {
                dingo_core::message::ReplyTo::Address(caller) => Some(caller.clone()),
                _ => None,
            };
            task_returned(inner, message.key(), reply.as_deref(), &why);
        }
        Err(_) => inner.events.emit(Event::new(
            Origin::Producer,
            Level::Warning,
            EventKind::UnknownTask,
            format!("RabbitMQ returned a message no queue took ({why})"),
        )),
    }
}

/// Publishes what the last channel did not confirm on the new one, in order (RabbitMQ may
/// have stored some of it already: at least once).
fn republish(inner: &Inner, channel: &Channel, pending: &mut VecDeque<Pending>) -> Result<(), String> {
    for entry in pending.iter_mut() {
        entry.returned = None;
        if entry.sent {
            inner.stats.republished.fetch_add(1, Ordering::Relaxed);
        }
        entry.outgoing.reroute(&inner.names);
        publish(channel, entry).map_err(|e| e.to_string())?;
        entry.sent = true;
    }
    Ok(())
}

/// Notes which pending message RabbitMQ returned (by its number, the `message_id`).
fn mark_returned(state: &mut State, returned: &amiquip::Return) {
    let number = returned.properties.message_id().as_ref().and_then(|id| id.parse::<u64>().ok());
    if let Some(entry) = state.pending.iter_mut().find(|p| Some(p.number) == number) {
        entry.returned = Some(format!("{} {}", returned.reply_code, returned.reply_text));
    }
}

/// Settles messages that went out on [`MAX_ATTEMPTS`] channels without a confirm as refused.
fn give_up(inner: &Arc<Inner>, entries: Vec<Pending>) {
    if entries.is_empty() {
        return;
    }
    inner.events.emit(Event::new(
        Origin::Producer,
        Level::Error,
        EventKind::SendFailed,
        format!(
            "{} message(s) given up: each went out on {MAX_ATTEMPTS} channels that broke before RabbitMQ \
             confirmed it (does the server refuse it?)",
            entries.len()
        ),
    ));
    for entry in entries {
        settle(inner, entry, false);
    }
}

/// Takes the channels out of use (messages published meanwhile wait for the next one).
fn broken(shared: &Shared, why: &str) -> String {
    let channels = {
        let mut state = lock(&shared.state);
        (state.channel.take(), state.fast.take())
    };
    // Closed outside the lock: closing waits for the server (or the dead connection).
    drop(channels);
    why.to_owned()
}

fn publish(channel: &Channel, entry: &Pending) -> Result<(), amiquip::Error> {
    let outgoing = &entry.outgoing;
    let mut properties = AmqpProperties::default().with_delivery_mode(if outgoing.persistent { 2 } else { 1 });
    properties = properties.with_message_id(entry.number.to_string());
    if let Some(correlation) = &outgoing.correlation {
        properties = properties.with_correlation_id(correlation.clone());
    }
    if outgoing.reason.is_some() || outgoing.redeliveries > 0 || outgoing.delay.is_some() {
        let mut headers = FieldTable::new();
        if let Some(delay) = &outgoing.delay {
            headers.insert(DESTINATION_HEADER.into(), AmqpValue::LongString(delay.queue.clone()));
        }
        if let Some(reason) = &outgoing.reason {
            headers.insert(REASON_HEADER.into(), AmqpValue::LongString(reason.clone()));
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            headers.insert(DEAD_AT_HEADER.into(), AmqpValue::LongLongInt(i64::try_from(now.as_millis()).unwrap_or(0)));
        }
        if outgoing.redeliveries > 0 {
            headers.insert(REDELIVERIES_HEADER.into(), AmqpValue::LongLongInt(i64::from(outgoing.redeliveries)));
        }
        properties = properties.with_headers(headers);
    }
    channel.basic_publish(
        outgoing.exchange.as_str(),
        Publish {
            body: &outgoing.body,
            routing_key: outgoing.routing_key.clone(),
            mandatory: true,
            immediate: false,
            properties,
        },
    )
}

/// Acts on RabbitMQ's answer for one message: `stored` (an ack) or refused (a nack).
fn settle(inner: &Arc<Inner>, entry: Pending, stored: bool) {
    let Pending { outgoing, returned, .. } = entry;
    let stats = &inner.stats;
    let delayed = outgoing.delay.is_some();
    match outgoing.then {
        Then::Task { key, reply, ack } => match (stored, returned) {
            (true, None) => {
                stats.sent.fetch_add(1, Ordering::Relaxed);
                if delayed {
                    stats.delayed.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(ack) = ack
                    && let Err(e) = ack.ack()
                {
                    ack_failed(inner, &e);
                }
            }
            (true, Some(why)) => {
                stats.returned.fetch_add(1, Ordering::Relaxed);
                // (A retry's delivery, dropped with `ack`, goes back to its queue.)
                task_returned(inner, key, reply.as_deref(), &why);
            }
            (false, _) => {
                let retry = ack.is_some();
                let message = if retry {
                    "RabbitMQ refused to store the task message; the delivery it follows goes back to its queue"
                } else {
                    "RabbitMQ refused to store the task message"
                };
                inner.events.emit(
                    Event::new(Origin::Producer, Level::Error, EventKind::SendFailed, message).with_task(key.clone()),
                );
                // A retry's delivery comes back (dropped, its ack gives it back): the call
                // goes on.
                if !retry {
                    fail_call(inner, key, reply.as_deref(), TaskErrorKind::Other, message);
                }
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
                let level = if final_report { Level::Warning } else { Level::Info };
                report_dropped(inner, Some(key), level, &why);
            }
            if let Some(ack) = ack
                && let Err(e) = ack.ack()
            {
                ack_failed(inner, &e);
            }
        }
        Then::DeadLetter { original } => {
            // A dead letter that reached no queue (its dead-letter queue was deleted) is
            // not stored either.
            if stored && returned.is_none() {
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                original.acked();
            } else {
                // RabbitMQ's own dead-lettering still keeps it (without dingo's reason).
                original.rejected();
            }
        }
        Then::Requeued { original } => {
            if stored && returned.is_none() {
                original.requeued();
            }
            // Otherwise dropping the original gives it back to its queue.
        }
    }
}

/// A task message RabbitMQ returned (no queue took it): its call fails with `UnknownTask`.
fn task_returned(inner: &Inner, key: CallKey, reply: Option<&str>, why: &str) {
    let message = format!(
        "no queue serves task `{}` (RabbitMQ returned the message: {why}): no app on this broker has registered it; {}",
        key.name,
        dingo_core::error::not_linked_hint(key.name.as_str())
    );
    inner.events.emit(
        Event::new(Origin::Producer, Level::Warning, EventKind::UnknownTask, message.clone()).with_task(key.clone()),
    );
    fail_call(inner, key, reply, TaskErrorKind::UnknownTask, &message);
}

/// A report RabbitMQ returned: its caller's reply queue is gone (it expired or was
/// deleted), so nobody waits for it.
fn report_dropped(inner: &Inner, key: Option<CallKey>, level: Level, why: &str) {
    let mut event = Event::new(
        Origin::Reporter,
        level,
        EventKind::ReportFailed,
        format!("a report was dropped: its caller's reply queue is gone ({why})"),
    );
    if let Some(key) = key {
        event = event.with_task(key);
    }
    inner.events.emit(event);
}

fn ack_failed(inner: &Inner, error: &BrokerError) {
    inner.events.emit(Event::new(
        Origin::Reporter,
        Level::Error,
        EventKind::AckFailed,
        format!(
            "a delivery whose report (or next message) was stored could not be acknowledged: {}",
            dingo_core::error::chain(error)
        ),
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
