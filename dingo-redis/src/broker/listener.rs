//! The store's listener: one thread and one connection per process, however many calls wait.
//! It blocks on the process's reply lists (`BLMPOP`, a batch at a time) and routes each
//! report to the handle of its call; reports that arrive before their handle watches are
//! kept by the router.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use dingo_core::event::{Event, EventKind, Level, Origin};
use dingo_core::message::wire::{self, Known};
use dingo_core::{BrokerError, TaskName};
use redis::Value;

use super::{Inner, Thread, lock};
use crate::keys::{self, QueueKeys};

pub(crate) struct Listener {
    inner: Arc<Inner>,
    /// Reply list → the task it belongs to.
    replies: Arc<Mutex<HashMap<String, TaskName>>>,
    control: String,
    thread: Thread,
}

impl Listener {
    pub(crate) fn start(inner: Arc<Inner>) -> Result<Listener, BrokerError> {
        let replies: Arc<Mutex<HashMap<String, TaskName>>> = Arc::default();
        let control = keys::control(&inner.options.namespace, &format!("{}:reply", inner.process));
        let listen = Listen { inner: inner.clone(), replies: replies.clone(), control: control.clone() };
        let thread = Thread::spawn("dingo-redis-reply", move |stop| listen.run(&stop))?;
        Ok(Listener { inner, replies, control, thread })
    }

    /// Makes sure the reply list of this process for `queue`'s task is listened to.
    pub(crate) fn listen_to(&self, queue: &QueueKeys) {
        let mut replies = lock(&self.replies);
        if replies.contains_key(&queue.reply_here) {
            return;
        }
        let task = queue_task(queue);
        replies.insert(queue.reply_here.clone(), task);
        drop(replies);
        // The listener may be blocked on the old set of lists: wake it to take the new one.
        self.wake();
    }

    pub(crate) fn stop(&self) {
        self.thread.stop_and_join_with(|| self.wake());
    }

    fn wake(&self) {
        let control = self.control.clone();
        let _ = self.inner.command(&mut |c| redis::cmd("LPUSH").arg(&control).arg("wake").query::<i64>(c));
    }
}

/// The task name of a queue, from its key prefix (`NS:{task}`), unescaped.
fn queue_task(queue: &QueueKeys) -> TaskName {
    let tagged = queue.prefix.rsplit_once(":{").map(|(_, t)| t).unwrap_or("");
    let escaped = tagged.strip_suffix('}').unwrap_or(tagged);
    TaskName::from(escaped.replace("%7B", "{").replace("%7D", "}").replace("%25", "%"))
}

struct Listen {
    inner: Arc<Inner>,
    replies: Arc<Mutex<HashMap<String, TaskName>>>,
    control: String,
}

impl Listen {
    fn run(&self, stop: &AtomicBool) {
        let mut conn = self.inner.conn("report listener", Origin::Store, true);
        let timeout = self.inner.options.block_timeout.as_secs_f64();
        let batch = self.inner.options.batch;
        while !stop.load(Ordering::SeqCst) {
            let (keys, names): (Vec<String>, HashMap<String, TaskName>) = {
                let replies = lock(&self.replies);
                let mut keys = vec![self.control.clone()];
                keys.extend(replies.keys().cloned());
                (keys, replies.clone())
            };
            let popped = conn.retry(stop, &mut |c| {
                redis::cmd("BLMPOP")
                    .arg(timeout)
                    .arg(keys.len())
                    .arg(&keys)
                    .arg("LEFT")
                    .arg("COUNT")
                    .arg(batch)
                    .query::<Value>(c)
            });
            let value = match popped {
                Some(Ok(value)) => value,
                Some(Err(e)) => {
                    self.event(Level::Error, EventKind::ReceiveFailed, format!("waiting for reports failed: {e}"));
                    continue;
                }
                None => return,
            };
            let Some((key, reports)) = split(value) else { continue };
            if key == self.control {
                continue;
            }
            let name = names.get(&key);
            for bytes in reports {
                let known = Known { name, address: None };
                match wire::decode_report_from(bytes, &known) {
                    Ok(report) => {
                        self.inner.router.route(report);
                    }
                    Err(e) => self.event(
                        Level::Error,
                        EventKind::MalformedMessage,
                        format!("an undecodable report in `{key}` was dropped: {}", dingo_core::error::chain(&e)),
                    ),
                }
            }
        }
    }

    fn event(&self, level: Level, kind: EventKind, message: String) {
        self.inner.events.emit(Event::new(Origin::Store, level, kind, message));
    }
}

/// `[key, [elements…]]` from `BLMPOP`; `None` on a timeout.
fn split(value: Value) -> Option<(String, Vec<Vec<u8>>)> {
    let Value::Array(mut parts) = value else { return None };
    if parts.len() != 2 {
        return None;
    }
    let elements = parts.pop()?;
    let key: String = redis::from_redis_value(parts.pop()?).ok()?;
    let Value::Array(elements) = elements else { return None };
    let bytes = elements
        .into_iter()
        .filter_map(|v| match v {
            Value::BulkString(b) => Some(b),
            _ => None,
        })
        .collect();
    Some((key, bytes))
}
