//! Where everything lives in Redis; the layout is documented in `keys.md` (part of the
//! crate docs).

use std::fmt::Write;

/// The keys of one task's queue (for one broker: its reply lists are this process's).
#[derive(Debug)]
pub(crate) struct QueueKeys {
    /// The task's name.
    pub(crate) task: String,
    /// `NS:{T}` — the prefix of every key of the queue.
    pub(crate) prefix: String,
    pub(crate) pending: String,
    pub(crate) amo: String,
    pub(crate) wake: String,
    /// Consumer → lease deadline.
    pub(crate) consumers: String,
    /// The prefix of the consumers' processing lists (+ consumer id).
    pub(crate) processing: String,
    pub(crate) dead: String,
    /// How many bytes the dead-letter list holds (kept by the scripts that write it).
    pub(crate) dead_bytes: String,
    /// Delayed messages, scored by due time (ms since the Unix epoch).
    pub(crate) delayed: String,
    /// A token when a message is due before all the others in `delayed`: what promoters
    /// block on.
    pub(crate) delayed_wake: String,
    /// The cancelled calls of the queue: id → until (ms since the Unix epoch).
    pub(crate) cancelled: String,
    /// The queue's cancel log: id → the generation of its last cancel, so a process loads
    /// only the cancels newer than those it has (see `scripts::CANCELS`).
    pub(crate) cancelled_log: String,
    /// The queue's cancel generation: changes with every cancel (see `scripts::CANCEL`).
    pub(crate) cancelled_gen: String,
    /// The cancel generation whose cancels this process has loaded into its `Cancels` (0:
    /// none). Stored only after the cancels it stands for are in the set.
    pub(crate) cancel_gen: std::sync::atomic::AtomicU64,
    /// The reply list of the process these keys were made for, and its notify list.
    pub(crate) reply_here: String,
    pub(crate) notify_here: String,
    /// Whether this process's listener waits on `reply_here` already (checked on every call,
    /// without the listener's lock).
    pub(crate) listened: std::sync::atomic::AtomicBool,
}

impl QueueKeys {
    pub(crate) fn new(namespace: &str, task: &str, process: &str) -> QueueKeys {
        let prefix = format!("{namespace}:{{{}}}", escape(task));
        let key = |kind: &str| format!("{prefix}:{kind}");
        QueueKeys {
            pending: key("pending"),
            amo: key("amo"),
            wake: key("wake"),
            consumers: key("consumers"),
            processing: key("processing:"),
            dead: key("dead"),
            dead_bytes: key("dead:bytes"),
            delayed: key("delayed"),
            delayed_wake: key("delayed:wake"),
            cancelled: key("cancelled"),
            cancelled_gen: key("cancelled:gen"),
            cancelled_log: key("cancelled:log"),
            cancel_gen: std::sync::atomic::AtomicU64::new(0),
            reply_here: key(&format!("reply:{process}")),
            notify_here: key(&format!("notify:{process}")),
            listened: std::sync::atomic::AtomicBool::new(false),
            prefix,
            task: task.to_owned(),
        }
    }

    /// The reply list of caller `caller` for this task.
    pub(crate) fn reply(&self, caller: &str) -> String {
        format!("{}:reply:{caller}", self.prefix)
    }

    /// Whether `key` is [`reply`](QueueKeys::reply)`(caller)`, without building it.
    pub(crate) fn is_reply(&self, key: &str, caller: &str) -> bool {
        key.strip_prefix(self.prefix.as_str()).and_then(|rest| rest.strip_prefix(":reply:")) == Some(caller)
    }

    /// The notify list of caller `caller` for this task: a token while reports wait.
    pub(crate) fn notify(&self, caller: &str) -> String {
        format!("{}:notify:{caller}", self.prefix)
    }

    /// The sequence key of `actor` on this queue: the number of its last batch applied.
    pub(crate) fn seq(&self, actor: &str) -> String {
        format!("{}:seq:{actor}", self.prefix)
    }
}

/// The set of declared task names.
pub(crate) fn tasks(namespace: &str) -> String {
    format!("{namespace}:tasks")
}

/// The control list of one blocking connection (`owner`: a worker thread's id, or a broker's
/// process id and `:reply` for its report listener): wake-ups and stops.
pub(crate) fn control(namespace: &str, owner: &str) -> String {
    format!("{namespace}:ctl:{owner}")
}

/// How long a control list outlives its last token: tokens are taken within a block timeout
/// by a live thread, and one left by a thread that was busy when it came, or that is gone,
/// must not stay forever.
pub(crate) const CONTROL_TTL: std::time::Duration = std::time::Duration::from_secs(60);

fn escape(task: &str) -> String {
    let mut out = String::with_capacity(task.len());
    for c in task.chars() {
        match c {
            '{' | '}' | '%' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_keys_of_a_queue_share_one_hash_tag() {
        let keys = QueueKeys::new("ns", "math.add", "p1");
        for key in [
            &keys.pending,
            &keys.amo,
            &keys.wake,
            &keys.consumers,
            &keys.processing,
            &keys.dead,
            &keys.dead_bytes,
            &keys.delayed,
            &keys.delayed_wake,
            &keys.cancelled,
            &keys.cancelled_gen,
            &keys.cancelled_log,
        ] {
            assert!(key.starts_with("ns:{math.add}:"), "{key}");
        }
        assert_eq!(keys.reply("c1"), "ns:{math.add}:reply:c1");
        assert_eq!(keys.reply_here, "ns:{math.add}:reply:p1");
        assert!(keys.is_reply(&keys.reply("c1"), "c1"));
        assert!(!keys.is_reply(&keys.reply("c1"), "c"));
        assert!(!keys.is_reply(&keys.reply("c1"), "c12"));
        assert!(!keys.is_reply(&QueueKeys::new("ns", "math.mul", "p1").reply("c1"), "c1"));
        assert!(!keys.is_reply(&keys.notify("c1"), "c1"));
    }

    #[test]
    fn braces_in_names_cannot_break_the_tag() {
        assert_eq!(QueueKeys::new("ns", "a}b{c%", "p").pending, "ns:{a%7Db%7Bc%25}:pending");
    }
}
