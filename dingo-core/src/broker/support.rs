//! Pieces that broker implementations share: components started on first use, the checks
//! every byte-carrying broker makes on a message, and the reply address of a call.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::ReplyTo;

/// A background component (a thread and its channels) started on first use; failing to
/// start is an error, not a panic, and two threads asking at once start it once.
pub struct Lazy<T> {
    cell: OnceLock<T>,
    starting: Mutex<()>,
}

impl<T> Lazy<T> {
    /// Not started yet.
    pub const fn new() -> Lazy<T> {
        Lazy { cell: OnceLock::new(), starting: Mutex::new(()) }
    }

    /// The component, started by `start` if it is not running yet.
    pub fn get_or_start(&self, start: impl FnOnce() -> Result<T, BrokerError>) -> Result<&T, BrokerError> {
        if let Some(started) = self.cell.get() {
            return Ok(started);
        }
        // Held only while starting; a panic in `start` leaves nothing half-set.
        let _starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        if self.cell.get().is_none() {
            let _ = self.cell.set(start()?);
        }
        self.cell.get().ok_or_else(|| BrokerError::new(BrokerErrorKind::Other, "a broker component did not start"))
    }

    /// The component, if it was started.
    pub fn get(&self) -> Option<&T> {
        self.cell.get()
    }
}

impl<T> Default for Lazy<T> {
    fn default() -> Lazy<T> {
        Lazy::new()
    }
}

impl<T> fmt::Debug for Lazy<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.cell.get().is_some() { "Lazy(started)" } else { "Lazy(not started)" })
    }
}

/// Refuses an encoded message (`what`: "task message", "report") longer than `limit` bytes
/// with [`BrokerErrorKind::TooLarge`].
pub fn check_size(what: &str, len: usize, limit: usize) -> Result<(), BrokerError> {
    if len > limit {
        return Err(BrokerError::new(
            BrokerErrorKind::TooLarge,
            format!("{what} of {len} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    Ok(())
}

/// Where the reports of a call go on a broker that carries bytes (`broker` names it in the
/// error): `None` when the caller wants none; an in-process reply cannot travel.
pub fn reply_address<'a>(to: &'a ReplyTo, broker: &str) -> Result<Option<&'a Arc<str>>, BrokerError> {
    match to {
        ReplyTo::None => Ok(None),
        ReplyTo::Address(address) => Ok(Some(address)),
        ReplyTo::Local(_) => {
            Err(BrokerError::new(BrokerErrorKind::Config, format!("an in-process reply cannot go through {broker}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_starts_once_and_reports_failure() {
        let lazy: Lazy<u32> = Lazy::new();
        assert!(lazy.get().is_none());
        let failed = lazy.get_or_start(|| Err(BrokerError::new(BrokerErrorKind::Connection, "down")));
        assert_eq!(failed.expect_err("failed").kind(), BrokerErrorKind::Connection);
        assert_eq!(*lazy.get_or_start(|| Ok(7)).expect("started"), 7);
        assert_eq!(*lazy.get_or_start(|| Ok(8)).expect("already started"), 7);
    }

    #[test]
    fn size_and_reply_checks() {
        assert!(check_size("report", 10, 10).is_ok());
        let error = check_size("report", 11, 10).expect_err("too large");
        assert_eq!(error.kind(), BrokerErrorKind::TooLarge);
        assert_eq!(error.to_string(), "report of 11 bytes exceeds the limit of 10 bytes");
        assert_eq!(reply_address(&ReplyTo::None, "x").expect("none"), None);
        let address = ReplyTo::Address(Arc::from("q"));
        assert_eq!(reply_address(&address, "x").expect("address").map(|a| &**a), Some("q"));
    }
}
