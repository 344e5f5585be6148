//! The local broker's delayed messages: a timer wheel, and one timer thread (started by the
//! first delayed send) that sleeps until the earliest message is due and moves what is due
//! to its task's queue. A send that adds an earlier message wakes the thread, so lateness is
//! the thread's wake-up, not a polling period.
//!
//! The wheel has one slot per millisecond for the next [`SLOTS`] ms; a message due later
//! waits in a heap and moves into the wheel as its slot comes into range. Adding a message
//! is a push onto its slot, taking the due ones is a scan of the current slot: a heap of a
//! million messages would pay twenty cache misses per message taken.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender};

use crate::broker::kit::{Lazy, Thread, lock};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::id::TaskName;

/// One delayed message of type `T`, bound for the queue of its task.
pub(super) struct Entry<T> {
    /// Microseconds since the Unix epoch.
    due: u64,
    seq: u64,
    held: (TaskName, T),
}

impl<T> Entry<T> {
    /// The queue it is bound for, and the message.
    pub(super) fn into_parts(self) -> (TaskName, T) {
        self.held
    }
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Entry<T>) -> bool {
        self.due == other.due && self.seq == other.seq
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Entry<T>) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    /// Due order; among messages due at once, send order.
    fn cmp(&self, other: &Entry<T>) -> Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Milliseconds the wheel covers, one slot each.
const SLOTS: u64 = 4096;

/// Microseconds since the Unix epoch.
fn micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Messages by due time: the wheel for the next [`SLOTS`] ms, a heap for later.
struct Wheel<T> {
    /// The millisecond of the current slot (`slots[base % SLOTS]`).
    base: u64,
    slots: Vec<Vec<Entry<T>>>,
    /// In the wheel (the rest are in `far`).
    near: usize,
    far: BinaryHeap<Reverse<Entry<T>>>,
}

impl<T> Wheel<T> {
    fn new() -> Wheel<T> {
        let base = micros(SystemTime::now()) / 1000;
        Wheel { base, slots: (0..SLOTS).map(|_| Vec::new()).collect(), near: 0, far: BinaryHeap::new() }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.near + self.far.len()
    }

    fn slot(&mut self, ms: u64) -> &mut Vec<Entry<T>> {
        &mut self.slots[(ms % SLOTS) as usize]
    }

    fn push(&mut self, entry: Entry<T>) {
        let ms = (entry.due / 1000).max(self.base);
        if ms < self.base + SLOTS {
            self.near += 1;
            self.slot(ms).push(entry);
        } else {
            self.far.push(Reverse(entry));
        }
    }

    /// The earliest due time, if any message waits.
    fn earliest(&self) -> Option<u64> {
        if self.near > 0 {
            for ms in self.base..self.base + SLOTS {
                let slot = &self.slots[(ms % SLOTS) as usize];
                if let Some(due) = slot.iter().map(|e| e.due).min() {
                    return Some(due);
                }
            }
        }
        self.far.peek().map(|Reverse(e)| e.due)
    }

    /// Moves the messages due at `now` (microseconds) into `out`, at most `limit`.
    fn take_due(&mut self, now: u64, limit: usize, out: &mut Vec<Entry<T>>) {
        if self.near == 0 {
            // Nothing in the wheel: jump it to now, and pull in what the heap holds for it.
            self.base = self.base.max(now / 1000);
            self.pull_in();
        }
        let now_ms = now / 1000;
        while out.len() < limit {
            let base = self.base;
            let slot = std::mem::take(self.slot(base));
            if base < now_ms {
                // A slot wholly past: everything in it is due.
                self.near -= slot.len();
                out.extend(slot);
                self.base += 1;
                self.pull_in();
                if self.near == 0 && self.far.peek().is_none_or(|Reverse(e)| e.due > now) {
                    break;
                }
                continue;
            }
            // The current millisecond: only what is due by now.
            let (due, waiting): (Vec<_>, Vec<_>) = slot.into_iter().partition(|e| e.due <= now);
            self.near -= due.len();
            out.extend(due);
            *self.slot(base) = waiting;
            break;
        }
        out.sort_unstable();
    }

    /// Moves heap entries whose slot came into range into the wheel.
    fn pull_in(&mut self) {
        let end = (self.base + SLOTS) * 1000;
        while self.far.peek().is_some_and(|Reverse(e)| e.due < end) {
            if let Some(Reverse(entry)) = self.far.pop() {
                let ms = (entry.due / 1000).max(self.base);
                self.near += 1;
                self.slot(ms).push(entry);
            }
        }
    }

    fn drain(&mut self) -> Vec<Entry<T>> {
        let mut all: Vec<Entry<T>> = self.slots.iter_mut().flat_map(std::mem::take).collect();
        all.extend(std::mem::take(&mut self.far).into_iter().map(|Reverse(e)| e));
        self.near = 0;
        all.sort_unstable();
        all
    }
}

/// Delayed messages, bounded: a send waits for room like a send to a full queue.
///
/// Senders never touch the wheel: they put messages into an inbox and wake the timer only
/// when a message is due before the time it sleeps until; the timer thread owns the wheel.
pub(super) struct Delays<T> {
    inbox: Sender<Entry<T>>,
    /// The timer's end of the inbox (taken by the thread when it starts).
    inbox_rx: Mutex<Option<Receiver<Entry<T>>>>,
    /// A wake-up for the timer (an earlier message, or the stop).
    wake: Sender<()>,
    woken: Receiver<()>,
    /// Until when the timer sleeps, in microseconds (`u64::MAX`: until woken; 0: awake).
    sleeps_until: AtomicU64,
    /// Messages held (in the inbox or the wheel).
    held: AtomicUsize,
    capacity: usize,
    seq: AtomicU64,
    stopped: AtomicBool,
    /// What the timer held when it stopped.
    left: Mutex<Vec<Entry<T>>>,
    /// Moves due messages on (into their queues), in due order.
    release: Box<dyn Fn(Vec<Entry<T>>) + Send + Sync>,
    timer: Lazy<Thread>,
}

/// At most this many due messages move per round (the rest in the next one).
const BATCH: usize = 4096;

/// After releasing messages the timer sleeps at least this long (unless more are due at
/// once): under a stream of delayed messages it then wakes once per tick for a batch, not
/// once per message; a message waits at most this much longer than its due time.
const TICK: Duration = Duration::from_micros(500);

impl<T: Send + 'static> Delays<T> {
    pub(super) fn new(capacity: usize, release: impl Fn(Vec<Entry<T>>) + Send + Sync + 'static) -> Delays<T> {
        let (inbox, inbox_rx) = crossbeam_channel::unbounded();
        let (wake, woken) = crossbeam_channel::bounded(1);
        Delays {
            inbox,
            inbox_rx: Mutex::new(Some(inbox_rx)),
            wake,
            woken,
            sleeps_until: AtomicU64::new(u64::MAX),
            held: AtomicUsize::new(0),
            capacity: capacity.max(1),
            seq: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            left: Mutex::new(Vec::new()),
            release: Box::new(release),
            timer: Lazy::default(),
        }
    }

    /// How many messages wait.
    pub(super) fn len(&self) -> usize {
        self.held.load(AtomicOrdering::Relaxed)
    }

    /// Keeps `item` until `due`, waiting at most `timeout` (`None`: no limit) for room. The
    /// first call starts the timer thread.
    pub(super) fn push(
        self: &Arc<Self>,
        queue: TaskName,
        due: SystemTime,
        item: T,
        timeout: Option<Duration>,
    ) -> Result<(), BrokerError> {
        self.timer.get_or_start(|| {
            let this = self.clone();
            let inbox = lock(&self.inbox_rx).take();
            Thread::spawn("dingo-local-delays", move |_stop| {
                if let Some(inbox) = inbox {
                    this.run(&inbox);
                }
            })
        })?;
        self.wait_for_room(timeout)?;
        let due = micros(due);
        let seq = self.seq.fetch_add(1, AtomicOrdering::Relaxed);
        let entry = Entry { due, seq, held: (queue, item) };
        if self.inbox.send(entry).is_err() {
            self.held.fetch_sub(1, AtomicOrdering::Relaxed);
            return Err(crate::broker::kit::closed("the local broker"));
        }
        // Once in the inbox the message is the timer's (or, after a stop, `stop()`'s): one
        // outcome each, so a send that races with a stop still says it was taken.
        // SeqCst with the timer's store before it drains the inbox: either it sees this
        // message, or this sees the time it sleeps until.
        if due < self.sleeps_until.load(AtomicOrdering::SeqCst) {
            let _ = self.wake.try_send(());
        }
        Ok(())
    }

    /// Counts the message in, waiting while the delays are full (a rare path: it polls).
    fn wait_for_room(&self, timeout: Option<Duration>) -> Result<(), BrokerError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.stopped.load(AtomicOrdering::SeqCst) {
                return Err(crate::broker::kit::closed("the local broker"));
            }
            let held = self.held.load(AtomicOrdering::Relaxed);
            if held < self.capacity {
                if self
                    .held
                    .compare_exchange_weak(held, held + 1, AtomicOrdering::Relaxed, AtomicOrdering::Relaxed)
                    .is_ok()
                {
                    return Ok(());
                }
                continue;
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return Err(BrokerError::new(BrokerErrorKind::Full, "the local broker's delayed tasks are full"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops the timer and returns what was still waiting (in due order).
    pub(super) fn stop(&self) -> Vec<Entry<T>> {
        self.stopped.store(true, AtomicOrdering::SeqCst);
        let _ = self.wake.try_send(());
        if let Some(timer) = self.timer.get() {
            timer.stop_and_join();
        }
        let mut left = std::mem::take(&mut *lock(&self.left));
        // Sent after the timer stopped, or before it ever started.
        if let Some(inbox) = lock(&self.inbox_rx).as_ref() {
            left.extend(inbox.try_iter());
        }
        let _ = self.held.fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |held| {
            Some(held.saturating_sub(left.len()))
        });
        left.sort_unstable();
        left
    }

    /// The timer thread: sleeps until the earliest message is due, releases what is due.
    fn run(&self, inbox: &Receiver<Entry<T>>) {
        let mut wheel = Wheel::new();
        let mut released = false;
        loop {
            wheel_in(&mut wheel, inbox);
            if self.stopped.load(AtomicOrdering::SeqCst) {
                let mut left = wheel.drain();
                left.extend(inbox.try_iter());
                *lock(&self.left) = left;
                return;
            }
            let now = micros(SystemTime::now());
            match wheel.earliest() {
                Some(due) if due <= now => {
                    let mut due = Vec::new();
                    wheel.take_due(now, BATCH, &mut due);
                    self.held.fetch_sub(due.len(), AtomicOrdering::Relaxed);
                    released = true;
                    if !due.is_empty() {
                        (self.release)(due);
                    }
                }
                earliest => {
                    let until = match earliest {
                        Some(due) => {
                            let left = Duration::from_micros(due - now);
                            let left = if released { left.max(TICK) } else { left };
                            Some(left)
                        }
                        None => None,
                    };
                    released = false;
                    let until_us = until.map_or(u64::MAX, |left| now + left.as_micros() as u64);
                    self.sleeps_until.store(until_us, AtomicOrdering::SeqCst);
                    // What came in before the store may be due earlier: look once more.
                    if !inbox.is_empty() {
                        self.sleeps_until.store(0, AtomicOrdering::SeqCst);
                        continue;
                    }
                    let _ = match until {
                        Some(left) => self.woken.recv_timeout(left).ok(),
                        None => self.woken.recv().ok(),
                    };
                    self.sleeps_until.store(0, AtomicOrdering::SeqCst);
                }
            }
        }
    }
}

/// Moves what the inbox holds into the wheel.
fn wheel_in<T>(wheel: &mut Wheel<T>, inbox: &Receiver<Entry<T>>) {
    for entry in inbox.try_iter() {
        wheel.push(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(due: u64, seq: u64) -> Entry<u64> {
        Entry { due, seq, held: (TaskName::from("t"), seq) }
    }

    #[test]
    fn releases_in_due_order_not_send_order() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let delays = Arc::new(Delays::<u32>::new(16, move |due: Vec<Entry<u32>>| {
            for e in due {
                let _ = tx.send((e.into_parts().1, SystemTime::now()));
            }
        }));
        let now = SystemTime::now();
        for (n, ms) in [(1u32, 60u64), (2, 20), (3, 40), (4, 20)] {
            delays.push(TaskName::from("t"), now + Duration::from_millis(ms), n, None).unwrap();
        }
        let got: Vec<(u32, SystemTime)> = (0..4).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [2, 4, 3, 1]);
        for ((n, at), ms) in got.iter().zip([20u64, 20, 40, 60]) {
            assert!(*at >= now + Duration::from_millis(ms), "{n} released early");
        }
        assert!(delays.stop().is_empty());
    }

    #[test]
    fn the_wheel_takes_what_is_due_from_slots_and_the_heap() {
        let mut wheel = Wheel::<u64>::new();
        let base = wheel.base * 1000;
        // In the current slot, later slots, and beyond the wheel (the heap).
        let dues = [base + 300, base + 900, base + 5_000, base + 4_096_000 + 7, base + 10_000_000];
        for (seq, due) in dues.iter().enumerate().rev() {
            wheel.push(entry(*due, seq as u64));
        }
        assert_eq!(wheel.len(), 5);
        assert_eq!(wheel.earliest(), Some(base + 300));
        let mut out = Vec::new();
        wheel.take_due(base + 500, 100, &mut out);
        assert_eq!(out.iter().map(|e| e.due).collect::<Vec<_>>(), [base + 300]);
        out.clear();
        wheel.take_due(base + 5_000, 100, &mut out);
        assert_eq!(out.iter().map(|e| e.due).collect::<Vec<_>>(), [base + 900, base + 5_000]);
        assert_eq!(wheel.earliest(), Some(base + 4_096_007));
        out.clear();
        wheel.take_due(base + 4_096_006, 100, &mut out);
        assert!(out.is_empty(), "not due yet");
        wheel.take_due(base + 20_000_000, 100, &mut out);
        assert_eq!(out.iter().map(|e| e.due).collect::<Vec<_>>(), [base + 4_096_007, base + 10_000_000]);
        assert_eq!((wheel.len(), wheel.earliest()), (0, None));
        // A message due in the past goes into the current slot and is due at once.
        wheel.push(entry(1, 9));
        out.clear();
        wheel.take_due(micros(SystemTime::now()), 100, &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn full_delays_wait_for_room_then_fail() {
        let delays = Arc::new(Delays::<u32>::new(1, |_| {}));
        let far = SystemTime::now() + Duration::from_secs(3600);
        delays.push(TaskName::from("t"), far, 1, None).unwrap();
        let error = delays.push(TaskName::from("t"), far, 2, Some(Duration::from_millis(20))).unwrap_err();
        assert_eq!(error.kind(), BrokerErrorKind::Full);
        let left = delays.stop();
        assert_eq!(left.len(), 1);
        assert_eq!(left.into_iter().next().map(|e| e.into_parts().1), Some(1));
        assert!(delays.push(TaskName::from("t"), far, 3, None).is_err());
    }
}
