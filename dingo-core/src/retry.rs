//! Retries: how many times a failing call runs again ([`RetryPolicy`]) and how long it waits
//! before each new attempt ([`Backoff`]).
//!
//! What retries: a task that returns `Err` (kind [`Failed`](crate::TaskErrorKind::Failed))
//! while attempts remain. What never does: a panic, a payload that does not decode, a
//! signature mismatch, an unknown task, a result that cannot be encoded, an expired call —
//! running those again gives the same outcome. A retry is a new message with the call's
//! name and id, `attempt + 1` and a due time, kept by the broker until then (the worker does
//! not sleep holding a thread); a worker killed while running an attempt has that same
//! attempt redelivered, which does not count as a retry.
//!
//! The policy travels in the message: it is the caller's (its call options over the task's
//! defaults, from the task's attribute where the caller links the task). A caller that calls
//! by name a task it does not link sends no retries unless it sets them; a worker without a
//! producer cannot send a next attempt, so its failures are final.

use std::cell::Cell;
use std::time::Duration;

/// How often a failing call is tried again, and how long it waits in between.
///
/// ```
/// use std::time::Duration;
/// use dingo_core::{Backoff, RetryPolicy};
///
/// let policy = RetryPolicy::new(3).backoff(Backoff::exponential(Duration::from_millis(100)).jitter(false));
/// assert_eq!(policy.retries(), 3);
/// // Attempt 1 failed: wait 100 ms; attempt 2: 200 ms; attempt 3: 400 ms; then no more.
/// assert_eq!(policy.delay_after(1), Some(Duration::from_millis(100)));
/// assert_eq!(policy.delay_after(3), Some(Duration::from_millis(400)));
/// assert_eq!(policy.delay_after(4), None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[must_use]
pub struct RetryPolicy {
    retries: u32,
    backoff: Backoff,
}

impl RetryPolicy {
    /// At most `retries` attempts after the first, with the default [`Backoff`].
    pub const fn new(retries: u32) -> RetryPolicy {
        RetryPolicy { retries, backoff: Backoff::DEFAULT }
    }

    /// No retries (the default).
    pub const NONE: RetryPolicy = RetryPolicy::new(0);

    /// Sets the backoff.
    pub const fn backoff(mut self, backoff: Backoff) -> RetryPolicy {
        self.backoff = backoff;
        self
    }

    /// How many attempts may follow the first.
    pub const fn retries(&self) -> u32 {
        self.retries
    }

    /// The backoff between attempts.
    pub const fn get_backoff(&self) -> Backoff {
        self.backoff
    }

    /// Whether a call may run again after `attempt` (1 for the first run) failed.
    pub const fn allows_after(&self, attempt: u32) -> bool {
        attempt <= self.retries
    }

    /// How long to wait after `attempt` (1 for the first run) failed, or `None` when no
    /// attempt is left.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        self.allows_after(attempt).then(|| self.backoff.delay(attempt))
    }
}

/// The wait before a retry: exponential, `base × 2^(attempt − 1)` capped at `cap`, with full
/// jitter by default (a uniformly random wait between zero and that, so callers that failed
/// together do not retry together — see AWS's "Exponential Backoff And Jitter").
///
/// Defaults: base 1 s, cap 10 min, full jitter.
///
/// ```
/// use std::time::Duration;
/// use dingo_core::Backoff;
///
/// let fixed = Backoff::fixed(Duration::from_secs(5));
/// assert_eq!(fixed.delay(1), Duration::from_secs(5));
/// assert_eq!(fixed.delay(9), Duration::from_secs(5));
///
/// let capped = Backoff::exponential(Duration::from_secs(1)).cap(Duration::from_secs(30)).jitter(false);
/// assert_eq!(capped.delay(4), Duration::from_secs(8));
/// assert_eq!(capped.delay(10), Duration::from_secs(30));
///
/// let jittered = Backoff::exponential(Duration::from_secs(1));
/// assert!(jittered.delay(4) <= Duration::from_secs(8));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use]
pub struct Backoff {
    /// Milliseconds (a message carries them so; compact, as every message holds a policy).
    base_ms: u32,
    cap_ms: u32,
    exponential: bool,
    jitter: bool,
}

/// `d` in whole milliseconds, at most `u32::MAX` (49 days).
const fn ms(d: Duration) -> u32 {
    let ms = d.as_millis();
    if ms > u32::MAX as u128 { u32::MAX } else { ms as u32 }
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff::DEFAULT
    }
}

impl Backoff {
    /// Exponential from 1 s, capped at 10 min, full jitter.
    pub const DEFAULT: Backoff = Backoff { base_ms: 1_000, cap_ms: 600_000, exponential: true, jitter: true };

    /// Exponential from `base` (cap 10 min, full jitter). Waits count in whole milliseconds
    /// (as messages carry them), up to 49 days.
    pub const fn exponential(base: Duration) -> Backoff {
        Backoff { base_ms: ms(base), ..Backoff::DEFAULT }
    }

    /// The same wait every time, no jitter.
    pub const fn fixed(delay: Duration) -> Backoff {
        Backoff { base_ms: ms(delay), cap_ms: ms(delay), exponential: false, jitter: false }
    }

    /// Sets the longest wait.
    pub const fn cap(mut self, cap: Duration) -> Backoff {
        self.cap_ms = ms(cap);
        self
    }

    /// Full jitter on (`true`, the default for exponential) or off.
    pub const fn jitter(mut self, on: bool) -> Backoff {
        self.jitter = on;
        self
    }

    /// The first wait.
    pub const fn get_base(&self) -> Duration {
        Duration::from_millis(self.base_ms as u64)
    }

    /// The longest wait.
    pub const fn get_cap(&self) -> Duration {
        Duration::from_millis(self.cap_ms as u64)
    }

    /// Whether the wait doubles with every attempt.
    pub const fn is_exponential(&self) -> bool {
        self.exponential
    }

    /// Whether full jitter is on.
    pub const fn has_jitter(&self) -> bool {
        self.jitter
    }

    /// The wait after `attempt` (1 for the first run) failed: at most
    /// `min(cap, base × 2^(attempt − 1))`, exactly that without jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let (base, cap) = (self.get_base(), self.get_cap());
        let ceiling = if self.exponential {
            let doublings = attempt.saturating_sub(1).min(31);
            base.checked_mul(1u32 << doublings).unwrap_or(cap)
        } else {
            base
        }
        .min(cap);
        if !self.jitter || ceiling.is_zero() {
            return ceiling;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(random() % nanos.saturating_add(1))
    }
}

/// A fast per-thread pseudo-random number (SplitMix64); jitter needs no cryptography.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let time = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            let here = &time as *const u64 as u64;
            time ^ here.rotate_left(32)
        });
    }
    STATE.with(|state| {
        let next = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(next);
        let mut z = next;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_doubles_up_to_the_cap() {
        let b = Backoff::exponential(Duration::from_millis(10)).cap(Duration::from_millis(50)).jitter(false);
        let waits: Vec<u64> = (1..=5).map(|a| b.delay(a).as_millis() as u64).collect();
        assert_eq!(waits, [10, 20, 40, 50, 50]);
        assert_eq!(b.delay(1_000), Duration::from_millis(50));
        assert_eq!(b.delay(0), Duration::from_millis(10));
    }

    #[test]
    fn full_jitter_stays_under_the_ceiling_and_varies() {
        let b = Backoff::exponential(Duration::from_millis(100));
        let waits: Vec<Duration> = (0..200).map(|_| b.delay(3)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(400)));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 150, "jitter should spread the waits: {} distinct", distinct.len());
    }

    #[test]
    fn policy_counts_attempts() {
        let p = RetryPolicy::new(2).backoff(Backoff::fixed(Duration::from_secs(1)));
        assert!(p.allows_after(1) && p.allows_after(2) && !p.allows_after(3));
        assert_eq!(RetryPolicy::NONE.delay_after(1), None);
        assert_eq!(RetryPolicy::default(), RetryPolicy::NONE);
    }
}
