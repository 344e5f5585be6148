// A builder method returns the changed value and leaves its receiver alone, so calling one
// and dropping the result does nothing: each line below is an error under
// `deny(unused_must_use)` (a warning by default).
#![deny(unused_must_use)]

use std::time::Duration;

use dingo::broker::{ConsumeSettings, Delivery};
use dingo::codec::{Encoded, MSGPACK};
use dingo::message::{Payload, ReplyTo, TaskMessage};
use dingo::{App, CallOptions, Event, EventFilter, EventKind, Level, LocalOptions, Origin, TaskId, TaskOptions};

fn message() -> TaskMessage {
    TaskMessage::new("t".into(), TaskId::new("1"), 0, Payload::Encoded(Encoded::new(MSGPACK, vec![])))
}

fn main() {
    let options = CallOptions::new();
    options.clone().ignore_report(true);
    CallOptions::new().monitor_progress(true);
    CallOptions::new();
    EventFilter::new().level(Level::Warning);
    App::builder().shutdown_grace(Duration::from_secs(1));
    LocalOptions::new().capacity(8);
    TaskOptions::new();
    ConsumeSettings::new(2);
    Event::new(Origin::App, Level::Info, EventKind::Started, "x").with_task(dingo::CallKey::new("t", "1"));
    message().with_reply_to(ReplyTo::None);
    message().with_options(TaskOptions::new());
    Delivery::new(message()).with_redelivered(true);
    Delivery::new(message()).with_ack(None);
    drop(options);
}
