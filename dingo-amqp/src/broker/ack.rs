//! [`AmqpAck`]: a delivery taken by a worker, settled on the channel it came on — by the
//! worker, or, for a delivery a copy was published in place of (dead-lettered with a
//! reason, or requeued with its redelivery count), by the
//! [`publisher`](super::publisher) once that copy is confirmed. Its own module, so that the
//! publisher does not import the subscription.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use amiquip::Channel;
use dingo_core::BrokerError;
use dingo_core::broker::Acknowledge;

use super::publisher::Original;
use super::subscription::{Line, Shared};

/// Acknowledges one delivery on the channel it came on. Dropped unused, it gives the
/// delivery back.
pub(crate) struct AmqpAck {
    shared: Arc<Shared>,
    line: Arc<Line>,
    /// The index of the delivery's queue in the subscription.
    pub(super) queue: usize,
    delivery: Option<amiquip::Delivery>,
    /// A copy of the message, for dead-lettering it with a reason.
    pub(super) copy: Option<Vec<u8>>,
    pub(super) on_drop: OnDrop,
    /// The delivery's routing key is not its queue's name (it came through the delay
    /// queues): RabbitMQ's own dead-lettering, which routes by that key, would drop it, so
    /// it is never rejected without requeue (see [`OnDrop::Reject`]).
    rerouted: bool,
}

/// What an [`AmqpAck`] dropped unused does with its delivery.
#[derive(Clone, Copy)]
pub(super) enum OnDrop {
    /// Gives it back to its queue (a worker that never ran it).
    Requeue,
    /// Lets RabbitMQ dead-letter it (its dead letter copy was not stored) — or, when its
    /// routing key is not its queue's name, gives it back: RabbitMQ would route it by that key
    /// to no dead-letter queue. It then comes back counted as a redelivery, is published
    /// again under its queue's name, and runs again (at least once, not lost).
    Reject,
}

impl AmqpAck {
    pub(super) fn new(shared: &Arc<Shared>, line: &Arc<Line>, queue: usize, delivery: amiquip::Delivery) -> AmqpAck {
        line.outstanding.fetch_add(1, Ordering::AcqRel);
        let rerouted = shared.rerouted(queue, &delivery.routing_key);
        AmqpAck {
            shared: shared.clone(),
            line: line.clone(),
            queue,
            delivery: Some(delivery),
            copy: None,
            on_drop: OnDrop::Requeue,
            rerouted,
        }
    }

    fn settle(mut self, settle: impl FnOnce(&Channel, amiquip::Delivery) -> Result<(), amiquip::Error>) {
        if let Some(delivery) = self.delivery.take() {
            self.shared.settle(&self.line, |channel| settle(channel, delivery));
        }
    }

    /// Its dead letter was stored (and counted): acknowledge the original.
    pub(crate) fn settle_acked(self) {
        self.settle(|channel, delivery| delivery.ack(channel));
    }

    /// Its copy was stored in its queue in its place: acknowledge the original.
    pub(crate) fn settle_requeued(self) {
        let inner = self.shared.inner.clone();
        self.settle(|channel, delivery| {
            delivery.ack(channel)?;
            inner.stats.requeued.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
    }

    /// Its dead letter was refused: let RabbitMQ dead-letter the original itself (or give it
    /// back, see [`OnDrop::Reject`]).
    pub(crate) fn settle_rejected(self) {
        let inner = self.shared.inner.clone();
        let rerouted = self.rerouted;
        self.settle(|channel, delivery| reject(&inner, channel, delivery, rerouted));
    }
}

impl Original for AmqpAck {
    fn acked(self: Box<Self>) {
        (*self).settle_acked();
    }

    fn requeued(self: Box<Self>) {
        (*self).settle_requeued();
    }

    fn rejected(self: Box<Self>) {
        (*self).settle_rejected();
    }
}

impl Drop for AmqpAck {
    fn drop(&mut self) {
        if let Some(delivery) = self.delivery.take() {
            let inner = self.shared.inner.clone();
            let on_drop = self.on_drop;
            let rerouted = self.rerouted;
            self.shared.settle(&self.line, |channel| {
                match on_drop {
                    OnDrop::Requeue => {
                        delivery.reject(channel, true)?;
                        inner.stats.requeued.fetch_add(1, Ordering::Relaxed);
                    }
                    OnDrop::Reject => reject(&inner, channel, delivery, rerouted)?,
                }
                Ok(())
            });
        }
    }
}

/// Lets RabbitMQ dead-letter a delivery, unless it was `rerouted`: given back instead.
fn reject(
    inner: &super::Inner,
    channel: &Channel,
    delivery: amiquip::Delivery,
    rerouted: bool,
) -> Result<(), amiquip::Error> {
    delivery.reject(channel, rerouted)?;
    let counter = if rerouted { &inner.stats.requeued } else { &inner.stats.dead_lettered };
    counter.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

impl Acknowledge for AmqpAck {
    fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let inner = self.shared.inner.clone();
        self.settle(|channel, delivery| {
            delivery.ack(channel)?;
            inner.stats.acked.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        Ok(())
    }

    fn reject(mut self: Box<Self>, requeue: bool, reason: &str) -> Result<(), BrokerError> {
        if requeue {
            // Dropping it gives it back.
            return Ok(());
        }
        let copy = self.copy.take();
        let shared = self.shared.clone();
        shared.dead_letter(*self, copy, reason.to_owned());
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}
