//! The promoter: moves delayed messages — sent with a due time, and retries waiting out
//! their backoff — from their queue's delayed set to the queue once they are due. Every
//! process that consumes a queue promotes it (no scheduler process to keep alive); the
//! [`PROMOTE`](scripts::PROMOTE) script is atomic, so two promoting at once move each
//! message once.
//!
//! It does not poll on a tick. The script returns the earliest due time left, by the
//! server's clock, and the promoter sleeps until then — on its own clock, for the
//! difference the script gives, so neither its clock nor the server's coarse timeouts of
//! blocking commands (`hz`: 100 ms by default) matter. A send due before everything the
//! set held leaves a token in the queue's `delayed:wake` list; a second thread, the wake
//! listener, blocks on those lists and cuts the promoter's sleep short. A token wakes one
//! listener, in one process: should that process die before it promotes, the others still
//! look at least every [`MAX_SLEEP`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use dingo_core::BrokerError;
use dingo_core::broker::kit::Stop;
use dingo_core::event::{Event, EventKind, Level, Origin};

use super::{Inner, Thread, lock};
use crate::keys::{self, QueueKeys};
use crate::scripts::{self, Call};

/// The longest a promoter sleeps without looking: bounds the lateness of a task whose
/// wake-up token went to a process that died before it promoted.
pub(crate) const MAX_SLEEP: Duration = Duration::from_secs(1);

/// The most messages one script moves (it runs again at once while it finds that many).
const BATCH: usize = 1000;

pub(crate) struct Promoter {
    inner: Arc<Inner>,
    /// The wake listener's control list: a token makes it look at the queues again, or stop.
    control: String,
    /// Cuts the promoter's sleep short.
    poke: Sender<()>,
    promote: Thread,
    listen: Thread,
}

impl Promoter {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Promoter, BrokerError> {
        let (poke, poked) = crossbeam_channel::bounded(1);
        let control = keys::control(&inner.options.namespace, &format!("{}:delay", inner.process));
        let promote = {
            let inner = inner.clone();
            Thread::spawn("dingo-redis-delay", move |stop| promote_loop(&inner, &poked, &stop))?
        };
        let listen = {
            let (inner, poke, control) = (inner.clone(), poke.clone(), control.clone());
            Thread::spawn("dingo-redis-delay-wake", move |stop| listen_loop(&inner, &poke, &control, &stop.flag))
        };
        let listen = match listen {
            Ok(listen) => listen,
            Err(e) => {
                promote.stop_and_join();
                return Err(e);
            }
        };
        Ok(Promoter { inner, control, poke, promote, listen })
    }

    /// The queues this process consumes changed: promote at once, and listen for theirs.
    pub(crate) fn refresh(&self) {
        let _ = self.poke.try_send(());
        self.inner.poke(&self.control, "wake");
    }

    pub(crate) fn stop(&self) {
        self.listen.stop_and_join_with(|| self.inner.poke(&self.control, "stop"));
        self.promote.stop_and_join();
    }
}

/// The queues to promote: those this process consumes.
fn queues(inner: &Inner) -> Vec<Arc<QueueKeys>> {
    lock(&inner.consumed).values().map(|(queue, _)| queue.clone()).collect()
}

fn promote_loop(inner: &Arc<Inner>, poked: &Receiver<()>, stop: &Stop) {
    let mut conn = inner.conn("delay promoter", Origin::Consumer, false);
    while !stop.is_set() {
        let sleep = promote(inner, &mut conn, &stop.flag);
        crossbeam_channel::select! {
            recv(poked) -> _ => {}
            recv(stop.signal) -> _ => {}
            default(sleep) => {}
        }
    }
}

/// Moves every due message of the queues this process consumes; returns how long until the
/// next one falls due (at most [`MAX_SLEEP`]).
fn promote(inner: &Inner, conn: &mut crate::conn::Conn, stop: &AtomicBool) -> Duration {
    let mut queues = queues(inner);
    let mut sleep = MAX_SLEEP;
    let batch = BATCH.to_string();
    while !queues.is_empty() && !stop.load(Ordering::Acquire) {
        let calls: Vec<Call> = queues
            .iter()
            .map(|q| {
                Call::new(&scripts::PROMOTE)
                    .key(q.delayed.clone())
                    .key(q.pending.clone())
                    .key(q.amo.clone())
                    .key(q.wake.clone())
                    .arg(batch.as_bytes())
            })
            .collect();
        let results = match conn.retry(stop, &mut |c| scripts::run_batch(c, &calls)) {
            Some(Ok(results)) => results,
            Some(Err(e)) => {
                inner.events.emit(Event::new(
                    Origin::Consumer,
                    Level::Error,
                    EventKind::ReceiveFailed,
                    format!("promoting delayed tasks failed (tried again within {MAX_SLEEP:?}): {e}"),
                ));
                return MAX_SLEEP;
            }
            None => return MAX_SLEEP,
        };
        let mut more = Vec::new();
        for (queue, result) in queues.into_iter().zip(results) {
            let (moved, next, now): (u64, i64, i64) = redis::from_redis_value(result).unwrap_or((0, -1, 0));
            if moved > 0 {
                inner.stats.promoted.fetch_add(moved, Ordering::Relaxed);
            }
            if moved >= BATCH as u64 {
                more.push(queue);
            } else if next >= 0 {
                // A millisecond more: the due time is rounded down to the millisecond.
                let until = Duration::from_millis(u64::try_from(next.saturating_sub(now)).unwrap_or(0) + 1);
                sleep = sleep.min(until);
            }
        }
        queues = more;
    }
    sleep
}

/// Blocks on the wake lists of the queues this process consumes (and its control list);
/// a token in one cuts the promoter's sleep short.
fn listen_loop(inner: &Arc<Inner>, poke: &Sender<()>, control: &str, stop: &AtomicBool) {
    let mut conn = inner.conn("delay listener", Origin::Consumer, true);
    let block = format!("{:.3}", inner.options.block_timeout.as_secs_f64().max(0.001));
    while !stop.load(Ordering::SeqCst) {
        let mut wait = redis::cmd("BLPOP");
        wait.arg(control);
        for queue in queues(inner) {
            wait.arg(&queue.delayed_wake);
        }
        wait.arg(&block);
        let woke = conn.retry(stop, &mut |c| wait.query::<Option<(String, redis::Value)>>(c));
        match woke {
            // Another queue, or a stop: look again.
            Some(Ok(Some((list, _)))) if list == control => {}
            Some(Ok(None)) | None => {}
            Some(Ok(Some(_))) => {
                let _ = poke.try_send(());
            }
            // Refused (not a lost connection: that is retried): the promoter still looks
            // every `MAX_SLEEP`; try again a little later.
            Some(Err(e)) => {
                let _ = poke.try_send(());
                inner.events.emit(Event::new(
                    Origin::Consumer,
                    Level::Error,
                    EventKind::ReceiveFailed,
                    format!("waiting for delayed tasks failed: {e}"),
                ));
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
