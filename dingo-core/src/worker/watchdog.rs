//! A pool's watchdog: one thread, started by the pool's first task with a hard time limit,
//! that keeps the hard deadlines of the running tasks in a heap. At a deadline it settles
//! the call itself — a `TimeLimit` failure stored and the delivery acknowledged, so the
//! message is not redelivered — and writes the thread off: the pool forgets it and starts a
//! fresh thread in its place (see [`TimeLimits`](crate::TimeLimits)).
//!
//! Who settles is decided once, by [`Running`]'s state: the worker thread when the task
//! returns in time ([`Running::claim`]), or the watchdog at the deadline
//! ([`Running::write_off`]); the loser does nothing, so the late outcome of a written-off
//! thread is never reported.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::Crew;
use crate::broker::Ack;
use crate::broker::kit::lock;
use crate::error::{TaskError, TaskErrorKind};
use crate::event::{Event, EventKind, Level, Origin};
use crate::id::CallKey;
use crate::message::{ReplyTo, ReportBody, ReportMessage};

const RUNNING: u8 = 0;
const CLAIMED: u8 = 1;
const WRITTEN_OFF: u8 = 2;

/// A task under a hard time limit: its delivery, held until the worker or the watchdog
/// claims it.
pub(crate) struct Running {
    key: CallKey,
    reply_to: ReplyTo,
    thread: ThreadId,
    state: AtomicU8,
    /// Raised at write-off, for [`Context::is_cancelled`](crate::Context::is_cancelled).
    written_off: AtomicBool,
    /// Raised once the watchdog settled the call and released the thread's state: a
    /// written-off thread that returns waits for it before it leaves its subscription.
    settled: AtomicBool,
    ack: Mutex<Option<Ack>>,
}

impl Running {
    /// The task the calling thread is about to run.
    pub(crate) fn new(key: CallKey, reply_to: ReplyTo, ack: Option<Ack>) -> Running {
        Running {
            key,
            reply_to,
            thread: std::thread::current().id(),
            state: AtomicU8::new(RUNNING),
            written_off: AtomicBool::new(false),
            settled: AtomicBool::new(false),
            ack: Mutex::new(ack),
        }
    }

    /// The worker's claim, when the task returned: its delivery to settle, or `None` if the
    /// watchdog wrote the task off first (its outcome is then discarded).
    pub(crate) fn claim(&self) -> Option<Option<Ack>> {
        self.state
            .compare_exchange(RUNNING, CLAIMED, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| lock(&self.ack).take())
    }

    /// The watchdog's claim, at the deadline.
    fn write_off(&self) -> Option<Option<Ack>> {
        self.state.compare_exchange(RUNNING, WRITTEN_OFF, Ordering::AcqRel, Ordering::Acquire).ok()?;
        self.written_off.store(true, Ordering::Release);
        Some(lock(&self.ack).take())
    }

    /// For the written-off thread, back from its task: waits (at most `patience`) until the
    /// watchdog has settled its call and released what the thread held, so the thread's
    /// own leaving comes after, never in the middle.
    pub(crate) fn wait_settled(&self, patience: Duration) {
        let deadline = Instant::now() + patience;
        while !self.settled.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn is_running(&self) -> bool {
        self.state.load(Ordering::Acquire) == RUNNING
    }

    pub(crate) fn written_off_flag(&self) -> &AtomicBool {
        &self.written_off
    }
}

enum Watch {
    Task { at: Instant, limit: Duration, running: Arc<Running> },
    Stop,
}

/// The sending end of a pool's watchdog.
#[derive(Clone)]
pub(crate) struct Watchdog {
    tx: Sender<Watch>,
}

impl Watchdog {
    /// Starts the watchdog of `crew` (`None` if no thread could be started: the event says
    /// so, and hard limits of this pool are then not enforced).
    pub(crate) fn start(crew: &Arc<Crew>) -> Option<Watchdog> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let weak = Arc::downgrade(crew);
        let started =
            std::thread::Builder::new().name(format!("dingo-{}-watchdog", crew.label)).spawn(move || run(&weak, &rx));
        match started {
            Ok(_) => Some(Watchdog { tx }),
            Err(e) => {
                crew.shared.events.emit(Event::new(
                    Origin::Worker,
                    Level::Error,
                    EventKind::TimeLimitExceeded,
                    format!("hard time limits are not enforced in pool {}: no watchdog thread ({e})", crew.label),
                ));
                None
            }
        }
    }

    /// Watches `running` until `at` (`limit` after it started).
    pub(crate) fn watch(&self, at: Instant, limit: Duration, running: Arc<Running>) {
        let _ = self.tx.send(Watch::Task { at, limit, running });
    }

    /// Ends the watchdog once the tasks it watches are settled.
    pub(crate) fn stop(&self) {
        let _ = self.tx.send(Watch::Stop);
    }
}

/// One watched task in the heap (ordered by deadline, then arrival).
struct Entry {
    at: Instant,
    seq: u64,
    limit: Duration,
    running: Arc<Running>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Entry) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Entry) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

fn run(crew: &Weak<Crew>, rx: &Receiver<Watch>) {
    let mut heap: BinaryHeap<Reverse<Entry>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut stopping = false;
    // Entries of tasks that finished in time stay until their deadline; the heap is swept
    // of them when it doubles, so it holds at most about twice the tasks running.
    let mut sweep_at = 1024;
    loop {
        let received = match heap.peek() {
            Some(Reverse(first)) => rx.recv_deadline(first.at),
            None if stopping => return,
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match received {
            Ok(Watch::Task { at, limit, running }) => {
                seq += 1;
                heap.push(Reverse(Entry { at, seq, limit, running }));
            }
            Ok(Watch::Stop) | Err(RecvTimeoutError::Disconnected) => stopping = true,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(first)| first.at <= now) {
            let Some(Reverse(entry)) = heap.pop() else { break };
            let Some(ack) = entry.running.write_off() else { continue };
            let Some(crew) = crew.upgrade() else {
                entry.running.settled.store(true, Ordering::Release);
                return;
            };
            // The replacement first: a settlement that blocks (a broker reconnecting) must
            // not leave the pool a thread short.
            crew.write_off(entry.running.thread);
            settle(&crew, &entry, ack);
            entry.running.settled.store(true, Ordering::Release);
        }
        if heap.len() >= sweep_at {
            heap.retain(|Reverse(entry)| entry.running.is_running());
            sweep_at = (heap.len() * 2).max(1024);
        }
        if stopping {
            heap.retain(|Reverse(entry)| entry.running.is_running());
            if heap.is_empty() {
                return;
            }
        }
    }
}

/// Fails the call of a task past its hard limit and settles its delivery.
fn settle(crew: &Crew, entry: &Entry, ack: Option<Ack>) {
    let shared = &crew.shared;
    let Running { key, reply_to, .. } = &*entry.running;
    let message = format!(
        "the task ran past its hard time limit of {} ms: its worker thread was written off and replaced",
        entry.limit.as_millis()
    );
    shared.events.emit(
        Event::new(Origin::Worker, Level::Warning, EventKind::TimeLimitExceeded, message.clone())
            .with_task(key.clone()),
    );
    let error = TaskError::new(TaskErrorKind::TimeLimit, message);
    let settled = if reply_to.wants_reports() {
        let report = ReportMessage { name: key.name.clone(), id: key.id.clone(), body: ReportBody::Failure(error) };
        shared.reporter.finish(reply_to, report, ack)
    } else {
        ack.map_or(Ok(()), Ack::ack)
    };
    if let Err(e) = settled {
        shared.events.emit(
            Event::new(
                Origin::Worker,
                Level::Error,
                EventKind::ReportFailed,
                format!("the time-limit failure or its acknowledgement failed: {}", crate::error::chain(&e)),
            )
            .with_task(key.clone()),
        );
    }
    crew.subscription.release_thread(entry.running.thread);
}
