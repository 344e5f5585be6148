//! Baselines on RabbitMQ without dingo: amiquip alone, doing the least that dingo's
//! guarantees need (persistent messages on a durable queue, publisher confirms, manual
//! acknowledgements), so each dingo figure has a same-run reference on the same server.

use std::time::{Duration, Instant};

use amiquip::{
    AmqpProperties, Auth, Channel, ConfirmSmoother, Connection, ConnectionOptions, ConnectionTuning, ConsumerMessage,
    ConsumerOptions, Publish, QueueDeclareOptions, QueueDeleteOptions,
};

use crate::{Measure, Outcome};

/// amiquip's warnings and errors on standard error: an I/O thread that ends says why only
/// through `log`, and its clients only see "i/o loop dropped sending side of a channel".
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{} {}: {}", record.level(), record.target(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once per process.
fn log_amiquip() {
    if log::set_logger(&Stderr).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

fn error(e: impl std::fmt::Display) -> dingo::Error {
    dingo::Error::Broker(dingo::BrokerError::new(dingo::BrokerErrorKind::Other, e.to_string()))
}

/// A connection to `url`'s host (`amqp://guest:guest@host:port/…`, default vhost) with
/// `TCP_NODELAY`, as dingo opens it.
fn connect(url: &str) -> Result<Connection, dingo::Error> {
    log_amiquip();
    let rest = url.strip_prefix("amqp://").ok_or_else(|| error("the raw baseline needs an amqp:// URL"))?;
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let host = rest.split(['/', '?']).next().unwrap_or("127.0.0.1:5672");
    let host = if host.contains(':') { host.to_owned() } else { format!("{host}:5672") };
    let stream = std::net::TcpStream::connect(&host).map_err(error)?;
    stream.set_nodelay(true).map_err(error)?;
    let stream = mio::net::TcpStream::from_stream(stream).map_err(error)?;
    Connection::insecure_open_stream(stream, ConnectionOptions::<Auth>::default(), ConnectionTuning::default())
        .map_err(error)
}

/// A request queue (durable) and a reply queue (transient) of one raw request-reply
/// baseline, named for this process and `kind`.
struct Exchange {
    requests: String,
    replies: String,
}

impl Exchange {
    fn declare(channel: &Channel, kind: &str) -> Result<Exchange, dingo::Error> {
        let requests = format!("dingo-bench-raw-{kind}req-{}", std::process::id());
        let replies = format!("dingo-bench-raw-{kind}rep-{}", std::process::id());
        durable_queue(channel, &requests)?;
        channel.queue_declare(replies.as_str(), QueueDeclareOptions::default()).map_err(error)?;
        Ok(Exchange { requests, replies })
    }

    /// The caller's consumer of the replies (no acks).
    fn replies<'a>(&self, channel: &'a Channel) -> Result<Consuming<'a>, dingo::Error> {
        Consuming::start(channel, &self.replies, ConsumerOptions { no_ack: true, ..ConsumerOptions::default() })
    }

    fn delete(self, channel: &Channel) -> Result<(), dingo::Error> {
        channel.queue_delete(self.requests, QueueDeleteOptions::default()).map_err(error)?;
        channel.queue_delete(self.replies, QueueDeleteOptions::default()).map_err(error)?;
        Ok(())
    }
}

/// A consumer that is cancelled safely when dropped. amiquip 0.4's own drop cancels, then
/// drops the receiver while its I/O thread may still be about to report the cancellation
/// there; that send fails and ends the whole connection ("i/o loop dropped sending side of
/// a channel" on the next call). This waits for the report first, as dingo-amqp does.
struct Consuming<'a>(amiquip::Consumer<'a>);

impl<'a> Consuming<'a> {
    fn start(channel: &'a Channel, queue: &str, options: ConsumerOptions) -> Result<Consuming<'a>, dingo::Error> {
        Ok(Consuming(channel.basic_consume(queue, options).map_err(error)?))
    }
}

impl<'a> std::ops::Deref for Consuming<'a> {
    type Target = amiquip::Consumer<'a>;

    fn deref(&self) -> &amiquip::Consumer<'a> {
        &self.0
    }
}

impl Drop for Consuming<'_> {
    fn drop(&mut self) {
        if self.0.cancel().is_ok() {
            let until = Instant::now() + Duration::from_secs(1);
            while let Ok(ConsumerMessage::Delivery(_)) = self.0.receiver().recv_deadline(until) {}
        }
    }
}

fn durable_queue(channel: &Channel, name: &str) -> Result<(), dingo::Error> {
    channel
        .queue_declare(name, QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() })
        .map_err(error)?;
    channel.queue_purge(name).map_err(error)?;
    Ok(())
}

fn persistent() -> AmqpProperties {
    AmqpProperties::default().with_delivery_mode(2)
}

/// `messages` persistent messages published with confirms (at most `window` unconfirmed) on
/// one connection, consumed with manual acknowledgement (prefetch 128) on another: what
/// fire-and-forget costs RabbitMQ at the least. Messages per second.
pub(crate) fn publish_consume(url: &str, messages: u64, window: usize) -> Outcome {
    let queue = format!("dingo-bench-raw-{}", std::process::id());
    let mut publishing = connect(url)?;
    let mut consuming = connect(url)?;
    let channel = publishing.open_channel(None).map_err(error)?;
    durable_queue(&channel, &queue)?;
    let confirms = channel.listen_for_publisher_confirms().map_err(error)?;
    channel.enable_publisher_confirms().map_err(error)?;
    let consumer_queue = queue.clone();
    let consumer = std::thread::spawn(move || -> Result<(), dingo::Error> {
        let channel = consuming.open_channel(None).map_err(error)?;
        channel.qos(0, 128, false).map_err(error)?;
        let consumer = Consuming::start(&channel, &consumer_queue, ConsumerOptions::default())?;
        let mut received = 0;
        while received < messages {
            if let ConsumerMessage::Delivery(delivery) = consumer.receiver().recv().map_err(error)? {
                consumer.ack(delivery).map_err(error)?;
                received += 1;
            }
        }
        Ok(())
    });
    let body = [7u8; 100];
    let start = Instant::now();
    let (mut sent, mut confirmed) = (0u64, 0u64);
    let mut smoother = ConfirmSmoother::new();
    while confirmed < messages {
        while sent < messages && sent - confirmed < window as u64 {
            channel.basic_publish("", Publish::with_properties(&body, queue.as_str(), persistent())).map_err(error)?;
            sent += 1;
        }
        let confirm = confirms.recv().map_err(error)?;
        confirmed += smoother.process(confirm).count() as u64;
    }
    consumer.join().map_err(|_| error("the consumer thread panicked"))??;
    let rate = messages as f64 / start.elapsed().as_secs_f64();
    channel.queue_delete(queue, QueueDeleteOptions::default()).map_err(error)?;
    Ok(Measure::Rate(rate))
}

/// Calls as dingo makes them, without dingo: `calls` persistent, confirmed requests on a
/// durable queue, at most `window` in flight; a responder on another connection publishes
/// a transient reply for each (confirmed) and acknowledges the request once the reply is
/// confirmed; the caller counts replies. Calls per second — the reference for
/// `amqp-inflight`.
pub(crate) fn inflight(url: &str, calls: u64, window: usize) -> Outcome {
    in_flight(url, calls, window, true, move |responding, request_queue, reply_queue| {
        let channel = responding.open_channel(None).map_err(error)?;
        channel.qos(0, 128, false).map_err(error)?;
        let confirms = channel.listen_for_publisher_confirms().map_err(error)?;
        channel.enable_publisher_confirms().map_err(error)?;
        let consumer = Consuming::start(&channel, request_queue, ConsumerOptions::default())?;
        let mut smoother = ConfirmSmoother::new();
        let mut waiting = std::collections::VecDeque::new();
        let mut acked = 0;
        while acked < calls {
            crossbeam_select(&consumer, &confirms, |event| -> Result<(), dingo::Error> {
                match event {
                    RawEvent::Delivery(delivery) => {
                        channel.basic_publish("", Publish::new(&delivery.body, reply_queue)).map_err(error)?;
                        waiting.push_back(*delivery);
                    }
                    RawEvent::Confirm(confirm) => {
                        for _ in smoother.process(confirm) {
                            if let Some(delivery) = waiting.pop_front() {
                                consumer.ack(delivery).map_err(error)?;
                                acked += 1;
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    })
}

/// At-most-once calls without dingo: `calls` transient requests published without
/// confirms, at most `window` in flight; a responder on another connection acknowledges each
/// request as it arrives (prefetch 128), then publishes a transient reply without a
/// confirm; the caller counts replies. Calls per second — the reference for
/// `amqp-inflight-at-most-once`.
pub(crate) fn inflight_at_most_once(url: &str, calls: u64, window: usize) -> Outcome {
    in_flight(url, calls, window, false, move |responding, request_queue, reply_queue| {
        let channel = responding.open_channel(None).map_err(error)?;
        channel.qos(0, 128, false).map_err(error)?;
        let consumer = Consuming::start(&channel, request_queue, ConsumerOptions::default())?;
        let mut answered = 0;
        while answered < calls {
            if let ConsumerMessage::Delivery(delivery) = consumer.receiver().recv().map_err(error)? {
                let body = delivery.body.clone();
                consumer.ack(delivery).map_err(error)?;
                channel.basic_publish("", Publish::new(&body, reply_queue)).map_err(error)?;
                answered += 1;
            }
        }
        Ok(())
    })
}

/// The caller's side of a raw in-flight run: `calls` requests on a durable queue (persistent
/// and confirmed when `confirmed`, else transient without confirms), at most `window`
/// unanswered, replies consumed without acks; `respond` serves the requests on a connection
/// of its own (its thread) until it answered them all. Calls per second.
fn in_flight(
    url: &str,
    calls: u64,
    window: usize,
    confirmed: bool,
    respond: impl FnOnce(&mut Connection, &str, &str) -> Result<(), dingo::Error> + Send + 'static,
) -> Outcome {
    let mut caller = connect(url)?;
    let mut responding = connect(url)?;
    let channel = caller.open_channel(None).map_err(error)?;
    let queues = Exchange::declare(&channel, if confirmed { "in" } else { "amo" })?;
    let request_confirms = if confirmed {
        let confirms = channel.listen_for_publisher_confirms().map_err(error)?;
        channel.enable_publisher_confirms().map_err(error)?;
        Some(confirms)
    } else {
        None
    };
    let (request_queue, reply_queue) = (queues.requests.clone(), queues.replies.clone());
    let responder = std::thread::spawn(move || respond(&mut responding, &request_queue, &reply_queue));
    let replies = queues.replies(&channel)?;
    let body = [7u8; 100];
    let properties = if confirmed { persistent() } else { AmqpProperties::default() };
    let start = Instant::now();
    let (mut sent, mut answered) = (0u64, 0u64);
    while answered < calls {
        while sent < calls && sent - answered < window as u64 {
            let request = Publish::with_properties(&body, queues.requests.as_str(), properties.clone());
            channel.basic_publish("", request).map_err(error)?;
            sent += 1;
        }
        if let ConsumerMessage::Delivery(_) = replies.receiver().recv().map_err(error)? {
            answered += 1;
        }
        if let Some(confirms) = &request_confirms {
            confirms.try_iter().for_each(drop);
        }
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    responder.join().map_err(|_| error("the responder thread panicked"))??;
    drop(replies);
    queues.delete(&channel)?;
    Ok(Measure::Rate(rate))
}

enum RawEvent {
    Delivery(Box<amiquip::Delivery>),
    Confirm(amiquip::Confirm),
}

/// Waits for the next delivery or confirm and hands it to `on`.
fn crossbeam_select(
    consumer: &Consuming<'_>,
    confirms: &crossbeam_channel::Receiver<amiquip::Confirm>,
    mut on: impl FnMut(RawEvent) -> Result<(), dingo::Error>,
) -> Result<(), dingo::Error> {
    crossbeam_channel::select! {
        recv(consumer.receiver()) -> message => match message.map_err(error)? {
            ConsumerMessage::Delivery(delivery) => on(RawEvent::Delivery(Box::new(delivery))),
            other => Err(error(format!("the request consumer ended: {other:?}"))),
        },
        recv(confirms) -> confirm => on(RawEvent::Confirm(confirm.map_err(error)?)),
    }
}

/// One request at a time: a persistent, confirmed request to a durable queue, answered by a
/// responder on another connection with a transient reply; p50 / p99 of the round trip —
/// the floor under dingo's sequential call→result latency.
pub(crate) fn request_reply(url: &str, requests: u64) -> Outcome {
    let mut caller = connect(url)?;
    let mut responding = connect(url)?;
    let channel = caller.open_channel(None).map_err(error)?;
    let queues = Exchange::declare(&channel, "")?;
    let _confirms = channel.listen_for_publisher_confirms().map_err(error)?;
    channel.enable_publisher_confirms().map_err(error)?;
    let (request_queue, reply_queue) = (queues.requests.clone(), queues.replies.clone());
    let responder = std::thread::spawn(move || -> Result<(), dingo::Error> {
        let channel = responding.open_channel(None).map_err(error)?;
        channel.qos(0, 128, false).map_err(error)?;
        let consumer = Consuming::start(&channel, &request_queue, ConsumerOptions::default())?;
        let mut answered = 0;
        while answered < requests {
            if let ConsumerMessage::Delivery(delivery) = consumer.receiver().recv().map_err(error)? {
                channel.basic_publish("", Publish::new(&delivery.body, reply_queue.as_str())).map_err(error)?;
                consumer.ack(delivery).map_err(error)?;
                answered += 1;
            }
        }
        Ok(())
    });
    let replies = queues.replies(&channel)?;
    let mut latencies = Vec::with_capacity(requests as usize);
    let start = Instant::now();
    for _ in 0..requests {
        let begin = Instant::now();
        channel
            .basic_publish("", Publish::with_properties(b"request", queues.requests.as_str(), persistent()))
            .map_err(error)?;
        while !matches!(replies.receiver().recv().map_err(error)?, ConsumerMessage::Delivery(_)) {}
        latencies.push(begin.elapsed());
    }
    let rate = requests as f64 / start.elapsed().as_secs_f64();
    responder.join().map_err(|_| error("the responder thread panicked"))??;
    drop(replies);
    queues.delete(&channel)?;
    latencies.sort();
    let at = |q: f64| latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)).copied();
    Ok(Measure::Latency { p50: at(0.50).unwrap_or(Duration::ZERO), p99: at(0.99).unwrap_or(Duration::ZERO), rate })
}
