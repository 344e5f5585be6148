//! Per-call options ([`CallOptions`]) and the part of them that travels with the task
//! ([`TaskOptions`]): the worker obeys what the caller chose.

use std::time::{Duration, SystemTime};

use crate::id::TaskId;
use crate::limits::TimeLimits;
use crate::retry::{Backoff, RetryPolicy};

/// A moment given either way round: a wait from now, or a wall-clock time.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use dingo_core::When;
///
/// let now = SystemTime::now();
/// assert_eq!(When::In(Duration::from_secs(5)).from(now), now + Duration::from_secs(5));
/// assert_eq!(When::At(now).from(now + Duration::from_secs(1)), now);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum When {
    /// This long after the call.
    In(Duration),
    /// At this time (on the caller's clock).
    At(SystemTime),
}

impl When {
    /// The time this names, for a call made at `now`.
    pub fn from(self, now: SystemTime) -> SystemTime {
        match self {
            // Too far to count: as far as a message can say (never, in practice).
            When::In(wait) => now.checked_add(wait).unwrap_or_else(|| now + Duration::from_secs(1 << 40)),
            When::At(time) => time,
        }
    }
}

/// Options for one call, or a task's defaults (see
/// [`App::set_default_options`](crate::App::set_default_options)).
///
/// Every option left unset falls back to the task's default, then to dingo's default.
///
/// ```
/// use std::time::Duration;
/// use dingo_core::CallOptions;
///
/// let opts = CallOptions::new().monitor_progress(true).enqueue_timeout(Duration::ZERO);
/// assert_eq!(opts.is_monitor_progress(), true);
/// assert_eq!(opts.is_ignore_report(), false);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use = "builder methods return the changed value; they do not change it in place"]
pub struct CallOptions {
    ignore_report: Option<bool>,
    monitor_progress: Option<bool>,
    at_most_once: Option<bool>,
    enqueue_timeout: Option<Duration>,
    id: Option<TaskId>,
    delay: Option<When>,
    expires: Option<When>,
    retries: Option<u32>,
    backoff: Option<Backoff>,
    limits: TimeLimits,
}

impl CallOptions {
    /// No option set.
    pub fn new() -> CallOptions {
        CallOptions::default()
    }

    /// Fire-and-forget: workers produce no report at all and the call has no result.
    pub fn ignore_report(mut self, yes: bool) -> CallOptions {
        self.ignore_report = Some(yes);
        self
    }

    /// Also deliver `Sent` (a worker received the task) and `Progress` reports.
    pub fn monitor_progress(mut self, yes: bool) -> CallOptions {
        self.monitor_progress = Some(yes);
        self
    }

    /// Deliver at most once: the broker forgets the task as soon as a worker takes it, so a
    /// worker that dies while running it loses it (instead of the task running again
    /// elsewhere). Cheaper on brokers that keep leases (Redis); the default is at least once.
    /// Usually a per-task default ([`App::set_default_options`](crate::App::set_default_options)).
    pub fn at_most_once(mut self, yes: bool) -> CallOptions {
        self.at_most_once = Some(yes);
        self
    }

    /// How long a call may block on a full queue before failing with
    /// [`Error::QueueFull`](crate::Error::QueueFull); `Duration::ZERO` never blocks. Unset:
    /// block until there is room.
    pub fn enqueue_timeout(mut self, timeout: Duration) -> CallOptions {
        self.enqueue_timeout = Some(timeout);
        self
    }

    /// Use this id instead of one from the task's [`IdMaker`](crate::IdMaker).
    pub fn id(mut self, id: impl Into<TaskId>) -> CallOptions {
        self.id = Some(id.into());
        self
    }

    /// Runs the task no earlier than `wait` from now (Celery's `countdown`). The broker keeps
    /// the task until then, not a worker's memory: it survives worker restarts (and broker
    /// restarts where the broker persists). Replaces an [`eta`](CallOptions::eta).
    pub fn countdown(mut self, wait: Duration) -> CallOptions {
        self.delay = Some(When::In(wait));
        self
    }

    /// Runs the task no earlier than `time` (an ETA; a time in the past runs it at once).
    /// Replaces a [`countdown`](CallOptions::countdown).
    pub fn eta(mut self, time: SystemTime) -> CallOptions {
        self.delay = Some(When::At(time));
        self
    }

    /// A task not started within `wait` of the call is not run: its caller gets a failure of
    /// kind [`Expired`](crate::TaskErrorKind::Expired). A task already running is not
    /// interrupted. Replaces an [`expires_at`](CallOptions::expires_at).
    pub fn expires_in(mut self, wait: Duration) -> CallOptions {
        self.expires = Some(When::In(wait));
        self
    }

    /// A task not started by `time` is not run (see [`expires_in`](CallOptions::expires_in)).
    pub fn expires_at(mut self, time: SystemTime) -> CallOptions {
        self.expires = Some(When::At(time));
        self
    }

    /// Runs a failing task (one that returns `Err`) up to `retries` more times, waiting the
    /// [`backoff`](CallOptions::backoff) in between (see [`crate::retry`] for what retries).
    /// Usually a task's default: `#[dingo::task(retries = 5)]`.
    pub fn retries(mut self, retries: u32) -> CallOptions {
        self.retries = Some(retries);
        self
    }

    /// The wait between attempts (default: [`Backoff::DEFAULT`]).
    pub fn backoff(mut self, backoff: Backoff) -> CallOptions {
        self.backoff = Some(backoff);
        self
    }

    /// The hard time limit: a task still running `limit` after it started fails with
    /// [`TimeLimit`](crate::TaskErrorKind::TimeLimit), its message settled, its worker thread
    /// written off and replaced (see [`TimeLimits`] for the trade-off).
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::time::Duration;
    /// use dingo_core::{App, CallOptions, Error, TaskErrorKind};
    ///
    /// let app = App::local()?;
    /// app.register("nap", |ms: u64| std::thread::sleep(Duration::from_millis(ms)))?;
    /// app.allocate("nap", 1)?;
    /// let limited = CallOptions::new().time_limit(Duration::from_millis(50));
    /// match app.call_with::<_, ()>("nap", &limited, 2_000u64)?.wait() {
    ///     Err(Error::Task(e)) => assert_eq!(e.kind(), TaskErrorKind::TimeLimit),
    ///     other => panic!("{other:?}"),
    /// }
    /// // The pool kept its size: the next call runs at once.
    /// app.call::<_, ()>("nap", 1u64)?.wait()?;
    /// # app.close()
    /// # }
    /// ```
    pub fn time_limit(mut self, limit: Duration) -> CallOptions {
        self.limits = self.limits.hard(limit);
        self
    }

    /// The soft time limit: once it passes, [`Context::is_cancelled`](crate::Context::is_cancelled)
    /// turns true and the task may clean up and return (see [`TimeLimits`]).
    pub fn soft_time_limit(mut self, limit: Duration) -> CallOptions {
        self.limits = self.limits.soft(limit);
        self
    }

    /// The time limits set.
    pub fn get_time_limits(&self) -> TimeLimits {
        self.limits
    }

    /// When the task may start, if a countdown or ETA is set.
    pub fn get_delay(&self) -> Option<When> {
        self.delay
    }

    /// When the task expires, if it does.
    pub fn get_expiry(&self) -> Option<When> {
        self.expires
    }

    /// The retry policy these options give.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(self.retries.unwrap_or(0)).backoff(self.backoff.unwrap_or_default())
    }

    /// Whether `ignore_report` is on.
    pub fn is_ignore_report(&self) -> bool {
        self.ignore_report.unwrap_or(false)
    }

    /// Whether `monitor_progress` is on.
    pub fn is_monitor_progress(&self) -> bool {
        self.monitor_progress.unwrap_or(false)
    }

    /// Whether `at_most_once` is on.
    pub fn is_at_most_once(&self) -> bool {
        self.at_most_once.unwrap_or(false)
    }

    /// The enqueue timeout, if one is set.
    pub fn get_enqueue_timeout(&self) -> Option<Duration> {
        self.enqueue_timeout
    }

    /// The explicit id, if one is set.
    pub fn get_id(&self) -> Option<&TaskId> {
        self.id.as_ref()
    }

    /// Whether no option is set.
    pub(crate) fn is_empty(&self) -> bool {
        self.ignore_report.is_none()
            && self.monitor_progress.is_none()
            && self.at_most_once.is_none()
            && self.enqueue_timeout.is_none()
            && self.id.is_none()
            && self.delay.is_none()
            && self.expires.is_none()
            && self.retries.is_none()
            && self.backoff.is_none()
            && self.limits.is_none()
    }

    /// These options, with every unset one taken from `defaults`.
    pub fn or(&self, defaults: &CallOptions) -> CallOptions {
        CallOptions {
            ignore_report: self.ignore_report.or(defaults.ignore_report),
            monitor_progress: self.monitor_progress.or(defaults.monitor_progress),
            at_most_once: self.at_most_once.or(defaults.at_most_once),
            enqueue_timeout: self.enqueue_timeout.or(defaults.enqueue_timeout),
            id: self.id.clone().or_else(|| defaults.id.clone()),
            delay: self.delay.or(defaults.delay),
            expires: self.expires.or(defaults.expires),
            retries: self.retries.or(defaults.retries),
            backoff: self.backoff.or(defaults.backoff),
            limits: self.limits.or(defaults.limits),
        }
    }

    pub(crate) fn task_options(&self) -> TaskOptions {
        TaskOptions {
            ignore_report: self.is_ignore_report(),
            monitor_progress: self.is_monitor_progress(),
            at_most_once: self.is_at_most_once(),
        }
    }
}

/// The options that travel inside a task message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[must_use]
pub struct TaskOptions {
    /// No report is produced.
    pub ignore_report: bool,
    /// `Sent` and `Progress` reports are produced.
    pub monitor_progress: bool,
    /// The broker may forget the task once a worker has taken it.
    pub at_most_once: bool,
}

impl TaskOptions {
    /// Defaults: a final report only.
    pub fn new() -> TaskOptions {
        TaskOptions::default()
    }
}
