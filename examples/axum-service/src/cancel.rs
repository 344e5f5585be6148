//! Cancelling the calls nobody waits for any more.

use dingo::{App, CallKey};

/// Cancels a call when dropped, unless [disarmed](CancelOnDrop::disarm) once its final
/// report arrived: dropping a handle does not stop its task, and nobody is left to read
/// its result.
pub(crate) struct CancelOnDrop {
    app: App,
    key: Option<CallKey>,
}

impl CancelOnDrop {
    pub(crate) fn new(app: &App, key: &CallKey) -> CancelOnDrop {
        CancelOnDrop { app: app.clone(), key: Some(key.clone()) }
    }

    pub(crate) fn disarm(mut self) {
        self.key = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let app = self.app.clone();
        let cancel = move || match app.cancel(&key.name, &key.id) {
            Ok(()) | Err(dingo::Error::Shutdown) => {}
            Err(e) => eprintln!("could not cancel {} {}: {}", key.name, key.id, dingo::error::chain(&e)),
        };
        // `cancel` is a round trip to the broker: off the runtime's threads.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(cancel)),
            Err(_) => cancel(),
        }
    }
}
