//! The machinery every broker is built from: its life (the apps that use it, its shutdown),
//! the threads it owns, the components it starts on first use, its counters, and a lock that
//! survives a panicking holder.
//!
//! A broker shares one `Inner` between its clones and its threads. The pattern the brokers
//! of this workspace follow:
//!
//! ```
//! use std::sync::Arc;
//! use dingo_core::broker::kit::{Lifecycle, Shutdown, ShutdownOnDrop};
//! use dingo_core::event::{EventSink, EventSinks};
//!
//! struct Inner {
//!     life: Lifecycle,
//!     // … connections, threads (each a `Thread`, or a `Lazy` one started on first use)
//! }
//!
//! impl Shutdown for Inner {
//!     fn shutdown(&self) {
//!         if !self.life.close() {
//!             return; // someone else is shutting it down
//!         }
//!         // stop the threads, fail what waits …
//!     }
//! }
//!
//! #[derive(Clone)]
//! struct MyBroker {
//!     inner: Arc<Inner>,
//!     // The last clone to go shuts the broker down; its threads hold `inner`, not this.
//!     _last: Arc<ShutdownOnDrop<Inner>>,
//! }
//!
//! let events = EventSinks::new();
//! let inner = Arc::new(Inner { life: Lifecycle::new("my broker", events) });
//! let broker = MyBroker { _last: ShutdownOnDrop::new(inner.clone()), inner };
//! // What a role trait's `attach` and `close` do (`Producer::attach`, `Producer::close`, …):
//! let app_events = EventSink::new();
//! broker.inner.life.attach(&app_events);
//! assert!(broker.inner.life.check_open().is_ok());
//! broker.inner.life.release(&*broker.inner); // the last app: shuts it down
//! let error = broker.inner.life.check_open().unwrap_err();
//! assert_eq!(error.to_string(), "my broker is shut down");
//! ```

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::error::{BrokerError, BrokerErrorKind};
use crate::event::{EventSink, EventSinks};

/// Locks `mutex`, using the data even if a holder panicked.
///
/// For data that stays consistent across a panic (single inserts, removals, swaps): a
/// poisoned lock would otherwise take every later caller down with the first.
#[inline]
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads `lock`, even if a writer panicked (see [`lock`]).
#[inline]
pub fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// Writes `lock`, even if a writer panicked (see [`lock`]).
#[inline]
pub fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `condvar` with `guard` (see [`lock`]: a panicked holder does not matter).
#[inline]
pub fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits on `condvar` with `guard` for at most `timeout` (see [`wait`]).
#[inline]
pub fn wait_timeout<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
    condvar.wait_timeout(guard, timeout).unwrap_or_else(|e| e.into_inner()).0
}

/// A broker's life: the apps that use it (and get its events), and whether it has shut down.
///
/// A broker that several apps share shuts down when the last of them closes (see
/// [`Store::close`](crate::broker::Store::close)), or when its owner shuts it down. Each
/// role a broker plays for an app attaches and releases it once: the role traits' `attach`
/// call [`attach`](Lifecycle::attach), their `close` call [`release`](Lifecycle::release).
#[derive(Debug)]
pub struct Lifecycle {
    /// What the broker is called in errors ("the redis broker").
    name: &'static str,
    /// Where the broker's events go: the sinks of the apps that attached it.
    events: EventSinks,
    users: AtomicUsize,
    /// Raised when the broker shuts down.
    closed: Signal,
}

impl Lifecycle {
    /// A broker in use by no app yet, open; `name` is how errors call it ("the redis
    /// broker"); `events` are the broker's sinks, which every app that attaches joins.
    pub fn new(name: &'static str, events: EventSinks) -> Lifecycle {
        Lifecycle { name, events, users: AtomicUsize::new(0), closed: Signal::new() }
    }

    /// An app attached the broker, in one of its roles: counted, and its sink gets the
    /// broker's events.
    pub fn attach(&self, app_events: &EventSink) {
        self.users.fetch_add(1, Ordering::AcqRel);
        self.events.add(app_events);
    }

    /// An app let the broker go, in one of its roles; `true` when that was the last use (time
    /// to shut down).
    pub fn detach(&self) -> bool {
        let previous =
            self.users.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1))).unwrap_or(0);
        previous <= 1
    }

    /// [`detach`](Lifecycle::detach)es, and shuts `broker` down if that was the last use.
    pub fn release(&self, broker: &impl Shutdown) {
        if self.detach() {
            broker.shutdown();
        }
    }

    /// Marks the broker shut down; `true` for the one caller that did it (and now stops its
    /// threads), `false` if it already was.
    pub fn close(&self) -> bool {
        self.closed.raise()
    }

    /// Whether the broker has shut down (a `SeqCst` read: a sender that checks after
    /// enqueueing and a shutdown that drains after closing cannot both miss each other).
    #[inline]
    pub fn is_closed(&self) -> bool {
        self.closed.flag().load(Ordering::SeqCst)
    }

    /// Never receives; disconnects when the broker shuts down (to wake whoever waits in a
    /// `select!`).
    pub fn closing(&self) -> &Receiver<()> {
        self.closed.receiver()
    }

    /// `Ok` while the broker is open, else the [`closed_error`](Lifecycle::closed_error).
    #[inline]
    pub fn check_open(&self) -> Result<(), BrokerError> {
        if self.is_closed() { Err(self.closed_error()) } else { Ok(()) }
    }

    /// The error of an operation on a broker that has shut down
    /// ([`BrokerErrorKind::Closed`]).
    #[cold]
    pub fn closed_error(&self) -> BrokerError {
        closed(self.name)
    }
}

/// The error of an operation on `broker` ("the redis broker") after it shut down
/// ([`BrokerErrorKind::Closed`]), for parts of a broker that do not hold its [`Lifecycle`].
///
/// ```
/// use dingo_core::BrokerErrorKind;
///
/// let error = dingo_core::broker::kit::closed("my broker");
/// assert_eq!((error.kind(), error.to_string().as_str()), (BrokerErrorKind::Closed, "my broker is shut down"));
/// ```
pub fn closed(broker: &str) -> BrokerError {
    BrokerError::new(BrokerErrorKind::Closed, format!("{broker} is shut down"))
}

/// What a broker does when its last handle goes (see [`ShutdownOnDrop`]).
pub trait Shutdown: Send + Sync + 'static {
    /// Finishes queued work, stops the broker's threads and fails what still waits. Called
    /// more than once, it does that once.
    fn shutdown(&self);
}

/// Shuts `T` down when dropped: a broker's clones share one in an `Arc`, so the last clone
/// to go shuts the broker down (its threads hold the `Arc<T>` itself, which a cycle would
/// keep alive forever).
pub struct ShutdownOnDrop<T: Shutdown>(Arc<T>);

impl<T: Shutdown> ShutdownOnDrop<T> {
    /// The guard of `inner`, to share between a broker's clones.
    pub fn new(inner: Arc<T>) -> Arc<ShutdownOnDrop<T>> {
        Arc::new(ShutdownOnDrop(inner))
    }
}

impl<T: Shutdown> Drop for ShutdownOnDrop<T> {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl<T: Shutdown> fmt::Debug for ShutdownOnDrop<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShutdownOnDrop")
    }
}

/// A named thread with a way to be told to stop, and an owner that joins it.
///
/// ```
/// use std::time::Duration;
/// use dingo_core::broker::kit::Thread;
///
/// let thread = Thread::spawn("my-broker-poll", |stop| {
///     while !stop.is_set() {
///         // Sleeps until the next round, or until told to stop.
///         let _ = stop.signal.recv_timeout(Duration::from_secs(60));
///     }
/// })
/// .unwrap();
/// thread.stop_and_join(); // at once: the signal wakes it
/// ```
pub struct Thread {
    signal: Signal,
    handle: Mutex<Option<JoinHandle<()>>>,
}

/// A stop many can wait on: a flag, and a channel that disconnects when it is raised (so a
/// `select!` or a `recv_timeout` on [`receiver`](Signal::receiver) wakes at once). A
/// [`Thread`]'s stop, a subscription's (every worker blocked in `recv` wakes), a broker's
/// shutdown.
///
/// ```
/// use dingo_core::broker::kit::Signal;
///
/// let stop = Signal::new();
/// assert!(!stop.is_raised());
/// stop.raise();
/// assert!(stop.is_raised() && stop.receiver().recv().is_err(), "raised: waits end at once");
/// ```
pub struct Signal {
    flag: Arc<AtomicBool>,
    /// Dropped when raised: disconnects `waits`.
    raise: Mutex<Option<Sender<()>>>,
    waits: Receiver<()>,
}

impl Signal {
    /// A signal not raised yet.
    pub fn new() -> Signal {
        let (raise, waits) = crossbeam_channel::bounded(0);
        Signal { flag: Arc::new(AtomicBool::new(false)), raise: Mutex::new(Some(raise)), waits }
    }

    /// Raises it (for good): the flag is set, then every wait on the receiver ends. `true`
    /// for the call that raised it, `false` if it already was.
    pub fn raise(&self) -> bool {
        let first = !self.flag.swap(true, Ordering::SeqCst);
        drop(lock(&self.raise).take());
        first
    }

    /// Whether it was raised.
    #[inline]
    pub fn is_raised(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// The flag, for loops and retries that take one.
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// Never receives; disconnects when the signal is raised.
    pub fn receiver(&self) -> &Receiver<()> {
        &self.waits
    }

    /// A [`Stop`] that follows this signal, to hand to a thread.
    pub fn stop(&self) -> Stop {
        Stop { flag: self.flag.clone(), signal: self.waits.clone() }
    }
}

impl Default for Signal {
    fn default() -> Signal {
        Signal::new()
    }
}

impl fmt::Debug for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signal").field("raised", &self.is_raised()).finish()
    }
}

/// What a [`Thread`] is told to stop by: a flag, and a channel that disconnects (its
/// [`Signal`]'s, shared).
#[derive(Debug)]
pub struct Stop {
    /// Set when the thread is to stop (shared with loops and retries that take a flag).
    pub flag: Arc<AtomicBool>,
    /// Never sends; disconnects when the thread is to stop, so a `select!` or
    /// `recv_timeout` on it wakes at once.
    pub signal: Receiver<()>,
}

impl Stop {
    /// Whether the thread is to stop.
    #[inline]
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Thread {
    /// Starts `run` on a thread called `name`; failing to start one is an error.
    pub fn spawn(name: &str, run: impl FnOnce(Stop) + Send + 'static) -> Result<Thread, BrokerError> {
        let signal = Signal::new();
        let stop = signal.stop();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(stop))
            .map_err(|e| BrokerError::with_source(BrokerErrorKind::Other, format!("cannot start thread {name}"), e))?;
        Ok(Thread { signal, handle: Mutex::new(Some(handle)) })
    }

    /// Tells the thread to stop and waits for it (never for the calling thread itself).
    pub fn stop_and_join(&self) {
        self.stop_and_join_with(|| {});
    }

    /// Like [`stop_and_join`](Thread::stop_and_join), calling `wake` once told (to interrupt
    /// a blocking wait the stop signal cannot reach, such as a blocking read on a socket).
    pub fn stop_and_join_with(&self, wake: impl FnOnce()) {
        self.signal.raise();
        wake();
        if let Some(handle) = lock(&self.handle).take()
            && handle.thread().id() != std::thread::current().id()
        {
            let _ = handle.join();
        }
    }
}

impl fmt::Debug for Thread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = lock(&self.handle).as_ref().and_then(|h| h.thread().name().map(str::to_owned));
        f.debug_struct("Thread").field("name", &name).field("stopping", &self.signal.is_raised()).finish()
    }
}

/// A background component (a thread and its channels) started on first use; failing to
/// start is an error, not a panic, and two threads asking at once start it once.
pub struct Lazy<T> {
    cell: OnceLock<T>,
    starting: Mutex<()>,
}

impl<T> Lazy<T> {
    /// Not started yet.
    pub const fn new() -> Lazy<T> {
        Lazy { cell: OnceLock::new(), starting: Mutex::new(()) }
    }

    /// The component, started by `start` if it is not running yet.
    pub fn get_or_start(&self, start: impl FnOnce() -> Result<T, BrokerError>) -> Result<&T, BrokerError> {
        if let Some(started) = self.cell.get() {
            return Ok(started);
        }
        // Held only while starting; a panic in `start` leaves nothing half-set.
        let _starting = lock(&self.starting);
        if self.cell.get().is_none() {
            let _ = self.cell.set(start()?);
        }
        self.cell.get().ok_or_else(|| BrokerError::new(BrokerErrorKind::Other, "a broker component did not start"))
    }

    /// The component, if it was started.
    pub fn get(&self) -> Option<&T> {
        self.cell.get()
    }
}

impl<T> Default for Lazy<T> {
    fn default() -> Lazy<T> {
        Lazy::new()
    }
}

impl<T> fmt::Debug for Lazy<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.cell.get().is_some() { "Lazy(started)" } else { "Lazy(not started)" })
    }
}

/// Declares a broker's counters twice from one list: `$stats`, the public snapshot (plain
/// `u64` fields, `#[non_exhaustive]`, so a broker can count more without breaking anyone),
/// and `$counters`, the crate's atomics the broker's threads add to, with
/// `snapshot()`.
///
/// ```
/// use std::sync::atomic::Ordering;
///
/// dingo_core::counters! {
///     /// What my broker did.
///     pub struct Stats / Counters {
///         /// Messages sent.
///         sent,
///         /// Messages received.
///         received,
///     }
/// }
///
/// let counters = Counters::default();
/// counters.sent.fetch_add(2, Ordering::Relaxed);
/// let stats: Stats = counters.snapshot();
/// assert_eq!((stats.sent, stats.received), (2, 0));
/// ```
#[macro_export]
macro_rules! counters {
    (
        $(#[$meta:meta])*
        $vis:vis struct $stats:ident / $counters:ident {
            $( $(#[$field_meta:meta])* $field:ident ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        ///
        /// A snapshot: each counter read once, with no lock (counters read at slightly
        /// different moments).
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        $vis struct $stats {
            $( $(#[$field_meta])* pub $field: u64, )*
        }

        /// The atomic counters behind the snapshot, added to by the broker's threads.
        #[derive(Debug, Default)]
        pub(crate) struct $counters {
            $( pub(crate) $field: ::std::sync::atomic::AtomicU64, )*
        }

        impl $counters {
            /// What the counters say now.
            pub(crate) fn snapshot(&self) -> $stats {
                $stats { $( $field: self.$field.load(::std::sync::atomic::Ordering::Relaxed), )* }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_starts_once_and_reports_failure() {
        let lazy: Lazy<u32> = Lazy::new();
        assert!(lazy.get().is_none());
        let failed = lazy.get_or_start(|| Err(BrokerError::new(BrokerErrorKind::Connection, "down")));
        assert_eq!(failed.expect_err("failed").kind(), BrokerErrorKind::Connection);
        assert_eq!(*lazy.get_or_start(|| Ok(7)).expect("started"), 7);
        assert_eq!(*lazy.get_or_start(|| Ok(8)).expect("already started"), 7);
    }

    #[test]
    fn the_last_of_several_users_is_told_so() {
        let life = Lifecycle::new("the test broker", EventSinks::new());
        let app = EventSink::new();
        life.attach(&app);
        life.attach(&app);
        assert!(!life.detach());
        assert!(life.detach());
        // More detaches than attaches (an app closing twice) still say "last".
        assert!(life.detach());
    }

    #[test]
    fn closing_happens_once_and_refuses_afterwards() {
        let life = Lifecycle::new("the test broker", EventSinks::new());
        assert!(life.check_open().is_ok());
        assert!(life.close());
        assert!(!life.close());
        let error = life.check_open().unwrap_err();
        assert_eq!(error.kind(), BrokerErrorKind::Closed);
        assert_eq!(error.to_string(), "the test broker is shut down");
    }

    #[test]
    fn a_stopped_thread_is_woken_and_joined() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = Thread::spawn("kit-test", move |stop| {
            let _ = stop.signal.recv();
            tx.send(stop.is_set()).unwrap();
        })
        .unwrap();
        thread.stop_and_join();
        assert_eq!(rx.try_recv(), Ok(true), "the thread saw the flag set and had finished when joined");
        thread.stop_and_join(); // twice is harmless
    }

    #[test]
    fn a_thread_stopping_itself_does_not_join_itself() {
        let slot: Arc<Mutex<Option<Arc<Thread>>>> = Arc::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        let inside = slot.clone();
        let thread = Arc::new(
            Thread::spawn("kit-self-stop", move |_| {
                let me = loop {
                    if let Some(me) = lock(&inside).clone() {
                        break me;
                    }
                    std::thread::yield_now();
                };
                me.stop_and_join();
                tx.send(()).unwrap();
            })
            .unwrap(),
        );
        *lock(&slot) = Some(thread.clone());
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the thread went on after stopping itself");
        thread.stop_and_join();
    }
}
