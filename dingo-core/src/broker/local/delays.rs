//! The local broker's delayed messages: a heap ordered by due time, and one timer thread
//! (started by the first delayed send) that sleeps until the earliest is due and moves it to
//! its task's queue. A send that adds an earlier message wakes the thread, so lateness is
//! the thread's wake-up, not a polling period.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::broker::kit::{Lazy, Thread, lock, wait, wait_timeout};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::id::TaskName;

/// One delayed message of type `T`, bound for the queue of `queue`.
pub(super) struct Entry<T> {
    pub(super) due: SystemTime,
    seq: u64,
    pub(super) queue: TaskName,
    pub(super) item: T,
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

struct State<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
    stopped: bool,
}

/// Delayed messages, bounded: a send waits for room like a send to a full queue.
pub(super) struct Delays<T> {
    state: Mutex<State<T>>,
    /// The timer waits on it: an earlier message, or the stop.
    changed: Condvar,
    /// Senders wait on it for room.
    room: Condvar,
    capacity: usize,
    /// Moves a due message on (into its queue).
    release: Box<dyn Fn(Entry<T>) + Send + Sync>,
    timer: Lazy<Thread>,
}

/// At most this many due messages move per lock taken (the rest in the next round).
const BATCH: usize = 256;

impl<T: Send + 'static> Delays<T> {
    pub(super) fn new(capacity: usize, release: impl Fn(Entry<T>) + Send + Sync + 'static) -> Delays<T> {
        Delays {
            release: Box::new(release),
            state: Mutex::new(State { heap: BinaryHeap::new(), seq: 0, stopped: false }),
            changed: Condvar::new(),
            room: Condvar::new(),
            capacity: capacity.max(1),
            timer: Lazy::default(),
        }
    }

    /// How many messages wait.
    pub(super) fn len(&self) -> usize {
        lock(&self.state).heap.len()
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
        let this = self.clone();
        self.timer.get_or_start(move || Thread::spawn("dingo-local-delays", move |_stop| this.run()))?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        while state.heap.len() >= self.capacity && !state.stopped {
            state = match deadline {
                None => wait(&self.room, state),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(BrokerError::new(
                            BrokerErrorKind::Full,
                            "the local broker's delayed tasks are full",
                        ));
                    }
                    wait_timeout(&self.room, state, left)
                }
            };
        }
        if state.stopped {
            return Err(crate::broker::kit::closed("the local broker"));
        }
        state.seq += 1;
        let seq = state.seq;
        let earliest = state.heap.peek().is_none_or(|Reverse(head)| due < head.due);
        state.heap.push(Reverse(Entry { due, seq, queue, item }));
        drop(state);
        if earliest {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Stops the timer and returns what was still waiting (in due order).
    pub(super) fn stop(&self) -> Vec<Entry<T>> {
        let mut state = lock(&self.state);
        state.stopped = true;
        let mut left = Vec::with_capacity(state.heap.len());
        while let Some(Reverse(entry)) = state.heap.pop() {
            left.push(entry);
        }
        drop(state);
        self.changed.notify_all();
        self.room.notify_all();
        left
    }

    /// The timer thread: sleeps until the earliest message is due, releases what is due.
    fn run(&self) {
        loop {
            let mut state = lock(&self.state);
            let now = loop {
                if state.stopped {
                    return;
                }
                let now = SystemTime::now();
                state = match state.heap.peek() {
                    None => wait(&self.changed, state),
                    Some(Reverse(head)) => match head.due.duration_since(now) {
                        Ok(left) if !left.is_zero() => wait_timeout(&self.changed, state, left),
                        _ => break now,
                    },
                };
            };
            let mut due = Vec::new();
            while due.len() < BATCH && state.heap.peek().is_some_and(|Reverse(head)| head.due <= now) {
                if let Some(Reverse(entry)) = state.heap.pop() {
                    due.push(entry);
                }
            }
            drop(state);
            self.room.notify_all();
            for entry in due {
                (self.release)(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn releases_in_due_order_not_send_order() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let delays = Arc::new(Delays::<u32>::new(16, move |e: Entry<u32>| {
            let _ = tx.send((e.item, SystemTime::now()));
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
    fn full_delays_wait_for_room_then_fail() {
        let delays = Arc::new(Delays::<u32>::new(1, |_| {}));
        let far = SystemTime::now() + Duration::from_secs(3600);
        delays.push(TaskName::from("t"), far, 1, None).unwrap();
        let error = delays.push(TaskName::from("t"), far, 2, Some(Duration::from_millis(20))).unwrap_err();
        assert_eq!(error.kind(), BrokerErrorKind::Full);
        let left = delays.stop();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].item, 1);
        assert!(delays.push(TaskName::from("t"), far, 3, None).is_err());
    }
}
