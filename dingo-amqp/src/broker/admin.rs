//! The operator's role over RabbitMQ ([`Admin`]): cancels go into the namespace's cancel
//! stream; dead letters are read, replayed and purged in the task's dead-letter queue;
//! purges empty a task queue (see [Cancels](crate#cancels) and
//! [Dead letters](crate#dead-letters)).
//!
//! Reading a queue without taking from it: its messages are fetched unacknowledged
//! (`basic.get`) and given back, in their places, when the channel recovers or closes.
//! Replays run on a channel of their own in transaction mode: the fresh copies published to
//! the task queue and the acknowledgements of their dead letters take effect together at
//! `tx.commit`, or not at all.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use amiquip::{AmqpProperties, AmqpValue, Channel, Publish};
use dingo_core::broker::{Admin, DeadLetter, Select};
use dingo_core::{BrokerError, BrokerErrorKind, CallKey, TaskName};

use super::{AmqpBroker, Inner, cancels, is_not_found};
use crate::conn::amqp_error;
use crate::topology::{DEAD_AT_HEADER, REASON_HEADER};

/// How many letters one replay transaction takes (a process killed half-way leaves at most
/// this many to replay again, never duplicated).
const REPLAY_BATCH: usize = 100;

/// Cancels are published into the stream (confirmed) and put into this broker's own set at
/// once; other processes' consumers read them within milliseconds, and a subscription that
/// starts or reconnects reads the stream up to its end before it consumes (see
/// [Cancels](crate#cancels)). Dead letters are those of `NS.dead.NAME`, oldest first; a
/// queue that does not exist holds none.
impl Admin for AmqpBroker {
    fn cancel(&self, key: &CallKey, until: SystemTime) -> Result<(), BrokerError> {
        let inner = &self.inner;
        inner.life.check_open()?;
        inner.publish_to_cancels("recording a cancel", cancels::cancel_headers(key, until))?;
        inner.cancels.insert(key.clone(), until);
        Ok(())
    }

    fn dead_letters(&self, queue: &TaskName, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let dead = self.inner.names.dead_queue(queue.as_str())?;
        let read = self.inner.with_control("reading dead letters", |channel| {
            let mut letters = Vec::new();
            while letters.len() < limit {
                let Some(get) = channel.basic_get(dead.clone(), false)? else { break };
                letters.push(letter(queue, &get.delivery.properties, get.delivery.body));
            }
            // Unacknowledged: they go back, in their places — before this returns: the
            // queue handles this channel's requeue before its next request from the same
            // channel (a passive declare), so a replay right after finds them.
            channel.recover(true)?;
            channel.queue_declare_passive(dead.clone())?;
            Ok(letters)
        });
        none_if_missing(read, Vec::new())
    }

    fn dead_count(&self, queue: &TaskName) -> Result<usize, BrokerError> {
        let dead = self.inner.names.dead_queue(queue.as_str())?;
        none_if_missing(self.inner.queue_len(&dead), 0)
    }

    /// In transactions of up to 100 letters: each copy published to the task queue and its
    /// dead letter acknowledged in one `tx.commit`. A process killed before a commit changes
    /// nothing of that batch (RabbitMQ discards the transaction and gives the letters back);
    /// one killed after it replayed the batch whole. Letters not selected are fetched too
    /// (to look at their ids) and given back in their places when the channel closes.
    ///
    /// RabbitMQ makes a transaction atomic across queues against a client that dies, not
    /// against a node that crashes in the middle of a commit: there the batch may be
    /// half-applied (at worst a letter replayed and still dead: run twice if replayed again).
    fn replay(&self, queue: &TaskName, select: &Select) -> Result<usize, BrokerError> {
        let inner = &self.inner;
        inner.life.check_open()?;
        if inner.dead_count_or_none(queue)? == 0 {
            return Ok(0);
        }
        // The copies go to the task queue by name: it must exist, or they would be dropped.
        inner.declare(queue)?;
        let dead = inner.names.dead_queue(queue.as_str())?;
        let target = inner.names.task_queue(queue.as_str())?;
        let channel = inner.admin_channel("replaying dead letters")?;
        let failed = |e| amqp_error("replaying dead letters failed", e);
        channel.tx_select().map_err(failed)?;
        let persistent = if inner.options.durable { 2 } else { 1 };
        let mut replayed = 0;
        loop {
            let mut batch = 0;
            let mut drained = false;
            while batch < REPLAY_BATCH {
                let Some(get) = channel.basic_get(dead.clone(), false).map_err(failed)? else {
                    drained = true;
                    break;
                };
                let letter = letter(queue, &get.delivery.properties, get.delivery.body.clone());
                if !letter.is_selected(select) {
                    continue;
                }
                // A fresh delivery: no redelivery count, no reason, no `x-death`.
                let properties = AmqpProperties::default().with_delivery_mode(persistent);
                let body = letter.replay_bytes();
                channel
                    .basic_publish("", Publish::with_properties(&body, target.clone(), properties))
                    .map_err(failed)?;
                get.delivery.ack(&channel).map_err(failed)?;
                batch += 1;
            }
            if batch > 0 {
                channel.tx_commit().map_err(failed)?;
                replayed += batch;
            }
            if drained {
                break;
            }
        }
        // Gives back the letters not selected (fetched, never acknowledged), before this
        // returns (see `dead_letters`).
        channel.recover(true).map_err(failed)?;
        channel.queue_declare_passive(dead.clone()).map_err(failed)?;
        let _ = channel.close();
        Ok(replayed)
    }

    fn purge_dead(&self, queue: &TaskName, select: &Select) -> Result<usize, BrokerError> {
        let inner = &self.inner;
        let dead = inner.names.dead_queue(queue.as_str())?;
        if *select == Select::All {
            let purged = inner.with_control("purging dead letters", |channel| channel.queue_purge(dead.clone()));
            return none_if_missing(purged.map(|n| n as usize), 0);
        }
        if inner.dead_count_or_none(queue)? == 0 {
            return Ok(0);
        }
        let channel = inner.admin_channel("purging dead letters")?;
        let failed = |e| amqp_error("purging dead letters failed", e);
        let mut purged = 0;
        while let Some(get) = channel.basic_get(dead.clone(), false).map_err(failed)? {
            if letter(queue, &get.delivery.properties, get.delivery.body.clone()).is_selected(select) {
                get.delivery.ack(&channel).map_err(failed)?;
                purged += 1;
            }
        }
        // The letters not selected go back before this returns (see `dead_letters`).
        channel.recover(true).map_err(failed)?;
        channel.queue_declare_passive(dead.clone()).map_err(failed)?;
        channel.close().map_err(failed)?;
        Ok(purged)
    }

    /// Task messages this broker sent before are purged too: the purge waits (at most the
    /// connect timeout) for RabbitMQ's confirms of what this broker published, which go
    /// through another channel. At-most-once messages have no confirms: one sent just
    /// before may escape the purge.
    fn purge(&self, queue: &TaskName) -> Result<usize, BrokerError> {
        if let Some(publisher) = self.inner.publisher.get() {
            publisher.flush(self.inner.options.connect_timeout);
        }
        let name = self.inner.names.task_queue(queue.as_str())?;
        let purged = self.inner.with_control("purging a task queue", |channel| channel.queue_purge(name.clone()));
        none_if_missing(purged.map(|n| n as usize), 0)
    }
}

impl Inner {
    /// How many messages wait in the queue named `queue`.
    pub(crate) fn queue_len(&self, queue: &str) -> Result<usize, BrokerError> {
        self.with_control("reading a queue's length", |channel| {
            channel.queue_declare_passive(queue.to_owned()).map(|q| q.declared_message_count().unwrap_or(0) as usize)
        })
    }

    /// How many dead letters `queue` holds (0 when its dead-letter queue does not exist).
    fn dead_count_or_none(&self, queue: &TaskName) -> Result<usize, BrokerError> {
        none_if_missing(self.queue_len(&self.names.dead_queue(queue.as_str())?), 0)
    }

    /// A channel of its own (closed when dropped: RabbitMQ gives back what it fetched and
    /// did not acknowledge, and discards a transaction not committed).
    fn admin_channel(&self, what: &str) -> Result<Channel, BrokerError> {
        let give_up = std::sync::atomic::AtomicBool::new(false);
        let deadline = Instant::now() + self.options.connect_timeout;
        self.session.channel_until(what, &give_up, Some(deadline)).map(|opened| opened.channel).ok_or_else(|| {
            BrokerError::new(BrokerErrorKind::Connection, format!("{what} failed: RabbitMQ unreachable"))
        })
    }
}

/// A dead letter as RabbitMQ holds it.
fn letter(queue: &TaskName, properties: &AmqpProperties, body: Vec<u8>) -> DeadLetter {
    DeadLetter::new(queue.clone(), reason(properties), body).with_time(time(properties))
}

/// `value` where RabbitMQ answered "not found" (the queue does not exist).
fn none_if_missing<T>(result: Result<T, BrokerError>, value: T) -> Result<T, BrokerError> {
    match result {
        Err(e) if is_not_found(&e) => Ok(value),
        other => other,
    }
}

/// The most recent `x-death` entry: RabbitMQ's record of dead-lettering it.
fn last_death(properties: &AmqpProperties) -> Option<&amiquip::FieldTable> {
    let AmqpValue::FieldArray(deaths) = properties.headers().as_ref()?.get("x-death")? else { return None };
    match deaths.first() {
        Some(AmqpValue::FieldTable(death)) => Some(death),
        _ => None,
    }
}

/// Why a message in a dead-letter queue is there: the reason dingo gave, or RabbitMQ's for
/// messages it dead-lettered itself.
pub(crate) fn reason(properties: &AmqpProperties) -> String {
    let ours = properties.headers().as_ref().and_then(|h| h.get(REASON_HEADER)).and_then(|v| match v {
        AmqpValue::LongString(reason) => Some(reason.clone()),
        _ => None,
    });
    let theirs = || match last_death(properties)?.get("reason") {
        Some(AmqpValue::LongString(reason)) => Some(format!("dead-lettered by RabbitMQ: {reason}")),
        _ => None,
    };
    ours.or_else(theirs).unwrap_or_default()
}

/// When it was dead-lettered: dingo's header (milliseconds), or the time of RabbitMQ's
/// `x-death` record (seconds); `None` when neither is there.
fn time(properties: &AmqpProperties) -> Option<SystemTime> {
    let ours = properties.headers().as_ref().and_then(|h| h.get(DEAD_AT_HEADER)).and_then(|v| match v {
        AmqpValue::LongLongInt(ms) => u64::try_from(*ms).ok().map(Duration::from_millis),
        _ => None,
    });
    let theirs = || match last_death(properties)?.get("time") {
        Some(AmqpValue::Timestamp(seconds)) => Some(Duration::from_secs(*seconds)),
        _ => None,
    };
    ours.or_else(theirs).and_then(|since| UNIX_EPOCH.checked_add(since))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(headers: amiquip::FieldTable) -> AmqpProperties {
        AmqpProperties::default().with_headers(headers)
    }

    #[test]
    fn a_letter_has_dingos_reason_and_time_or_rabbitmqs() {
        let mut ours = amiquip::FieldTable::new();
        ours.insert(REASON_HEADER.into(), AmqpValue::LongString("unknown task: x".into()));
        ours.insert(DEAD_AT_HEADER.into(), AmqpValue::LongLongInt(1_800_000_000_123));
        let ours = with(ours);
        assert_eq!(reason(&ours), "unknown task: x");
        assert_eq!(time(&ours), Some(UNIX_EPOCH + Duration::from_millis(1_800_000_000_123)));

        let mut death = amiquip::FieldTable::new();
        death.insert("reason".into(), AmqpValue::LongString("expired".into()));
        death.insert("time".into(), AmqpValue::Timestamp(1_800_000_000));
        let mut theirs = amiquip::FieldTable::new();
        theirs.insert("x-death".into(), AmqpValue::FieldArray(vec![AmqpValue::FieldTable(death)]));
        let theirs = with(theirs);
        assert_eq!(reason(&theirs), "dead-lettered by RabbitMQ: expired");
        assert_eq!(time(&theirs), Some(UNIX_EPOCH + Duration::from_secs(1_800_000_000)));

        let neither = AmqpProperties::default();
        assert_eq!(reason(&neither), "");
        assert_eq!(time(&neither), None);
    }
}
