//! A RabbitMQ resource alarm under running apps. A test binary of its own: the alarm blocks
//! every publisher on the server, so nothing else may run meanwhile (cargo runs test
//! binaries one after another).
#![cfg(feature = "amqp")]

use std::process::Command;
use std::time::{Duration, Instant};

use dingo::{App, Event, EventFilter, Level};
use dingo_test_support::PATIENCE;
use dingo_test_support::amqp::Amqp;

#[dingo::task(name = "amqp_alarm.double")]
fn double(n: u64) -> u64 {
    n * 2
}

fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl must be installed for this test");
    assert!(out.status.success(), "rabbitmqctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Sets the memory high watermark so low that RabbitMQ raises its memory alarm; restores
/// the previous setting on drop (even if the test fails).
struct Alarm {
    previous: String,
}

impl Alarm {
    fn raise() -> Alarm {
        let previous = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        rabbitmqctl(&["set_vm_memory_high_watermark", "absolute", "1"]);
        Alarm { previous }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        let restore = match self.previous.parse::<f64>() {
            Ok(_) => vec!["set_vm_memory_high_watermark", self.previous.as_str()],
            // `{absolute, N}` when it was set in bytes.
            Err(_) => {
                let bytes = self.previous.trim_matches(|c| c == '{' || c == '}').trim_start_matches("absolute,");
                vec!["set_vm_memory_high_watermark", "absolute", bytes]
            }
        };
        let _ = Command::new("rabbitmqctl").args(&restore).output();
    }
}

/// The first event whose message contains `text`, or fails after [`PATIENCE`].
fn expect_event(events: &dingo::Events, text: &str) -> Event {
    let deadline = Instant::now() + PATIENCE;
    while let Some(event) = events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if event.message.contains(text) {
            return event;
        }
    }
    panic!("no event saying {text:?} within {PATIENCE:?}");
}

/// RabbitMQ's memory alarm blocks a caller's publishing: the caller's app reports it (an
/// event, not silence), the call waits instead of failing, and once the alarm clears the
/// connection is unblocked (another event) and the call gets its result.
#[test]
fn a_resource_alarm_blocks_publishing_and_loses_nothing() {
    let Some(setup) = Amqp::setup() else { return };
    let worker = App::builder().broker(setup.broker()).build().expect("worker app");
    let caller = App::builder().broker(setup.broker()).build().expect("caller app");
    let events = caller.events(EventFilter::new().level(Level::Info));
    worker.allocate(double, 1).expect("allocate");
    assert_eq!(double::call(&caller, 1).expect("call").wait_timeout(PATIENCE).expect("works"), 2);

    let alarm = Alarm::raise();
    let mut handle = double::call(&caller, 21).expect("the call is accepted");
    let blocked = expect_event(&events, "blocks publishing");
    assert_eq!(blocked.level, Level::Warning, "{blocked:?}");
    assert!(handle.wait_timeout(Duration::from_millis(300)).is_err(), "no result while publishing is blocked");
    drop(alarm);
    expect_event(&events, "unblocked publishing");
    assert_eq!(handle.wait_timeout(PATIENCE).expect("the result after the alarm"), 42);
    caller.close().expect("close");
    worker.close().expect("close");
}
