//! [`Context`]: what a running task knows about its call.

use std::fmt;

use serde::Serialize;

use crate::broker::Reporter;
use crate::codec::Encoded;
use crate::codec::{Codec, encode};
use crate::event::{Event, EventKind, EventSink, Level, Origin};
use crate::id::{CallKey, TaskId, TaskName};
use crate::message::{ReplyTo, ReportBody, ReportMessage};
use crate::options::TaskOptions;

/// The running call, injected into a task that takes a `&dingo::Context` parameter (it is
/// not sent by the caller).
///
/// ```
/// # fn main() -> Result<(), dingo_core::Error> {
/// use dingo_core::{App, CallOptions, Context, Report};
///
/// let app = App::local()?;
/// app.register_with_context("resize", |ctx: &Context<'_>, pixels: Vec<u8>| {
///     ctx.progress(0.5); // delivered only with `monitor_progress`
///     Ok::<usize, String>(pixels.len() / 4)
/// })?;
/// app.allocate("resize", 1)?;
///
/// let opts = CallOptions::new().monitor_progress(true);
/// let reports: Vec<Report<usize>> = app.call_with("resize", &opts, vec![0u8; 64])?.reports().collect();
/// assert!(matches!(&reports[2], Report::Progress(p) if p.value::<f64>().unwrap().unwrap() == 0.5));
/// assert_eq!(reports[3], Report::Success(16));
/// # app.close()
/// # }
/// ```
pub struct Context<'a> {
    pub(crate) name: &'a TaskName,
    pub(crate) id: &'a TaskId,
    pub(crate) options: TaskOptions,
    pub(crate) redelivered: bool,
    pub(crate) reply_to: &'a ReplyTo,
    pub(crate) reporter: &'a dyn Reporter,
    pub(crate) codec: &'a dyn Codec,
    pub(crate) events: &'a EventSink,
}

impl Context<'_> {
    /// The call's id.
    pub fn id(&self) -> &TaskId {
        self.id
    }

    /// The task's name.
    pub fn name(&self) -> &TaskName {
        self.name
    }

    /// The call's identity.
    pub fn key(&self) -> CallKey {
        CallKey { name: self.name.clone(), id: self.id.clone() }
    }

    /// The options the caller chose.
    pub fn options(&self) -> TaskOptions {
        self.options
    }

    /// Whether the broker delivered this call before (a worker died or gave it back): the
    /// task may have run, fully or partly, already.
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Sends a progress report to the caller, if it asked for them (`monitor_progress`);
    /// otherwise does nothing. A failure to report becomes an event, never a task error.
    pub fn progress<P: Serialize>(&self, value: P) {
        if !self.options.monitor_progress || !self.reply_to.wants_reports() {
            return;
        }
        let sent = encode(self.codec, &value).map_err(|e| crate::error::chain(&e)).and_then(|bytes| {
            let body = ReportBody::Progress(Some(Encoded::new(self.codec.id(), bytes)));
            let report = ReportMessage { name: self.name.clone(), id: self.id.clone(), body };
            self.reporter.report(self.reply_to, report).map_err(|e| crate::error::chain(&e))
        });
        if let Err(message) = sent {
            self.events.emit(
                Event::new(
                    Origin::Worker,
                    Level::Warning,
                    EventKind::ReportFailed,
                    format!("progress report lost: {message}"),
                )
                .with_task(self.key()),
            );
        }
    }
}

impl fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("name", self.name)
            .field("id", self.id)
            .field("options", &self.options)
            .field("redelivered", &self.redelivered)
            .finish()
    }
}
