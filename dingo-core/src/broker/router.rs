//! [`ReportRouter`]: the caller-side half of a report transport that receives reports as
//! bytes — which handle waits for which call, and the reports that came before anyone
//! waited. Stores of byte-carrying brokers (the serialized local broker, Redis) route
//! through it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::broker::kit::lock;
use crate::event::{Event, EventKind, EventSinks, Level, Origin};
use crate::hash::FastMap;
use crate::id::CallKey;
use crate::message::{ReplySink, ReportBody, ReportMessage, ReportSink, Value};

/// How much a [`ReportRouter`] keeps of the reports nobody waits for: at most `reports` of
/// them and at most `bytes` of their contents, the oldest dropped first.
///
/// Reports nobody waits for are those that arrive before their handle watches (kept until
/// it does), of calls whose handle was dropped, and forged ones: anyone who can write to a
/// caller's reply list or queue can send it reports (see the README's trust boundary). The
/// bounds keep a flood of them from costing the caller more than `bytes` of memory.
///
/// ```
/// use dingo_core::broker::router::UnclaimedLimit;
///
/// let limit = UnclaimedLimit::new(10_000, 8 << 20);
/// assert_eq!((limit.reports, limit.bytes), (10_000, 8 << 20));
/// assert_eq!(UnclaimedLimit::default().bytes, 64 << 20);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[must_use]
pub struct UnclaimedLimit {
    /// Reports kept at most. Default 100,000.
    pub reports: usize,
    /// Bytes of report contents (payloads, error messages, names and ids) kept at most.
    /// Default 64 MiB.
    pub bytes: usize,
}

impl UnclaimedLimit {
    /// At most `reports` reports and `bytes` bytes.
    pub fn new(reports: usize, bytes: usize) -> UnclaimedLimit {
        UnclaimedLimit { reports, bytes }
    }
}

impl Default for UnclaimedLimit {
    fn default() -> UnclaimedLimit {
        UnclaimedLimit { reports: 100_000, bytes: 64 << 20 }
    }
}

/// How often at most the router warns that it dropped reports at its bound.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Hands reports to the handles waiting for them; keeps, for a while, those that arrive
/// before their handle (or after it was dropped), within an [`UnclaimedLimit`].
///
/// It warns (a `Warning` event of kind [`EventKind::UnclaimedReport`], from
/// [`Origin::Store`]) when what it keeps reaches half of either bound (again after it fell
/// below a quarter), and when it drops reports at a bound (at most once per 10 seconds,
/// with the count since the last warning); [`ReportRouter::dropped`] counts those.
pub struct ReportRouter {
    state: Mutex<State>,
    ttl: Duration,
    limit: UnclaimedLimit,
    events: EventSinks,
    /// Reports dropped at the bounds (not those that expired).
    dropped: AtomicU64,
    closed: AtomicBool,
    /// `state.watched.len()` as of its last change, for readers that must not take the lock
    /// (every wait asks it).
    watching: AtomicUsize,
}

/// What [`ReportRouter::route`] did with a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// A handle got it.
    Delivered,
    /// Nobody waits for it yet: kept until a handle watches its call, or it expires.
    Kept,
    /// The router is closed, or nobody waits for it and it alone is larger than the
    /// [`UnclaimedLimit`]'s byte bound: dropped.
    Dropped,
}

#[derive(Default)]
struct State {
    watched: FastMap<CallKey, ReplySink>,
    unclaimed: FastMap<CallKey, Unclaimed>,
    /// Keys in the order they became unclaimed, with their generation: an entry whose
    /// generation no longer matches was claimed since and is skipped.
    order: VecDeque<(Instant, CallKey, u64)>,
    /// Reports kept, and their weight in bytes (see `weight`).
    kept: usize,
    bytes: usize,
    generation: u64,
    /// Dropped at a bound since the last warning about it, and when that was.
    dropped_unwarned: u64,
    warned_drop: Option<Instant>,
    /// Warned that half of a bound was reached (re-armed below a quarter).
    warned_half: bool,
}

/// The reports kept for one call.
struct Unclaimed {
    generation: u64,
    reports: Vec<ReportMessage<'static>>,
    bytes: usize,
}

/// What keeping a report did, for the warnings given outside the lock.
#[derive(Default)]
struct Kept {
    /// Dropped at a bound (the report itself, if larger than the byte bound alone, or
    /// older ones).
    dropped: u64,
    /// A warning is due: the count dropped since the last one.
    warn_dropped: Option<u64>,
    /// Half of a bound was just reached: (reports, bytes) kept.
    warn_half: Option<(usize, usize)>,
    /// The report itself was dropped (larger than the byte bound alone).
    refused: bool,
}

impl ReportRouter {
    /// A router keeping unclaimed reports for `ttl`, within `limit` (the oldest go first),
    /// warning through `events`.
    pub fn new(ttl: Duration, limit: UnclaimedLimit, events: EventSinks) -> ReportRouter {
        ReportRouter {
            state: Mutex::new(State::default()),
            ttl,
            limit,
            events,
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            watching: AtomicUsize::new(0),
        }
    }

    /// Registers the handle of `key`. Reports kept for it are handed over at once, under the
    /// router's lock, so none arriving meanwhile can overtake them (`sink` must not call
    /// back into the router).
    pub fn watch(&self, key: &CallKey, sink: ReplySink) {
        let mut state = self.lock();
        let mut finished = false;
        if state.kept > 0 {
            for report in state.claim(key) {
                finished |= report.body.is_final();
                sink.deliver(report.body);
            }
        }
        if !finished && !self.closed.load(Ordering::Acquire) {
            state.watched.insert(key.clone(), sink);
            self.count(&state);
        }
    }

    /// Hands a report to its handle (the final one ends the watch), or keeps it.
    pub fn route(&self, report: ReportMessage<'static>) -> Routed {
        let key = report.key();
        let mut state = self.lock();
        let found = if report.body.is_final() {
            let sink = state.watched.remove(&key).map(Sink::Last);
            self.count(&state);
            sink
        } else {
            state.watched.get(&key).map(|sink| Sink::Shared(sink.shared()))
        };
        let Some(sink) = found else {
            if self.closed.load(Ordering::Acquire) {
                return Routed::Dropped;
            }
            let kept = state.keep(key, report, self.ttl, self.limit);
            drop(state);
            return self.kept(kept);
        };
        // Outside the lock: delivering may run the caller's callbacks.
        drop(state);
        sink.deliver(report.body);
        Routed::Delivered
    }

    /// Counts and warns about what keeping a report did (outside the lock).
    fn kept(&self, kept: Kept) -> Routed {
        let UnclaimedLimit { reports, bytes } = self.limit;
        if let Some((count, size)) = kept.warn_half {
            let message = format!(
                "{count} reports ({size} bytes) are kept for calls nobody waits for, half of the bound ({reports} \
                 reports, {bytes} bytes): reports arrive for calls no handle watches (dropped handles, or forged reports)"
            );
            self.events.emit(Event::new(Origin::Store, Level::Warning, EventKind::UnclaimedReport, message));
        }
        if kept.dropped > 0 {
            self.dropped.fetch_add(kept.dropped, Ordering::Relaxed);
        }
        if let Some(count) = kept.warn_dropped {
            let message = format!(
                "{count} reports nobody waits for were dropped at the bound of {reports} reports and {bytes} bytes \
                 (the oldest go first; {} in all)",
                self.dropped()
            );
            self.events.emit(Event::new(Origin::Store, Level::Warning, EventKind::UnclaimedReport, message));
        }
        if kept.refused { Routed::Dropped } else { Routed::Kept }
    }

    /// How many reports nobody waited for were dropped at the [`UnclaimedLimit`] (those
    /// that expired are not counted).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stops watching `key` (its handle is gone).
    pub fn forget(&self, key: &CallKey) {
        let mut state = self.lock();
        let sink = state.watched.remove(key);
        self.count(&state);
        drop(state);
        drop(sink); // outside the lock: dropping may run the handle's disconnect
    }

    /// Whether a handle watches `key`.
    pub fn is_watched(&self, key: &CallKey) -> bool {
        self.lock().watched.contains_key(key)
    }

    /// How many handles are watched (without taking the lock).
    pub fn watched(&self) -> usize {
        self.watching.load(Ordering::Relaxed)
    }

    /// How long a caller about to wait polls ([`Store::wait_spin`](crate::broker::Store::wait_spin)),
    /// for a store whose reports come over the network: `spin` for a lone call, nothing
    /// while more are in flight (a caller with many would burn a core the workers need).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dingo_core::broker::router::{ReportRouter, UnclaimedLimit};
    /// use dingo_core::event::EventSinks;
    ///
    /// let router = ReportRouter::new(Duration::from_secs(60), UnclaimedLimit::default(), EventSinks::new());
    /// let spin = Duration::from_micros(50);
    /// assert_eq!(router.wait_spin(spin), spin, "no call in flight: the next one is alone");
    /// ```
    pub fn wait_spin(&self, spin: Duration) -> Duration {
        if self.watched() <= 1 { spin } else { Duration::ZERO }
    }

    /// Closes the router: every waiting handle learns that no report will come (a
    /// `Shutdown` failure), kept reports are dropped, later ones too.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let state = {
            let mut state = self.lock();
            let taken = std::mem::take(&mut *state);
            self.count(&state);
            taken
        };
        drop(state); // outside the lock: dropping disconnects the waiting handles
    }

    /// Publishes the count of watched handles; called under the lock after every change.
    fn count(&self, state: &State) {
        self.watching.store(state.watched.len(), Ordering::Relaxed);
    }

    // The state stays consistent if a holder panics (single inserts and removals).
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// Where [`ReportRouter::route`] delivers, outside the lock: the watch itself when the
/// report is final (it ends there), a share of its sink otherwise.
enum Sink {
    Last(ReplySink),
    Shared(Arc<dyn ReportSink>),
}

impl Sink {
    fn deliver(&self, body: crate::message::ReportBody<'_>) {
        match self {
            Sink::Last(sink) => sink.deliver(body),
            Sink::Shared(sink) => sink.deliver(body),
        }
    }
}

impl fmt::Debug for ReportRouter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("ReportRouter")
            .field("watched", &state.watched.len())
            .field("unclaimed", &state.kept)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// What a kept report costs, in bytes: its contents (names, id, payload, error message)
/// and a fixed share for the bookkeeping around it.
fn weight(report: &ReportMessage<'_>) -> usize {
    let contents = match &report.body {
        ReportBody::Sent | ReportBody::Progress(None) => 0,
        ReportBody::Progress(Some(encoded)) | ReportBody::Success(Value::Encoded(encoded)) => encoded.bytes.len(),
        ReportBody::Success(Value::Local(_)) => 0,
        ReportBody::Failure(error) | ReportBody::Retrying { error, .. } => {
            error.message().len() + error.raw_payload().map_or(0, |p| p.bytes.len())
        }
    };
    64 + report.name.as_str().len() + report.id.as_str().len() + contents
}

impl State {
    /// Keeps `report`, dropping what expired and, oldest first, what is over `limit`.
    fn keep(&mut self, key: CallKey, report: ReportMessage<'static>, ttl: Duration, limit: UnclaimedLimit) -> Kept {
        let mut kept = Kept::default();
        let size = weight(&report);
        if size > limit.bytes || limit.reports == 0 {
            kept.dropped = 1;
            kept.refused = true;
        } else {
            let now = Instant::now();
            while let Some((at, _, _)) = self.order.front() {
                let expired = now.duration_since(*at) > ttl;
                let over = self.kept >= limit.reports || self.bytes + size > limit.bytes;
                if !expired && !over && self.order.len() < 2 * limit.reports {
                    break;
                }
                if let Some((_, old, generation)) = self.order.pop_front()
                    && self.unclaimed.get(&old).is_some_and(|u| u.generation == generation)
                    && let Some(old) = self.unclaimed.remove(&old)
                {
                    self.kept -= old.reports.len();
                    self.bytes -= old.bytes;
                    if !expired {
                        kept.dropped += old.reports.len() as u64;
                    }
                }
            }
            let generation = self.generation;
            let entry = self.unclaimed.entry(key.clone()).or_insert_with(|| Unclaimed {
                generation,
                reports: Vec::new(),
                bytes: 0,
            });
            if entry.generation == generation {
                self.generation += 1;
                self.order.push_back((now, key, generation));
            }
            entry.reports.push(report);
            entry.bytes += size;
            self.kept += 1;
            self.bytes += size;
        }
        if self.kept * 4 < limit.reports && self.bytes * 4 < limit.bytes {
            self.warned_half = false;
        }
        let half = self.kept * 2 >= limit.reports.max(1) || self.bytes * 2 >= limit.bytes.max(1);
        if half && !self.warned_half {
            self.warned_half = true;
            kept.warn_half = Some((self.kept, self.bytes));
        }
        if kept.dropped > 0 {
            self.dropped_unwarned += kept.dropped;
            let now = Instant::now();
            if self.warned_drop.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                self.warned_drop = Some(now);
                kept.warn_dropped = Some(std::mem::take(&mut self.dropped_unwarned));
            }
        }
        kept
    }

    fn claim(&mut self, key: &CallKey) -> Vec<ReportMessage<'static>> {
        match self.unclaimed.remove(key) {
            Some(claimed) => {
                self.kept -= claimed.reports.len();
                self.bytes -= claimed.bytes;
                claimed.reports
            }
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoded;
    use crate::message::{ReportBody, ReportSink, Value};
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Seen(StdMutex<Vec<String>>);

    impl ReportSink for Seen {
        fn deliver(&self, body: ReportBody<'_>) {
            self.0.lock().unwrap().push(format!("{body:?}"));
        }
        fn disconnect(&self) {
            self.0.lock().unwrap().push("disconnected".into());
        }
    }

    fn report(id: &str, body: ReportBody<'static>) -> ReportMessage<'static> {
        ReportMessage { name: "t".into(), id: id.into(), body }
    }

    #[test]
    fn early_reports_wait_and_expire_in_order() {
        let router = ReportRouter::new(Duration::from_secs(60), UnclaimedLimit::new(2, 1 << 20), EventSinks::new());
        assert_eq!(router.route(report("1", ReportBody::Sent)), Routed::Kept);
        assert_eq!(router.route(report("2", ReportBody::Sent)), Routed::Kept);
        // A third report pushes the oldest out.
        assert_eq!(router.route(report("3", ReportBody::Sent)), Routed::Kept);
        let seen = Arc::new(Seen::default());
        router.watch(&CallKey::new("t", "1"), ReplySink::new(seen.clone()));
        assert!(seen.0.lock().unwrap().is_empty(), "evicted");
        let seen = Arc::new(Seen::default());
        router.watch(&CallKey::new("t", "3"), ReplySink::new(seen.clone()));
        assert_eq!(*seen.0.lock().unwrap(), ["Sent"]);
        let done = ReportBody::Success(Value::Encoded(Encoded::new(1, vec![1])));
        assert_eq!(router.route(report("3", done)), Routed::Delivered);
        assert!(!router.is_watched(&CallKey::new("t", "3")));
    }

    #[test]
    fn the_count_of_watched_handles_follows_watches_routes_and_forgets() {
        let router = ReportRouter::new(Duration::from_secs(60), UnclaimedLimit::new(10, 1 << 20), EventSinks::new());
        let seen = Arc::new(Seen::default());
        router.watch(&CallKey::new("t", "1"), ReplySink::new(seen.clone()));
        router.watch(&CallKey::new("t", "2"), ReplySink::new(seen.clone()));
        router.watch(&CallKey::new("t", "3"), ReplySink::new(seen.clone()));
        assert_eq!(router.watched(), 3);
        assert_eq!(router.route(report("1", ReportBody::Sent)), Routed::Delivered);
        assert_eq!(router.watched(), 3, "a report that is not final keeps the watch");
        let done = ReportBody::Success(Value::Encoded(Encoded::new(1, vec![1])));
        assert_eq!(router.route(report("1", done)), Routed::Delivered);
        assert_eq!(router.watched(), 2);
        router.forget(&CallKey::new("t", "2"));
        assert_eq!(router.watched(), 1);
        router.close();
        assert_eq!(router.watched(), 0);
    }

    #[test]
    fn close_fails_waiting_handles() {
        let router = ReportRouter::new(Duration::from_secs(60), UnclaimedLimit::new(10, 1 << 20), EventSinks::new());
        let seen = Arc::new(Seen::default());
        router.watch(&CallKey::new("t", "1"), ReplySink::new(seen.clone()));
        router.close();
        assert_eq!(*seen.0.lock().unwrap(), ["disconnected"]);
        assert_eq!(router.route(report("1", ReportBody::Sent)), Routed::Dropped);
    }

    fn success(id: &str, payload: usize) -> ReportMessage<'static> {
        report(id, ReportBody::Success(Value::Encoded(Encoded::new(1, vec![7; payload]))))
    }

    fn claimed(router: &ReportRouter, id: &str) -> usize {
        let seen = Arc::new(Seen::default());
        router.watch(&CallKey::new("t", id), ReplySink::new(seen.clone()));
        router.forget(&CallKey::new("t", id));
        seen.0.lock().unwrap().iter().filter(|s| s.starts_with("Success")).count()
    }

    #[test]
    fn unclaimed_reports_are_bounded_by_bytes_oldest_dropped_first() {
        // Each report weighs 64 + 1 ("t") + 2 (id) + 1,000 = 1,067 bytes: 10 fit in 10,700.
        let router = ReportRouter::new(Duration::from_secs(60), UnclaimedLimit::new(1_000, 10_700), EventSinks::new());
        for i in 10..30 {
            assert_eq!(router.route(success(&i.to_string(), 1_000)), Routed::Kept);
        }
        assert_eq!(router.dropped(), 10);
        let kept: Vec<usize> = (10..30).map(|i| claimed(&router, &i.to_string())).collect();
        assert_eq!(kept, [[0; 10], [1; 10]].concat(), "the newest ten are kept");
        // Alone larger than the bound: refused, the others stay.
        assert_eq!(router.route(success("99", 20_000)), Routed::Dropped);
        assert_eq!(router.dropped(), 11);
    }

    #[test]
    fn claiming_frees_the_bytes_of_what_was_kept() {
        let router = ReportRouter::new(Duration::from_secs(60), UnclaimedLimit::new(1_000, 10_700), EventSinks::new());
        for i in 10..20 {
            router.route(success(&i.to_string(), 1_000));
        }
        assert_eq!(claimed(&router, "10"), 1);
        router.route(success("20", 1_000));
        assert_eq!(router.dropped(), 0, "room was made by the claim");
        assert_eq!(claimed(&router, "11"), 1);
    }

    #[test]
    fn the_router_warns_at_half_of_a_bound_and_when_it_drops() {
        let sink = crate::event::EventSink::new();
        let events = sink.subscribe(crate::event::EventFilter::new());
        let sinks = EventSinks::new();
        sinks.add(&sink);
        let router = ReportRouter::new(Duration::from_secs(60), UnclaimedLimit::new(4, 1 << 20), sinks);
        router.route(report("1", ReportBody::Sent));
        assert!(events.try_recv().is_none(), "below half: quiet");
        router.route(report("2", ReportBody::Sent));
        let half = events.try_recv().expect("half of the bound");
        assert_eq!((half.level, half.kind), (Level::Warning, EventKind::UnclaimedReport));
        assert!(half.message.starts_with("2 reports ("), "{}", half.message);
        for i in 3..=8 {
            router.route(report(&i.to_string(), ReportBody::Sent));
        }
        let dropped = events.try_recv().expect("a drop warning");
        assert!(dropped.message.starts_with("1 reports nobody waits for were dropped"), "{}", dropped.message);
        assert!(events.try_recv().is_none(), "one warning per 10 s, and half once");
        assert_eq!(router.dropped(), 4);
    }
}
