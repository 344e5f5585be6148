//! [`Context`]: what a running task knows about its call.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::broker::{Cancels, Reporter};
use crate::codec::Encoded;
use crate::codec::{Codec, encode};
use crate::event::{Event, EventKind, EventSink, Level, Origin};
use crate::id::{CallKey, TaskId, TaskName};
use crate::message::{ReplyTo, ReportBody, ReportMessage};
use crate::options::TaskOptions;
use crate::retry::RetryPolicy;

/// The running call, injected into a task that takes a `&dingo::Context` parameter (it is
/// not sent by the caller).
///
/// ```
/// # fn main() -> Result<(), dingo_core::Error> {
/// use dingo_core::{App, CallOptions, Context, Report};
///
/// let app = App::local()?;
/// app.register_with_context("resize", |ctx: &Context<'_>, pixels: Vec<u8>| {
///     ctx.progress(0.5); // delivered only with `monitor_progress`
///     Ok::<usize, String>(pixels.len() / 4)
/// })?;
/// app.allocate("resize", 1)?;
///
/// let opts = CallOptions::new().monitor_progress(true);
/// let reports: Vec<Report<usize>> = app.call_with("resize", &opts, vec![0u8; 64])?.reports().collect();
/// assert!(matches!(&reports[2], Report::Progress(p) if p.value::<f64>().unwrap().unwrap() == 0.5));
/// assert_eq!(reports[3], Report::Success(16));
/// # app.close()
/// # }
/// ```
///
/// An `async fn` task's context is a `Context<'static>`: it owns what a blocking task's
/// borrows from its worker, so the task's future can hold it across `.await`s.
pub struct Context<'a> {
    pub(crate) name: Lent<'a, TaskName>,
    pub(crate) id: Lent<'a, TaskId>,
    pub(crate) options: TaskOptions,
    pub(crate) redelivered: bool,
    pub(crate) reply_to: Lent<'a, ReplyTo>,
    pub(crate) reporter: Lent<'a, dyn Reporter>,
    pub(crate) codec: Lent<'a, dyn Codec>,
    pub(crate) events: Lent<'a, EventSink>,
    pub(crate) attempt: u32,
    pub(crate) retry: RetryPolicy,
    /// What [`Context::retry_after`] asked for, in milliseconds; `u64::MAX`: nothing.
    pub(crate) retry_after: AtomicU64,
    /// The consumer's cancels.
    pub(crate) cancels: Option<Lent<'a, Cancels>>,
    /// When the soft time limit passes.
    pub(crate) soft_at: Option<Instant>,
    /// What [`Context::deadline`] says.
    pub(crate) deadline: Option<Instant>,
    /// Raised when the watchdog wrote this task off (past its hard limit).
    pub(crate) written_off: Option<Lent<'a, AtomicBool>>,
    /// What [`Context::is_cancelled`] has seen (`worker::SAW_*`).
    pub(crate) saw: AtomicU8,
}

/// What a context refers to: borrowed from the worker running a blocking task, or shared
/// with the executor running an async one (whose future must own its context).
pub(crate) enum Lent<'a, T: ?Sized> {
    Borrowed(&'a T),
    Shared(Arc<T>),
}

impl<T: ?Sized> Deref for Lent<'_, T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        match self {
            Lent::Borrowed(value) => value,
            Lent::Shared(value) => value,
        }
    }
}

impl Context<'_> {
    /// The call's id.
    pub fn id(&self) -> &TaskId {
        &self.id
    }

    /// The task's name.
    pub fn name(&self) -> &TaskName {
        &self.name
    }

    /// The call's identity.
    pub fn key(&self) -> CallKey {
        CallKey { name: TaskName::clone(&self.name), id: TaskId::clone(&self.id) }
    }

    /// The options the caller chose.
    pub fn options(&self) -> TaskOptions {
        self.options
    }

    /// Whether the broker delivered this call before (a worker died or gave it back): the
    /// task may have run, fully or partly, already.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Which run of the call this is: 1 for the first, `n + 1` after `n` retries. A worker
    /// that died while running the task does not count: its attempt runs again under the
    /// same number (with [`redelivered`](Context::redelivered) set).
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::time::Duration;
    /// use dingo_core::{App, Backoff, CallOptions, Context};
    ///
    /// let app = App::local()?;
    /// app.register_with_context("flaky", |ctx: &Context<'_>, ()| {
    ///     if ctx.attempt() < 3 { Err(format!("attempt {} failed", ctx.attempt())) } else { Ok(ctx.attempt()) }
    /// })?;
    /// app.allocate("flaky", 1)?;
    /// let opts = CallOptions::new().retries(5).backoff(Backoff::fixed(Duration::from_millis(1)));
    /// let attempts: u32 = app.call_with("flaky", &opts, ())?.wait()?;
    /// assert_eq!(attempts, 3);
    /// # app.close()
    /// # }
    /// ```
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The call's retry policy (how many retries it has in all, and its backoff).
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// Asks that, if this attempt fails (the task returns `Err`), the next one start after
    /// `wait` instead of the backoff — for a service that said when to come back (an HTTP
    /// `Retry-After`). The retry still counts against the call's
    /// [`retries`](crate::CallOptions::retries): without attempts left, the failure is final.
    /// A task that returns `Ok` afterwards succeeds as usual.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::time::Duration;
    /// use dingo_core::{App, CallOptions, Context, Report};
    ///
    /// let app = App::local()?;
    /// app.register_with_context("fetch", |ctx: &Context<'_>, ()| {
    ///     if ctx.attempt() == 1 {
    ///         ctx.retry_after(Duration::from_millis(20)); // "503, Retry-After: 0.02"
    ///         return Err("service unavailable".to_string());
    ///     }
    ///     Ok("fetched".to_string())
    /// })?;
    /// app.allocate("fetch", 1)?;
    /// let opts = CallOptions::new().retries(1).monitor_progress(true);
    /// let reports: Vec<Report<String>> = app.call_with("fetch", &opts, ())?.reports().collect();
    /// assert!(reports.iter().any(|r| matches!(r, Report::Retrying { after, .. } if *after == Duration::from_millis(20))));
    /// assert_eq!(reports.last(), Some(&Report::Success("fetched".to_string())));
    /// # app.close()
    /// # }
    /// ```
    pub fn retry_after(&self, wait: Duration) {
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX - 1).min(u64::MAX - 1);
        self.retry_after.store(millis, Ordering::Relaxed);
    }

    /// What [`retry_after`](Context::retry_after) asked for, if anything.
    pub(crate) fn requested_retry(&self) -> Option<Duration> {
        let millis = self.retry_after.load(Ordering::Relaxed);
        (millis != u64::MAX).then(|| Duration::from_millis(millis))
    }

    /// Whether the task should stop: its call was cancelled
    /// ([`App::cancel`](crate::App::cancel), [`Handle::cancel`](crate::Handle::cancel)), or
    /// its soft time limit passed (or its hard one: the call has failed already). Cheap
    /// (a clock read and an atomic load while nothing is cancelled): call it in a task's
    /// loop. Cooperative — nothing stops a task that does not ask. A task that returns `Err`
    /// after this said `true` fails with [`Cancelled`](crate::TaskErrorKind::Cancelled) or
    /// [`TimeLimit`](crate::TaskErrorKind::TimeLimit), and is not retried; a value it
    /// returns arrives as usual.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::time::Duration;
    /// use dingo_core::{App, CallOptions, Context};
    ///
    /// let app = App::local()?;
    /// app.register_with_context("count", |ctx: &Context<'_>, ()| {
    ///     let mut n = 0u64;
    ///     while !ctx.is_cancelled() {
    ///         n += 1;
    ///         std::thread::sleep(Duration::from_millis(1));
    ///     }
    ///     Ok::<u64, String>(n) // what it counted before its soft limit
    /// })?;
    /// app.allocate("count", 1)?;
    /// let opts = CallOptions::new().soft_time_limit(Duration::from_millis(50));
    /// let counted: u64 = app.call_with("count", &opts, ())?.wait()?;
    /// assert!(counted > 0);
    /// # app.close()
    /// # }
    /// ```
    pub fn is_cancelled(&self) -> bool {
        if self.written_off.as_ref().is_some_and(|flag| flag.load(Ordering::Acquire)) {
            self.saw.store(crate::worker::SAW_TIME_LIMIT, Ordering::Relaxed);
            return true;
        }
        if self.cancels.as_ref().is_some_and(|cancels| cancels.is_cancelled(&self.name, &self.id)) {
            self.saw.store(crate::worker::SAW_CANCEL, Ordering::Relaxed);
            return true;
        }
        if self.soft_at.is_some_and(|at| Instant::now() >= at) {
            self.saw.store(crate::worker::SAW_TIME_LIMIT, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// When the task should be done by: its soft time limit, else its hard one (`None`:
    /// no limit). For a task that passes a deadline on (an HTTP timeout, a query's).
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::time::{Duration, Instant};
    /// use dingo_core::{App, CallOptions, Context};
    ///
    /// let app = App::local()?;
    /// app.register_with_context("left", |ctx: &Context<'_>, ()| {
    ///     Ok::<u64, String>(ctx.deadline().map_or(0, |d| d.saturating_duration_since(Instant::now()).as_millis() as u64))
    /// })?;
    /// app.allocate("left", 1)?;
    /// let opts = CallOptions::new().time_limit(Duration::from_secs(10));
    /// let left: u64 = app.call_with("left", &opts, ())?.wait()?;
    /// assert!(left > 9_000 && left <= 10_000);
    /// # app.close()
    /// # }
    /// ```
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// What [`is_cancelled`](Context::is_cancelled) saw last.
    pub(crate) fn saw(&self) -> u8 {
        self.saw.load(Ordering::Relaxed)
    }

    /// Sends a progress report to the caller, if it asked for them (`monitor_progress`);
    /// otherwise does nothing. A failure to report becomes an event, never a task error.
    pub fn progress<P: Serialize>(&self, value: P) {
        // A written-off task's progress is as stale as its outcome: dropped.
        if !self.options.monitor_progress
            || !self.reply_to.wants_reports()
            || self.written_off.as_ref().is_some_and(|flag| flag.load(Ordering::Acquire))
        {
            return;
        }
        let sent = encode(&*self.codec, &value).map_err(|e| crate::error::chain(&e)).and_then(|bytes| {
            let body = ReportBody::Progress(Some(Encoded::new(self.codec.id(), bytes)));
            let report = ReportMessage { name: TaskName::clone(&self.name), id: TaskId::clone(&self.id), body };
            self.reporter.report(&self.reply_to, report).map_err(|e| crate::error::chain(&e))
        });
        if let Err(message) = sent {
            self.events.emit(
                Event::new(
                    Origin::Worker,
                    Level::Warning,
                    EventKind::ReportFailed,
                    format!("progress report lost: {message}"),
                )
                .with_task(self.key()),
            );
        }
    }
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", &*self.name)
            .field("id", &*self.id)
            .field("options", &self.options)
            .field("redelivered", &self.redelivered)
            .field("attempt", &self.attempt)
            .finish()
    }
}
