//! The four roles a broker plays, as in Go dingo, so a deployment can mix transports
//! (tasks through RabbitMQ, reports through Redis):
//!
//! | role | side | does |
//! | --- | --- | --- |
//! | [`Producer`] | caller | sends task messages |
//! | [`Consumer`] | worker | receives task messages of named tasks, hands them to workers with an [`Ack`] |
//! | [`Reporter`] | worker | publishes the reports of a call; the final one together with the [`Ack`] |
//! | [`Store`] | caller | routes the reports of a call to the caller's handle |
//!
//! The data flow of one call:
//!
//! ```text
//! caller: Store::watch(key, sink) -> ReplyTo ─┐
//!         Producer::send(TaskMessage{reply_to, ..}) ──> queue of the task
//! worker: Consumer::consume([tasks]) -> Subscription::recv() -> Delivery{message, ack}
//!         run the task
//!         Reporter::report(reply_to, Sent/Progress)            (monitor_progress only)
//!         Reporter::finish(reply_to, Success/Failure, ack)     (acknowledge after storing)
//!      or, on a failure with attempts left:
//!         Reporter::report(reply_to, Retrying)                 (monitor_progress only)
//!         Producer::retry(next attempt, due later, ack)        (schedule, then settle)
//! caller: the Store hands every report to the sink of (task name, id), in order
//! ```
//!
//! At-least-once brokers acknowledge a delivery only after its final report is stored, in
//! [`Reporter::finish`]; a broker playing both roles overrides it to make the pair atomic
//! (it recognises its own acknowledgements with [`Ack::downcast`]).
//!
//! Beside the four, a fifth role, [`Admin`], is the operator's: cancel a call by its key,
//! list, replay and purge dead letters, purge a queue. It belongs to the task transport
//! (the broker that plays [`Producer`] and [`Consumer`]), whose consumers honour the cancels
//! it records ([`Consumer::cancels`]).
//!
//! The built-in [`local`] broker plays all five roles in process.

pub mod kit;
pub mod local;
pub mod router;
pub mod support;
pub mod tls;

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::BrokerError;
use crate::event::EventSink;
use crate::id::{CallKey, TaskId, TaskName};
use crate::message::{ReplySink, ReplyTo, ReportMessage, TaskMessage};

pub use crate::cancel::{Cancels, DEFAULT_CANCEL_TTL};

/// Sends task messages (caller side).
pub trait Producer: Send + Sync + 'static {
    /// Called once by every app that uses this producer, with the app's event sink.
    fn attach(&self, events: &EventSink) {
        let _ = events;
    }

    /// Makes sure the queue of `task` exists (idempotent). Apps call it for every task they
    /// register, so a message is never sent into a missing queue.
    fn declare(&self, task: &TaskName) -> Result<(), BrokerError>;

    /// Sends a task message. Blocks while the queue is full, at most `timeout` (`None`: no
    /// limit), then fails with [`BrokerErrorKind::Full`](crate::BrokerErrorKind::Full). A
    /// message for a task without a queue fails with
    /// [`BrokerErrorKind::Unroutable`](crate::BrokerErrorKind::Unroutable) where the broker
    /// can tell.
    ///
    /// A message [`due`](TaskMessage::due) in the future is kept by the broker and handed to
    /// a worker once due ([`TaskMessage::wait_at`] says how long), never earlier and never
    /// held in a worker's memory: a delayed task survives worker restarts like a queued one.
    fn send(&self, message: TaskMessage, timeout: Option<Duration>) -> Result<(), BrokerError>;

    /// Schedules the next attempt of a call that failed (`message`: same name and id,
    /// `attempt + 1`, due after the backoff) and settles the delivery of the failed one
    /// (`ack`). On an error `ack` must not have been acknowledged: the failed attempt comes
    /// back as the broker gives back unsettled deliveries, and runs again.
    ///
    /// The default sends, then acknowledges: a worker that dies between the two leaves the
    /// next attempt scheduled *and* the failed one to be redelivered (at least once). A
    /// broker that can do both in one atomic step overrides it, recognising its own
    /// acknowledgements with [`Ack::downcast`].
    fn retry(&self, message: TaskMessage, ack: Option<Ack>) -> Result<(), BrokerError> {
        self.send(message, None)?;
        match ack {
            Some(ack) => ack.ack(),
            None => Ok(()),
        }
    }

    /// Whether messages may carry in-process values ([`Payload::Local`](crate::message::Payload::Local)).
    /// Only brokers inside the process say yes; the app then skips serialization.
    fn accepts_local(&self) -> bool {
        false
    }

    /// The app that attached this producer is closing.
    fn close(&self) {}
}

/// How a consumer should deliver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct ConsumeSettings {
    /// How many messages may be fetched ahead of the workers (at least 1).
    pub prefetch: usize,
    /// How many worker threads share the subscription.
    pub workers: usize,
}

impl ConsumeSettings {
    /// Settings for `workers` threads, prefetching as many messages.
    pub fn new(workers: usize) -> ConsumeSettings {
        ConsumeSettings { prefetch: workers.max(1), workers: workers.max(1) }
    }
}

/// Receives task messages (worker side).
pub trait Consumer: Send + Sync + 'static {
    /// Called once by every app that uses this consumer, with the app's event sink.
    fn attach(&self, events: &EventSink) {
        let _ = events;
    }

    /// Makes sure the queue of `task` exists (idempotent).
    fn declare(&self, task: &TaskName) -> Result<(), BrokerError>;

    /// Starts receiving the messages of `tasks`. The subscription is shared by the worker
    /// threads of one pool.
    fn consume(&self, tasks: &[TaskName], settings: &ConsumeSettings) -> Result<Box<dyn Subscription>, BrokerError>;

    /// The cancels this consumer's workers honour: before a worker starts a task it asks
    /// whether the call is cancelled (then it does not run it: its caller gets a failure of
    /// kind [`Cancelled`](crate::TaskErrorKind::Cancelled) and the delivery is settled), and
    /// a running task reads it through [`Context::is_cancelled`](crate::Context::is_cancelled).
    ///
    /// The broker keeps the set current: a cancel that [`Admin::cancel`] recorded before a
    /// delivery was handed out must be in the set by the time the worker reads it (so a
    /// cancelled task never starts), and one recorded while a task runs reaches the set
    /// within a bound the broker documents. `None` (the default): this consumer knows no
    /// cancels.
    fn cancels(&self) -> Option<Arc<Cancels>> {
        None
    }

    /// The app that attached this consumer is closing (its subscriptions are stopped).
    fn close(&self) {}
}

/// What [`Subscription::recv`] got (more outcomes may be added: a `match` needs a `_` arm).
#[derive(Debug)]
#[non_exhaustive]
// A delivery is moved once per task; boxing it would cost an allocation per task instead.
#[allow(clippy::large_enum_variant)]
pub enum Recv {
    /// A task to run.
    Delivery(Delivery),
    /// Nothing within the timeout.
    Empty,
    /// The subscription was stopped (or the broker closed): the worker should exit.
    Stopped,
}

/// A stream of deliveries shared by the worker threads of one pool.
pub trait Subscription: Send + Sync + 'static {
    /// The next delivery if one is ready, without blocking.
    fn try_recv(&self) -> Recv;

    /// Blocks for the next delivery, at most `timeout` (`None`: until one arrives or the
    /// subscription stops).
    fn recv(&self, timeout: Option<Duration>) -> Recv;

    /// Stops fetching and wakes every blocked `recv` (which then returns [`Recv::Stopped`]).
    /// Messages fetched but not handed to a worker go back to their queue.
    fn stop(&self);

    /// Whether an idle worker should poll [`try_recv`](Subscription::try_recv) for a few
    /// microseconds before blocking: worth it for in-process queues, where the next task may
    /// be that close; a waste of a core for remote ones, where tasks arrive in batches.
    fn prefers_polling(&self) -> bool {
        false
    }

    /// Like [`recv`](Subscription::recv), but returns [`Recv::Empty`] as soon as `bell` has a
    /// message (taking it): a worker thread running async tasks waits for its next delivery
    /// and for its tasks' wakers at once (`Some(Duration::ZERO)`: only looks). Returning
    /// [`Recv::Stopped`], it must not give back or settle what the thread holds: the thread
    /// still runs tasks it took and settles them before it calls
    /// [`detach_worker`](Subscription::detach_worker). The default waits in slices of a
    /// millisecond; a subscription that waits on channels selects on the bell with them.
    fn recv_or_bell(&self, timeout: Option<Duration>, bell: &crossbeam_channel::Receiver<()>) -> Recv {
        const SLICE: Duration = Duration::from_millis(1);
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        loop {
            if bell.try_recv().is_ok() {
                return Recv::Empty;
            }
            let left = deadline.map_or(SLICE, |d| d.saturating_duration_since(std::time::Instant::now()).min(SLICE));
            match self.recv(Some(left)) {
                Recv::Empty if deadline.is_some_and(|d| std::time::Instant::now() >= d) => return Recv::Empty,
                Recv::Empty => {}
                other => return other,
            }
        }
    }

    /// Whether the deliveries a worker thread took must be settled in the order it took
    /// them (a broker that removes settled messages by position). A thread running async
    /// tasks, which finish in any order, then reports a task that finished early at once
    /// and settles it once the ones before it are settled.
    fn settles_in_order(&self) -> bool {
        false
    }

    /// The calling worker thread stops using the subscription (it exits): whatever it holds
    /// — completions not yet stored, tasks fetched but not started — must be settled now.
    fn detach_worker(&self) {}

    /// The worker thread `thread` was written off (its task ran past a hard time limit; it
    /// may never come back), and this is called from another thread: what it holds beyond
    /// the task it runs — tasks fetched but not started, settlements not yet stored — must
    /// be handed back or settled now, not when it returns. The task it runs was settled
    /// already, through [`Reporter::finish`] from the calling thread.
    fn release_thread(&self, thread: std::thread::ThreadId) {
        let _ = thread;
    }
}

/// A task message handed to a worker, with what acknowledges it (made with
/// [`Delivery::new`]; fields may be added).
///
/// ```
/// use dingo_core::broker::Delivery;
/// use dingo_core::codec::{Encoded, MSGPACK};
/// use dingo_core::message::{Payload, TaskMessage};
/// use dingo_core::{TaskId, TaskName};
///
/// let args = Payload::Encoded(Encoded::new(MSGPACK, vec![0x92, 0x02, 0x03]));
/// let message = TaskMessage::new(TaskName::from("tasks.add"), TaskId::new("1"), 0, args);
/// // A broker that acknowledges passes its `Ack` (`Some(Ack::new(…))`).
/// let delivery = Delivery::new(message).with_ack(None).with_redelivered(true);
/// assert!(delivery.redelivered && delivery.ack.is_none());
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct Delivery {
    /// The message.
    pub message: TaskMessage,
    /// Acknowledges the message once its final report is stored (`None`: nothing to do).
    pub ack: Option<Ack>,
    /// Whether the broker delivered this message before (a worker died or gave it back).
    pub redelivered: bool,
}

impl Delivery {
    /// A delivery that needs no acknowledgement.
    #[inline]
    pub fn new(message: TaskMessage) -> Delivery {
        Delivery { message, ack: None, redelivered: false }
    }

    /// Sets [`ack`](Delivery::ack).
    #[inline]
    #[must_use]
    pub fn with_ack(mut self, ack: Option<Ack>) -> Delivery {
        self.ack = ack;
        self
    }

    /// Sets [`redelivered`](Delivery::redelivered).
    #[inline]
    #[must_use]
    pub fn with_redelivered(mut self, redelivered: bool) -> Delivery {
        self.redelivered = redelivered;
        self
    }
}

/// The broker side of acknowledging one delivery.
pub trait Acknowledge: Send + 'static {
    /// The task is done: remove it from the broker.
    fn ack(self: Box<Self>) -> Result<(), BrokerError>;
    /// Give the task back (`requeue`), or move it to the dead letters with `reason` (a
    /// message that cannot run: undecodable, unknown task, wrong signature).
    fn reject(self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BrokerError>;
    /// For a reporter of the same broker, to recognise its own acknowledgements.
    fn as_any(&self) -> &dyn Any;
    /// For a reporter of the same broker, to store a report and acknowledge in one step.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// Acknowledges one delivery (see [`Acknowledge`]).
pub struct Ack(Box<dyn Acknowledge>);

impl Ack {
    /// Wraps a broker's acknowledgement.
    pub fn new(inner: impl Acknowledge) -> Ack {
        Ack(Box::new(inner))
    }

    /// The task is done.
    pub fn ack(self) -> Result<(), BrokerError> {
        self.0.ack()
    }

    /// Give the task back (`requeue`), or move it to the dead letters with `reason`.
    pub fn reject(self, requeue: bool, reason: &str) -> Result<(), BrokerError> {
        self.0.reject(requeue, reason)
    }

    /// The broker's own acknowledgement, if it is a `T` (a reporter of the same broker
    /// stores the final report and acknowledges in one step); otherwise `self` back.
    pub fn downcast<T: Acknowledge>(self) -> Result<Box<T>, Ack> {
        if self.0.as_any().is::<T>() {
            // `is::<T>()` just held for this very value, so the downcast cannot fail.
            #[allow(clippy::expect_used)]
            Ok(self.0.into_any().downcast::<T>().expect("the type was checked"))
        } else {
            Err(self)
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Ack")
    }
}

/// Publishes reports (worker side).
pub trait Reporter: Send + Sync + 'static {
    /// Called once by every app that uses this reporter, with the app's event sink.
    fn attach(&self, events: &EventSink) {
        let _ = events;
    }

    /// Publishes a non-final report (`Sent`, `Progress`). Reports of one call published from
    /// one thread must reach the caller in order. A report lends its value only for the
    /// duration of the call: encode (or deliver) it before returning.
    fn report(&self, to: &ReplyTo, report: ReportMessage<'_>) -> Result<(), BrokerError>;

    /// Publishes the final report, then acknowledges the delivery. Brokers that can do both
    /// in one atomic step override this.
    fn finish(&self, to: &ReplyTo, report: ReportMessage<'_>, ack: Option<Ack>) -> Result<(), BrokerError> {
        self.report(to, report)?;
        match ack {
            Some(ack) => ack.ack(),
            None => Ok(()),
        }
    }

    /// Whether reports may carry in-process values ([`Value::Local`](crate::message::Value::Local)).
    fn accepts_local(&self) -> bool {
        false
    }

    /// The app that attached this reporter is closing.
    fn close(&self) {}
}

/// Routes the reports of calls to their handles (caller side).
pub trait Store: Send + Sync + 'static {
    /// Called once by every app that uses this store, with the app's event sink.
    fn attach(&self, events: &EventSink) {
        let _ = events;
    }

    /// Registers the handle of one call, before its task is sent, and returns where workers
    /// must send its reports. Reports that arrive before the caller reads them are kept in
    /// the sink; a store that keeps results by key also hands over reports published before
    /// this call.
    fn watch(&self, key: &CallKey, sink: ReplySink) -> Result<ReplyTo, BrokerError>;

    /// The handle of `key` is gone (finished or dropped): forget it.
    fn forget(&self, key: &CallKey);

    /// How long a caller about to wait for a result polls before it sleeps; asked each
    /// time a handle waits, so the answer can depend on what is in flight at that moment. Polling keeps a core busy and saves the wake-up (tens of microseconds, more on
    /// virtual machines): worth it when the result is that close — reports from this
    /// process, or a lone call over a fast network. Default: no polling.
    fn wait_spin(&self) -> Duration {
        Duration::ZERO
    }

    /// The app that attached this store is closing. Once no app uses the store, pending
    /// handles get a `Shutdown` failure (a store shared by apps keeps serving the others).
    fn close(&self) {}
}

/// A message a broker could not deliver, kept for inspection in its dead letters.
///
/// ```
/// use dingo_core::{DeadLetter, TaskName};
///
/// let letter = DeadLetter::new(TaskName::from("add"), "undecodable message", vec![0xc1]);
/// assert_eq!(letter.queue.as_str(), "add");
/// assert!(letter.key.is_none()); // the bytes are not a task message
/// assert_eq!(letter.replay_bytes(), vec![0xc1]); // replayed as they are
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The queue it was taken from (its task's name).
    pub queue: TaskName,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The message as it was queued (its first bytes only, for one over the size limit).
    pub bytes: Vec<u8>,
    /// When it was dead-lettered (`None`: the broker did not record it).
    pub at: Option<SystemTime>,
    /// The call it holds, when its bytes decode as a task message.
    pub key: Option<CallKey>,
}

impl DeadLetter {
    /// A dead letter of `queue` (its [`key`](DeadLetter::key) read from `bytes`).
    pub fn new(queue: TaskName, reason: impl Into<String>, bytes: Vec<u8>) -> DeadLetter {
        let key = crate::message::wire::decode_task(&bytes).ok().map(|message| message.key());
        DeadLetter { queue, reason: reason.into(), bytes, at: None, key }
    }

    /// Sets [`at`](DeadLetter::at).
    #[must_use]
    pub fn with_time(mut self, at: Option<SystemTime>) -> DeadLetter {
        self.at = at;
        self
    }

    /// What a replay sends back to the queue: the same call (name, id, arguments, reply
    /// address, retry policy) as a fresh attempt — attempt 1, no due time, no expiry (an
    /// operator who replays a letter wants it run now) — or the bytes as they are when they
    /// do not decode (they are dead-lettered again, with their reason).
    pub fn replay_bytes(&self) -> Vec<u8> {
        use crate::message::wire;
        match wire::decode_task(&self.bytes) {
            Ok(message) => {
                let fresh = message.with_attempt(1).with_due(None).with_expires(None);
                wire::encode_task(&fresh).unwrap_or_else(|_| self.bytes.clone())
            }
            Err(_) => self.bytes.clone(),
        }
    }

    /// Whether `select` takes this letter.
    pub fn is_selected(&self, select: &Select) -> bool {
        match select {
            Select::All => true,
            Select::Ids(ids) => self.key.as_ref().is_some_and(|key| ids.contains(&key.id)),
        }
    }
}

/// Which dead letters an [`Admin`] operation takes.
///
/// ```
/// use dingo_core::broker::Select;
/// use dingo_core::TaskId;
///
/// let some = Select::Ids(vec![TaskId::new("7"), TaskId::new("9")]);
/// assert_ne!(some, Select::All);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Select {
    /// Every letter of the queue.
    All,
    /// The letters of these calls (by id; letters whose bytes do not decode have none).
    Ids(Vec<TaskId>),
}

/// The operator's role (beside the four): cancels, dead letters and purges of one broker's
/// task queues. Every built-in broker plays it; the app reaches it through
/// [`App::cancel`](crate::App::cancel), [`App::dead_letters`](crate::App::dead_letters) and
/// their neighbours, and a command-line tool can work on any broker by URL.
///
/// Queues are named by their task's name. Lists are oldest first.
pub trait Admin: Send + Sync + 'static {
    /// Records that the call `key` must not start, until `until`: a worker of this broker
    /// that takes its message afterwards — queued, delayed, or redelivered; in a process that
    /// starts after the cancel, or one cut off from the broker when it was sent — settles it
    /// with a failure of kind [`Cancelled`](crate::TaskErrorKind::Cancelled) instead of
    /// running it; a running task sees it through
    /// [`Context::is_cancelled`](crate::Context::is_cancelled). Cancelling a call that is
    /// unknown, finished, or already cancelled records the cancel and changes nothing else.
    ///
    /// A remote broker may leave a short window, which it documents: a message a worker had
    /// already taken when the cancel was recorded (prefetched behind the task it runs, or
    /// on its way to it) may still start, and then sees `is_cancelled` (on Redis up to
    /// 100 ms after the cancel, on RabbitMQ a few milliseconds; none on the local broker).
    fn cancel(&self, key: &CallKey, until: SystemTime) -> Result<(), BrokerError>;

    /// The dead letters of `queue`, oldest first, at most `limit`, each with its reason and,
    /// where the broker records it, its time. Reading leaves them in place.
    fn dead_letters(&self, queue: &TaskName, limit: usize) -> Result<Vec<DeadLetter>, BrokerError>;

    /// How many dead letters `queue` holds.
    fn dead_count(&self, queue: &TaskName) -> Result<usize, BrokerError>;

    /// Sends the selected dead letters of `queue` back to it as fresh attempts
    /// ([`DeadLetter::replay_bytes`]) and removes them from the dead letters; returns how
    /// many. At least once and without duplicates: a process that dies half-way leaves each
    /// letter either replayed (and gone from the dead letters) or still dead, never both.
    fn replay(&self, queue: &TaskName, select: &Select) -> Result<usize, BrokerError>;

    /// Deletes the selected dead letters of `queue`; returns how many.
    fn purge_dead(&self, queue: &TaskName, select: &Select) -> Result<usize, BrokerError>;

    /// Deletes every message waiting in `queue` (not those running, nor delayed ones);
    /// returns how many. Their callers are not told: cancel calls to tell them.
    fn purge(&self, queue: &TaskName) -> Result<usize, BrokerError>;
}
