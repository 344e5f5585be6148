//! Rules that broker implementations share: the checks every byte-carrying broker makes on
//! a message, the reply address of a call, the failures and events they send for the same
//! facts, and the start-up retry of `connect`. (Their machinery — threads, life, locks — is in
//! [`kit`](super::kit).)

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{BrokerError, BrokerErrorKind, TaskError, TaskErrorKind, chain};
use crate::event::{Event, EventKind, Level, Origin};
use crate::id::CallKey;
use crate::message::{ReplyTo, ReportBody, ReportMessage, wire};

/// Refuses an encoded message (`what`: "task message", "report") longer than `limit` bytes
/// with [`BrokerErrorKind::TooLarge`].
pub fn check_size(what: &str, len: usize, limit: usize) -> Result<(), BrokerError> {
    if len > limit {
        return Err(BrokerError::new(
            BrokerErrorKind::TooLarge,
            format!("{what} of {len} bytes exceeds the limit of {limit} bytes"),
        ));
    }
    Ok(())
}

/// How many bytes of a task message over the size limit its dead letter keeps: the first
/// 4 KiB, where its name, id and reply address are (the rest, its arguments, is dropped
/// unread). The reason says how long the message was.
pub const OVERSIZE_KEPT: usize = 4096;

/// A received task message over the size limit, as its first bytes tell it: what a broker
/// needs to dead-letter it (with a bounded prefix) and to tell its caller, without decoding
/// it. Made by [`oversize_task`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OversizeTask {
    /// The dead-letter reason: the message's size, the limit, and how much is kept.
    pub reason: String,
    /// How many of its first bytes the dead letter keeps (at most [`OVERSIZE_KEPT`]).
    pub kept: usize,
    /// The call, if its first bytes name it.
    pub call: Option<CallKey>,
    /// Where its caller waits for reports, if its first bytes say.
    pub reply_to: Option<Arc<str>>,
}

impl OversizeTask {
    /// The failure its caller gets (`BadPayload`, with the reason).
    pub fn failure(&self) -> TaskError {
        TaskError::new(TaskErrorKind::BadPayload, format!("the worker refused the task message: {}", self.reason))
    }
}

/// What a broker knows of a received task message of `len` bytes over `limit`
/// (`max_message_size`) from its first bytes `head` (up to [`OVERSIZE_KEPT`] of them).
///
/// ```
/// use dingo_core::broker::support::oversize_task;
///
/// let oversize = oversize_task(b"\x01\x01", 50 << 20, 16 << 20);
/// assert_eq!(
///     oversize.reason,
///     "task message of 52428800 bytes exceeds the limit of 16777216 bytes (max_message_size); its dead letter \
///      keeps its first 4096 bytes only"
/// );
/// assert_eq!((oversize.kept, oversize.call.is_none()), (4096, true));
/// ```
pub fn oversize_task(head: &[u8], len: usize, limit: usize) -> OversizeTask {
    let kept = len.min(OVERSIZE_KEPT);
    let head = &head[..head.len().min(kept)];
    let (name, id, reply_to) = match wire::decode_delivery(head.to_vec(), &wire::Known::default()) {
        Ok((message, _)) => {
            let reply_to = match message.reply_to {
                ReplyTo::Address(caller) => Some(caller),
                _ => None,
            };
            (Some(message.name), Some(message.id), reply_to)
        }
        // Cut off after its first bytes: what they hold.
        Err(cut) => (cut.name, cut.id, cut.reply_to),
    };
    let call = name.zip(id).map(|(name, id)| CallKey { name, id });
    OversizeTask {
        reason: format!(
            "task message of {len} bytes exceeds the limit of {limit} bytes (max_message_size); its dead letter \
             keeps its first {kept} bytes only"
        ),
        kept,
        call,
        reply_to,
    }
}

/// A received report over the size limit, as its first bytes tell it. Made by
/// [`oversize_report`].
#[derive(Debug)]
#[non_exhaustive]
pub struct OversizeReport {
    /// What happened, for an event.
    pub message: String,
    /// The call it was for, if its first bytes name it.
    pub call: Option<CallKey>,
    /// For a final report whose call is known: the failure (`Encode`) to route in its
    /// place, so its caller learns why instead of waiting in vain. A progress report, or
    /// one whose call is not known, is dropped with nothing in its place.
    pub failure: Option<ReportMessage<'static>>,
}

/// What a caller's broker does with a received report of `len` bytes over `limit`
/// (`max_message_size`), from its first bytes `head`; `place` names where it was read (a
/// reply list or queue), for the event.
///
/// ```
/// use dingo_core::broker::support::oversize_report;
///
/// let dropped = oversize_report(b"", 20 << 20, 16 << 20, "reply.1");
/// assert!(dropped.failure.is_none());
/// assert_eq!(
///     dropped.message,
///     "a report of 20971520 bytes in `reply.1` exceeds the limit of 16777216 bytes (max_message_size): dropped \
///      unread (its call is not known)"
/// );
/// ```
pub fn oversize_report(head: &[u8], len: usize, limit: usize, place: &str) -> OversizeReport {
    let head = wire::report_head(&head[..head.len().min(OVERSIZE_KEPT)]);
    let over = format!("a report of {len} bytes in `{place}` exceeds the limit of {limit} bytes (max_message_size)");
    let call = head.name.zip(head.id).map(|(name, id)| CallKey { name, id });
    let Some(key) = call.clone() else {
        return OversizeReport {
            message: format!("{over}: dropped unread (its call is not known)"),
            call,
            failure: None,
        };
    };
    if head.final_report != Some(true) {
        let message = format!("{over}: dropped unread (a progress report of `{}` {})", key.name, key.id);
        return OversizeReport { message, call, failure: None };
    }
    let error = TaskError::new(
        TaskErrorKind::Encode,
        format!("the result of {len} bytes exceeds this caller's limit of {limit} bytes (max_message_size)"),
    );
    OversizeReport {
        message: format!("{over}: dropped unread; its call `{}` {} fails (Encode)", key.name, key.id),
        call,
        failure: Some(ReportMessage { name: key.name, id: key.id, body: ReportBody::Failure(error) }),
    }
}

/// Where the reports of a call go on a broker that carries bytes (`broker` names it in the
/// error): `None` when the caller wants none; an in-process reply cannot travel.
pub fn reply_address<'a>(to: &'a ReplyTo, broker: &str) -> Result<Option<&'a Arc<str>>, BrokerError> {
    match to {
        ReplyTo::None => Ok(None),
        ReplyTo::Address(address) => Ok(Some(address)),
        ReplyTo::Local(_) => {
            Err(BrokerError::new(BrokerErrorKind::Config, format!("an in-process reply cannot go through {broker}")))
        }
    }
}

/// How long a broker's `connect` keeps trying, by default, while its server cannot be
/// reached: 30 seconds.
///
/// Processes are often started together with their broker (a compose file, a systemd
/// target, a pod): the server may need a few seconds before it accepts connections, and a
/// worker that gave up at once would need a supervisor to start it again. Waiting for ever
/// would be as surprising: a wrong host name would hang a program without a word. So
/// `connect` waits, with backoff, for about as long as sqlx waits for a connection and r2d2
/// for a pooled one; longer outages are better left to a supervisor that restarts the
/// process. Each broker's options set it (`connect_retry`, or `connect_retry_s` in the URL):
/// zero fails at the first refusal, [`Duration::MAX`] never gives up.
pub const CONNECT_RETRY: Duration = Duration::from_secs(30);

/// How often the start-up retry warns that it is still waiting.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// The start-up retry of a broker's `connect`: calls `attempt` until it succeeds, until it
/// fails with an error other than [`BrokerErrorKind::Connection`] (bad credentials, an
/// unknown option, a server too old: trying again cannot help, so that error is returned
/// at once), or until `patience` has passed since the first attempt. Between attempts it
/// sleeps `backoff.0`, doubling up to `backoff.1`.
///
/// `server` names what is being reached, without credentials (`redis at
/// redis://127.0.0.1:6379`, see [`redact_url`]); `attempt` fails with a short reason as its
/// message (`connection refused`) and the client library's error as its source. When it
/// gives up, the error says both: `cannot reach redis at redis://127.0.0.1:6390: connection
/// refused (tried for 30s; is the server running and the URL right?)`, with the last
/// attempt's source.
///
/// No app exists yet to receive events while `connect` waits, so it says so through
/// `tracing` (target `dingo`): a warning at the first failure and at most one every 5 s
/// after it, and an info record once the server answers.
///
/// ```
/// use std::time::Duration;
/// use dingo_core::broker::support::connect_retrying;
/// use dingo_core::{BrokerError, BrokerErrorKind};
///
/// let mut refusals = 2;
/// let connected = connect_retrying("demo at demo://localhost", Duration::from_secs(5), (Duration::from_millis(1), Duration::from_millis(10)), || {
///     if refusals == 0 { return Ok("connected") }
///     refusals -= 1;
///     Err(BrokerError::new(BrokerErrorKind::Connection, "connection refused"))
/// });
/// assert_eq!(connected.unwrap(), "connected");
/// ```
pub fn connect_retrying<T>(
    server: &str,
    patience: Duration,
    backoff: (Duration, Duration),
    mut attempt: impl FnMut() -> Result<T, BrokerError>,
) -> Result<T, BrokerError> {
    let started = Instant::now();
    // `None`: no deadline (a patience too long to add to the clock).
    let deadline = started.checked_add(patience);
    let mut pause = backoff.0.max(Duration::from_millis(1));
    let mut warned: Option<Instant> = None;
    loop {
        let error = match attempt() {
            Ok(connected) => {
                if warned.is_some() {
                    tracing::info!(target: "dingo", server, "reached {server} after {:.1?}", started.elapsed());
                }
                return Ok(connected);
            }
            Err(e) if e.kind() != BrokerErrorKind::Connection => return Err(e),
            Err(e) => e,
        };
        let now = Instant::now();
        let left = deadline.map(|d| d.saturating_duration_since(now));
        if left.is_some_and(|left| left.is_zero()) {
            let tried = if patience.is_zero() { "not retried".to_owned() } else { format!("tried for {patience:?}") };
            let message = format!("cannot reach {server}: {error} ({tried}; is the server running and the URL right?)");
            return Err(error.reworded(message));
        }
        if warned.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            warned = Some(now);
            let until = match left {
                Some(left) => format!("for another {:.0?}", left),
                None => "until it answers".to_owned(),
            };
            tracing::warn!(target: "dingo", server, error = %chain(&error), "cannot reach {server} yet ({error}); retrying {until}");
        }
        std::thread::sleep(left.map_or(pause, |left| pause.min(left)));
        pause = (pause * 2).min(backoff.1.max(pause));
    }
}

/// A URL without its password (`redis://:***@host:6379/0`, and a `pass=` or `password=` in
/// its query, as `redis+unix` URLs carry it), for messages and logs.
pub fn redact_url(url: &str) -> String {
    let url = redact_authority(url);
    let Some((base, query)) = url.split_once('?') else { return url };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key @ ("pass" | "password"), _)) => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{base}?{}", pairs.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

fn redact_authority(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// A short reason for an I/O error a connection attempt failed with (`connection refused`),
/// or `None` for kinds without one (use the error's own text).
pub fn io_reason(kind: std::io::ErrorKind) -> Option<&'static str> {
    use std::io::ErrorKind::*;
    Some(match kind {
        ConnectionRefused => "connection refused",
        TimedOut | WouldBlock => "timed out",
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => "the connection was closed",
        NotFound => "no such socket",
        HostUnreachable | NetworkUnreachable => "no route to the host",
        _ => return None,
    })
}

/// The failure a caller gets when a broker gives up on its task after its workers stopped
/// before finishing it `times` times (`max_redeliveries` is `max`): the same words on every
/// broker.
///
/// ```
/// use dingo_core::TaskErrorKind;
///
/// let error = dingo_core::broker::support::worker_lost(3, 2);
/// assert_eq!(error.kind(), TaskErrorKind::WorkerLost);
/// assert_eq!(
///     error.message(),
///     "the workers that took this task stopped before finishing it 3 times (max_redeliveries is 2): \
///      it may crash its worker process; it was moved to the dead letters"
/// );
/// assert!(dingo_core::broker::support::worker_lost(1, 0).message().contains(" it once "));
/// ```
pub fn worker_lost(times: u32, max: u32) -> crate::error::TaskError {
    let times = if times == 1 { "once".to_owned() } else { format!("{times} times") };
    crate::error::TaskError::new(
        crate::error::TaskErrorKind::WorkerLost,
        format!(
            "the workers that took this task stopped before finishing it {times} (max_redeliveries is {max}): it \
             may crash its worker process; it was moved to the dead letters"
        ),
    )
}

/// The [`DeadLettered`](EventKind::DeadLettered) event of a message moved to the dead
/// letters of `queue`, for `reason`: every broker emits one per dead letter, whatever the
/// cause (a cause with an event of its own — a malformed message, one too large — has that
/// event too).
///
/// ```
/// use dingo_core::broker::support::dead_lettered;
/// use dingo_core::{EventKind, Level, Origin};
///
/// let event = dead_lettered(Origin::Consumer, "tasks.add", "undecodable message: …", None);
/// assert_eq!((event.kind, event.level), (EventKind::DeadLettered, Level::Warning));
/// assert_eq!(event.message, "a message of `tasks.add` moved to the dead letters: undecodable message: …");
/// ```
pub fn dead_lettered(origin: Origin, queue: &str, reason: &str, call: Option<CallKey>) -> Event {
    let event = Event::new(
        origin,
        Level::Warning,
        EventKind::DeadLettered,
        format!("a message of `{queue}` moved to the dead letters: {reason}"),
    );
    match call {
        Some(key) => event.with_task(key),
        None => event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_reply_checks() {
        assert!(check_size("report", 10, 10).is_ok());
        let error = check_size("report", 11, 10).expect_err("too large");
        assert_eq!(error.kind(), BrokerErrorKind::TooLarge);
        assert_eq!(error.to_string(), "report of 11 bytes exceeds the limit of 10 bytes");
        assert_eq!(reply_address(&ReplyTo::None, "x").expect("none"), None);
        let address = ReplyTo::Address(Arc::from("q"));
        assert_eq!(reply_address(&address, "x").expect("address").map(|a| &**a), Some("q"));
    }

    /// A task over the limit is known by its first bytes: its call and caller, the reason
    /// with both sizes; a report likewise, a final one replaced by an `Encode` failure.
    #[test]
    fn oversize_messages_are_known_by_their_first_bytes() {
        use crate::codec::Encoded;
        use crate::id::{TaskId, TaskName};
        use crate::message::{Payload, TaskMessage, Value};
        let task = TaskMessage::new(
            TaskName::from("t.big"),
            TaskId::new("id-1"),
            0,
            Payload::Encoded(Encoded::new(1, vec![7; 10_000])),
        )
        .with_reply_to(ReplyTo::Address(Arc::from("reply.9")));
        let bytes = wire::encode_task(&task).expect("encodes");
        let oversize = oversize_task(&bytes, bytes.len(), 5_000);
        assert_eq!(oversize.kept, OVERSIZE_KEPT);
        assert_eq!(oversize.call.as_ref().map(|k| (k.name.as_str(), k.id.as_str())), Some(("t.big", "id-1")));
        assert_eq!(oversize.reply_to.as_deref(), Some("reply.9"));
        assert_eq!(
            oversize.reason,
            format!(
                "task message of {} bytes exceeds the limit of 5000 bytes (max_message_size); its dead letter keeps \
                 its first 4096 bytes only",
                bytes.len()
            )
        );
        assert_eq!(oversize.failure().kind(), TaskErrorKind::BadPayload);
        // Under 4 KiB, the whole message is the prefix.
        let small = oversize_task(&bytes[..300], 300, 200);
        assert_eq!(small.kept, 300);

        let result = ReportMessage {
            name: TaskName::from("t.big"),
            id: TaskId::new("id-1"),
            body: ReportBody::Success(Value::Encoded(Encoded::new(1, vec![1; 9_000]))),
        };
        let bytes = wire::encode_report(&result).expect("encodes");
        assert_eq!(wire::report_len(&bytes).expect("a report"), bytes.len());
        let over = oversize_report(&bytes[..OVERSIZE_KEPT], bytes.len(), 4_000, "reply.9");
        let Some(ReportMessage { body: ReportBody::Failure(error), name, .. }) = over.failure else {
            panic!("a final report is replaced by a failure")
        };
        assert_eq!((name.as_str(), error.kind()), ("t.big", TaskErrorKind::Encode));
        assert_eq!(
            error.message(),
            format!("the result of {} bytes exceeds this caller's limit of 4000 bytes (max_message_size)", bytes.len())
        );
        let progress = ReportMessage { body: ReportBody::Progress(Some(Encoded::new(1, vec![1; 9_000]))), ..result };
        let bytes = wire::encode_report(&progress).expect("encodes");
        let over = oversize_report(&bytes, bytes.len(), 4_000, "reply.9");
        assert!(over.failure.is_none() && over.call.is_some());
        assert!(over.message.ends_with("dropped unread (a progress report of `t.big` id-1)"), "{}", over.message);
    }

    const FAST: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(20));

    fn refused() -> BrokerError {
        BrokerError::with_source(
            BrokerErrorKind::Connection,
            "connection refused",
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        )
    }

    #[test]
    fn connect_retries_until_the_deadline_and_then_says_where_and_why() {
        let started = Instant::now();
        let mut attempts = 0;
        let error = connect_retrying("redis at redis://127.0.0.1:1", Duration::from_millis(300), FAST, || {
            attempts += 1;
            Err::<(), _>(refused())
        })
        .expect_err("never reachable");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300) && waited < Duration::from_millis(900), "{waited:?}");
        assert!(attempts >= 10, "retried with a backoff capped at 20 ms: {attempts} attempt(s)");
        assert_eq!(error.kind(), BrokerErrorKind::Connection);
        assert_eq!(
            error.to_string(),
            "cannot reach redis at redis://127.0.0.1:1: connection refused (tried for 300ms; is the server running and the URL right?)"
        );
        let source = std::error::Error::source(&error).expect("the cause is kept");
        assert_eq!(source.to_string(), std::io::Error::from(std::io::ErrorKind::ConnectionRefused).to_string());
    }

    #[test]
    fn connect_without_patience_tries_once() {
        let mut attempts = 0;
        let error = connect_retrying("x at x://h", Duration::ZERO, FAST, || {
            attempts += 1;
            Err::<(), _>(refused())
        })
        .expect_err("refused");
        assert_eq!(attempts, 1);
        assert_eq!(
            error.to_string(),
            "cannot reach x at x://h: connection refused (not retried; is the server running and the URL right?)"
        );
    }

    #[test]
    fn connect_fails_at_once_on_what_retrying_cannot_fix() {
        let started = Instant::now();
        let mut attempts = 0;
        let error = connect_retrying("x at x://h", Duration::from_secs(10), FAST, || {
            attempts += 1;
            Err::<(), _>(BrokerError::new(BrokerErrorKind::Config, "x at x://h refused the credentials"))
        })
        .expect_err("bad credentials");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!((attempts, error.kind()), (1, BrokerErrorKind::Config));
        assert_eq!(error.to_string(), "x at x://h refused the credentials", "returned as it is");
    }

    #[test]
    fn connect_succeeds_once_the_server_answers() {
        let mut attempts = 0;
        let connected = connect_retrying("x at x://h", Duration::MAX, FAST, || {
            attempts += 1;
            if attempts < 4 { Err(refused()) } else { Ok(attempts) }
        });
        assert_eq!(connected.expect("reached"), 4);
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(redact_url("redis://:secret@host:6379/0"), "redis://:***@host:6379/0");
        assert_eq!(redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact_url("amqp://guest@h/%2f"), "amqp://guest@h/%2f");
        assert_eq!(redact_url("redis://host:6379?x=a@b"), "redis://host:6379?x=a@b");
        assert_eq!(redact_url("redis://u:p@host"), "redis://u:***@host");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=secret&user=u#x"),
            "redis+unix:///run/redis.sock?db=1&pass=***&user=u#x"
        );
    }
}
