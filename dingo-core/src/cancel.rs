//! Cancels: the calls a process's workers must not start (and whose running tasks see
//! [`Context::is_cancelled`](crate::Context::is_cancelled)).
//!
//! A cancel is recorded by the task broker ([`Admin::cancel`](crate::broker::Admin::cancel)),
//! durably where the broker is remote, so a worker that starts after it, or that was cut off
//! when it was sent, still honours it. Each consumer keeps the cancels it knows in one
//! [`Cancels`] set ([`Consumer::cancels`](crate::broker::Consumer::cancels)), which the
//! workers read before they start a task and whenever a running task asks. Every cancel
//! expires (`until`), so the set stays bounded.
//!
//! Reading costs one atomic load while the set is empty, and one hash lookup behind a
//! read lock otherwise: a process that never cancels pays nothing measurable per task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crossbeam_channel::Sender;

use crate::id::{CallKey, TaskId, TaskName};

/// How long a cancel lasts unless the app says otherwise
/// ([`AppBuilder::cancel_ttl`](crate::AppBuilder::cancel_ttl)): a day.
pub const DEFAULT_CANCEL_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The size below which inserts do not prune.
const PRUNE_FROM: usize = 1024;

/// The cancels one consumer knows: call keys, each until a time.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use dingo_core::broker::Cancels;
/// use dingo_core::{CallKey, TaskId, TaskName};
///
/// let cancels = Cancels::new();
/// let key = CallKey::new(TaskName::from("add"), TaskId::new("7"));
/// assert!(!cancels.is_cancelled(&key.name, &key.id));
/// cancels.insert(key.clone(), SystemTime::now() + Duration::from_secs(60));
/// assert!(cancels.is_cancelled(&key.name, &key.id));
/// // Expired cancels no longer count, and `prune` drops them.
/// cancels.insert(CallKey::new(TaskName::from("add"), TaskId::new("8")), SystemTime::UNIX_EPOCH);
/// assert!(!cancels.is_cancelled(&TaskName::from("add"), &TaskId::new("8")));
/// cancels.prune(SystemTime::now());
/// assert_eq!(cancels.len(), 1);
/// ```
pub struct Cancels {
    /// By task name, then id: the time each cancel lapses.
    keys: RwLock<HashMap<TaskName, HashMap<TaskId, SystemTime>>>,
    /// How many keys `keys` holds (read without the lock: zero is the common case).
    count: AtomicUsize,
    /// Bumped by every insert, so a reader can tell whether anything changed.
    generation: AtomicU64,
    /// The size at which an insert prunes lapsed cancels (twice the size after the last
    /// prune): pruning stays amortized O(1) per insert.
    prune_at: AtomicUsize,
    /// Rung by every insert: the threads running async tasks, which drop a cancelled one.
    bells: Mutex<Vec<Sender<()>>>,
}

impl std::fmt::Debug for Cancels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancels").field("len", &self.len()).field("generation", &self.generation()).finish()
    }
}

impl Cancels {
    /// An empty set.
    pub fn new() -> Cancels {
        Cancels {
            keys: RwLock::default(),
            count: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            prune_at: AtomicUsize::new(PRUNE_FROM),
            bells: Mutex::new(Vec::new()),
        }
    }

    /// Rings `bell` after every insert (until its receiver is gone).
    pub(crate) fn ring_on_insert(&self, bell: Sender<()>) {
        crate::broker::kit::lock(&self.bells).push(bell);
    }

    /// Adds (or extends) the cancel of `key` until `until`. Returns whether the key was new.
    /// Once the set has doubled since it was last pruned, lapsed cancels are dropped first.
    pub fn insert(&self, key: CallKey, until: SystemTime) -> bool {
        if self.count.load(Ordering::Acquire) >= self.prune_at.load(Ordering::Relaxed) {
            self.prune(SystemTime::now());
            self.prune_at.store((self.len() * 2).max(PRUNE_FROM), Ordering::Relaxed);
        }
        let mut keys = crate::broker::kit::write(&self.keys);
        let ids = keys.entry(key.name).or_default();
        let new = match ids.get_mut(&key.id) {
            Some(known) => {
                *known = (*known).max(until);
                false
            }
            None => {
                ids.insert(key.id, until);
                self.count.fetch_add(1, Ordering::Release);
                true
            }
        };
        drop(keys);
        self.generation.fetch_add(1, Ordering::Release);
        crate::broker::kit::lock(&self.bells)
            .retain(|bell| !matches!(bell.try_send(()), Err(crossbeam_channel::TrySendError::Disconnected(_))));
        new
    }

    /// Whether the call `name`/`id` is cancelled (a cancel that lapsed does not count).
    #[inline]
    pub fn is_cancelled(&self, name: &TaskName, id: &TaskId) -> bool {
        if self.count.load(Ordering::Acquire) == 0 {
            return false;
        }
        self.lookup(name, id)
    }

    #[cold]
    fn lookup(&self, name: &TaskName, id: &TaskId) -> bool {
        let keys = crate::broker::kit::read(&self.keys);
        keys.get(name).and_then(|ids| ids.get(id)).is_some_and(|until| *until > SystemTime::now())
    }

    /// Drops the cancels that lapsed by `now` (a walk over the whole set: call it now and
    /// then, not per cancel).
    pub fn prune(&self, now: SystemTime) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut keys = crate::broker::kit::write(&self.keys);
        let mut removed = 0;
        keys.retain(|_, ids| {
            let before = ids.len();
            ids.retain(|_, until| *until > now);
            removed += before - ids.len();
            !ids.is_empty()
        });
        self.count.fetch_sub(removed, Ordering::Release);
    }

    /// How many cancels the set holds (lapsed ones until pruned).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A number that changes whenever a cancel is added.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl Default for Cancels {
    fn default() -> Cancels {
        Cancels::new()
    }
}
