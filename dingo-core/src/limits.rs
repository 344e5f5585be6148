//! [`TimeLimits`]: how long a task may run, in two steps as in Celery.
//!
//! - The **soft** limit is cooperative: once it passes,
//!   [`Context::is_cancelled`](crate::Context::is_cancelled) turns true (and
//!   [`Context::deadline`](crate::Context::deadline) told the task when it would), so the task
//!   can clean up and return. A value it returns then arrives as usual; an `Err` becomes a
//!   failure of kind [`TimeLimit`](crate::TaskErrorKind::TimeLimit).
//! - The **hard** limit is enforced: the call fails with `TimeLimit`, its message is settled
//!   (not redelivered), and the pool keeps its size. Rust cannot kill a thread, so the thread
//!   still running the task is *written off*: whatever it returns later is discarded, never
//!   reported (fenced, like a stale worker's), and a fresh worker thread takes its place at
//!   once. The written-off thread holds its stack and whatever the task holds until the task
//!   returns; a task that never returns leaks them. Prefer the soft limit for tasks that can
//!   check it; keep the hard one as the backstop.
//!
//! Limits travel in the task message (per call, [`CallOptions::time_limit`]), falling back to
//! the task's own (`#[dingo::task(time_limit = "30s", soft_time_limit = "25s")]` or
//! [`App::set_default_options`](crate::App::set_default_options)) on the worker. They are kept
//! in whole milliseconds, up to 49 days.
//!
//! [`CallOptions::time_limit`]: crate::CallOptions::time_limit

use std::time::Duration;

/// A task's soft and hard time limits (each optional).
///
/// ```
/// use std::time::Duration;
/// use dingo_core::TimeLimits;
///
/// let limits = TimeLimits::new().soft(Duration::from_secs(25)).hard(Duration::from_secs(30));
/// assert_eq!(limits.get_soft(), Some(Duration::from_secs(25)));
/// assert_eq!(limits.get_hard(), Some(Duration::from_secs(30)));
/// assert!(TimeLimits::NONE.is_none());
/// // Unset limits fall back to defaults.
/// let call = TimeLimits::new().hard(Duration::from_secs(5));
/// assert_eq!(call.or(limits).get_soft(), Some(Duration::from_secs(25)));
/// assert_eq!(call.or(limits).get_hard(), Some(Duration::from_secs(5)));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[must_use = "builder methods return the changed value; they do not change it in place"]
pub struct TimeLimits {
    /// In milliseconds; 0: none.
    soft: u32,
    /// In milliseconds; 0: none.
    hard: u32,
}

impl TimeLimits {
    /// No limit.
    pub const NONE: TimeLimits = TimeLimits { soft: 0, hard: 0 };

    /// No limit.
    pub fn new() -> TimeLimits {
        TimeLimits::NONE
    }

    /// Sets the soft limit (rounded up to a millisecond, at most 49 days).
    pub fn soft(mut self, limit: Duration) -> TimeLimits {
        self.soft = millis(limit);
        self
    }

    /// Sets the hard limit (rounded up to a millisecond, at most 49 days).
    pub fn hard(mut self, limit: Duration) -> TimeLimits {
        self.hard = millis(limit);
        self
    }

    /// The soft limit, if set.
    pub fn get_soft(self) -> Option<Duration> {
        (self.soft != 0).then(|| Duration::from_millis(self.soft.into()))
    }

    /// The hard limit, if set.
    pub fn get_hard(self) -> Option<Duration> {
        (self.hard != 0).then(|| Duration::from_millis(self.hard.into()))
    }

    /// Whether neither limit is set.
    #[inline]
    pub fn is_none(self) -> bool {
        self.soft == 0 && self.hard == 0
    }

    /// Each limit of `self`, or `defaults`' where `self` sets none.
    pub fn or(self, defaults: TimeLimits) -> TimeLimits {
        TimeLimits {
            soft: if self.soft != 0 { self.soft } else { defaults.soft },
            hard: if self.hard != 0 { self.hard } else { defaults.hard },
        }
    }

    /// The wire form: soft, then hard, milliseconds as little-endian `u32`s.
    pub(crate) fn to_bytes(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.soft.to_le_bytes());
        out[4..].copy_from_slice(&self.hard.to_le_bytes());
        out
    }

    pub(crate) fn from_bytes(bytes: [u8; 8]) -> TimeLimits {
        TimeLimits {
            soft: u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            hard: u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        }
    }
}

/// `limit` in whole milliseconds, rounded up (a limit of 1 µs is 1 ms, not none), saturating.
fn millis(limit: Duration) -> u32 {
    let ms = limit.as_nanos().div_ceil(1_000_000);
    u32::try_from(ms).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_up_saturate_and_round_trip() {
        let limits = TimeLimits::new().soft(Duration::from_micros(1)).hard(Duration::from_secs(u64::MAX));
        assert_eq!(limits.get_soft(), Some(Duration::from_millis(1)));
        assert_eq!(limits.get_hard(), Some(Duration::from_millis(u32::MAX.into())));
        assert_eq!(TimeLimits::from_bytes(limits.to_bytes()), limits);
        assert_eq!(TimeLimits::new().soft(Duration::ZERO), TimeLimits::NONE);
    }
}
