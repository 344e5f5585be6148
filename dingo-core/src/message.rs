//! What travels between callers and workers: [`TaskMessage`] one way, [`ReportMessage`]s
//! the other. Brokers that carry bytes use [`wire`] to encode them.

pub mod wire;

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::codec::Encoded;
use crate::error::TaskError;
use crate::id::{CallKey, TaskId, TaskName};
use crate::limits::TimeLimits;
use crate::options::TaskOptions;
use crate::retry::RetryPolicy;

/// A value in a message: encoded by a codec, or (inside one process, on the local broker) the
/// Rust value itself, moved without serialization.
pub enum Payload {
    /// Bytes produced by a codec.
    Encoded(Encoded),
    /// An in-process value (only brokers that say [`accepts_local`](crate::broker::Producer::accepts_local) see these).
    Local(Box<dyn Any + Send>),
}

impl Payload {
    /// The bytes, if this payload is encoded.
    pub fn encoded(&self) -> Option<&Encoded> {
        match self {
            Payload::Encoded(e) => Some(e),
            Payload::Local(_) => None,
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Encoded(e) => fmt::Debug::fmt(e, f),
            Payload::Local(_) => f.write_str("Local(..)"),
        }
    }
}

/// The value of a successful call, in a report: encoded, or (inside one process) the value
/// itself, lent to the report's receiver for the duration of the call.
pub enum Value<'a> {
    /// Bytes produced by a codec.
    Encoded(Encoded),
    /// An `Option<T>` holding the task's result; the receiving handle takes it out. Only
    /// reporters that say [`accepts_local`](crate::broker::Reporter::accepts_local) see these.
    Local(&'a mut (dyn Any + Send)),
}

impl Value<'_> {
    /// The bytes, if this value is encoded.
    pub fn encoded(&self) -> Option<&Encoded> {
        match self {
            Value::Encoded(e) => Some(e),
            Value::Local(_) => None,
        }
    }
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Encoded(e) => fmt::Debug::fmt(e, f),
            Value::Local(_) => f.write_str("Local(..)"),
        }
    }
}

/// Where the reports of a call go. Chosen by the caller's [`Store`](crate::broker::Store).
pub enum ReplyTo {
    /// Nowhere: the call was made with `ignore_report`.
    None,
    /// A broker address (a reply queue, a result key prefix, …) that the store understands.
    Address(Arc<str>),
    /// Straight into the caller's handle, inside one process.
    Local(ReplySink),
}

impl ReplyTo {
    /// Whether reports are wanted at all.
    pub fn wants_reports(&self) -> bool {
        !matches!(self, ReplyTo::None)
    }

    /// Another way to the same place (an in-process sink shared: dropping the share after
    /// the final report changes nothing).
    pub(crate) fn share(&self) -> ReplyTo {
        match self {
            ReplyTo::None => ReplyTo::None,
            ReplyTo::Address(address) => ReplyTo::Address(address.clone()),
            ReplyTo::Local(sink) => ReplyTo::Local(ReplySink::new(sink.shared())),
        }
    }

    /// Another way to the same place that tells the caller nothing when dropped (an async
    /// task's context: the call may go on, retried, after the context is gone).
    pub(crate) fn lend(&self) -> ReplyTo {
        match self {
            ReplyTo::Local(sink) => ReplyTo::Local(ReplySink { sink: sink.shared(), disconnects: false }),
            other => other.share(),
        }
    }
}

impl fmt::Debug for ReplyTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyTo::None => f.write_str("None"),
            ReplyTo::Address(a) => f.debug_tuple("Address").field(a).finish(),
            ReplyTo::Local(_) => f.write_str("Local(..)"),
        }
    }
}

/// One task to run: what a producer sends and a consumer delivers.
///
/// Made with [`TaskMessage::new`] and the `with_` setters: fields will be added.
///
/// ```
/// use std::sync::Arc;
/// use dingo_core::codec::{Encoded, MSGPACK};
/// use dingo_core::message::{Payload, ReplyTo, TaskMessage};
/// use dingo_core::{TaskId, TaskName, TaskOptions};
///
/// let args = Payload::Encoded(Encoded::new(MSGPACK, vec![0x92, 0x02, 0x03]));
/// let message = TaskMessage::new(TaskName::from("tasks.add"), TaskId::new("1"), 0, args)
///     .with_options(TaskOptions::new())
///     .with_reply_to(ReplyTo::Address(Arc::from("reply.1")));
/// assert_eq!(message.name, "tasks.add");
/// assert!(message.reply_to.wants_reports());
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct TaskMessage {
    /// The task to run.
    pub name: TaskName,
    /// The call's id (unique per task name).
    pub id: TaskId,
    /// A hash of the task's argument and result types, checked by the worker; 0 skips the check.
    pub fingerprint: u64,
    /// Options chosen by the caller.
    pub options: TaskOptions,
    /// Where the reports go.
    pub reply_to: ReplyTo,
    /// The arguments: the value itself for one, a tuple for several (a call by name may send
    /// one argument as a one-element tuple; its fingerprint says so).
    pub args: Payload,
    /// Which run of the call this is: 1 for the first, `n + 1` after `n` retries. A broker
    /// that redelivers a message (its worker died) delivers the same attempt again.
    pub attempt: u32,
    /// The message must not reach a worker before this time: a broker keeps a message due in
    /// the future (see [`Producer::send`](crate::broker::Producer::send)). `None`: now.
    pub due: Option<SystemTime>,
    /// A worker does not start the task after this time (it fails with `Expired`).
    pub expires: Option<SystemTime>,
    /// How the call retries when it fails (the worker decides, not the broker).
    pub retry: RetryPolicy,
    /// How long the task may run (the worker falls back to the task's own where unset).
    pub limits: TimeLimits,
}

impl TaskMessage {
    /// A message for one call of `name`: default [`options`](TaskMessage::options), no
    /// reports ([`ReplyTo::None`]).
    #[inline]
    pub fn new(name: TaskName, id: TaskId, fingerprint: u64, args: Payload) -> TaskMessage {
        TaskMessage {
            name,
            id,
            fingerprint,
            options: TaskOptions::new(),
            reply_to: ReplyTo::None,
            args,
            attempt: 1,
            due: None,
            expires: None,
            retry: RetryPolicy::NONE,
            limits: TimeLimits::NONE,
        }
    }

    /// Sets [`limits`](TaskMessage::limits).
    #[inline]
    #[must_use]
    pub fn with_limits(mut self, limits: TimeLimits) -> TaskMessage {
        self.limits = limits;
        self
    }

    /// Sets [`attempt`](TaskMessage::attempt).
    #[inline]
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32) -> TaskMessage {
        self.attempt = attempt;
        self
    }

    /// Sets [`due`](TaskMessage::due).
    #[inline]
    #[must_use]
    pub fn with_due(mut self, due: Option<SystemTime>) -> TaskMessage {
        self.due = due;
        self
    }

    /// Sets [`expires`](TaskMessage::expires).
    #[inline]
    #[must_use]
    pub fn with_expires(mut self, expires: Option<SystemTime>) -> TaskMessage {
        self.expires = expires;
        self
    }

    /// Sets [`retry`](TaskMessage::retry).
    #[inline]
    #[must_use]
    pub fn with_retry(mut self, retry: RetryPolicy) -> TaskMessage {
        self.retry = retry;
        self
    }

    /// How long the message must still wait at `now`: `None` when it is due (or has no due
    /// time). What a broker asks when it is sent.
    ///
    /// ```
    /// use std::time::{Duration, SystemTime};
    /// use dingo_core::codec::{Encoded, MSGPACK};
    /// use dingo_core::message::{Payload, TaskMessage};
    /// use dingo_core::{TaskId, TaskName};
    ///
    /// let now = SystemTime::now();
    /// let args = Payload::Encoded(Encoded::new(MSGPACK, vec![0x90]));
    /// let message = TaskMessage::new(TaskName::from("t"), TaskId::new("1"), 0, args);
    /// assert_eq!(message.wait_at(now), None);
    /// let message = message.with_due(Some(now + Duration::from_millis(300)));
    /// assert_eq!(message.wait_at(now), Some(Duration::from_millis(300)));
    /// assert_eq!(message.wait_at(now + Duration::from_secs(1)), None);
    /// ```
    #[inline]
    pub fn wait_at(&self, now: SystemTime) -> Option<Duration> {
        let due = self.due?;
        due.duration_since(now).ok().filter(|wait| !wait.is_zero())
    }

    /// Sets [`options`](TaskMessage::options).
    #[inline]
    #[must_use]
    pub fn with_options(mut self, options: TaskOptions) -> TaskMessage {
        self.options = options;
        self
    }

    /// Sets [`reply_to`](TaskMessage::reply_to).
    #[inline]
    #[must_use]
    pub fn with_reply_to(mut self, reply_to: ReplyTo) -> TaskMessage {
        self.reply_to = reply_to;
        self
    }

    /// The identity of the call.
    pub fn key(&self) -> CallKey {
        CallKey { name: self.name.clone(), id: self.id.clone() }
    }
}

/// What a report says.
#[derive(Debug)]
pub enum ReportBody<'a> {
    /// A worker received the task.
    Sent,
    /// The task started (`None`) or reported progress (the encoded value).
    Progress(Option<Encoded>),
    /// The task returned a value.
    Success(Value<'a>),
    /// The task failed or could not run.
    Failure(TaskError),
    /// Attempt `attempt` failed with `error`; the next runs `after` this long (sent with
    /// `monitor_progress` only, not final).
    Retrying {
        /// The attempt that failed (1 for the first run).
        attempt: u32,
        /// The wait before the next attempt.
        after: Duration,
        /// Why it failed.
        error: TaskError,
    },
}

impl ReportBody<'_> {
    /// Whether this is the last report of a call.
    pub fn is_final(&self) -> bool {
        matches!(self, ReportBody::Success(_) | ReportBody::Failure(_))
    }
}

/// One report about one call.
#[derive(Debug)]
pub struct ReportMessage<'a> {
    /// The task's name.
    pub name: TaskName,
    /// The call's id.
    pub id: TaskId,
    /// What happened.
    pub body: ReportBody<'a>,
}

impl ReportMessage<'_> {
    /// The identity of the call.
    pub fn key(&self) -> CallKey {
        CallKey { name: self.name.clone(), id: self.id.clone() }
    }
}

/// Receives the reports of one call on the caller's side (implemented by the call's handle).
pub trait ReportSink: Send + Sync + 'static {
    /// A report arrived. Reports of one call arrive in order; the final one arrives once.
    fn deliver(&self, body: ReportBody<'_>);
    /// The writer went away before the final report (shutdown, a dropped message).
    fn disconnect(&self);
}

/// The writing end of one call's reports.
///
/// There is one per call; dropping it before the final report tells the caller the task will
/// not report (it gets a `Shutdown` failure instead of waiting forever).
pub struct ReplySink {
    sink: Arc<dyn ReportSink>,
    /// Whether dropping it disconnects the caller (all but a lent one's).
    disconnects: bool,
}

impl ReplySink {
    /// Wraps a sink.
    pub fn new(sink: Arc<dyn ReportSink>) -> ReplySink {
        ReplySink { sink, disconnects: true }
    }

    /// Hands a report to the caller.
    pub fn deliver(&self, body: ReportBody<'_>) {
        self.sink.deliver(body);
    }

    /// The sink itself, to deliver to while this stays where it is (dropping a share does
    /// not disconnect the caller).
    pub(crate) fn shared(&self) -> Arc<dyn ReportSink> {
        self.sink.clone()
    }
}

impl Drop for ReplySink {
    fn drop(&mut self) {
        if self.disconnects {
            self.sink.disconnect();
        }
    }
}

impl fmt::Debug for ReplySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplySink")
    }
}
