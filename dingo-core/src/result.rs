//! [`Handle`]: the caller's end of one call.

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, IntoFuture};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_core::Stream;

#[cfg(all(test, dingo_loom))]
#[path = "result/loom.rs"]
mod loom;
#[path = "result/sync.rs"]
mod sync;
use crate::broker::{Admin, Store};
use crate::codec::{Codecs, Encoded};
use crate::error::{Error, TaskError, TaskErrorKind};
use crate::id::{CallKey, TaskId, TaskName};
use crate::message::{ReportBody, ReportSink, Value};
use crate::report::{Progress, Report};
use sync::{AtomicBool, Condvar, Mutex, MutexGuard, Ordering, lock, wait, wait_timeout};

/// How many `Sent` / `Progress` reports a handle keeps while nobody reads them; beyond
/// that the oldest are dropped (a chatty task must not grow a forgotten handle without end).
const MAX_PENDING_REPORTS: usize = 1024;

/// `now + timeout`, or no deadline when that is beyond what `Instant` can represent.
pub(crate) fn deadline(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Turns an encoded result into the caller's type.
pub(crate) type DecodeFn<T> = fn(Encoded, &Codecs) -> Result<T, TaskError>;

/// The result of one call: wait for it, `.await` it, iterate over (or stream) its reports,
/// or register callbacks.
///
/// `handle.await` gets the call's result on any executor ([`IntoFuture`]): the delivering
/// thread wakes the task's [`Waker`], nothing polls and no thread blocks.
/// `(&mut handle).await` (under a timeout, say) leaves the handle usable, as
/// [`wait_timeout`](Handle::wait_timeout) does: awaiting it again still gets the result,
/// and once it did, [`Error::ResultTaken`]. Where a `Future` itself is wanted
/// (`tokio::spawn`, `block_on`), [`into_future`](IntoFuture::into_future) makes one.
///
/// A call made with `ignore_report` returns a *detached* handle: it has an id but no result
/// ([`Error::NoReport`]).
///
/// ```
/// # fn main() -> Result<(), dingo_core::Error> {
/// use std::time::Duration;
/// let app = dingo_core::App::local()?;
/// app.register("double", |n: i64| n * 2)?;
/// app.allocate("double", 1)?;
///
/// let mut handle = app.call::<_, i64>("double", 21i64)?;
/// handle.on_ok(|v| assert_eq!(*v, 42));
/// assert_eq!(handle.wait_timeout(Duration::from_secs(5))?, 42);
///
/// // The same from async code, on any executor:
/// use std::future::IntoFuture;
/// let handle = app.call::<_, i64>("double", 4i64)?;
/// assert_eq!(futures::executor::block_on(async { handle.await })?, 8);
/// let handle = app.call::<_, i64>("double", 5i64)?;
/// assert_eq!(futures::executor::block_on(handle.into_future())?, 10);
/// app.close()
/// # }
/// ```
pub struct Handle<T> {
    key: CallKey,
    slot: Option<Arc<Slot<T>>>,
    /// The store the reports come from (`None`: detached), and where cancels go.
    route: Option<Arc<Route>>,
    /// Whether reports come (else the handle is detached).
    attached: bool,
    /// Whether the store keeps state for this call (to forget when the handle goes).
    keeps_state: bool,
}

impl<T: Send + 'static> Handle<T> {
    pub(crate) fn new(key: CallKey, slot: Arc<Slot<T>>, route: Arc<Route>, keeps_state: bool) -> Handle<T> {
        Handle { key, slot: Some(slot), route: Some(route), attached: true, keeps_state }
    }

    pub(crate) fn detached(key: CallKey, route: Option<Arc<Route>>) -> Handle<T> {
        Handle { key, slot: None, route, attached: false, keeps_state: false }
    }

    /// Cancels the call (see [`App::cancel`](crate::App::cancel)): if it has not started,
    /// it never will, and this handle gets a failure of kind
    /// [`Cancelled`](crate::TaskErrorKind::Cancelled) once a worker takes its message; if it
    /// runs, the task sees [`Context::is_cancelled`](crate::Context::is_cancelled) and
    /// decides (an `Err` it returns then is `Cancelled`, a value arrives as usual); if it
    /// finished, nothing changes.
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use std::time::Duration;
    /// use dingo_core::{App, CallOptions, Error, TaskErrorKind};
    ///
    /// let app = App::local()?;
    /// app.register("add", |(a, b): (i64, i64)| a + b)?;
    /// app.allocate("add", 1)?;
    /// let later = CallOptions::new().countdown(Duration::from_millis(200));
    /// let mut handle = app.call_with::<_, i64>("add", &later, (2i64, 3i64))?;
    /// handle.cancel()?;
    /// match handle.wait() {
    ///     Err(Error::Task(e)) => assert_eq!(e.kind(), TaskErrorKind::Cancelled),
    ///     other => panic!("{other:?}"),
    /// }
    /// # app.close()
    /// # }
    /// ```
    pub fn cancel(&self) -> Result<(), Error> {
        match &self.route {
            Some(route) => route.cancel(&self.key),
            None => Err(Error::MissingRole(crate::error::Role::Admin)),
        }
    }

    /// The call's id.
    pub fn id(&self) -> &TaskId {
        &self.key.id
    }

    /// The task's name.
    pub fn name(&self) -> &TaskName {
        &self.key.name
    }

    /// The call's identity.
    pub fn key(&self) -> &CallKey {
        &self.key
    }

    /// Whether the call was made with `ignore_report` (there is nothing to wait for).
    pub fn is_detached(&self) -> bool {
        self.slot.is_none()
    }

    /// Blocks until the task finishes and returns its value.
    pub fn wait(mut self) -> Result<T, Error> {
        self.wait_for(None)
    }

    /// Waits at most `timeout`. On [`Error::Timeout`] nothing is lost: wait again later.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<T, Error> {
        self.wait_for(Some(timeout))
    }

    /// The value if the task has finished, without blocking; `None` while it runs.
    pub fn try_get(&mut self) -> Option<Result<T, Error>> {
        let slot = match &self.slot {
            None => return Some(Err(Error::NoReport)),
            Some(slot) => slot,
        };
        let mut state = slot.lock();
        state.reports.clear();
        slot.take_outcome(&mut state)
    }

    /// Whether the final report has arrived.
    pub fn is_finished(&self) -> bool {
        self.slot.as_ref().is_some_and(|s| s.finished.load(Ordering::Acquire))
    }

    /// Calls `f` with the value once the task succeeds — at once if it already has. It runs
    /// on the thread that delivers the result (keep it short, and do not call this handle's
    /// methods from it) and does not take the value: `wait` still returns it. Never called
    /// if the task fails, or if the value was already taken by `wait`. A second `on_ok`
    /// replaces the first. Dropping the handle does not cancel the callback.
    pub fn on_ok(&self, f: impl FnOnce(&T) + Send + 'static) -> &Handle<T> {
        if let Some(slot) = &self.slot {
            let mut state = slot.lock();
            match slot.resolve(&mut state) {
                Some(Ok(value)) => f(value),
                Some(Err(_)) => {}
                None => state.on_ok = Some(Box::new(f)),
            }
        }
        self
    }

    /// Calls `f` with the error once the task fails — at once if it already has. Like
    /// [`on_ok`](Handle::on_ok), whatever the order the two are registered in and whatever
    /// reports came before.
    pub fn on_err(&self, f: impl FnOnce(&TaskError) + Send + 'static) -> &Handle<T> {
        if let Some(slot) = &self.slot {
            let mut state = slot.lock();
            match slot.resolve(&mut state) {
                Some(Err(error)) => f(error),
                Some(Ok(_)) => {}
                None => state.on_err = Some(Box::new(f)),
            }
        }
        self
    }

    /// The reports of the call, in order, ending with the final one (`Sent` and `Progress`
    /// appear only with `monitor_progress`), as an [`Iterator`] that blocks; see
    /// [`report_stream`](Handle::report_stream) for async code.
    pub fn reports(self) -> Reports<T> {
        Reports { handle: self, done: false }
    }

    /// The same reports as [`reports`](Handle::reports), as a [`Stream`]: nothing blocks,
    /// the delivering thread wakes the task (to relay progress over server-sent events, say).
    ///
    /// ```
    /// # fn main() -> Result<(), dingo_core::Error> {
    /// use dingo_core::{App, CallOptions, Report};
    /// use futures::StreamExt;
    ///
    /// let app = App::local()?;
    /// app.register("double", |n: i64| n * 2)?;
    /// app.allocate("double", 1)?;
    /// let opts = CallOptions::new().monitor_progress(true);
    /// let stream = app.call_with::<_, i64>("double", &opts, 21i64)?.report_stream();
    /// let reports: Vec<Report<i64>> = futures::executor::block_on(stream.collect());
    /// assert_eq!(reports.last(), Some(&Report::Success(42)));
    /// # app.close()
    /// # }
    /// ```
    pub fn report_stream(self) -> ReportStream<T> {
        ReportStream { handle: self, done: false }
    }

    /// The next report, waiting at most `timeout` (`None`: no limit). `Ok(None)` once the
    /// final report was returned.
    pub fn next_report(&mut self, timeout: Option<Duration>) -> Result<Option<Report<T>>, Error> {
        let Some(slot) = &self.slot else {
            return Err(Error::NoReport);
        };
        let deadline = timeout.and_then(deadline);
        let mut state = slot.lock();
        loop {
            if let Some(report) = state.reports.pop_front() {
                return Ok(Some(report));
            }
            match slot.take_outcome(&mut state) {
                Some(Ok(value)) => return Ok(Some(Report::Success(value))),
                Some(Err(Error::Task(error))) => return Ok(Some(Report::Failure(error))),
                Some(Err(Error::ResultTaken)) => return Ok(None),
                Some(Err(other)) => return Err(other),
                None => {}
            }
            state = slot.sleep(state, deadline).map_err(|()| Error::Timeout(timeout.unwrap_or_default()))?;
        }
    }

    fn wait_for(&mut self, timeout: Option<Duration>) -> Result<T, Error> {
        let deadline = timeout.and_then(deadline);
        let slot = self.slot.as_ref().ok_or(Error::NoReport)?;
        // Asked now, not at the call: whether this call is alone depends on the moment.
        if let Some(store) = self.store() {
            slot.spin_until_finished(store.wait_spin());
        }
        let mut state = slot.lock();
        loop {
            state.reports.clear();
            if let Some(outcome) = slot.take_outcome(&mut state) {
                return outcome;
            }
            state = slot.sleep(state, deadline).map_err(|()| Error::Timeout(timeout.unwrap_or_default()))?;
        }
    }
}

impl<T: Send + 'static> Handle<T> {
    /// Ready with the result once the final report arrived; until then the slot keeps the
    /// waker of the latest poll and the delivering thread wakes it.
    fn poll_outcome(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<T, Error>> {
        let Some(slot) = &self.slot else {
            return Poll::Ready(Err(Error::NoReport));
        };
        let mut state = slot.lock();
        state.reports.clear();
        match slot.take_outcome(&mut state) {
            Some(outcome) => Poll::Ready(outcome),
            None => {
                state.listen(cx.waker());
                Poll::Pending
            }
        }
    }
}

/// `handle.await`: the call's result.
impl<T: Send + 'static> IntoFuture for Handle<T> {
    type Output = Result<T, Error>;
    type IntoFuture = HandleFuture<T>;

    fn into_future(self) -> HandleFuture<T> {
        HandleFuture { handle: self }
    }
}

/// `(&mut handle).await`: the call's result, the handle kept (under a timeout, say: awaiting
/// it again still gets the result).
impl<'a, T: Send + 'static> IntoFuture for &'a mut Handle<T> {
    type Output = Result<T, Error>;
    type IntoFuture = HandleFutureMut<'a, T>;

    fn into_future(self) -> HandleFutureMut<'a, T> {
        HandleFutureMut { handle: self }
    }
}

/// The future of a call's result (`handle.await`, see [`Handle`]).
#[derive(Debug)]
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct HandleFuture<T> {
    handle: Handle<T>,
}

impl<T: Send + 'static> Future for HandleFuture<T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Result<T, Error>> {
        self.handle.poll_outcome(cx)
    }
}

/// The future of a call's result that leaves the handle with its owner
/// (`(&mut handle).await`, see [`Handle`]).
#[derive(Debug)]
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct HandleFutureMut<'a, T> {
    handle: &'a mut Handle<T>,
}

impl<T: Send + 'static> Future for HandleFutureMut<'_, T> {
    type Output = Result<T, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Result<T, Error>> {
        self.handle.poll_outcome(cx)
    }
}

impl<T> Handle<T> {
    fn store(&self) -> Option<&Arc<dyn Store>> {
        self.route.as_ref().filter(|_| self.attached).and_then(|route| route.store.as_ref())
    }
}

/// What a handle reaches beyond its slot: the app's store (to forget the call) and admin
/// role (to cancel it). One per app, shared by its handles.
pub(crate) struct Route {
    pub(crate) store: Option<Arc<dyn Store>>,
    pub(crate) admin: Option<Arc<dyn Admin>>,
    pub(crate) cancel_ttl: Duration,
}

impl Route {
    pub(crate) fn cancel(&self, key: &CallKey) -> Result<(), Error> {
        let admin = self.admin.as_ref().ok_or(Error::MissingRole(crate::error::Role::Admin))?;
        let until = std::time::SystemTime::now() + self.cancel_ttl;
        admin.cancel(key, until).map_err(|e| match e.kind() {
            crate::error::BrokerErrorKind::Closed => Error::Shutdown,
            _ => Error::Broker(e),
        })
    }
}

impl<T> Drop for Handle<T> {
    /// Tells the store to stop keeping reports for this call — unless a callback still waits
    /// for the result, which then arrives as if the handle were kept.
    fn drop(&mut self) {
        if let Some(store) = self.store().filter(|_| self.keeps_state) {
            let callbacks_pending = self.slot.as_ref().is_some_and(|slot| slot.callbacks_pending());
            if !callbacks_pending {
                store.forget(&self.key);
            }
        }
    }
}

impl<T> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("key", &self.key)
            .field("detached", &self.slot.is_none())
            .field("finished", &self.slot.as_ref().is_some_and(|s| s.finished.load(Ordering::Relaxed)))
            .finish()
    }
}

/// Iterator over the reports of one call (see [`Handle::reports`]).
#[derive(Debug)]
pub struct Reports<T> {
    handle: Handle<T>,
    done: bool,
}

impl<T: Send + 'static> Iterator for Reports<T> {
    type Item = Report<T>;

    fn next(&mut self) -> Option<Report<T>> {
        if self.done {
            return None;
        }
        match self.handle.next_report(None) {
            Ok(Some(report)) => {
                self.done = report.is_final();
                Some(report)
            }
            Ok(None) | Err(_) => {
                self.done = true;
                None
            }
        }
    }
}

/// The reports of one call as a [`Stream`] (see [`Handle::report_stream`]).
#[derive(Debug)]
#[must_use = "a stream does nothing unless polled"]
pub struct ReportStream<T> {
    handle: Handle<T>,
    done: bool,
}

impl<T: Send + 'static> ReportStream<T> {
    /// The call's identity.
    pub fn key(&self) -> &CallKey {
        self.handle.key()
    }

    /// Cancels the call (see [`Handle::cancel`]); the stream then ends with its failure.
    /// A round trip to the broker on a remote one: from async code, off the executor.
    pub fn cancel(&self) -> Result<(), Error> {
        self.handle.cancel()
    }
}

impl<T: Send + 'static> Stream for ReportStream<T> {
    type Item = Report<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Option<Report<T>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let Some(slot) = self.handle.slot.clone() else {
            self.done = true;
            return Poll::Ready(None);
        };
        let mut state = slot.lock();
        let report = match state.reports.pop_front() {
            Some(report) => Some(report),
            None => match slot.take_outcome(&mut state) {
                Some(Ok(value)) => Some(Report::Success(value)),
                Some(Err(Error::Task(error))) => Some(Report::Failure(error)),
                Some(Err(_)) => None,
                None => {
                    state.listen(cx.waker());
                    return Poll::Pending;
                }
            },
        };
        drop(state);
        self.done = report.as_ref().is_none_or(Report::is_final);
        Poll::Ready(report)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done { (0, Some(0)) } else { (1, None) }
    }
}

type OnOk<T> = Box<dyn FnOnce(&T) + Send>;
type OnErr = Box<dyn FnOnce(&TaskError) + Send>;

/// The shared state of one call: written by the report transport, read by the handle.
pub(crate) struct Slot<T> {
    finished: AtomicBool,
    state: Mutex<State<T>>,
    wake: Condvar,
    codecs: Arc<Codecs>,
    decode: DecodeFn<T>,
}

struct State<T> {
    reports: VecDeque<Report<T>>,
    outcome: Outcome<T>,
    waiting: bool,
    /// The task of the last poll that found nothing (a future or a stream).
    waker: Option<Waker>,
    on_ok: Option<OnOk<T>>,
    on_err: Option<OnErr>,
}

impl<T> State<T> {
    /// Keeps `waker` to be woken by the next delivery (a poll from another task replaces it).
    fn listen(&mut self, waker: &Waker) {
        match &mut self.waker {
            Some(kept) if kept.will_wake(waker) => {}
            kept => *kept = Some(waker.clone()),
        }
    }

    /// Wakes the task that polled last, if any.
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

enum Outcome<T> {
    Pending,
    /// Arrived, not decoded yet (decoding happens on the caller's thread).
    Raw(Encoded),
    Ready(Result<T, TaskError>),
    Taken,
}

impl<T> Slot<T> {
    fn callbacks_pending(&self) -> bool {
        if self.finished.load(Ordering::Acquire) {
            return false;
        }
        let state = lock(&self.state);
        state.on_ok.is_some() || state.on_err.is_some()
    }
}

impl<T: Send + 'static> Slot<T> {
    pub(crate) fn new(codecs: Arc<Codecs>, decode: DecodeFn<T>) -> Slot<T> {
        Slot {
            finished: AtomicBool::new(false),
            state: Mutex::new(State {
                reports: VecDeque::new(),
                outcome: Outcome::Pending,
                waiting: false,
                waker: None,
                on_ok: None,
                on_err: None,
            }),
            wake: Condvar::new(),
            codecs,
            decode,
        }
    }

    // A panicking callback can poison the lock; the state itself is still consistent.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        lock(&self.state)
    }

    /// Polls for the final report for up to `budget` (what the store advises).
    fn spin_until_finished(&self, budget: Duration) {
        crate::spin::spin(budget, || self.finished.load(Ordering::Acquire).then_some(()));
    }

    /// Sleeps until something is delivered; `Err` when the deadline passed.
    fn sleep<'a>(
        &'a self,
        mut state: MutexGuard<'a, State<T>>,
        deadline: Option<Instant>,
    ) -> Result<MutexGuard<'a, State<T>>, ()> {
        state.waiting = true;
        let mut state = match deadline {
            None => wait(&self.wake, state),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    state.waiting = false;
                    return Err(());
                }
                wait_timeout(&self.wake, state, left)
            }
        };
        state.waiting = false;
        Ok(state)
    }

    /// Decodes a raw outcome in place and returns a view of the final result, if any.
    fn resolve<'s>(&self, state: &'s mut State<T>) -> Option<Result<&'s T, &'s TaskError>> {
        if let Outcome::Raw(_) = &state.outcome {
            let Outcome::Raw(payload) = std::mem::replace(&mut state.outcome, Outcome::Pending) else {
                return None;
            };
            state.outcome = Outcome::Ready((self.decode)(payload, &self.codecs));
        }
        match &state.outcome {
            Outcome::Ready(Ok(v)) => Some(Ok(v)),
            Outcome::Ready(Err(e)) => Some(Err(e)),
            Outcome::Pending | Outcome::Raw(_) | Outcome::Taken => None,
        }
    }

    /// Moves the final result out, if it has arrived.
    fn take_outcome(&self, state: &mut State<T>) -> Option<Result<T, Error>> {
        match std::mem::replace(&mut state.outcome, Outcome::Taken) {
            Outcome::Pending => {
                state.outcome = Outcome::Pending;
                None
            }
            Outcome::Raw(payload) => Some((self.decode)(payload, &self.codecs).map_err(Error::Task)),
            Outcome::Ready(result) => Some(result.map_err(Error::Task)),
            Outcome::Taken => Some(Err(Error::ResultTaken)),
        }
    }

    /// Records the final outcome, wakes waiters, then runs the callbacks (a panicking
    /// callback is caught: it must not take the delivering thread down with it).
    fn finish(&self, state: &mut State<T>, outcome: Outcome<T>) {
        state.outcome = outcome;
        self.finished.store(true, Ordering::Release);
        if state.waiting {
            self.wake.notify_all();
        }
        state.wake();
        if state.on_ok.is_none() && state.on_err.is_none() {
            return;
        }
        let (on_ok, on_err) = (state.on_ok.take(), state.on_err.take());
        let ran = catch_unwind(AssertUnwindSafe(|| match self.resolve(state) {
            Some(Ok(value)) => on_ok.map(|f| f(value)),
            Some(Err(error)) => on_err.map(|f| f(error)),
            None => None,
        }));
        if ran.is_err() {
            tracing::error!(target: "dingo", "an on_ok / on_err callback panicked");
        }
    }
}

impl<T: Send + 'static> ReportSink for Slot<T> {
    fn deliver(&self, body: ReportBody<'_>) {
        let mut state = self.lock();
        if !matches!(state.outcome, Outcome::Pending) {
            return; // a final report already arrived: ignore duplicates
        }
        if !body.is_final() && state.reports.len() >= MAX_PENDING_REPORTS {
            state.reports.pop_front();
        }
        match body {
            ReportBody::Sent => state.reports.push_back(Report::Sent),
            ReportBody::Progress(value) => {
                state.reports.push_back(Report::Progress(Progress::new(value, Codecs::clone(&self.codecs))))
            }
            ReportBody::Success(Value::Encoded(encoded)) => self.finish(&mut state, Outcome::Raw(encoded)),
            // Moved straight out of the worker's hands: no allocation, no serialization.
            ReportBody::Success(Value::Local(value)) => {
                let outcome = match value.downcast_mut::<Option<T>>().and_then(Option::take) {
                    Some(value) => Ok(value),
                    None => Err(TaskError::new(
                        TaskErrorKind::SignatureMismatch,
                        format!("the result is not a `{}`", std::any::type_name::<T>()),
                    )),
                };
                self.finish(&mut state, Outcome::Ready(outcome))
            }
            ReportBody::Failure(mut error) => {
                error.set_codecs(Codecs::clone(&self.codecs));
                self.finish(&mut state, Outcome::Ready(Err(error)))
            }
            ReportBody::Retrying { attempt, after, mut error } => {
                error.set_codecs(Codecs::clone(&self.codecs));
                state.reports.push_back(Report::Retrying { attempt, after, error })
            }
        }
        if !self.finished.load(Ordering::Relaxed) {
            if state.waiting {
                self.wake.notify_all();
            }
            state.wake();
        }
    }

    fn disconnect(&self) {
        if self.finished.load(Ordering::Acquire) {
            return; // the usual case: the final report came first
        }
        let mut state = self.lock();
        if matches!(state.outcome, Outcome::Pending) {
            let error = TaskError::new(TaskErrorKind::Shutdown, "the task was dropped before it reported (shutdown)");
            self.finish(&mut state, Outcome::Ready(Err(error)));
        }
    }
}

/// Decodes an encoded result into `T`.
pub(crate) fn decode_value<T: serde::de::DeserializeOwned + 'static>(
    encoded: Encoded,
    codecs: &Codecs,
) -> Result<T, TaskError> {
    codecs.decode(&encoded).map_err(|e| {
        TaskError::new(
            TaskErrorKind::BadPayload,
            format!("the result does not decode as `{}`: {}", std::any::type_name::<T>(), crate::error::chain(&e)),
        )
    })
}

/// Keeps an encoded result as bytes (for untyped calls).
pub(crate) fn decode_raw(encoded: Encoded, _codecs: &Codecs) -> Result<Encoded, TaskError> {
    Ok(encoded)
}
