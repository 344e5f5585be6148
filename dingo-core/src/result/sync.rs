//! The synchronization a result slot uses: std's, or loom's when the crate is built for the
//! model test of the waker hand-off (`RUSTFLAGS="--cfg dingo_loom"`, see `loom.rs` beside).

use std::time::Duration;

#[cfg(not(dingo_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(not(dingo_loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

#[cfg(dingo_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, Ordering};
#[cfg(dingo_loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

/// Locks `mutex`, using the data even if a holder panicked (a panicking callback leaves the
/// state consistent).
#[inline]
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `condvar` with `guard` (see [`lock`]).
#[inline]
pub(crate) fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits on `condvar` with `guard` for at most `timeout` (see [`wait`]).
#[inline]
pub(crate) fn wait_timeout<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>, timeout: Duration) -> MutexGuard<'a, T> {
    condvar.wait_timeout(guard, timeout).unwrap_or_else(|e| e.into_inner()).0
}
