//! The report listener: one thread per broker consuming this process's reply queue and
//! routing every report to its call's handle by (task name, id). Many calls waiting cost
//! no channel each. Reports are acknowledged in batches once routed; after a reconnection
//! the queue (which outlives its connection) is consumed again, so nothing in it is lost.

use std::sync::Arc;
use std::time::Instant;

use amiquip::{Channel, ConsumerMessage, ConsumerOptions};
use crossbeam_channel::Sender;
use dingo_core::broker::support;
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::wire;
use dingo_core::{BrokerError, BrokerErrorKind};

use super::{Inner, Stop, Thread};
use crate::conn::{Backoff, amqp_error};
use crate::topology;

/// How many reports RabbitMQ sends ahead of the listener's acknowledgements.
const PREFETCH: u16 = 2048;

pub(crate) struct Listener {
    thread: Thread,
}

impl Listener {
    /// Starts the thread and waits until the reply queue is declared (a worker must never
    /// publish a report into a queue that does not exist yet).
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Listener, BrokerError> {
        let (ready, declared) = crossbeam_channel::bounded(1);
        let patience = inner.options.connect_timeout * 2;
        let thread = Thread::spawn("dingo-amqp-reply", move |stop| run(&inner, &stop, &mut Some(ready)))?;
        let listener = Listener { thread };
        let failed = match declared.recv_timeout(patience) {
            Ok(Ok(())) => return Ok(listener),
            Ok(Err(e)) => e,
            Err(_) => BrokerError::new(BrokerErrorKind::Connection, "the reply queue could not be declared in time"),
        };
        // Not left behind: a later `watch` starts another.
        listener.stop();
        Err(failed)
    }

    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

fn run(inner: &Arc<Inner>, stop: &Stop, ready: &mut Option<Sender<Result<(), BrokerError>>>) {
    let mut backoff = Backoff::new(&inner.options);
    while !stop.is_set() {
        let Some(opened) = inner.session.channel("report listener", &stop.flag) else { break };
        let since = Instant::now();
        if let Err(e) = topology::declare_reply(&opened.channel, &inner.options, &inner.reply_queue) {
            if let Some(ready) = ready.take() {
                // At start: the caller learns why (a declaration the server refuses will not
                // succeed by retrying).
                let _ = ready.send(Err(amqp_error("declaring the reply queue failed", e)));
                return;
            }
            inner.session.channel_failed(opened.generation, "report listener", &e.to_string());
            backoff.broke(since, &stop.flag);
            continue;
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(Ok(()));
        }
        if let Err(error) = listen(inner, &opened.channel, stop) {
            inner.events.emit(Event::new(
                Origin::Store,
                Level::Warning,
                EventKind::ReceiveFailed,
                format!("receiving reports failed ({error}); listening again"),
            ));
            inner.session.channel_failed(opened.generation, "report listener", &error);
            backoff.broke(since, &stop.flag);
        }
    }
}

/// Routes reports until told to stop (`Ok`) or the channel breaks (`Err`).
fn listen(inner: &Inner, channel: &Channel, stop: &Stop) -> Result<(), String> {
    channel.qos(0, PREFETCH, false).map_err(|e| e.to_string())?;
    let consumer =
        channel.basic_consume(inner.reply_queue.to_string(), ConsumerOptions::default()).map_err(|e| e.to_string())?;
    let receiver = consumer.receiver();
    while !stop.is_set() {
        let mut last = None;
        let mut next = crossbeam_channel::select! {
            recv(receiver) -> message => match message {
                Ok(message) => Some(message),
                Err(_) => return Err("the connection stopped delivering reports".to_owned()),
            },
            recv(stop.signal) -> _ => None,
        };
        // Route what has arrived, then acknowledge it all at once.
        while let Some(message) = next {
            match message {
                ConsumerMessage::Delivery(mut delivery) => {
                    route(inner, std::mem::take(&mut delivery.body), delivery.body_size);
                    last = Some(delivery);
                }
                ConsumerMessage::ServerClosedChannel(e) | ConsumerMessage::ServerClosedConnection(e) => {
                    return Err(e.to_string());
                }
                _ => return Err("the reply queue's consumer was cancelled".to_owned()),
            }
            next = if last.is_some() { receiver.try_recv().ok() } else { None };
        }
        if let Some(last) = last {
            last.ack_multiple(channel).map_err(|e| e.to_string())?;
        }
    }
    // Reports that arrive meanwhile stay unacknowledged: the queue keeps them.
    crate::conn::cancelled(&consumer, drop);
    Ok(())
}

/// Routes one report; `body` holds only its first bytes when its announced `size` is over
/// the limit (see `conn`).
fn route(inner: &Inner, body: Vec<u8>, size: u64) {
    let limit = inner.options.max_message_size;
    if size > limit as u64 {
        inner.stats.oversize.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        let oversize = support::oversize_report(&body, len, limit, &inner.reply_queue);
        inner.events.emit(Event::new(Origin::Store, Level::Error, EventKind::TooLarge, oversize.message));
        if let Some(failure) = oversize.failure {
            inner.router.route(failure);
        }
        return;
    }
    match wire::decode_report_from(body, &wire::Known { name: None, address: None }) {
        Ok(report) => {
            inner.router.route(report);
        }
        Err(e) => inner.events.emit(Event::new(
            Origin::Store,
            Level::Warning,
            EventKind::MalformedMessage,
            format!("an undecodable report in `{}` was dropped: {}", inner.reply_queue, dingo_core::error::chain(&e)),
        )),
    }
}
