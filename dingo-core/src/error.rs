//! Errors: what callers of the API get ([`Error`]), what travels to callers when a task
//! fails ([`TaskError`]), and what brokers report ([`BrokerError`]).

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::codec::{CodecError, Codecs, Encoded};

/// Everything the dingo API can fail with.
///
/// A task that ran (or could not run) and failed arrives as [`Error::Task`]; the other
/// variants are decisions the caller makes locally: retry later, fix the configuration, …
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task failed, or a worker could not run it; the [`TaskError`] says why.
    #[error(transparent)]
    Task(#[from] TaskError),
    /// `wait_timeout` ran out before the final report arrived; waiting again still works.
    #[error("no result within {0:?}")]
    Timeout(Duration),
    /// The app is closed (or closing), or its broker was shut down, and accepts no more
    /// calls.
    #[error("the app is closed (App::close, or its broker shut down): it takes no more calls or workers")]
    Shutdown,
    /// The task queue stayed full for the whole enqueue timeout (back-pressure): the workers
    /// do not keep up, or are not running. The limit is the broker's
    /// ([`LocalOptions::capacity`](crate::LocalOptions::capacity), Redis's `send_buffer`,
    /// RabbitMQ's `max_unconfirmed`); the wait is the call's
    /// [`enqueue_timeout`](crate::CallOptions::enqueue_timeout).
    #[error(
        "the queue of task `{task}` is full: add workers, or raise the broker's queue limit or the call's enqueue_timeout"
    )]
    QueueFull {
        /// The task whose queue is full.
        task: String,
    },
    /// The call was made with `ignore_report`: there is no result to wait for.
    #[error("the call was made with ignore_report and has no result")]
    NoReport,
    /// The final result was already taken from this handle.
    #[error("the result was already taken from this handle")]
    ResultTaken,
    /// No task of that name is registered in this app. The message says what to check: a
    /// closure is registered with [`App::register`](crate::App::register), and a
    /// `#[dingo::task]` only when the crate defining it is linked (see [`not_linked_hint`]).
    #[error("no task named `{name}` is registered in this app: register a closure first; {}", not_linked_hint(.name))]
    UnknownTask {
        /// The name.
        name: String,
    },
    /// A function given where a task is expected (`app.allocate(f, 1)`) is not a
    /// `#[dingo::task]`.
    #[error("`{function}` is not a `#[dingo::task]` function")]
    NotATask {
        /// The function's type name (its path).
        function: String,
    },
    /// Two tasks were registered under one name.
    #[error("a task named `{name}` is already registered")]
    DuplicateTask {
        /// The name registered twice.
        name: String,
    },
    /// The app lacks a role this operation needs (e.g. `allocate` without a consumer).
    #[error("the app has no {0} (configure one on the builder)")]
    MissingRole(Role),
    /// A URL that names no broker this build supports, or is malformed.
    #[error("unsupported broker URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given (credentials removed).
        url: String,
        /// What is wrong with it.
        reason: Cow<'static, str>,
    },
    /// A configuration value out of range (e.g. zero workers).
    #[error("invalid configuration: {0}")]
    InvalidConfig(Cow<'static, str>),
    /// Arguments or results could not be encoded or decoded.
    #[error("codec failure")]
    Codec(#[from] CodecError),
    /// The broker failed; see [`BrokerError::kind`] and [`BrokerError::is_transient`]. The
    /// broker error (the source) says what and why: print the error with [`chain`].
    #[error("broker failure")]
    Broker(#[from] BrokerError),
    /// A worker thread could not be started.
    #[error("could not start a worker thread")]
    Spawn(#[source] std::io::Error),
    /// `close` gave up waiting for in-flight tasks after the grace period.
    #[error("{running} task(s) still running after the shutdown grace period")]
    ShutdownTimeout {
        /// How many worker threads were still busy.
        running: usize,
    },
}

impl Error {
    /// The task-level error, if this is a failure report.
    pub fn task_error(&self) -> Option<&TaskError> {
        match self {
            Error::Task(e) => Some(e),
            _ => None,
        }
    }

    /// The kind of the task-level error, if this is a failure report.
    pub fn task_kind(&self) -> Option<TaskErrorKind> {
        self.task_error().map(TaskError::kind)
    }
}

/// A role an [`App`](crate::App) plays through a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Role {
    /// Sends task messages (caller side).
    Producer,
    /// Receives task messages (worker side).
    Consumer,
    /// Publishes reports (worker side).
    Reporter,
    /// Waits for reports (caller side).
    Store,
    /// Cancels calls, replays and purges (the operator's role, see
    /// [`Admin`](crate::broker::Admin)).
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
            Role::Reporter => "reporter",
            Role::Store => "store",
            Role::Admin => "admin",
        })
    }
}

/// Why a task failed; the error that travels from the worker to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TaskErrorKind {
    /// The task panicked; the message is the panic's.
    Panic,
    /// The task returned `Err(e)`; the payload decodes into `e`.
    Failed,
    /// No worker knows the task's name.
    UnknownTask,
    /// The arguments could not be decoded.
    BadPayload,
    /// Caller and worker were built with different signatures for the task.
    SignatureMismatch,
    /// The app or broker shut down before the task ran.
    Shutdown,
    /// The task ran past its hard time limit
    /// ([`CallOptions::time_limit`](crate::CallOptions::time_limit)): its worker thread was
    /// written off and replaced, the message settled. Also a task that returned `Err` after
    /// its soft limit passed (it saw [`Context::is_cancelled`](crate::Context::is_cancelled)).
    TimeLimit,
    /// The worker could not encode the result.
    Encode,
    /// Every worker that took the task stopped before finishing it — its process died, was
    /// killed or stalled past its lease — as many times as the broker allows
    /// (`max_redeliveries`): the broker gave up and dead-lettered the message. Usually a task
    /// that crashes its worker process (an abort, running out of memory).
    WorkerLost,
    /// The call was not started before its expiry
    /// ([`CallOptions::expires_in`](crate::CallOptions::expires_in)), so it never ran.
    Expired,
    /// The call was cancelled ([`App::cancel`](crate::App::cancel),
    /// [`Handle::cancel`](crate::Handle::cancel)) before it started, or its task returned
    /// `Err` after it saw the cancel.
    Cancelled,
    /// A kind this build does not know (sent by a newer peer).
    Other,
}

impl TaskErrorKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            TaskErrorKind::Other => 0,
            TaskErrorKind::Panic => 1,
            TaskErrorKind::Failed => 2,
            TaskErrorKind::UnknownTask => 3,
            TaskErrorKind::BadPayload => 4,
            TaskErrorKind::SignatureMismatch => 5,
            TaskErrorKind::Shutdown => 6,
            TaskErrorKind::TimeLimit => 7,
            TaskErrorKind::Encode => 8,
            TaskErrorKind::WorkerLost => 9,
            TaskErrorKind::Expired => 10,
            TaskErrorKind::Cancelled => 11,
        }
    }

    pub(crate) fn from_code(code: u8) -> TaskErrorKind {
        match code {
            1 => TaskErrorKind::Panic,
            2 => TaskErrorKind::Failed,
            3 => TaskErrorKind::UnknownTask,
            4 => TaskErrorKind::BadPayload,
            5 => TaskErrorKind::SignatureMismatch,
            6 => TaskErrorKind::Shutdown,
            7 => TaskErrorKind::TimeLimit,
            8 => TaskErrorKind::Encode,
            9 => TaskErrorKind::WorkerLost,
            10 => TaskErrorKind::Expired,
            11 => TaskErrorKind::Cancelled,
            _ => TaskErrorKind::Other,
        }
    }
}

impl fmt::Display for TaskErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskErrorKind::Panic => "panic",
            TaskErrorKind::Failed => "failed",
            TaskErrorKind::UnknownTask => "unknown task",
            TaskErrorKind::BadPayload => "bad payload",
            TaskErrorKind::SignatureMismatch => "signature mismatch",
            TaskErrorKind::Shutdown => "shutdown",
            TaskErrorKind::TimeLimit => "time limit",
            TaskErrorKind::Encode => "encode",
            TaskErrorKind::WorkerLost => "worker lost",
            TaskErrorKind::Expired => "expired",
            TaskErrorKind::Cancelled => "cancelled",
            TaskErrorKind::Other => "other",
        })
    }
}

/// The error a worker sends to the caller: a kind, a message, and for
/// [`TaskErrorKind::Failed`] the task's own error value, encoded.
#[derive(Clone, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct TaskError {
    kind: TaskErrorKind,
    message: String,
    payload: Option<Encoded>,
    /// How many times the task ran (more than 1 after retries).
    attempts: u32,
    /// Resolved on the caller so [`TaskError::payload`] can decode.
    codecs: Option<Codecs>,
}

impl TaskError {
    /// A new error without payload.
    pub fn new(kind: TaskErrorKind, message: impl Into<String>) -> TaskError {
        TaskError { kind, message: message.into(), payload: None, attempts: 1, codecs: None }
    }

    /// A new error carrying an encoded payload (the task's own error value).
    pub fn with_payload(kind: TaskErrorKind, message: impl Into<String>, payload: Encoded) -> TaskError {
        TaskError { kind, message: message.into(), payload: Some(payload), attempts: 1, codecs: None }
    }

    /// This error, after the task ran `attempts` times (its retries are used up).
    #[must_use]
    pub fn with_attempts(mut self, attempts: u32) -> TaskError {
        self.attempts = attempts.max(1);
        self
    }

    /// How many times the task ran before this failure: 1 unless it was retried. The
    /// [`message`](TaskError::message) of a failure after retries names them too.
    ///
    /// ```
    /// use dingo_core::{TaskError, TaskErrorKind};
    ///
    /// let error = TaskError::new(TaskErrorKind::Failed, "card declined").with_attempts(3);
    /// assert_eq!(error.attempts(), 3);
    /// assert_eq!(TaskError::new(TaskErrorKind::Panic, "boom").attempts(), 1);
    /// ```
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Why the task failed.
    pub fn kind(&self) -> TaskErrorKind {
        self.kind
    }

    /// A human-readable description (a panic's message, the error's `Display`, …).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The encoded payload, if any.
    pub fn raw_payload(&self) -> Option<&Encoded> {
        self.payload.as_ref()
    }

    /// Decodes the task's own error value (the `E` of a task returning `Result<T, E>`).
    ///
    /// `None` when the error carries no payload (a panic, an unknown task, …).
    pub fn payload<E: DeserializeOwned>(&self) -> Option<Result<E, CodecError>> {
        let encoded = self.payload.as_ref()?;
        let codecs = self.codecs.clone().unwrap_or_default();
        Some(codecs.decode(encoded))
    }

    /// The same error with another message.
    pub(crate) fn renamed(mut self, message: String) -> TaskError {
        self.message = message;
        self
    }

    pub(crate) fn set_codecs(&mut self, codecs: Codecs) {
        self.codecs = Some(codecs);
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("payload", &self.payload)
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl PartialEq for TaskError {
    fn eq(&self, other: &TaskError) -> bool {
        self.kind == other.kind
            && self.message == other.message
            && self.payload == other.payload
            && self.attempts == other.attempts
    }
}

impl Eq for TaskError {}

/// What went wrong in a broker, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BrokerErrorKind {
    /// The server could not be reached or the connection broke.
    Connection,
    /// The broker (or this handle to it) is closed.
    Closed,
    /// A bounded queue is full.
    Full,
    /// No queue exists for the message's task.
    Unroutable,
    /// A message could not be decoded.
    Malformed,
    /// A message exceeds the configured size limit.
    TooLarge,
    /// The server answered something unexpected.
    Protocol,
    /// The broker was misconfigured.
    Config,
    /// Anything else.
    Other,
}

/// A broker failure: an opaque error with a [`kind`](BrokerError::kind) and the source kept.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BrokerError {
    kind: BrokerErrorKind,
    message: Cow<'static, str>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl BrokerError {
    /// A new error.
    pub fn new(kind: BrokerErrorKind, message: impl Into<Cow<'static, str>>) -> BrokerError {
        BrokerError { kind, message: message.into(), source: None }
    }

    /// A new error with its cause.
    pub fn with_source(
        kind: BrokerErrorKind,
        message: impl Into<Cow<'static, str>>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> BrokerError {
        BrokerError { kind, message: message.into(), source: Some(Box::new(source)) }
    }

    /// What went wrong.
    pub fn kind(&self) -> BrokerErrorKind {
        self.kind
    }

    /// Whether trying again later may succeed (a dropped connection, a full queue).
    pub fn is_transient(&self) -> bool {
        matches!(self.kind, BrokerErrorKind::Connection | BrokerErrorKind::Full)
    }

    /// The same error (kind and source) with another message.
    pub(crate) fn reworded(self, message: String) -> BrokerError {
        BrokerError { message: message.into(), ..self }
    }
}

/// What to check when a task looked up by name is not there: that the crate defining it is
/// linked. Rust links a dependency only if the code refers to it, so a crate of
/// `#[dingo::task]`s that nothing names is left out of the binary, and its tasks with it
/// (they register themselves at link time). Errors of unknown tasks end with this.
///
/// ```
/// assert_eq!(
///     dingo_core::error::not_linked_hint("billing::refund"),
///     "if it is a `#[dingo::task]` of crate `billing`, that crate may not be linked into \
///      this binary (a crate nothing refers to is left out, and its tasks with it): add \
///      `use billing as _;` to the binary"
/// );
/// ```
pub fn not_linked_hint(task: &str) -> String {
    let is_ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_');
    match task.split_once("::").map(|(first, _)| first).filter(|first| is_ident(first)) {
        Some(krate) => format!(
            "if it is a `#[dingo::task]` of crate `{krate}`, that crate may not be linked into this binary \
             (a crate nothing refers to is left out, and its tasks with it): add `use {krate} as _;` to the binary"
        ),
        None => "if it is a `#[dingo::task]`, the crate defining it may not be linked into this binary \
                 (a crate nothing refers to is left out, and its tasks with it): add `use that_crate as _;` \
                 to the binary"
            .to_owned(),
    }
}

/// `err` and its sources, joined with ": " — how to print an [`Error`] for a person: its
/// `Display` says only what failed (`broker failure`), its sources say why.
///
/// ```
/// use dingo_core::{BrokerError, BrokerErrorKind, Error};
///
/// let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
/// let error = Error::from(BrokerError::with_source(BrokerErrorKind::Connection, "cannot reach redis", refused));
/// assert_eq!(error.to_string(), "broker failure");
/// assert_eq!(dingo_core::error::chain(&error), "broker failure: cannot reach redis: connection refused");
/// ```
///
/// A cause that only repeats the text of the error above it (a wrapper that prints its
/// source) is left out.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut last = out.clone();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        source = cause.source();
    }
    out
}

/// An error for `main` to return, printed with its causes: when `main` fails, Rust prints
/// the `Debug` of its error, and this one's is the error and its sources on one line
/// ([`chain`]) — not a struct dump, and not only `broker failure`. Anything `?` accepts in
/// a `main` returning `Box<dyn Error + Send + Sync>` converts into it.
///
/// ```no_run
/// fn main() -> Result<(), dingo_core::error::MainError> {
///     let app = dingo_core::App::connect("redis://127.0.0.1:6379")?;
///     // A server that stays down prints, and exits with code 1:
///     // Error: broker failure: cannot reach redis at redis://127.0.0.1:6379: connection refused (…)
///     app.close()?;
///     Ok(())
/// }
/// ```
pub struct MainError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl MainError {
    /// The error itself.
    pub fn get_ref(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl<E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>> From<E> for MainError {
    fn from(error: E) -> MainError {
        MainError(error.into())
    }
}

impl fmt::Debug for MainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(&*self.0))
    }
}

impl fmt::Display for MainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&chain(&*self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind travels as its own code (a kind added without one would arrive as `Other`).
    #[test]
    fn every_kind_round_trips_through_its_wire_code() {
        use TaskErrorKind::*;
        let kinds = [
            Panic,
            Failed,
            UnknownTask,
            BadPayload,
            SignatureMismatch,
            Shutdown,
            TimeLimit,
            Encode,
            WorkerLost,
            Expired,
            Cancelled,
        ];
        for kind in kinds {
            assert_eq!(TaskErrorKind::from_code(kind.code()), kind, "{kind}");
        }
        let mut codes: Vec<u8> = kinds.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len(), "codes are distinct");
        assert_eq!(TaskErrorKind::from_code(200), Other);
    }

    #[test]
    fn main_error_prints_the_chain() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let broker = BrokerError::with_source(BrokerErrorKind::Connection, "cannot reach redis at redis://h", refused);
        let error = MainError::from(Error::from(broker));
        assert_eq!(format!("{error:?}"), "broker failure: cannot reach redis at redis://h: connection refused");
        assert_eq!(error.to_string(), format!("{error:?}"));
        assert_eq!(format!("{:?}", MainError::from("--calls needs a value")), "--calls needs a value");
        assert_eq!(format!("{:?}", MainError::from(format!("unknown flag {}", "-x"))), "unknown flag -x");
        assert!(matches!(MainError::from(Error::Shutdown).get_ref().downcast_ref::<Error>(), Some(Error::Shutdown)));
    }

    /// The operational failures say what to do.
    #[test]
    fn messages_say_what_to_do() {
        assert_eq!(
            Error::QueueFull { task: "resize".into() }.to_string(),
            "the queue of task `resize` is full: add workers, or raise the broker's queue limit or the call's enqueue_timeout"
        );
        assert_eq!(
            Error::Shutdown.to_string(),
            "the app is closed (App::close, or its broker shut down): it takes no more calls or workers"
        );
    }

    /// A client error that prints its own source (as redis's does) is not printed twice.
    #[test]
    fn chain_leaves_out_a_cause_that_repeats_its_error() {
        #[derive(Debug)]
        struct Forwarding(std::io::Error);
        impl fmt::Display for Forwarding {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
        impl std::error::Error for Forwarding {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let broker = BrokerError::with_source(BrokerErrorKind::Connection, "connection refused", Forwarding(io));
        assert_eq!(
            chain(&Error::from(broker)),
            "broker failure: connection refused: Connection refused (os error 111)"
        );
    }
}
