//! The store's listener: one thread and one connection per process, however many calls wait.
//! It blocks on the process's notify lists (`BLMPOP`); the reads of its reply lists ride in
//! the same round trip, so the server answers the moment a report arrives. Reports are
//! removed from Redis only after they were routed — in the next round trip, by an
//! idempotent trim — so a connection that breaks mid-read loses nothing (a report read
//! twice is ignored by its handle). Reports that arrive before their handle watches are kept
//! by the router.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dingo_core::broker::support;
use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::wire::{self, Known};
use dingo_core::{BrokerError, TaskName};
use redis::Value;

use super::{Inner, Thread, actor, lock};
use crate::keys::{self, QueueKeys};
use crate::scripts::{self, SEQ_TTL, Sequence};

pub(crate) struct Listener {
    inner: Arc<Inner>,
    /// The reply lists this process listens to.
    replies: Arc<Mutex<Vec<Reply>>>,
    control: String,
    thread: Thread,
}

#[derive(Clone)]
struct Reply {
    list: String,
    notify: String,
    /// Where the listener's sequence key for trimming `list` lives.
    seq_key: String,
    task: TaskName,
}

impl Listener {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Listener, BrokerError> {
        let replies: Arc<Mutex<Vec<Reply>>> = Arc::default();
        let control = keys::control(&inner.options.namespace, &format!("{}:reply", inner.process));
        let listen = Listen { inner: inner.clone(), replies: replies.clone(), control: control.clone() };
        let thread = Thread::spawn("dingo-redis-reply", move |stop| listen.run(&stop.flag))?;
        Ok(Listener { inner, replies, control, thread })
    }

    /// Makes sure the reply list of this process for `queue`'s task is listened to.
    pub(crate) fn listen_to(&self, queue: &QueueKeys) {
        if queue.listened.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut replies = lock(&self.replies);
        queue.listened.store(true, std::sync::atomic::Ordering::Release);
        if replies.iter().any(|r| r.list == queue.reply_here) {
            return;
        }
        replies.push(Reply {
            list: queue.reply_here.clone(),
            notify: queue.notify_here.clone(),
            seq_key: queue.seq(&format!("{}.{}", actor::RECV, self.inner.process)),
            task: TaskName::from(queue.task.as_str()),
        });
        drop(replies);
        // The listener may be blocked on the old set of lists: wake it to take the new one.
        self.wake();
    }

    pub(crate) fn stop(&self) {
        self.thread.stop_and_join_with(|| self.wake());
    }

    fn wake(&self) {
        self.inner.poke(&self.control, "wake");
    }
}

struct Listen {
    inner: Arc<Inner>,
    replies: Arc<Mutex<Vec<Reply>>>,
    control: String,
}

/// Reports read but not yet removed from a reply list.
enum Trim {
    /// The first `count` elements, by the numbered `TRIM` script (it applies once).
    Count { list: String, seq_key: String, seq: String, count: usize },
    /// The one element read, by value (`LREM list 1 element`): a plain command that removes
    /// nothing more when sent again, and costs Redis far less than a script — what a lone
    /// call's report needs. (Were the same bytes there twice, the second copy would be a
    /// duplicate report, which its handle ignores.)
    One { list: String, element: Vec<u8> },
}

impl Listen {
    fn run(&self, stop: &AtomicBool) {
        let mut conn = self.inner.conn("report listener", Origin::Store, true);
        let timeout = self.inner.options.block_timeout.as_secs_f64();
        let batch = self.inner.options.batch;
        let mut trims: Vec<Trim> = Vec::new();
        // Numbers the trims (see `scripts::SEEN`); the keys are each reply's `seq_key`.
        let mut sequence = Sequence::new(actor::RECV, &self.inner.process);
        let mut block = true;
        while !stop.load(Ordering::SeqCst) {
            let replies = lock(&self.replies).clone();
            let round = conn.retry(stop, &mut |c| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for trim in &trims {
                    match trim {
                        Trim::Count { list, seq_key, seq, count } => {
                            let trim = pipe.cmd("EVALSHA").arg(scripts::TRIM.get_hash()).arg(2).arg(list);
                            trim.arg(seq_key).arg(count).arg(seq).arg(SEQ_TTL);
                        }
                        Trim::One { list, element } => {
                            pipe.cmd("LREM").arg(list).arg(1).arg(element.as_slice());
                        }
                    }
                }
                if block {
                    let wait = pipe.cmd("BLMPOP").arg(timeout).arg(replies.len() + 1).arg(&self.control);
                    for reply in &replies {
                        wait.arg(&reply.notify);
                    }
                    wait.arg("LEFT").arg("COUNT").arg(1000);
                }
                for reply in &replies {
                    pipe.cmd("LRANGE").arg(&reply.list).arg(0).arg(batch as i64 - 1);
                }
                let results: Vec<redis::RedisResult<Value>> = pipe.query(c)?;
                let mut results = results.into_iter();
                for _ in &trims {
                    match results.next() {
                        Some(Err(e)) if e.code() == Some("NOSCRIPT") => {
                            scripts::TRIM.load(c)?;
                            return Err(e);
                        }
                        Some(Err(e)) => return Err(e),
                        _ => {}
                    }
                }
                if block {
                    results.next().transpose()?;
                }
                results.collect::<redis::RedisResult<Vec<Value>>>()
            });
            let lists = match round {
                Some(Ok(lists)) => lists,
                Some(Err(e)) if e.code() == Some("NOSCRIPT") => {
                    block = false; // the wait may have taken the notify tokens: read at once
                    continue;
                }
                Some(Err(e)) => {
                    self.event(Level::Error, EventKind::ReceiveFailed, format!("waiting for reports failed: {e}"));
                    std::thread::sleep(self.inner.options.block_timeout);
                    continue;
                }
                None => return,
            };
            trims.clear();
            block = true;
            for (reply, list) in replies.iter().zip(lists) {
                let Value::Array(reports) = list else { continue };
                if reports.is_empty() {
                    continue;
                }
                if reports.len() >= batch {
                    block = false; // more are waiting: read on without blocking
                }
                match reports.as_slice() {
                    [Value::BulkString(element)] => {
                        trims.push(Trim::One { list: reply.list.clone(), element: element.clone() })
                    }
                    _ => trims.push(Trim::Count {
                        list: reply.list.clone(),
                        seq_key: reply.seq_key.clone(),
                        seq: sequence.next_number(),
                        count: reports.len(),
                    }),
                }
                for report in reports {
                    let Value::BulkString(bytes) = report else { continue };
                    self.route(reply, bytes);
                }
            }
        }
    }

    /// Routes the reports of one list element (a batch of them, back to back).
    fn route(&self, reply: &Reply, bytes: Vec<u8>) {
        let known = Known { name: Some(&reply.task), address: None };
        if bytes.len() > self.inner.options.max_message_size {
            // One element holds a run of reports, each within the limit when written: only
            // an element over it needs each report's length checked before it is decoded.
            return self.route_checked(reply, &bytes, &known);
        }
        wire::decode_reports_from(bytes, &known, |report| match report {
            Ok(report) => {
                self.inner.router.route(report);
            }
            Err(e) => self.event(
                Level::Error,
                EventKind::MalformedMessage,
                format!("an undecodable report in `{}` was dropped: {}", reply.list, dingo_core::error::chain(&e)),
            ),
        });
    }

    /// Routes the reports of an element over the size limit one by one, each checked
    /// before it is decoded: one over the limit is dropped unread (a final one whose call
    /// its first bytes name becomes an `Encode` failure of that call).
    fn route_checked(&self, reply: &Reply, bytes: &[u8], known: &Known<'_>) {
        let limit = self.inner.options.max_message_size;
        let mut at = 0;
        while at < bytes.len() {
            let rest = &bytes[at..];
            let len = match wire::report_len(rest) {
                Ok(len) => len,
                // Where the next report starts is unknown: the element ends here.
                Err(e) => {
                    let message = format!(
                        "an undecodable report in `{}` was dropped: {}",
                        reply.list,
                        dingo_core::error::chain(&e)
                    );
                    return self.event(Level::Error, EventKind::MalformedMessage, message);
                }
            };
            if len > limit {
                self.inner.stats.oversize.fetch_add(1, Ordering::Relaxed);
                let oversize = support::oversize_report(rest, len, limit, &reply.list);
                self.event(Level::Error, EventKind::TooLarge, oversize.message);
                if let Some(failure) = oversize.failure {
                    self.inner.router.route(failure);
                }
            } else {
                match wire::decode_report_from(rest[..len].to_vec(), known) {
                    Ok(report) => {
                        self.inner.router.route(report);
                    }
                    Err(e) => self.event(
                        Level::Error,
                        EventKind::MalformedMessage,
                        format!(
                            "an undecodable report in `{}` was dropped: {}",
                            reply.list,
                            dingo_core::error::chain(&e)
                        ),
                    ),
                }
            }
            at += len;
        }
    }

    fn event(&self, level: Level, kind: EventKind, message: String) {
        self.inner.events.emit(Event::new(Origin::Store, level, kind, message));
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.list)
    }
}
