//! Typed reports, as a caller sees them: `Sent`, `Progress`, then `Success` or `Failure`.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::codec::{CodecError, Codecs, Encoded};
use crate::error::TaskError;

/// One report about a call, in the order they happen: [`Report::Sent`] and
/// [`Report::Progress`] (only with `monitor_progress`), then exactly one of
/// [`Report::Success`] and [`Report::Failure`]. A call that retries reports
/// [`Report::Retrying`] after each failed attempt but the last, then `Sent` and `Progress`
/// again for the next attempt (all with `monitor_progress` only).
///
/// New kinds of report may be added: a `match` on it needs a `_` arm.
#[derive(Debug)]
#[non_exhaustive]
pub enum Report<T> {
    /// A worker received the task.
    Sent,
    /// The task started ([`Progress::is_start`]) or reported progress.
    Progress(Progress),
    /// The task returned this value.
    Success(T),
    /// The task failed or could not run.
    Failure(TaskError),
    /// Attempt `attempt` failed with `error`; the next starts `after` this long.
    Retrying {
        /// The attempt that failed (1 for the first run).
        attempt: u32,
        /// The wait before the next attempt (the backoff, or what the task asked for with
        /// [`Context::retry_after`](crate::Context::retry_after)).
        after: Duration,
        /// Why the attempt failed.
        error: TaskError,
    },
}

impl<T> Report<T> {
    /// Whether this is the last report of the call.
    pub fn is_final(&self) -> bool {
        matches!(self, Report::Success(_) | Report::Failure(_))
    }
}

impl<T: PartialEq> PartialEq for Report<T> {
    fn eq(&self, other: &Report<T>) -> bool {
        match (self, other) {
            (Report::Sent, Report::Sent) => true,
            (Report::Progress(a), Report::Progress(b)) => a.value == b.value,
            (Report::Success(a), Report::Success(b)) => a == b,
            (Report::Failure(a), Report::Failure(b)) => a == b,
            (
                Report::Retrying { attempt: a, after: after_a, error: error_a },
                Report::Retrying { attempt: b, after: after_b, error: error_b },
            ) => a == b && after_a == after_b && error_a == error_b,
            _ => false,
        }
    }
}

/// A progress report: the start of the task, or a value passed to
/// [`Context::progress`](crate::Context::progress).
#[derive(Clone)]
pub struct Progress {
    value: Option<Encoded>,
    codecs: Codecs,
}

impl Progress {
    pub(crate) fn new(value: Option<Encoded>, codecs: Codecs) -> Progress {
        Progress { value, codecs }
    }

    /// The automatic report sent when the task starts running (it carries no value).
    pub fn is_start(&self) -> bool {
        self.value.is_none()
    }

    /// Decodes the progress value; `None` for the start report.
    pub fn value<P: DeserializeOwned>(&self) -> Option<Result<P, CodecError>> {
        self.value.as_ref().map(|v| self.codecs.decode(v))
    }

    /// The encoded value.
    pub fn raw(&self) -> Option<&Encoded> {
        self.value.as_ref()
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            None => f.write_str("Progress(start)"),
            Some(v) => write!(f, "Progress({v:?})"),
        }
    }
}
