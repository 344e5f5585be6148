//! Queue and exchange names, and their declarations (idempotent: declaring what exists with
//! the same arguments changes nothing).
//!
//! Room is left for what comes next: delayed tasks and retries as per-delay TTL queues
//! (`NS.delay.MS`) that dead-letter back to the task queues, no plugin needed.

use amiquip::{AmqpValue, Channel, ExchangeDeclareOptions, ExchangeType, FieldTable, QueueDeclareOptions};
use dingo_core::{BrokerError, BrokerErrorKind};

use crate::options::AmqpOptions;

/// The header carrying why a message was dead-lettered by dingo.
pub(crate) const REASON_HEADER: &str = "x-dingo-reason";

/// The header carrying how many times a task message was redelivered after its worker
/// stopped before finishing it (absent: never). RabbitMQ's own `redelivered` flag says only
/// that it happened, and a quorum queue's `x-delivery-count` counts give-backs too.
pub(crate) const REDELIVERIES_HEADER: &str = "x-dingo-redelivered";

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

    /// A caller process's reply queue: `NS.reply.PROCESS`.
    pub(crate) fn reply_queue(&self, process: &str) -> String {
        format!("{}.reply.{process}", self.namespace)
    }
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
}

impl TaskQueues {
    pub(crate) fn of(names: &Names, task: &str) -> Result<TaskQueues, BrokerError> {
        Ok(TaskQueues {
            queue: names.task_queue(task)?,
            dead: names.dead_queue(task)?,
            exchange: names.dead_exchange(),
        })
    }
}

/// Declares a task's queue and its dead letters: the namespace's dead-letter exchange, the
/// task's dead-letter queue bound to it, and the task queue, which dead-letters there
/// (messages rejected without requeue, expired ones, those over a quorum queue's delivery
/// limit). The dead-letter queue is bounded by `max_dead_letters` and
/// `max_dead_letter_bytes` (`x-max-length`, `x-max-length-bytes`; RabbitMQ drops the oldest
/// past either).
pub(crate) fn declare_task(channel: &Channel, options: &AmqpOptions, task: &TaskQueues) -> Result<(), amiquip::Error> {
    let TaskQueues { queue, dead, exchange } = task;
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
