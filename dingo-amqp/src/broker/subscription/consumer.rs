//! The consumer thread of a subscription: it opens the pool's channel, declares and
//! consumes the pool's queues, then watches — for a broken channel, for the workers all
//! staying busy while tasks wait (it pauses the pool and hands them back), for a worker
//! asking to resume, and for the stop (it cancels the consumers, hands back what they
//! delivered, and waits for outstanding settlements before it closes the channel).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amiquip::{Channel, ConsumerMessage, ConsumerOptions};
use crossbeam_channel::{Receiver, Sender};
use dingo_core::event::{Event, EventKind, Level, Origin};

use super::{Feed, Line, Note, Shared};
use crate::broker::lock;
use crate::conn::Backoff;
use crate::topology;

pub(super) struct ConsumerThread {
    pub(super) shared: Arc<Shared>,
    pub(super) prefetch: u16,
    pub(super) noted: Receiver<Note>,
}

/// What the consumer thread last saw of the workers' progress.
struct Progress {
    /// [`Shared::taken`] then.
    taken: u64,
    /// Since when no worker took a task while tasks waited.
    since: Instant,
}

impl ConsumerThread {
    /// `retire` retires the current feed when dropped.
    pub(super) fn run(self, mut retire: Sender<()>) {
        let inner = self.shared.inner.clone();
        let mut backoff = Backoff::new(&inner.options);
        let mut number = 0;
        // `AmqpSubscription::stop` sets it (dropping the subscription stops it first).
        while !self.shared.stop.is_raised() {
            let Some(opened) = inner.session.channel("task consumer", self.shared.stop.flag()) else { break };
            number += 1;
            let since = Instant::now();
            let generation = opened.generation;
            match self.serve(opened.channel, number, &mut retire) {
                None => break,
                Some(error) => {
                    backoff.broke(since, self.shared.stop.flag());
                    inner.events.emit(Event::new(
                        Origin::Consumer,
                        Level::Warning,
                        EventKind::ReceiveFailed,
                        format!("consuming tasks failed ({error}); unacknowledged tasks go back to their queues"),
                    ));
                    inner.session.channel_failed(generation, "task consumer", &error);
                }
            }
        }
        // The workers' feed ends with this thread, and so does the subscription (the broker
        // may have shut down under it): workers waiting in `recv` learn it now.
        self.shared.stop.raise();
        let (_, retired) = crossbeam_channel::bounded(0);
        drop(self.install(Feed {
            line: Arc::new(Line::new(number + 1, None)),
            receivers: Vec::new(),
            retired,
            paused: false,
        }));
        drop(retire);
    }

    /// Hands the workers a new feed and returns the old one (the caller empties its
    /// receivers: what they hold goes back to the queues, with its channel or by hand).
    fn install(&self, feed: Feed) -> Arc<Feed> {
        std::mem::replace(&mut *lock(&self.shared.feed), Arc::new(feed))
    }

    /// Installs a feed of `line` (paused: without receivers) and wakes the workers waiting
    /// on the old one; returns the old one.
    fn hand_over(
        &self,
        line: &Arc<Line>,
        receivers: Vec<Receiver<ConsumerMessage>>,
        retire: &mut Sender<()>,
    ) -> Arc<Feed> {
        let (next_retire, retired) = crossbeam_channel::bounded(0);
        let paused = receivers.is_empty();
        let old = self.install(Feed { line: line.clone(), receivers, retired, paused });
        // Dropping the previous feed's sender wakes the workers waiting on it.
        drop(std::mem::replace(retire, next_retire));
        old
    }

    /// Consumes on `channel` until stopped (`None`) or the channel breaks (why).
    fn serve(&self, channel: Channel, number: u64, retire: &mut Sender<()>) -> Option<String> {
        let line = Arc::new(Line::new(number, Some(channel)));
        let mut tags = Vec::new();
        let broken =
            match self.declare(&line).and_then(|()| self.sync()).and_then(|()| self.resume(&line, &mut tags, retire)) {
                Ok(()) => self.watch(&line, &mut tags, retire),
                Err(why) => Some(why),
            };
        // Closing the channel requeues whatever it had not acknowledged.
        line.close();
        if broken.is_some() {
            // An empty feed until the next channel (the workers wait on it, not spin on the
            // dead one); what the old one held went back with its channel.
            let closed = Arc::new(Line::new(number, None));
            let old = self.hand_over(&closed, Vec::new(), retire);
            for receiver in &old.receivers {
                receiver.try_iter().for_each(drop);
            }
        }
        broken
    }

    /// Waits until stopped and every delivery handed out is settled (or the settle grace
    /// passed): `None`; or until a worker reports the channel broken: why. Meanwhile pauses
    /// the pool while its workers are all busy and tasks wait, and resumes it when a worker
    /// asks.
    fn watch(&self, line: &Arc<Line>, tags: &mut Vec<String>, retire: &mut Sender<()>) -> Option<String> {
        let shared = &self.shared;
        let options = &shared.inner.options;
        let number = line.number;
        let mut deadline: Option<Instant> = None;
        let mut paused = false;
        let mut progress = Progress { taken: 0, since: Instant::now() };
        let tick = options.hand_back_after.map_or(Duration::from_millis(100), |wait| {
            (wait / 4).clamp(Duration::from_millis(5), Duration::from_millis(100))
        });
        loop {
            if deadline.is_none() && shared.stop.is_raised() {
                // Consumers first: what they delivered and no worker started goes back
                // unmarked, not requeued by the channel's close as redelivered (which would
                // count against its redeliveries). A broken channel requeues it anyway.
                if !paused {
                    let _ = self.pause(line, tags, retire);
                }
                deadline = Some(Instant::now() + options.settle_grace);
            }
            if let Some(deadline) = deadline
                && (line.outstanding.load(Ordering::Acquire) == 0 || Instant::now() >= deadline)
            {
                return None;
            }
            match self.noted.recv_timeout(tick) {
                // (When stopping, the consumers end because the channel is closing.)
                Ok(Note::Lost { channel, why }) if channel == number && deadline.is_none() => return Some(why),
                Ok(Note::Resume) if paused && deadline.is_none() => {
                    if let Err(why) = self.resume(line, tags, retire) {
                        return Some(why);
                    }
                    paused = false;
                    progress = Progress { taken: shared.taken.load(Ordering::Relaxed), since: Instant::now() };
                }
                Ok(_) | Err(_) => {}
            }
            if let (None, false, Some(wait)) = (deadline, paused, options.hand_back_after)
                && self.stalled(&mut progress, wait)
            {
                // Handed back with nobody else consuming, they would only come back here,
                // behind newer tasks.
                match self.others_consume(line) {
                    Ok(true) => {}
                    Ok(false) => {
                        progress.since = Instant::now();
                        continue;
                    }
                    Err(why) => return Some(why),
                }
                match self.pause(line, tags, retire) {
                    Ok(handed) => {
                        paused = true;
                        shared.inner.stats.pauses.fetch_add(1, Ordering::Relaxed);
                        shared.inner.events.emit(Event::new(
                            Origin::Consumer,
                            Level::Info,
                            EventKind::PoolPaused,
                            format!(
                                "every worker thread of the pool stayed busy for {wait:?} while tasks waited: {handed} \
                                 task(s) handed back to their queues for other workers; consuming again once a thread \
                                 is free"
                            ),
                        ));
                    }
                    Err(why) => return Some(why),
                }
            }
        }
    }

    /// Whether tasks have waited in the feed for `wait` with no worker taking any (every
    /// thread busy), and handing them back can help (RabbitMQ does not block publishing).
    fn stalled(&self, progress: &mut Progress, wait: Duration) -> bool {
        let taken = self.shared.taken.load(Ordering::Relaxed);
        let waiting = lock(&self.shared.feed).receivers.iter().any(|receiver| !receiver.is_empty());
        if !waiting || taken != progress.taken {
            *progress = Progress { taken, since: Instant::now() };
            return false;
        }
        let blocked = self.shared.inner.publisher.get().is_some_and(|publisher| publisher.is_blocked());
        progress.since.elapsed() >= wait && !blocked
    }

    /// Whether another consumer (another process, or another pool) consumes a queue whose
    /// tasks wait here, so that handing them back gets them run sooner.
    fn others_consume(&self, line: &Line) -> Result<bool, String> {
        let feed = lock(&self.shared.feed).clone();
        line.with(|channel| {
            for (queues, receiver) in self.shared.queues.iter().zip(&feed.receivers) {
                if receiver.is_empty() {
                    continue;
                }
                let queue = channel.queue_declare_passive(queues.queue.clone())?;
                if queue.declared_consumer_count().unwrap_or(0) > 1 {
                    return Ok(true);
                }
            }
            Ok(false)
        })
    }

    /// Reads the cancel stream up to its end before consuming (see [Cancels](crate#cancels)):
    /// no task cancelled before this channel opened reaches a worker unseen.
    fn sync(&self) -> Result<(), String> {
        let inner = &self.shared.inner;
        let watch = inner.cancel_watch().map_err(|e| dingo_core::error::chain(&e))?;
        watch.sync(inner, inner.options.connect_timeout * 2).map_err(|why| format!("reading the cancels: {why}"))
    }

    /// Declares the queues (again: one may have been deleted meanwhile) and sets the
    /// per-consumer prefetch for the consumers to come.
    fn declare(&self, line: &Line) -> Result<(), String> {
        let inner = &self.shared.inner;
        line.with(|channel| {
            for queues in &self.shared.queues {
                topology::declare_task(channel, &inner.options, queues)?;
            }
            channel.qos(0, self.prefetch, false)
        })
    }

    /// Consumes the queues and hands the workers the consumers' receivers. The `Consumer`s
    /// themselves are forgotten (their tags kept, to cancel them): they borrow the channel,
    /// which the workers share behind a lock, and dropping one would cancel it and drop its
    /// receiver (which kills the connection in amiquip 0.4, see `conn::cancelled`).
    fn resume(&self, line: &Arc<Line>, tags: &mut Vec<String>, retire: &mut Sender<()>) -> Result<(), String> {
        let consumers = line.with(|channel| {
            let mut consumers = Vec::with_capacity(self.shared.queues.len());
            for queues in &self.shared.queues {
                let consumer = channel.basic_consume(queues.queue.clone(), ConsumerOptions::default())?;
                consumers.push((consumer.consumer_tag().to_owned(), consumer.receiver().clone()));
                std::mem::forget(consumer);
            }
            Ok(consumers)
        })?;
        let (consumed, receivers): (Vec<String>, Vec<_>) = consumers.into_iter().unzip();
        *tags = consumed;
        self.shared.resume_asked.store(false, Ordering::Release);
        drop(self.hand_over(line, receivers, retire));
        Ok(())
    }

    /// Stops consuming: the workers get a paused feed (the next to come for a task asks to
    /// resume), the consumers are cancelled, and what they had delivered that no worker took
    /// is handed back. Returns how many deliveries were.
    fn pause(&self, line: &Arc<Line>, tags: &mut Vec<String>, retire: &mut Sender<()>) -> Result<usize, String> {
        let old = self.hand_over(line, Vec::new(), retire);
        let cancelled = line.with(|channel| tags.iter().try_for_each(|tag| channel.basic_cancel_tag(tag)));
        tags.clear();
        // Deliveries on their way arrive before the cancellation is confirmed; then amiquip
        // ends each receiver (a worker may take the end, or a last delivery, itself).
        let until = Instant::now() + Duration::from_secs(1);
        // The hand-back, all of it, waits for the publisher at most this long.
        let publish_until = Instant::now() + self.shared.inner.options.settle_grace;
        let mut handed = 0;
        for (queue, receiver) in old.receivers.iter().enumerate() {
            loop {
                let next = match cancelled {
                    Ok(()) => receiver.recv_deadline(until).ok(),
                    Err(_) => receiver.try_recv().ok(),
                };
                let Some(ConsumerMessage::Delivery(delivery)) = next else { break };
                if cancelled.is_err() {
                    // The channel is broken (or breaking): its close gives back everything it
                    // delivered. Publishing a copy too would run the task twice.
                    drop(delivery);
                    continue;
                }
                self.shared.hand_back(line, queue, delivery, publish_until);
                handed += 1;
            }
        }
        cancelled.map(|()| handed)
    }
}
