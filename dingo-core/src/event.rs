//! Events: what happens inside an app that no call returns — a task that panicked, a message
//! that could not be decoded, a broker that reconnected.
//!
//! Subscribe with [`App::events`](crate::App::events) and an [`EventFilter`]. Every
//! subscriber has a bounded queue; when it is full the event is dropped for that subscriber
//! and counted ([`Events::dropped`]) — a slow subscriber never blocks a worker. Every event
//! is also a `tracing` record (target `dingo`).

use std::fmt;
use std::ops::BitOr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::broker::kit::{lock, read, write};
use crate::id::CallKey;

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Detail for debugging.
    Debug,
    /// Normal operation worth knowing (started, reconnected).
    Info,
    /// Something failed but dingo handled it (a task panicked, a message was dead-lettered).
    Warning,
    /// Something failed that needs attention.
    Error,
}

/// The part of dingo an event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Origin {
    /// The app itself (start, close, configuration).
    App,
    /// A worker thread running tasks.
    Worker,
    /// The caller side of the task transport.
    Producer,
    /// The worker side of the task transport.
    Consumer,
    /// The worker side of the report transport.
    Reporter,
    /// The caller side of the report transport.
    Store,
}

impl Origin {
    fn bit(self) -> u16 {
        match self {
            Origin::App => 1,
            Origin::Worker => 2,
            Origin::Producer => 4,
            Origin::Consumer => 8,
            Origin::Reporter => 16,
            Origin::Store => 32,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A set of [`Origin`]s, combined with `|`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origins(u16);

impl Origins {
    /// Every origin.
    pub const ALL: Origins = Origins(u16::MAX);
    /// No origin.
    pub const NONE: Origins = Origins(0);

    /// Whether `origin` is in the set.
    pub fn contains(self, origin: Origin) -> bool {
        self.0 & origin.bit() != 0
    }
}

impl From<Origin> for Origins {
    fn from(origin: Origin) -> Origins {
        Origins(origin.bit())
    }
}

impl<T: Into<Origins>> BitOr<T> for Origin {
    type Output = Origins;
    fn bitor(self, rhs: T) -> Origins {
        Origins(self.bit() | rhs.into().0)
    }
}

impl<T: Into<Origins>> BitOr<T> for Origins {
    type Output = Origins;
    fn bitor(self, rhs: T) -> Origins {
        Origins(self.0 | rhs.into().0)
    }
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// A task panicked (its caller got a `Panic` failure).
    TaskPanicked,
    /// A task's arguments could not be decoded (its caller got a `BadPayload` failure).
    BadPayload,
    /// A task message named a task nobody serves.
    UnknownTask,
    /// A task message's signature fingerprint differs from the worker's.
    SignatureMismatch,
    /// A message could not be decoded at all.
    MalformedMessage,
    /// A message was moved to the dead letters: every broker emits one per dead letter,
    /// whatever the cause (a cause with a kind of its own — [`MalformedMessage`],
    /// [`TooLarge`], [`BadPayload`] — has that event too).
    ///
    /// [`MalformedMessage`]: EventKind::MalformedMessage
    /// [`TooLarge`]: EventKind::TooLarge
    /// [`BadPayload`]: EventKind::BadPayload
    DeadLettered,
    /// Dead letters were dropped, oldest first, to keep a dead-letter queue within its
    /// bounds (count and bytes).
    DeadLettersDropped,
    /// A received message was over the size limit (`max_message_size`): not decoded; a task
    /// message is dead-lettered, a report dropped.
    TooLarge,
    /// A task's result could not be encoded.
    EncodeFailed,
    /// A report could not be published.
    ReportFailed,
    /// A report arrived that no caller waits for.
    UnclaimedReport,
    /// A delivery could not be acknowledged.
    AckFailed,
    /// A task message could not be received.
    ReceiveFailed,
    /// A connection to a broker was lost.
    ConnectionLost,
    /// A connection to a broker was restored.
    ConnectionRestored,
    /// A TLS connection to a broker was opened without verifying the server's certificate
    /// and host name (a Redis URL's `#insecure`): anyone on the path can read and change
    /// what it carries. A warning, on every such connection.
    TlsUnverified,
    /// A worker thread caught a panic outside any task (in reporting or acknowledging) and
    /// went on.
    WorkerRecovered,
    /// A worker's lease on its tasks expired before it was renewed (its process stalled
    /// longer than the lease): its tasks went to other workers, and its late reports are
    /// rejected.
    LeaseLost,
    /// Tasks taken by a worker that died, stalled or stopped before finishing them went back
    /// to their queue, to run again.
    Redelivered,
    /// A worker's settlements (final reports, acknowledgements) could not be stored: its
    /// tasks run again once its lease expires.
    SettlementsLost,
    /// At-most-once messages were on their way when a connection broke: they may or may not
    /// have arrived, and are not sent twice.
    InDoubt,
    /// Task messages could not be sent (their callers got a failure).
    SendFailed,
    /// Messages were still unconfirmed by the broker when it shut down (their callers got a
    /// failure).
    UnconfirmedAtShutdown,
    /// The broker blocks publishing on a connection (a resource alarm): messages wait.
    ConnectionBlocked,
    /// The broker publishes on a blocked connection again.
    ConnectionUnblocked,
    /// A worker pool whose threads all stayed busy handed its prefetched tasks back to their
    /// queues for other workers, and takes more once a thread is free.
    PoolPaused,
    /// A call was not run because its expiry passed before a worker started it (its caller
    /// got an `Expired` failure).
    TaskExpired,
    /// A call failed and will run again after its backoff (a retry was scheduled).
    TaskRetrying,
    /// A retry could not be scheduled (the broker refused the new attempt): the delivery was
    /// not settled, so the attempt runs again once the broker gives it back.
    RetryFailed,
    /// A call was not run because it was cancelled before a worker started it (its caller
    /// got a `Cancelled` failure).
    TaskCancelled,
    /// A task ran past its hard time limit: its call failed with `TimeLimit`, its worker
    /// thread was written off and replaced.
    TimeLimitExceeded,
    /// Workers or the app started.
    Started,
    /// Workers or the app stopped.
    Stopped,
    /// Anything else.
    Other,
}

impl EventKind {
    fn bit(self) -> u64 {
        1 << (self as u32)
    }
}

// Every kind has a bit of `EventFilter::kinds` (`Other` stays the last variant).
const _: () = assert!((EventKind::Other as u32) < u64::BITS);

/// One thing that happened (made with [`Event::new`]; fields may be added).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event {
    /// Where it happened.
    pub origin: Origin,
    /// How serious it is.
    pub level: Level,
    /// What it is about.
    pub kind: EventKind,
    /// A description.
    pub message: String,
    /// The call it concerns, if any.
    pub task: Option<CallKey>,
    /// When it happened.
    pub time: SystemTime,
}

impl Event {
    /// A new event, stamped now.
    pub fn new(origin: Origin, level: Level, kind: EventKind, message: impl Into<String>) -> Event {
        Event { origin, level, kind, message: message.into(), task: None, time: SystemTime::now() }
    }

    /// The same event about one call.
    #[must_use]
    pub fn with_task(mut self, task: CallKey) -> Event {
        self.task = Some(task);
        self
    }
}

/// Which events a subscriber gets, and how many may queue up.
///
/// ```
/// use dingo_core::{EventFilter, EventKind, Level, Origin};
///
/// // Every dead letter and every failed send, whatever their level.
/// let losses = EventFilter::new().level(Level::Debug).kinds([EventKind::DeadLettered, EventKind::SendFailed]);
/// // Warnings and errors of the worker side.
/// let workers = EventFilter::new().origins(Origin::Worker | Origin::Consumer).level(Level::Warning);
/// # let _ = (losses, workers);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an event filter does nothing until it is passed to `App::events`"]
pub struct EventFilter {
    origins: Origins,
    level: Level,
    /// A bit per [`EventKind`].
    kinds: u64,
    capacity: usize,
}

impl EventFilter {
    /// Every origin, level [`Level::Info`] and above, 1024 queued events.
    pub fn new() -> EventFilter {
        EventFilter { origins: Origins::ALL, level: Level::Info, kinds: u64::MAX, capacity: 1024 }
    }

    /// Only events from these origins.
    pub fn origins(mut self, origins: impl Into<Origins>) -> EventFilter {
        self.origins = origins.into();
        self
    }

    /// Only events at this level or above.
    pub fn level(mut self, level: Level) -> EventFilter {
        self.level = level;
        self
    }

    /// Only events of these kinds (default: every kind).
    pub fn kinds(mut self, kinds: impl IntoIterator<Item = EventKind>) -> EventFilter {
        self.kinds = kinds.into_iter().fold(0, |bits, kind| bits | kind.bit());
        self
    }

    /// How many events may wait in the subscriber's queue (at least 1).
    pub fn capacity(mut self, capacity: usize) -> EventFilter {
        self.capacity = capacity.max(1);
        self
    }

    fn accepts(&self, event: &Event) -> bool {
        event.level >= self.level && self.origins.contains(event.origin) && self.kinds & event.kind.bit() != 0
    }
}

impl Default for EventFilter {
    fn default() -> EventFilter {
        EventFilter::new()
    }
}

/// A subscription to an app's events. The iterator ends when the app is closed.
#[derive(Debug)]
pub struct Events {
    rx: Receiver<Event>,
    dropped: Arc<AtomicU64>,
    alive: Arc<AtomicBool>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
    }
}

impl Events {
    /// Blocks for the next event; `None` once the app is closed and the queue is empty.
    pub fn recv(&self) -> Option<Event> {
        self.rx.recv().ok()
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Option<Event> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for the next event.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// How many events were dropped because this subscriber's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Iterates until the app is closed.
    pub fn iter(&self) -> impl Iterator<Item = Event> + '_ {
        self.rx.iter()
    }
}

struct Subscriber {
    filter: EventFilter,
    tx: Sender<Event>,
    dropped: Arc<AtomicU64>,
    alive: Arc<AtomicBool>,
}

#[derive(Default)]
struct Bus {
    subscribers: RwLock<Vec<Subscriber>>,
    closed: AtomicBool,
}

/// Where events are emitted: a cheap handle to one app's subscribers.
#[derive(Clone, Default)]
pub struct EventSink {
    bus: Arc<Bus>,
}

impl EventSink {
    /// A sink with no subscriber yet.
    pub fn new() -> EventSink {
        EventSink::default()
    }

    /// Adds a subscriber (after [`close`](EventSink::close), one that ends at once).
    pub fn subscribe(&self, filter: EventFilter) -> Events {
        let (tx, rx) = crossbeam_channel::bounded(filter.capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let mut subscribers = write(&self.bus.subscribers);
        subscribers.retain(|s| s.alive.load(Ordering::Acquire));
        if !self.bus.closed.load(Ordering::Acquire) {
            subscribers.push(Subscriber { filter, tx, dropped: dropped.clone(), alive: alive.clone() });
        }
        Events { rx, dropped, alive }
    }

    /// Emits an event to every matching subscriber and to `tracing`. Never blocks.
    pub fn emit(&self, event: Event) {
        trace(&event);
        let mut gone: Vec<Arc<AtomicU64>> = Vec::new();
        for subscriber in read(&self.bus.subscribers).iter() {
            if !subscriber.filter.accepts(&event) {
                continue;
            }
            match subscriber.tx.try_send(event.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    subscriber.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => gone.push(subscriber.dropped.clone()),
            }
        }
        if !gone.is_empty() {
            write(&self.bus.subscribers).retain(|s| !gone.iter().any(|g| Arc::ptr_eq(g, &s.dropped)));
        }
    }

    /// Ends every subscription (their iterators finish once drained), now and later.
    pub fn close(&self) {
        let mut subscribers = write(&self.bus.subscribers);
        self.bus.closed.store(true, Ordering::Release);
        subscribers.clear();
    }
}

impl fmt::Debug for EventSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSink").field("subscribers", &read(&self.bus.subscribers).len()).finish()
    }
}

/// The event sinks of every app a shared broker serves; events go to all of them. Apps
/// that are gone drop out by themselves (the sinks are held weakly).
#[derive(Clone, Default)]
pub struct EventSinks {
    sinks: Arc<Mutex<Vec<Weak<Bus>>>>,
}

impl EventSinks {
    /// No sink yet.
    pub fn new() -> EventSinks {
        EventSinks::default()
    }

    /// Adds an app's sink.
    pub fn add(&self, sink: &EventSink) {
        let mut sinks = lock(&self.sinks);
        sinks.retain(|s| s.strong_count() > 0);
        if !sinks.iter().any(|s| std::ptr::eq(s.as_ptr(), Arc::as_ptr(&sink.bus))) {
            sinks.push(Arc::downgrade(&sink.bus));
        }
    }

    /// Emits to every sink (and once to `tracing` when there is none).
    pub fn emit(&self, event: Event) {
        let sinks: Vec<EventSink> =
            lock(&self.sinks).iter().filter_map(Weak::upgrade).map(|bus| EventSink { bus }).collect();
        match sinks.split_last() {
            None => trace(&event),
            Some((last, rest)) => {
                for sink in rest {
                    sink.emit(event.clone());
                }
                last.emit(event);
            }
        }
    }
}

impl fmt::Debug for EventSinks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSinks").field("sinks", &lock(&self.sinks).len()).finish()
    }
}

fn trace(event: &Event) {
    let task = event.task.as_ref().map(|t| t.to_string()).unwrap_or_default();
    macro_rules! record {
        ($level:expr) => {
            tracing::event!(target: "dingo", $level, origin = %event.origin, kind = ?event.kind, task = %task, "{}", event.message)
        };
    }
    match event.level {
        Level::Debug => record!(tracing::Level::DEBUG),
        Level::Info => record!(tracing::Level::INFO),
        Level::Warning => record!(tracing::Level::WARN),
        Level::Error => record!(tracing::Level::ERROR),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(origin: Origin, level: Level) -> Event {
        Event::new(origin, level, EventKind::Other, format!("{origin:?} {level:?}"))
    }

    #[test]
    fn filters_by_origin_and_level() {
        let sink = EventSink::new();
        let workers = sink.subscribe(EventFilter::new().origins(Origin::Worker | Origin::Store).level(Level::Warning));
        let everything = sink.subscribe(EventFilter::new().level(Level::Debug));
        sink.emit(event(Origin::Worker, Level::Info));
        sink.emit(event(Origin::Worker, Level::Error));
        sink.emit(event(Origin::Producer, Level::Error));
        sink.emit(event(Origin::Store, Level::Warning));
        let got: Vec<String> = std::iter::from_fn(|| workers.try_recv()).map(|e| e.message).collect();
        assert_eq!(got, ["Worker Error", "Store Warning"]);
        assert_eq!(std::iter::from_fn(|| everything.try_recv()).count(), 4);
    }

    #[test]
    fn filters_by_kind_without_matching_text() {
        let sink = EventSink::new();
        let losses = sink
            .subscribe(EventFilter::new().level(Level::Debug).kinds([EventKind::DeadLettered, EventKind::SendFailed]));
        let none = sink.subscribe(EventFilter::new().kinds([]));
        for kind in [EventKind::SendFailed, EventKind::Other, EventKind::DeadLettered, EventKind::LeaseLost] {
            sink.emit(Event::new(Origin::Consumer, Level::Warning, kind, "x"));
        }
        let got: Vec<EventKind> = std::iter::from_fn(|| losses.try_recv()).map(|e| e.kind).collect();
        assert_eq!(got, [EventKind::SendFailed, EventKind::DeadLettered]);
        assert!(none.try_recv().is_none());
    }

    #[test]
    fn a_full_subscriber_loses_events_and_counts_them() {
        let sink = EventSink::new();
        let slow = sink.subscribe(EventFilter::new().capacity(2));
        for _ in 0..5 {
            sink.emit(event(Origin::Worker, Level::Error));
        }
        assert_eq!(slow.dropped(), 3);
        assert_eq!(std::iter::from_fn(|| slow.try_recv()).count(), 2);
    }

    #[test]
    fn dropped_subscribers_are_removed_and_close_ends_iteration() {
        let sink = EventSink::new();
        drop(sink.subscribe(EventFilter::new()));
        let kept = sink.subscribe(EventFilter::new());
        sink.emit(event(Origin::App, Level::Info));
        assert_eq!(read(&sink.bus.subscribers).len(), 1);
        sink.close();
        assert_eq!(kept.iter().count(), 1);
        let late = sink.subscribe(EventFilter::new());
        assert!(late.recv().is_none(), "a subscription after close ends at once");
    }
}
