//! [`ReportRouter`]: the caller-side half of a report transport that receives reports as
//! bytes — which handle waits for which call, and the reports that came before anyone
//! waited. Stores of byte-carrying brokers (the serialized local broker, Redis) route
//! through it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::id::{CallKey, FastMap};
use crate::message::{ReplySink, ReportMessage, ReportSink};

/// Hands reports to the handles waiting for them; keeps, for a while, those that arrive
/// before their handle (or after it was dropped).
pub struct ReportRouter {
    state: Mutex<State>,
    ttl: Duration,
    max_unclaimed: usize,
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
    /// The router is closed: dropped.
    Dropped,
}

#[derive(Default)]
struct State {
    watched: FastMap<CallKey, ReplySink>,
    unclaimed: FastMap<CallKey, (u64, Vec<ReportMessage<'static>>)>,
    /// Keys in the order they became unclaimed, with their generation: an entry whose
    /// generation no longer matches was claimed since and is skipped.
    order: VecDeque<(Instant, CallKey, u64)>,
    kept: usize,
    generation: u64,
}

impl ReportRouter {
    /// A router keeping unclaimed reports for `ttl`, at most `max_unclaimed` of them (the
    /// oldest go first).
    pub fn new(ttl: Duration, max_unclaimed: usize) -> ReportRouter {
        ReportRouter {
            state: Mutex::new(State::default()),
            ttl,
            max_unclaimed,
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
            state.keep(key, report, self.ttl, self.max_unclaimed);
            return Routed::Kept;
        };
        // Outside the lock: delivering may run the caller's callbacks.
        drop(state);
        sink.deliver(report.body);
        Routed::Delivered
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
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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

impl State {
    fn keep(&mut self, key: CallKey, report: ReportMessage<'static>, ttl: Duration, max: usize) {
        let now = Instant::now();
        while let Some((at, _, _)) = self.order.front() {
            let expired = now.duration_since(*at) > ttl;
            if !expired && self.kept < max && self.order.len() < 2 * max.max(1) {
                break;
            }
            if let Some((_, old, generation)) = self.order.pop_front()
                && self.unclaimed.get(&old).is_some_and(|(g, _)| *g == generation)
                && let Some((_, reports)) = self.unclaimed.remove(&old)
            {
                self.kept -= reports.len();
            }
        }
        let generation = self.generation;
        let (entry_generation, reports) = self.unclaimed.entry(key.clone()).or_insert_with(|| (generation, Vec::new()));
        if *entry_generation == generation {
            self.generation += 1;
            self.order.push_back((now, key, generation));
        }
        reports.push(report);
        self.kept += 1;
    }

    fn claim(&mut self, key: &CallKey) -> Vec<ReportMessage<'static>> {
        match self.unclaimed.remove(key) {
            Some((_, reports)) => {
                self.kept -= reports.len();
                reports
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
        let router = ReportRouter::new(Duration::from_secs(60), 2);
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
        let router = ReportRouter::new(Duration::from_secs(60), 10);
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
        let router = ReportRouter::new(Duration::from_secs(60), 10);
        let seen = Arc::new(Seen::default());
        router.watch(&CallKey::new("t", "1"), ReplySink::new(seen.clone()));
        router.close();
        assert_eq!(*seen.0.lock().unwrap(), ["disconnected"]);
        assert_eq!(router.route(report("1", ReportBody::Sent)), Routed::Dropped);
    }
}
