//! The cancel consumer: one thread per broker (`dingo-amqp-cancels`), started with its
//! first subscription, that reads the namespace's cancel stream (`NS.cancels`) into the
//! broker's [`Cancels`](dingo_core::broker::Cancels) set, from the stream's first message
//! and then live (see [Cancels](crate#cancels)).
//!
//! A stream is read, not drained: every consumer sees every message, and a reconnected
//! consumer goes on from the offset after the last one it read (`x-stream-offset`). Stream
//! consumers need a prefetch and acknowledgements (RabbitMQ's credit), nothing more.
//!
//! Markers make "read up to now" exact: [`CancelWatch::sync`] publishes a marker of its own
//! (confirmed) and waits until this thread reads it. A stream keeps the order in which
//! RabbitMQ stored its messages, so by then every cancel confirmed before the marker was
//! published has been read into the set. A subscription syncs before it consumes, on each
//! new channel, so a worker never starts a task cancelled before it (re)connected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::{AmqpProperties, AmqpValue, Channel, ConsumerMessage, ConsumerOptions, FieldTable};
use crossbeam_channel::Sender;
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::id::UuidV7;
use dingo_core::{BrokerError, CallKey, IdMaker, TaskId, TaskName};

use super::{Inner, Stop, Thread, lock};
use crate::conn::Backoff;
use crate::topology::{CANCEL_ID_HEADER, CANCEL_TASK_HEADER, CANCEL_UNTIL_HEADER, MARKER_HEADER};

/// How many stream messages RabbitMQ sends ahead of the consumer's acknowledgements.
const PREFETCH: u16 = 1024;

/// How often the reader looks up from the stream (to see a stop).
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// How long after the reader started an `INTERNAL_ERROR` is the fresh-stream fault of
/// RabbitMQ 3.10 (an info, not a warning).
const FRESH_STREAM: Duration = Duration::from_secs(10);

/// How often lapsed cancels are pruned from the set (a walk under its write lock; the set
/// also prunes itself as it grows, and lapsed cancels never count).
const PRUNE_LAPSED_EVERY: Duration = Duration::from_secs(60);

pub(crate) struct CancelWatch {
    watch: Arc<Watch>,
    thread: Thread,
}

struct Watch {
    /// The markers this process published and waits for, each with whom to tell.
    waiting: Mutex<HashMap<String, Sender<()>>>,
}

impl CancelWatch {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<CancelWatch, BrokerError> {
        let watch = Arc::new(Watch { waiting: Mutex::new(HashMap::new()) });
        let shared = watch.clone();
        let thread = Thread::spawn("dingo-amqp-cancels", move |stop| run(&inner, &shared, &stop))?;
        Ok(CancelWatch { watch, thread })
    }

    /// Returns once this broker's set holds every cancel RabbitMQ confirmed before the call
    /// (a marker published into the stream, then read back), or why not within `patience`.
    pub(crate) fn sync(&self, inner: &Inner, patience: Duration) -> Result<(), String> {
        let marker = UuidV7.next_id().as_str().to_owned();
        let (tell, told) = crossbeam_channel::bounded(1);
        lock(&self.watch.waiting).insert(marker.clone(), tell);
        let mut headers = FieldTable::new();
        headers.insert(MARKER_HEADER.into(), AmqpValue::LongString(marker.clone()));
        let result = inner
            .publish_to_cancels("publishing a marker into the cancel stream", headers)
            .map_err(|e| dingo_core::error::chain(&e))
            .and_then(|()| {
                told.recv_timeout(patience)
                    .map_err(|_| format!("the cancel stream was not read up to its end within {patience:?}"))
            });
        lock(&self.watch.waiting).remove(&marker);
        result
    }

    pub(crate) fn stop(&self) {
        self.thread.stop_and_join();
    }
}

fn run(inner: &Arc<Inner>, watch: &Watch, stop: &Stop) {
    let mut backoff = Backoff::new(&inner.options);
    // The offset to read from next (`None`: the stream's first message).
    let mut next: Option<i64> = None;
    let mut prune = Instant::now();
    let started = Instant::now();
    while !stop.is_set() {
        let session = match inner.streams() {
            Ok(session) => session,
            Err(error) => {
                backoff.broke(Instant::now(), &stop.flag);
                let _ = error;
                continue;
            }
        };
        let Some(opened) = session.channel("cancel consumer", &stop.flag) else { break };
        let since = Instant::now();
        if let Err(error) = follow(inner, watch, &opened.channel, stop, &mut next, &mut prune) {
            // RabbitMQ 3.10 may close a connection that uses a stream in its first moments
            // (`INTERNAL_ERROR`, see the crate docs): expected once, right after the stream
            // was declared, and read past without loss; anything else is a warning.
            let young = started.elapsed() < FRESH_STREAM && error.to_string().contains("INTERNAL_ERROR");
            inner.events.emit(Event::new(
                Origin::Consumer,
                if young { Level::Info } else { Level::Warning },
                EventKind::ReceiveFailed,
                format!(
                    "reading the cancel stream failed ({error}); reading on from where it stopped (subscriptions \
                     read it up to its end before they consume again)"
                ),
            ));
            session.channel_failed(opened.generation, "cancel consumer", &error);
            backoff.broke(since, &stop.flag);
        }
    }
}

/// Reads the stream until told to stop (`Ok`) or the channel breaks (`Err`).
fn follow(
    inner: &Inner,
    watch: &Watch,
    channel: &Channel,
    stop: &Stop,
    next: &mut Option<i64>,
    prune: &mut Instant,
) -> Result<(), String> {
    let text = |e: amiquip::Error| e.to_string();
    inner.declare_cancels().map_err(|e| dingo_core::error::chain(&e))?;
    channel.qos(0, PREFETCH, false).map_err(text)?;
    let offset = match *next {
        Some(offset) => AmqpValue::LongLongInt(offset),
        None => AmqpValue::LongString("first".into()),
    };
    let mut arguments = FieldTable::new();
    arguments.insert("x-stream-offset".into(), offset);
    let consumer = channel
        .basic_consume(inner.names.cancel_stream(), ConsumerOptions { arguments, ..ConsumerOptions::default() })
        .map_err(text)?;
    let receiver = consumer.receiver();
    while !stop.is_set() {
        let left = PRUNE_EVERY.saturating_sub(prune.elapsed());
        let mut next_message = crossbeam_channel::select! {
            recv(receiver) -> message => match message {
                Ok(message) => Some(message),
                Err(_) => return Err("the connection stopped delivering the cancel stream".to_owned()),
            },
            recv(stop.signal) -> _ => None,
            default(left) => None,
        };
        if prune.elapsed() >= PRUNE_LAPSED_EVERY {
            inner.cancels.prune(SystemTime::now());
            *prune = Instant::now();
        }
        let mut last = None;
        while let Some(message) = next_message {
            match message {
                ConsumerMessage::Delivery(delivery) => {
                    if let Some(offset) = stream_offset(&delivery.properties) {
                        *next = Some(offset + 1);
                    }
                    read(inner, watch, &delivery.properties);
                    last = Some(delivery);
                }
                ConsumerMessage::ServerCancelled => {
                    // The stream was deleted: a new one starts from offset 0 again.
                    *next = None;
                    inner.forget_cancels();
                    return Err("RabbitMQ cancelled the cancel stream's consumer (was it deleted?)".to_owned());
                }
                ConsumerMessage::ServerClosedChannel(e) | ConsumerMessage::ServerClosedConnection(e) => {
                    return Err(e.to_string());
                }
                _ => return Err("the cancel stream's consumer ended".to_owned()),
            }
            next_message = receiver.try_recv().ok();
        }
        if let Some(last) = last {
            last.ack_multiple(channel).map_err(text)?;
        }
    }
    crate::conn::cancelled(&consumer, drop);
    Ok(())
}

/// A stream message's offset (RabbitMQ's `x-stream-offset` header on every delivery).
fn stream_offset(properties: &AmqpProperties) -> Option<i64> {
    match properties.headers().as_ref()?.get("x-stream-offset")? {
        AmqpValue::LongLongInt(n) => Some(*n),
        AmqpValue::LongInt(n) => Some(i64::from(*n)),
        AmqpValue::LongUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Acts on one stream message: a cancel goes into the set (unless it lapsed already), a
/// marker this process waits for is reported read; anything else is ignored.
fn read(inner: &Inner, watch: &Watch, properties: &AmqpProperties) {
    let Some(headers) = properties.headers().as_ref() else { return };
    let text = |name: &str| match headers.get(name) {
        Some(AmqpValue::LongString(value)) => Some(value.clone()),
        _ => None,
    };
    if let Some(marker) = text(MARKER_HEADER) {
        if let Some(tell) = lock(&watch.waiting).remove(&marker) {
            let _ = tell.try_send(());
        }
        return;
    }
    let (Some(task), Some(id), Some(until)) = (text(CANCEL_TASK_HEADER), text(CANCEL_ID_HEADER), until(headers)) else {
        return;
    };
    if until > SystemTime::now() {
        inner.cancels.insert(CallKey { name: TaskName::from(task.as_str()), id: TaskId::new(&id) }, until);
    }
}

fn until(headers: &FieldTable) -> Option<SystemTime> {
    let ms = match headers.get(CANCEL_UNTIL_HEADER)? {
        AmqpValue::LongLongInt(n) => u64::try_from(*n).ok()?,
        _ => return None,
    };
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

/// A cancel's headers in the stream.
pub(crate) fn cancel_headers(key: &CallKey, until: SystemTime) -> FieldTable {
    let ms = until.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut headers = FieldTable::new();
    headers.insert(CANCEL_TASK_HEADER.into(), AmqpValue::LongString(key.name.as_str().to_owned()));
    headers.insert(CANCEL_ID_HEADER.into(), AmqpValue::LongString(key.id.as_str().to_owned()));
    headers.insert(CANCEL_UNTIL_HEADER.into(), AmqpValue::LongLongInt(ms));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_keeps_its_key_and_time_to_the_millisecond() {
        let key = CallKey { name: TaskName::from("shop.total"), id: TaskId::new("42") };
        let at = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let headers = cancel_headers(&key, at);
        assert_eq!(until(&headers), Some(at));
        assert_eq!(headers.get(CANCEL_TASK_HEADER), Some(&AmqpValue::LongString("shop.total".into())));
        assert_eq!(headers.get(CANCEL_ID_HEADER), Some(&AmqpValue::LongString("42".into())));
        let offset = AmqpProperties::default().with_headers({
            let mut h = FieldTable::new();
            h.insert("x-stream-offset".into(), AmqpValue::LongLongInt(7));
            h
        });
        assert_eq!(stream_offset(&offset), Some(7));
        assert_eq!(stream_offset(&AmqpProperties::default()), None);
    }
}
