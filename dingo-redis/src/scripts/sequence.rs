//! The numbering of batches, so that a batch sent again applies once: every actor (a
//! sender, a worker thread, a listener) numbers its batches, and the scripts (`SEEN`, see
//! [`scripts`](super)) — or, for a transaction of plain commands, a `SET` — record the
//! number of the last batch applied in the actor's sequence key of the queue.

use crate::keys::QueueKeys;

/// How long a sequence key lives after its actor's last batch: a day. A batch retried
/// after a longer outage could apply twice.
pub(crate) const SEQ_TTL: &str = "86400000";

/// Numbers the batches of one actor (a sender, a worker thread, a listener): see `SEEN`.
pub(crate) struct Sequence {
    actor: String,
    next: u64,
}

impl Sequence {
    /// A new actor (`role` and a unique id: the numbers start over with it).
    pub(crate) fn new(role: &str, id: &str) -> Sequence {
        Sequence { actor: format!("{role}.{id}"), next: 1 }
    }

    /// The next batch's sequence key on `queue` and its number.
    pub(crate) fn next(&mut self, queue: &QueueKeys) -> (String, String) {
        let n = self.next;
        self.next += 1;
        (queue.seq(&self.actor), n.to_string())
    }

    /// The next batch's number for sequence key `key` (another actor's, sharing this
    /// actor's numbers: see the writer's delayed sends).
    pub(crate) fn next_for(&mut self, key: String) -> (String, String) {
        (key, self.next_number())
    }

    /// The next batch's number alone (the caller knows the key).
    pub(crate) fn next_number(&mut self) -> String {
        let n = self.next;
        self.next += 1;
        n.to_string()
    }

    /// This actor's sequence key on `queue`.
    pub(crate) fn key(&self, queue: &QueueKeys) -> String {
        queue.seq(&self.actor)
    }
}
