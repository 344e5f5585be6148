//! Queue and exchange names, and their declarations (idempotent: declaring what exists with
//! the same arguments changes nothing).
//!
//! # Delays
//!
//! A delayed message waits in RabbitMQ, in a chain of [`DELAY_LEVELS`] queues without
//! consumers (the binary decomposition of Celery 5.5's "native delayed delivery"): queue
//! `NS.delay.K` holds every message for exactly 2^K [units](DELAY_UNIT) (`x-message-ttl`),
//! then dead-letters it to exchange `NS.delay.(K-1)`. A delay of D units goes through the
//! levels of the bits set in D, highest first, and skips the others, so it waits D units in
//! all. Each queue has one TTL for all its messages, so the message at its head always
//! expires first: a long delay never holds up a short one (RabbitMQ expires only at the
//! head of a queue; one queue with per-message TTLs would).
//!
//! The route is in the routing key, D's bits as words, least significant first and up to
//! its highest set bit (`1.0.1` for 5; see [`delay_route`] for why that way round):
//! exchange `NS.delay.K` (topic) binds queue `NS.delay.K` to keys whose word K is `1`
//! (`*.*.1.#` for K = 2), and the next lower exchange to those whose word K is `0`
//! (exchange-to-exchange bindings). The message is published to the exchange of D's highest
//! bit. Below level 0 is the exit, `NS.delay.exit` (headers), where every task queue is
//! bound on its own name in the header [`DESTINATION_HEADER`]: the message reaches the
//! queue an immediate send would have put it in. (The destination is a header, not words of
//! the routing key as in Celery: a topic pattern made of a task queue's name could match
//! other names, or hold `*` and `#`.)
//!
//! In a durable namespace the delay queues are quorum queues, whatever the task queues are,
//! dead-lettering `at-least-once` (`x-dead-letter-strategy`, which needs
//! `x-overflow=reject-publish`): a message leaves a level only once the next has it.
//! Classic queues dead-letter at most once (a node that stops or dies in the middle of a
//! hop loses that message: seen once in 200 across a `rabbitmqctl stop_app`). A transient
//! namespace (`durable(false)`) keeps classic transient delay queues: nothing of it
//! outlives the node anyway.

use std::time::Duration;

use amiquip::{AmqpValue, Channel, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions};
use dingo_core::{BrokerError, BrokerErrorKind};

use crate::options::AmqpOptions;

/// The header carrying why a message was dead-lettered by dingo.
pub(crate) const REASON_HEADER: &str = "x-dingo-reason";

/// The header carrying when dingo dead-lettered a message (milliseconds since the Unix
/// epoch); RabbitMQ's own dead-lettering records it in `x-death` instead (in seconds).
pub(crate) const DEAD_AT_HEADER: &str = "x-dingo-dead-at";

/// The headers of a cancel in the cancel stream: the call's task name and id, and until when
/// it holds (milliseconds since the Unix epoch).
pub(crate) const CANCEL_TASK_HEADER: &str = "dingo-cancel-task";
pub(crate) const CANCEL_ID_HEADER: &str = "dingo-cancel-id";
pub(crate) const CANCEL_UNTIL_HEADER: &str = "dingo-cancel-until";

/// The header of a marker in the cancel stream: a subscription about to consume publishes
/// one and reads the stream up to it, so it has read every cancel confirmed before.
pub(crate) const MARKER_HEADER: &str = "dingo-marker";

/// The size of the cancel stream's segments: RabbitMQ drops old messages (past
/// `x-max-age`) a whole segment at a time, and its default (500 MB) would keep them all.
const CANCEL_SEGMENT_BYTES: i64 = 1 << 20;

/// The header carrying how many times a task message was redelivered after its worker
/// stopped before finishing it (absent: never). RabbitMQ's own `redelivered` flag says only
/// that it happened, and a quorum queue's `x-delivery-count` counts give-backs too.
pub(crate) const REDELIVERIES_HEADER: &str = "x-dingo-redelivered";

/// The header naming the task queue a delayed message is for (matched at the delay chain's
/// exit). Not `x-` prefixed: a headers exchange does not match on those.
pub(crate) const DESTINATION_HEADER: &str = "dingo-queue";

/// How many levels of delay queues there are: delays up to 2^28 - 1 units (31 days) take
/// one trip through the chain; longer ones arrive early and are sent round again (see
/// [`delay_route`]).
pub(crate) const DELAY_LEVELS: u32 = 28;

/// The unit of delays: a delay is rounded up to it.
pub(crate) const DELAY_UNIT: Duration = Duration::from_millis(10);

/// The longest delay one trip through the chain makes.
pub(crate) const MAX_DELAY_UNITS: u64 = (1 << DELAY_LEVELS) - 1;

/// RabbitMQ's limit on queue and exchange names (bytes).
const MAX_NAME: usize = 255;

/// The names of one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    namespace: String,
}

impl Names {
    pub(crate) fn new(namespace: &str) -> Names {
        Names { namespace: namespace.to_owned() }
    }

    /// The queue of a task: `NS.task.NAME`.
    pub(crate) fn task_queue(&self, task: &str) -> Result<String, BrokerError> {
        checked(format!("{}.task.{task}", self.namespace))
    }

    /// The dead-letter queue of a task: `NS.dead.NAME`, bound to the dead-letter exchange with
    /// the task queue's name as routing key.
    pub(crate) fn dead_queue(&self, task: &str) -> Result<String, BrokerError> {
        checked(format!("{}.dead.{task}", self.namespace))
    }

    /// The namespace's dead-letter exchange (direct): `NS.dead`.
    pub(crate) fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// The namespace's cancel stream: `NS.cancels`.
    pub(crate) fn cancel_stream(&self) -> String {
        format!("{}.cancels", self.namespace)
    }

    /// A caller process's reply queue: `NS.reply.PROCESS`.
    pub(crate) fn reply_queue(&self, process: &str) -> String {
        format!("{}.reply.{process}", self.namespace)
    }

    /// Delay level `level`'s queue, and its exchange (the same name): `NS.delay.K`.
    pub(crate) fn delay_level(&self, level: u32) -> String {
        format!("{}.delay.{level}", self.namespace)
    }

    /// The exit of the delay chain (headers): `NS.delay.exit`, where the task queues are
    /// bound by name.
    pub(crate) fn delay_exit(&self) -> String {
        format!("{}.delay.exit", self.namespace)
    }
}

/// Where a delayed message is published: the exchange of its delay's highest bit, and the
/// routing key spelling the delay's bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DelayRoute {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    /// How many levels (from 0) the message passes: those must be declared.
    pub(crate) levels: u32,
}

/// How many units a remaining delay takes, rounded up (never early), capped at
/// [`MAX_DELAY_UNITS`]: a longer delay arrives early, and the subscription sends it round
/// again with the rest. `None`: no delay at all (due now or in the past).
pub(crate) fn delay_units(remaining: Duration) -> Option<u64> {
    if remaining.is_zero() {
        return None;
    }
    let unit = DELAY_UNIT.as_nanos();
    let units = remaining.as_nanos().div_ceil(unit);
    Some(u64::try_from(units).unwrap_or(u64::MAX).min(MAX_DELAY_UNITS))
}

/// The route of a delay of `units` (1 to [`MAX_DELAY_UNITS`]): its bits as words, least
/// significant first, up to the highest set one (`1.0.1` for 5). Least significant first and
/// no longer than needed, because RabbitMQ's topic exchanges walk a routing key word by word
/// (a trie): exchange `NS.delay.K` reads K + 1 words, and the levels a message passes most
/// often, the low ones, read the fewest.
pub(crate) fn delay_route(names: &Names, units: u64) -> DelayRoute {
    let units = units.clamp(1, MAX_DELAY_UNITS);
    let highest = 63 - units.leading_zeros();
    let words: Vec<&str> = (0..=highest).map(|bit| if units >> bit & 1 == 1 { "1" } else { "0" }).collect();
    DelayRoute { exchange: names.delay_level(highest), routing_key: words.join("."), levels: highest + 1 }
}

/// The topic pattern of level `level`'s bindings: its bit's word (word `level`, from 0) is
/// `bit`.
fn level_pattern(level: u32, bit: char) -> String {
    format!("{}{bit}.#", "*.".repeat(level as usize))
}

/// Declares levels `from..to` of the delay chain of a namespace (see [Delays](self#delays)),
/// and its exit with the first: each level's exchange and queue, bound to each other and to
/// the level below, lowest first. A delay uses only the levels up to its highest bit, so
/// the chain is declared as far as the delays sent need it (a first delay of a second
/// declares 7 levels, not 28: declarations cost RabbitMQ a few milliseconds each, more on
/// durable queues). Pipelined (`nowait`, one round trip instead of one each), then one
/// synchronous declaration, whose answer comes after RabbitMQ processed all the others: a
/// refusal of any closes the channel, and that one fails.
pub(crate) fn declare_delays(
    channel: &Channel,
    options: &AmqpOptions,
    names: &Names,
    from: u32,
    to: u32,
) -> Result<(), amiquip::Error> {
    let to = to.min(DELAY_LEVELS);
    if from >= to {
        return Ok(());
    }
    let durable = ExchangeDeclareOptions { durable: options.durable, ..ExchangeDeclareOptions::default() };
    let below = |level: u32| if level == 0 { names.delay_exit() } else { names.delay_level(level - 1) };
    if from == 0 {
        channel.exchange_declare_nowait(ExchangeType::Headers, names.delay_exit(), durable.clone())?;
    }
    for level in from..to {
        let name = names.delay_level(level);
        channel.exchange_declare_nowait(ExchangeType::Topic, name.clone(), durable.clone())?;
        channel.queue_declare_nowait(name.clone(), delay_queue_options(options, level, &below(level)))?;
        channel.queue_bind_nowait(name.clone(), name.clone(), level_pattern(level, '1'), FieldTable::new())?;
        channel.exchange_bind_nowait(below(level), name.clone(), level_pattern(level, '0'), FieldTable::new())?;
    }
    let last = to - 1;
    channel.queue_declare(names.delay_level(last), delay_queue_options(options, last, &below(last))).map(|_| ())
}

/// The declaration of level `level`'s queue, which dead-letters to exchange `below`: a
/// quorum queue dead-lettering at least once in a durable namespace, whatever its task
/// queues are (a classic queue dead-letters at most once, and a message in mid-hop when the
/// node stops is lost); a classic transient queue otherwise (nothing of such a namespace
/// outlives the node).
fn delay_queue_options(options: &AmqpOptions, level: u32, below: &str) -> QueueDeclareOptions {
    let mut arguments = FieldTable::new();
    let ttl = DELAY_UNIT.as_millis() << level;
    arguments.insert("x-message-ttl".into(), AmqpValue::LongLongInt(i64::try_from(ttl).unwrap_or(i64::MAX)));
    arguments.insert("x-dead-letter-exchange".into(), AmqpValue::LongString(below.to_owned()));
    if options.durable {
        arguments.insert("x-queue-type".into(), AmqpValue::LongString("quorum".into()));
        // A message leaves a level once the next one has it (quorum queues only).
        arguments.insert("x-dead-letter-strategy".into(), AmqpValue::LongString("at-least-once".into()));
        arguments.insert("x-overflow".into(), AmqpValue::LongString("reject-publish".into()));
    }
    QueueDeclareOptions { durable: options.durable, arguments, ..QueueDeclareOptions::default() }
}

/// The delay chain's queues and exchanges (levels, then the exit), for deleting them.
pub(crate) fn delay_names(names: &Names) -> (Vec<String>, Vec<String>) {
    let levels: Vec<String> = (0..DELAY_LEVELS).map(|level| names.delay_level(level)).collect();
    let mut exchanges = levels.clone();
    exchanges.push(names.delay_exit());
    (levels, exchanges)
}

fn checked(name: String) -> Result<String, BrokerError> {
    if name.len() > MAX_NAME {
        return Err(BrokerError::new(
            BrokerErrorKind::Config,
            format!("the queue name `{name}` is longer than RabbitMQ's {MAX_NAME} bytes: shorten the task name"),
        ));
    }
    Ok(name)
}

/// The names of one task's queues.
pub(crate) struct TaskQueues {
    pub(crate) queue: String,
    pub(crate) dead: String,
    pub(crate) exchange: String,
    /// The delay chain's exit, where the task queue is bound by name.
    pub(crate) delay_exit: String,
}

impl TaskQueues {
    pub(crate) fn of(names: &Names, task: &str) -> Result<TaskQueues, BrokerError> {
        Ok(TaskQueues {
            queue: names.task_queue(task)?,
            dead: names.dead_queue(task)?,
            exchange: names.dead_exchange(),
            delay_exit: names.delay_exit(),
        })
    }
}

/// Declares a task's queue and its dead letters: the namespace's dead-letter exchange, the
/// task's dead-letter queue bound to it, and the task queue, which dead-letters there
/// (messages rejected without requeue, expired ones, those over a quorum queue's delivery
/// limit). The dead-letter queue is bounded by `max_dead_letters` and
/// `max_dead_letter_bytes` (`x-max-length`, `x-max-length-bytes`; RabbitMQ drops the oldest
/// past either). The task queue is bound to the delay chain's exit by its name (so that
/// delayed messages reach it whoever declared the chain, and again after the queue was
/// deleted and declared anew).
pub(crate) fn declare_task(channel: &Channel, options: &AmqpOptions, task: &TaskQueues) -> Result<(), amiquip::Error> {
    let TaskQueues { queue, dead, exchange, delay_exit } = task;
    channel.exchange_declare(
        ExchangeType::Direct,
        exchange.clone(),
        ExchangeDeclareOptions { durable: options.durable, ..ExchangeDeclareOptions::default() },
    )?;
    channel.queue_declare(
        dead.clone(),
        QueueDeclareOptions {
            durable: options.durable,
            arguments: dead_arguments(options),
            ..QueueDeclareOptions::default()
        },
    )?;
    channel.queue_bind(dead.clone(), exchange.clone(), queue.clone(), FieldTable::new())?;
    let mut arguments = kind(options);
    arguments.insert("x-dead-letter-exchange".into(), AmqpValue::LongString(exchange.clone()));
    channel.queue_declare(
        queue.clone(),
        QueueDeclareOptions { durable: options.durable, arguments, ..QueueDeclareOptions::default() },
    )?;
    channel.exchange_declare(
        ExchangeType::Headers,
        delay_exit.clone(),
        ExchangeDeclareOptions { durable: options.durable, ..ExchangeDeclareOptions::default() },
    )?;
    let mut destination = FieldTable::new();
    destination.insert("x-match".into(), AmqpValue::LongString("all".into()));
    destination.insert(DESTINATION_HEADER.into(), AmqpValue::LongString(queue.clone()));
    channel.queue_bind(queue.clone(), delay_exit.clone(), "", destination)?;
    Ok(())
}

/// A dead-letter queue's arguments: its type, and its bounds (left out when 0).
pub(crate) fn dead_arguments(options: &AmqpOptions) -> FieldTable {
    let mut arguments = kind(options);
    if options.max_dead_letters > 0 {
        let count = i64::from(options.max_dead_letters);
        arguments.insert("x-max-length".into(), AmqpValue::LongLongInt(count));
    }
    if options.max_dead_letter_bytes > 0 {
        let bytes = i64::try_from(options.max_dead_letter_bytes).unwrap_or(i64::MAX);
        arguments.insert("x-max-length-bytes".into(), AmqpValue::LongLongInt(bytes));
    }
    arguments
}

/// The queue type's argument (none for classic queues).
fn kind(options: &AmqpOptions) -> FieldTable {
    let mut arguments = FieldTable::new();
    if options.quorum {
        arguments.insert("x-queue-type".into(), AmqpValue::LongString("quorum".into()));
    }
    arguments
}

/// Declares the namespace's cancel stream (see [Cancels](crate#cancels)): a stream queue,
/// durable whatever the namespace (RabbitMQ's streams always are), keeping cancels for
/// [`cancel_retention`](AmqpOptions::cancel_retention) in segments of 1 MiB.
pub(crate) fn declare_cancels(channel: &Channel, options: &AmqpOptions, names: &Names) -> Result<(), amiquip::Error> {
    let mut arguments = FieldTable::new();
    arguments.insert("x-queue-type".into(), AmqpValue::LongString("stream".into()));
    arguments.insert("x-max-age".into(), AmqpValue::LongString(format!("{}s", options.cancel_retention.as_secs())));
    arguments.insert("x-stream-max-segment-size-bytes".into(), AmqpValue::LongLongInt(CANCEL_SEGMENT_BYTES));
    channel
        .queue_declare(
            names.cancel_stream(),
            QueueDeclareOptions { durable: true, arguments, ..QueueDeclareOptions::default() },
        )
        .map(|_| ())
}

/// Declares a caller's reply queue. Not exclusive: an exclusive queue dies with its
/// connection, and the reports in it with it; this one outlives a reconnection and expires
/// once unused for the result TTL (so do the reports in it). Durable only with persistent
/// reports.
pub(crate) fn declare_reply(channel: &Channel, options: &AmqpOptions, queue: &str) -> Result<(), amiquip::Error> {
    let ttl = i64::try_from(options.result_ttl.as_millis()).unwrap_or(i64::MAX);
    let mut arguments = FieldTable::new();
    arguments.insert("x-expires".into(), AmqpValue::LongLongInt(ttl));
    arguments.insert("x-message-ttl".into(), AmqpValue::LongLongInt(ttl));
    channel
        .queue_declare(
            queue.to_owned(),
            QueueDeclareOptions { durable: options.persistent_reports, arguments, ..QueueDeclareOptions::default() },
        )
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_the_unit_and_cap_at_one_trip() {
        assert_eq!(delay_units(Duration::ZERO), None);
        assert_eq!(delay_units(Duration::from_nanos(1)), Some(1));
        assert_eq!(delay_units(Duration::from_millis(10)), Some(1));
        assert_eq!(delay_units(Duration::from_millis(11)), Some(2));
        assert_eq!(delay_units(Duration::from_secs(1)), Some(100));
        assert_eq!(delay_units(Duration::from_secs(30 * 24 * 3600)), Some(259_200_000));
        assert_eq!(delay_units(Duration::from_secs(40 * 24 * 3600)), Some(MAX_DELAY_UNITS));
        assert_eq!(delay_units(Duration::MAX), Some(MAX_DELAY_UNITS));
        // One trip holds at least 30 days.
        assert!(Duration::from_millis(MAX_DELAY_UNITS * 10) >= Duration::from_secs(30 * 24 * 3600));
    }

    #[test]
    fn a_route_spells_the_bits_and_starts_at_the_highest() {
        let names = Names::new("ns");
        let route = delay_route(&names, 0b110);
        assert_eq!(route.exchange, "ns.delay.2");
        assert_eq!(route.routing_key, "0.1.1");
        assert_eq!(route.levels, 3);
        assert_eq!(delay_route(&names, 1).routing_key, "1");
        assert_eq!(delay_route(&names, 1).exchange, "ns.delay.0");
        let longest = delay_route(&names, MAX_DELAY_UNITS);
        assert_eq!(longest.exchange, format!("ns.delay.{}", DELAY_LEVELS - 1));
        assert_eq!(longest.levels, DELAY_LEVELS);
        assert_eq!(longest.routing_key.split('.').count(), DELAY_LEVELS as usize);
        assert!(longest.routing_key.split('.').all(|w| w == "1"));
    }

    /// Whether topic `pattern` (only `*` and a final `#`) matches `key`.
    fn matches(pattern: &str, key: &str) -> bool {
        let (pattern, key): (Vec<&str>, Vec<&str>) = (pattern.split('.').collect(), key.split('.').collect());
        let fixed = &pattern[..pattern.len() - 1];
        key.len() >= fixed.len() && fixed.iter().zip(&key).all(|(p, k)| *p == "*" || p == k)
    }

    /// Follows a delay through the levels as RabbitMQ would route it: the queues it waits in.
    fn walk(units: u64) -> Vec<u32> {
        let route = delay_route(&Names::new("ns"), units);
        let mut waits = Vec::new();
        let mut level = Some(route.levels - 1);
        while let Some(k) = level {
            if matches(&level_pattern(k, '1'), &route.routing_key) {
                waits.push(k);
            } else {
                assert!(matches(&level_pattern(k, '0'), &route.routing_key), "level {k} routes {units} nowhere");
            }
            level = k.checked_sub(1);
        }
        waits
    }

    #[test]
    fn a_delay_waits_in_the_levels_of_its_bits() {
        assert_eq!(walk(1), [0]);
        assert_eq!(walk(5), [2, 0]);
        assert_eq!(walk(0b1000_0000_0001), [11, 0]);
        assert_eq!(walk(MAX_DELAY_UNITS), (0..DELAY_LEVELS).rev().collect::<Vec<_>>());
        for units in [2, 3, 300, 12_345, 259_200_000] {
            let total: u64 = walk(units).iter().map(|k| 1 << k).sum();
            assert_eq!(total, units);
        }
    }
}
