//! A call's reports as server-sent events: one event per report, in order.

use std::convert::Infallible;

use axum::response::sse::Event;
use dingo::{App, Handle, Report};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::STOPPING;
use crate::cancel::CancelOnDrop;
use crate::failure::ErrorBody;

/// One event per report of the call, in order, ending with its `result` or `failure`
/// (see the crate docs), or with a `shutdown` failure once `stopping` turns true; `P` is
/// the type of the task's progress values.
pub(crate) fn report_events<T, P>(
    app: &App,
    handle: Handle<T>,
    stopping: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Event, Infallible>> + use<T, P>
where
    T: Serialize + Send + 'static,
    P: Serialize + DeserializeOwned,
{
    let abandoned = CancelOnDrop::new(app, handle.key());
    let state = Some((handle.report_stream(), abandoned, stopping));
    futures::stream::unfold(state, |state| async move {
        let (mut reports, abandoned, mut stopping) = state?;
        let report = tokio::select! {
            report = reports.next() => report,
            Ok(_) = stopping.wait_for(|stopped| *stopped) => {
                // `abandoned` goes with this state: the call is cancelled.
                let message = format!("{STOPPING}: the call was cancelled");
                return Some((Ok(failure_event("shutdown", &message)), None));
            }
        };
        let Some(report) = report else {
            // The stream ends without a final report only when the app closed (it does not
            // say more): there is nothing left to cancel.
            abandoned.disarm();
            let message = "the call ended without a result: the app closed";
            return Some((Ok(failure_event("shutdown", message)), None));
        };
        let event = event_of::<T, P>(&report);
        if report.is_final() {
            abandoned.disarm();
            return Some((Ok(event), None));
        }
        Some((Ok(event), Some((reports, abandoned, stopping))))
    })
}

/// What a report looks like on the wire of the event stream.
fn event_of<T: Serialize, P: Serialize + DeserializeOwned>(report: &Report<T>) -> Event {
    match report {
        Report::Sent => Event::default().event("sent").data("{}"),
        Report::Progress(progress) => match progress.value::<P>() {
            None => Event::default().event("started").data("{}"),
            Some(Ok(value)) => json_event("progress", &value),
            Some(Err(e)) => Event::default().comment(format!("a progress report did not decode: {e}")),
        },
        Report::Retrying { attempt, after, error } => {
            let retrying = Retrying { attempt: *attempt, after_ms: after.as_millis(), error: error.message() };
            json_event("retrying", &retrying)
        }
        Report::Success(value) => json_event("result", value),
        Report::Failure(error) => failure_event(&error.kind().to_string(), error.message()),
        // A kind of report this example does not know yet.
        _ => Event::default().comment("a report of another kind"),
    }
}

#[derive(Serialize)]
struct Retrying<'a> {
    attempt: u32,
    after_ms: u128,
    error: &'a str,
}

fn failure_event(kind: &str, message: &str) -> Event {
    json_event("failure", &ErrorBody { error: message, kind })
}

fn json_event(name: &str, data: &impl Serialize) -> Event {
    match Event::default().event(name).json_data(data) {
        Ok(event) => event,
        Err(e) => Event::default().comment(format!("{name} did not encode: {e}")),
    }
}
