//! The runtime of [dingo](https://docs.rs/dingo), a distributed task framework: the
//! [`App`], the task registry, worker pools, reports and result handles, codecs, events,
//! the broker role traits and the embedded [`LocalBroker`].
//!
//! Most programs use the `dingo` facade crate and its `#[dingo::task]` macro; this crate is
//! what broker implementations (`dingo-redis`, `dingo-amqp`) build on.
//!
//! ```
//! # fn main() -> Result<(), dingo_core::Error> {
//! use dingo_core::App;
//!
//! let app = App::local()?;                        // in-process broker, no server
//! app.register("greet", |name: String| format!("hello, {name}"))?;
//! app.allocate("greet", 2)?;                      // two worker threads
//! let greeting: String = app.call("greet", "dingo".to_string())?.wait()?;
//! assert_eq!(greeting, "hello, dingo");
//! app.close()
//! # }
//! ```
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod app;
pub mod broker;
mod cancel;
pub mod codec;
mod context;
pub mod error;
pub mod event;
mod hash;
pub mod id;
mod limits;
pub mod message;
mod options;
pub mod registry;
mod report;
mod result;
pub mod retry;
mod spin;
mod worker;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

/// What the workspace's broker crates share with the runtime beyond the broker kit (the
/// fast hash map). Not a public API: it may change in any release, and the `dingo` facade
/// does not re-export it.
#[doc(hidden)]
pub mod __internal {
    pub use crate::hash::{FastMap, FxHasher};
}

pub use app::{App, AppBuilder, CallFuture};
pub use broker::DeadLetter;
pub use broker::local::{LocalBroker, LocalOptions};
pub use codec::{Codec, CodecError, Encoded};
pub use context::Context;
pub use error::{BrokerError, BrokerErrorKind, Error, Role, TaskError, TaskErrorKind};
pub use event::{Event, EventFilter, EventKind, Events, Level, Origin, Origins};
pub use id::{CallKey, IdMaker, Sequential, TaskId, TaskName, UuidV7};
pub use limits::TimeLimits;
pub use options::{CallOptions, TaskOptions, When};
pub use registry::{Task, TaskRef};
pub use report::{Progress, Report};
pub use result::{Handle, HandleFuture, HandleFutureMut, ReportStream, Reports};
pub use retry::{Backoff, RetryPolicy};
