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
    /// The app is closed (or closing) and accepts no more calls.
    #[error("the app is closed")]
    Shutdown,
    /// The task queue stayed full for the whole enqueue timeout (back-pressure).
    #[error("the queue of task `{task}` is full")]
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
    /// The broker failed; see [`BrokerError::kind`] and [`BrokerError::is_transient`].
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
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Producer => "producer",
            Role::Consumer => "consumer",
            Role::Reporter => "reporter",
            Role::Store => "store",
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
    /// The task ran out of time.
    Timeout,
    /// The worker could not encode the result.
    Encode,
    /// Every worker that took the task stopped before finishing it — its process died, was
    /// killed or stalled past its lease — as many times as the broker allows
    /// (`max_redeliveries`): the broker gave up and dead-lettered the message. Usually a task
    /// that crashes its worker process (an abort, running out of memory).
    WorkerLost,
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
            TaskErrorKind::Timeout => 7,
            TaskErrorKind::Encode => 8,
            TaskErrorKind::WorkerLost => 9,
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
            7 => TaskErrorKind::Timeout,
            8 => TaskErrorKind::Encode,
            9 => TaskErrorKind::WorkerLost,
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
            TaskErrorKind::Timeout => "timeout",
            TaskErrorKind::Encode => "encode",
            TaskErrorKind::WorkerLost => "worker lost",
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
    /// Resolved on the caller so [`TaskError::payload`] can decode.
    codecs: Option<Codecs>,
}

impl TaskError {
    /// A new error without payload.
    pub fn new(kind: TaskErrorKind, message: impl Into<String>) -> TaskError {
        TaskError { kind, message: message.into(), payload: None, codecs: None }
    }

    /// A new error carrying an encoded payload (the task's own error value).
    pub fn with_payload(kind: TaskErrorKind, message: impl Into<String>, payload: Encoded) -> TaskError {
        TaskError { kind, message: message.into(), payload: Some(payload), codecs: None }
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
            .finish()
    }
}

impl PartialEq for TaskError {
    fn eq(&self, other: &TaskError) -> bool {
        self.kind == other.kind && self.message == other.message && self.payload == other.payload
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

/// `err` and its sources, joined with ": " (for messages that travel without the chain).
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind travels as its own code (a kind added without one would arrive as `Other`).
    #[test]
    fn every_kind_round_trips_through_its_wire_code() {
        use TaskErrorKind::*;
        let kinds = [Panic, Failed, UnknownTask, BadPayload, SignatureMismatch, Shutdown, Timeout, Encode, WorkerLost];
        for kind in kinds {
            assert_eq!(TaskErrorKind::from_code(kind.code()), kind, "{kind}");
        }
        let mut codes: Vec<u8> = kinds.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len(), "codes are distinct");
        assert_eq!(TaskErrorKind::from_code(200), Other);
    }
}
