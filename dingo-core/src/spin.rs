//! Polling for a short while before sleeping: a wake-up costs tens of microseconds, a
//! result or task that is microseconds away costs nothing when polled.

use std::time::{Duration, Instant};

/// Calls `poll` until it yields something or `budget` has passed. Past half the budget it
/// also yields the core now and then, in case more threads want to run than there are cores.
pub(crate) fn spin<R>(budget: Duration, mut poll: impl FnMut() -> Option<R>) -> Option<R> {
    if budget.is_zero() {
        return poll();
    }
    let start = Instant::now();
    let mut round = 0u32;
    loop {
        if let Some(found) = poll() {
            return Some(found);
        }
        for _ in 0..32 {
            std::hint::spin_loop();
        }
        round = round.wrapping_add(1);
        if round.is_multiple_of(64) {
            let elapsed = start.elapsed();
            if elapsed > budget {
                return None;
            }
            if elapsed > budget / 2 {
                std::thread::yield_now();
            }
        }
    }
}
