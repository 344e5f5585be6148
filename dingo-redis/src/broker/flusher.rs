//! Settlements that wait while their worker thread runs its next task.
//!
//! A worker settles its tasks with its next round trip, so that quick tasks cost one round
//! trip per batch instead of one per task. Before it starts a task it *parks* the
//! settlements it holds; if the task finishes soon, the worker takes them back and sends
//! them with its next fetch as before. If the task runs past [`FLUSH_AFTER`], this thread
//! stores them on its own connection — so a quick task's result never waits for a slow
//! task behind it in the same batch.
//!
//! Order still holds: settlements are positional (each removes the oldest message of its
//! consumer's processing list) and numbered (see `scripts::SEEN`), so the worker's next
//! round trip must come after the flusher's. Taking a parked plan back waits while the
//! flusher is storing it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use dingo_core::BrokerError;
use dingo_core::event::{Event, EventKind, Level, Origin};

use super::settle::{FLUSH_AFTER, Parked, Pending, account, settle_calls, settled_by};
use super::{Inner, Thread, actor};
use crate::scripts::Sequence;

pub(crate) struct Flusher {
    tx: Sender<Arc<Parked>>,
    thread: Thread,
}

impl Flusher {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Flusher, BrokerError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = Thread::spawn("dingo-redis-flush", move |stop| flush_loop(&inner, &rx, &stop.flag))?;
        Ok(Flusher { tx, thread })
    }

    /// Watches a worker that just parked settlements.
    pub(crate) fn watch(&self, parked: Arc<Parked>) {
        let _ = self.tx.send(parked);
    }

    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

fn flush_loop(inner: &Arc<Inner>, rx: &Receiver<Arc<Parked>>, stop: &AtomicBool) {
    let mut conn = inner.conn("settlement flusher", Origin::Consumer, false);
    // An actor of its own: its batches are numbered apart from the workers' (see
    // `scripts::SEEN`); the order between them is the workers' waiting in `reclaim`.
    let mut sequence = Sequence::new(actor::FLUSH, &inner.process);
    let mut watched: Vec<Arc<Parked>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        // Until the first parked settlement falls due (or news, or a look at the stop flag).
        let mut wait = Duration::from_millis(50);
        // One worker at a time, each taken out just before it is stored: a store that waits
        // for Redis holds up only the worker whose settlements it carries.
        while let Some(parked) = next_due(&mut watched, &mut wait) {
            let mut state = parked.lock();
            let done = std::mem::take(&mut state.done);
            state.storing = true;
            state.since = None;
            drop(state);
            let consumers = settled_by(&done);
            // A panic must not leave the worker waiting for a store that never ends, nor let
            // it settle on as if these settlements had been stored.
            let stored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                store(inner, &mut conn, &parked.stop, &mut sequence, done)
            }));
            if stored.is_err() {
                // It may have stopped halfway through a round trip: start afresh.
                conn = inner.conn("settlement flusher", Origin::Consumer, false);
            }
            let failed = if matches!(stored, Ok(true)) { Vec::new() } else { consumers };
            let mut state = parked.lock();
            state.storing = false;
            state.failed.extend(failed);
            drop(state);
            parked.stored.notify_all();
        }
        match rx.recv_timeout(wait) {
            Ok(parked) => {
                watched.push(parked);
                watched.extend(rx.try_iter());
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The next watched worker whose parked settlements fall due, if any; forgets the workers
/// with nothing parked, and leaves those whose subscription stopped to store their own
/// (their retries give up, where the flusher's would hold them up). Lowers `wait` to the
/// time until the next one falls due.
fn next_due(watched: &mut Vec<Arc<Parked>>, wait: &mut Duration) -> Option<Arc<Parked>> {
    let now = Instant::now();
    let mut due = None;
    watched.retain(|parked| {
        let mut state = parked.lock();
        match state.since {
            Some(since) if !state.done.is_empty() && !parked.stop.load(Ordering::Acquire) => {
                let left = (since + FLUSH_AFTER).saturating_duration_since(now);
                if left.is_zero() && due.is_none() {
                    due = Some(parked.clone());
                } else if !left.is_zero() {
                    *wait = (*wait).min(left);
                }
                true
            }
            _ => {
                state.watched = false;
                false
            }
        }
    });
    due
}

/// Stores a worker's settlements as the worker itself would have; `false` when they were
/// not stored (the worker abandons their consumers).
fn store(
    inner: &Inner,
    conn: &mut crate::conn::Conn,
    stop: &AtomicBool,
    sequence: &mut Sequence,
    done: Vec<Pending>,
) -> bool {
    let count = done.len() as u64;
    let mut plan = settle_calls(inner, done, sequence);
    let why = match plan.run(inner, conn, stop, sequence) {
        Some(Ok(results)) => {
            account(inner, &results);
            inner.stats.flushed.fetch_add(count, Ordering::Relaxed);
            return true;
        }
        Some(Err(e)) => format!("storing a worker's settlements failed: {e}"),
        None => "a worker's settlements were not stored: redis unreachable when its subscription stopped".to_owned(),
    };
    inner.events.emit(Event::new(Origin::Consumer, Level::Error, EventKind::ReportFailed, why));
    false
}
