//! The byte layout of messages, for brokers that carry bytes.
//!
//! ```text
//! message = version:u8 (1) | type:u8 (1 task, 2 report) | field* | 0x00
//! field   = tag:u8 | len:varint (LEB128) | len bytes
//! ```
//! Task fields: 1 name, 2 id, 3 fingerprint (u64 LE), 4 option flags (1 ignore report,
//! 2 monitor progress, 4 at most once), 5 reply address, 6 codec id, 7 argument bytes,
//! 11 redelivered (empty; a broker appends it when it gives a task back after its lease
//! expired: the bytes [`REDELIVERED_MARK`] replace the final end marker), 12 attempt (u32 LE,
//! when not 1), 13 due and 14 expires (u64 LE, milliseconds since the Unix epoch), 15 retry
//! policy (retries u32 LE, base and cap u64 LE milliseconds, flags u8: 1 exponential,
//! 2 jitter; when retries are set), 17 time limits (soft and hard, u32 LE milliseconds each,
//! 0 for none; when one is set); fields 12–17 come before the options, so a message's
//! tail stays `4, 1, flags, 0`. Report fields: 1 name, 2 id, 8 status (1 sent, 2 progress,
//! 3 success, 4 failure, 5 retrying), 6 codec id, 7 payload bytes, 9 error kind, 10 error
//! message, 12 attempt (of a retrying report: the attempt that failed; of a failure: how many
//! ran, when more than 1), 16 wait before the next attempt (u64 LE milliseconds).
//! Readers skip tags they do not know, so fields can be added without breaking older
//! workers; a new version byte marks an incompatible change.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::codec::Encoded;
use crate::error::{BrokerError, BrokerErrorKind, TaskError, TaskErrorKind};
use crate::id::{TaskId, TaskName};
use crate::limits::TimeLimits;
use crate::message::{Payload, ReplyTo, ReportBody, ReportMessage, TaskMessage, Value};
use crate::options::TaskOptions;
use crate::retry::{Backoff, RetryPolicy};

/// The format version written in front of every message.
pub const VERSION: u8 = 1;
const TYPE_TASK: u8 = 1;
const TYPE_REPORT: u8 = 2;

const END: u8 = 0;
const NAME: u8 = 1;
const ID: u8 = 2;
const FINGERPRINT: u8 = 3;
const OPTIONS: u8 = 4;
const REPLY_TO: u8 = 5;
const CODEC: u8 = 6;
const PAYLOAD: u8 = 7;
const STATUS: u8 = 8;
const ERROR_KIND: u8 = 9;
const ERROR_MESSAGE: u8 = 10;
const REDELIVERED: u8 = 11;
const ATTEMPT: u8 = 12;
const DUE: u8 = 13;
const EXPIRES: u8 = 14;
const RETRY: u8 = 15;
const AFTER: u8 = 16;
const LIMITS: u8 = 17;

/// What a broker puts in place of a task message's last byte (its end marker) to mark it
/// redelivered: the empty field 11, then the end marker again. Brokers that rewrite
/// messages server-side (a Redis script) use it as is.
pub const REDELIVERED_MARK: &[u8] = &[REDELIVERED, 0, END];

const OPT_IGNORE_REPORT: u8 = 1;
const OPT_MONITOR_PROGRESS: u8 = 2;
const OPT_AT_MOST_ONCE: u8 = 4;

const STATUS_SENT: u8 = 1;
const STATUS_PROGRESS: u8 = 2;
const STATUS_SUCCESS: u8 = 3;
const STATUS_FAILURE: u8 = 4;
const STATUS_RETRYING: u8 = 5;

const BACKOFF_EXPONENTIAL: u8 = 1;
const BACKOFF_JITTER: u8 = 2;

/// `time` in milliseconds since the Unix epoch, as the wire carries times (0 before it).
pub fn millis(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `millis` milliseconds after the Unix epoch.
pub fn time(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

fn duration_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn retry_bytes(policy: &RetryPolicy) -> [u8; 21] {
    let backoff = policy.get_backoff();
    let mut out = [0u8; 21];
    out[..4].copy_from_slice(&policy.retries().to_le_bytes());
    out[4..12].copy_from_slice(&duration_millis(backoff.get_base()).to_le_bytes());
    out[12..20].copy_from_slice(&duration_millis(backoff.get_cap()).to_le_bytes());
    let mut flags = 0;
    if backoff.is_exponential() {
        flags |= BACKOFF_EXPONENTIAL;
    }
    if backoff.has_jitter() {
        flags |= BACKOFF_JITTER;
    }
    out[20] = flags;
    out
}

fn retry_policy(value: &[u8]) -> Result<RetryPolicy, BrokerError> {
    let bytes: [u8; 21] = fixed(value, "retry policy")?;
    let word = |range: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[range]);
        Duration::from_millis(u64::from_le_bytes(b))
    };
    let retries = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let (base, cap, flags) = (word(4..12), word(12..20), bytes[20]);
    let backoff = if flags & BACKOFF_EXPONENTIAL != 0 { Backoff::exponential(base) } else { Backoff::fixed(base) };
    Ok(RetryPolicy::new(retries).backoff(backoff.cap(cap).jitter(flags & BACKOFF_JITTER != 0)))
}

/// Encodes a task message. Its arguments must be encoded and its reply address must not be
/// an in-process sink.
pub fn encode_task(msg: &TaskMessage) -> Result<Vec<u8>, BrokerError> {
    let Payload::Encoded(args) = &msg.args else {
        return Err(BrokerError::new(BrokerErrorKind::Config, "in-process arguments cannot be sent as bytes"));
    };
    let address = match &msg.reply_to {
        ReplyTo::Address(address) => address.len(),
        _ => 0,
    };
    // Room for every field at once (and the redelivery mark a broker may add).
    let lifecycle = if msg.due.is_some() || msg.expires.is_some() || msg.retry.retries() > 0 || !msg.limits.is_none() {
        66
    } else {
        0
    };
    let mut out = Vec::with_capacity(
        48 + lifecycle + msg.name.as_str().len() + msg.id.as_str().len() + address + args.bytes.len(),
    );
    out.push(VERSION);
    out.push(TYPE_TASK);
    field(&mut out, NAME, msg.name.as_str().as_bytes());
    field(&mut out, ID, msg.id.as_str().as_bytes());
    match &msg.reply_to {
        ReplyTo::None => {}
        ReplyTo::Address(address) => field(&mut out, REPLY_TO, address.as_bytes()),
        ReplyTo::Local(_) => {
            return Err(BrokerError::new(BrokerErrorKind::Config, "an in-process reply sink cannot be sent as bytes"));
        }
    }
    field(&mut out, FINGERPRINT, &msg.fingerprint.to_le_bytes());
    field(&mut out, CODEC, &[args.codec]);
    field(&mut out, PAYLOAD, &args.bytes);
    if msg.attempt > 1 {
        field(&mut out, ATTEMPT, &msg.attempt.to_le_bytes());
    }
    if let Some(due) = msg.due {
        // Rounded up: a due time read back is never earlier than the one sent.
        let ms =
            millis(due) + u64::from(due.duration_since(UNIX_EPOCH).is_ok_and(|d| d.subsec_nanos() % 1_000_000 != 0));
        field(&mut out, DUE, &ms.to_le_bytes());
    }
    if let Some(expires) = msg.expires {
        field(&mut out, EXPIRES, &millis(expires).to_le_bytes());
    }
    if msg.retry.retries() > 0 {
        field(&mut out, RETRY, &retry_bytes(&msg.retry));
    }
    if !msg.limits.is_none() {
        field(&mut out, LIMITS, &msg.limits.to_bytes());
    }
    let mut flags = 0;
    if msg.options.ignore_report {
        flags |= OPT_IGNORE_REPORT;
    }
    if msg.options.monitor_progress {
        flags |= OPT_MONITOR_PROGRESS;
    }
    if msg.options.at_most_once {
        flags |= OPT_AT_MOST_ONCE;
    }
    // Last, so a message's tail (`4, 1, flags, END`) can never look like redelivery marks
    // to a broker counting them.
    field(&mut out, OPTIONS, &[flags]);
    out.push(END);
    Ok(out)
}

/// A task message that could not be decoded, with what could be read of its identity (so
/// the caller can still be told).
#[derive(Debug)]
pub struct MalformedTask {
    /// Why decoding failed.
    pub error: BrokerError,
    /// The task name, if it was read.
    pub name: Option<TaskName>,
    /// The call id, if it was read.
    pub id: Option<TaskId>,
    /// The reply address, if it was read.
    pub reply_to: Option<Arc<str>>,
    /// The message as it was given to the decoder.
    pub bytes: Vec<u8>,
}

/// Strings a decoder may already hold: when a decoded name or address equals one of them,
/// it is shared instead of allocated again.
#[derive(Debug, Default, Clone, Copy)]
pub struct Known<'a> {
    /// The task name expected (e.g. the queue's).
    pub name: Option<&'a TaskName>,
    /// The reply address expected (e.g. this process's own).
    pub address: Option<&'a Arc<str>>,
}

impl Known<'_> {
    /// The name in `value`: the known one if the bytes match (no check, no allocation).
    fn name(&self, value: &[u8]) -> Result<TaskName, BrokerError> {
        match self.name {
            Some(known) if known.as_str().as_bytes() == value => Ok(known.clone()),
            _ => Ok(TaskName::from(utf8(value, "name")?)),
        }
    }

    /// The address in `value`: the known one if the bytes match (no check, no allocation).
    fn address(&self, value: &[u8]) -> Result<Arc<str>, BrokerError> {
        match self.address {
            Some(known) if known.as_bytes() == value => Ok(known.clone()),
            _ => Ok(Arc::from(utf8(value, "reply address")?)),
        }
    }
}

/// Decodes a task message.
pub fn decode_task(bytes: &[u8]) -> Result<TaskMessage, Box<MalformedTask>> {
    decode_task_from(bytes.to_vec(), &Known::default())
}

/// Decodes a task message, reusing the buffer of `bytes` for the arguments (no new
/// allocation) and sharing the strings in `known`.
pub fn decode_task_from(bytes: Vec<u8>, known: &Known<'_>) -> Result<TaskMessage, Box<MalformedTask>> {
    decode_delivery(bytes, known).map(|(message, _)| message)
}

/// [`decode_task_from`], also telling whether a broker marked the message redelivered.
pub fn decode_delivery(bytes: Vec<u8>, known: &Known<'_>) -> Result<(TaskMessage, bool), Box<MalformedTask>> {
    let mut redelivered = false;
    let mut name = None;
    let mut id = None;
    let mut reply_to = None;
    let mut fingerprint = None;
    let mut options = TaskOptions::default();
    let mut codec = None;
    let mut payload = None;
    let (mut attempt, mut due, mut expires, mut retry) = (1, None, None, RetryPolicy::NONE);
    let mut limits = TimeLimits::NONE;
    let result = (|| {
        let mut reader = Reader::new(&bytes, TYPE_TASK)?;
        while let Some((tag, value)) = reader.next_field()? {
            match tag {
                NAME => name = Some(known.name(value)?),
                ID => id = Some(TaskId::new(utf8(value, "id")?)),
                REPLY_TO => reply_to = Some(known.address(value)?),
                FINGERPRINT => fingerprint = Some(u64::from_le_bytes(fixed(value, "fingerprint")?)),
                OPTIONS => {
                    let [flags] = fixed(value, "options")?;
                    options.ignore_report = flags & OPT_IGNORE_REPORT != 0;
                    options.monitor_progress = flags & OPT_MONITOR_PROGRESS != 0;
                    options.at_most_once = flags & OPT_AT_MOST_ONCE != 0;
                }
                CODEC => codec = Some(fixed::<1>(value, "codec")?[0]),
                PAYLOAD => payload = Some(reader.range_of(value)),
                REDELIVERED => redelivered = true,
                ATTEMPT => attempt = u32::from_le_bytes(fixed(value, "attempt")?),
                DUE => due = Some(time(u64::from_le_bytes(fixed(value, "due time")?))),
                EXPIRES => expires = Some(time(u64::from_le_bytes(fixed(value, "expiry")?))),
                RETRY => retry = retry_policy(value)?,
                LIMITS => limits = TimeLimits::from_bytes(fixed(value, "time limits")?),
                _ => {}
            }
        }
        Ok(())
    })();
    let missing = |what: &'static str| malformed(format!("task message without {what}"));
    let checked = result.and_then(|()| {
        Ok((
            name.clone().ok_or_else(|| missing("name"))?,
            id.clone().ok_or_else(|| missing("id"))?,
            codec.ok_or_else(|| missing("codec"))?,
            payload.take().ok_or_else(|| missing("arguments"))?,
        ))
    });
    match checked {
        Ok((name, id, codec, range)) => Ok((
            // Built in place, as in `App::call_task`: the builder's moves copy the message.
            TaskMessage {
                name,
                id,
                fingerprint: fingerprint.unwrap_or(0),
                options,
                reply_to: reply_to.map(ReplyTo::Address).unwrap_or(ReplyTo::None),
                args: Payload::Encoded(Encoded::new(codec, take_range(bytes, range))),
                attempt,
                due,
                expires,
                retry,
                limits,
            },
            redelivered,
        )),
        Err(error) => Err(Box::new(MalformedTask { error, name, id, reply_to, bytes })),
    }
}

/// The bytes of `range`, in the buffer that held them.
fn take_range(mut bytes: Vec<u8>, range: std::ops::Range<usize>) -> Vec<u8> {
    bytes.truncate(range.end);
    bytes.drain(..range.start);
    bytes
}

/// Encodes a report. A success payload must be encoded.
pub fn encode_report(report: &ReportMessage<'_>) -> Result<Vec<u8>, BrokerError> {
    // Room for every field at once: one allocation per report.
    let body = match &report.body {
        ReportBody::Progress(Some(value)) | ReportBody::Success(Value::Encoded(value)) => value.bytes.len(),
        ReportBody::Failure(error) | ReportBody::Retrying { error, .. } => {
            error.message().len() + error.raw_payload().map_or(0, |p| p.bytes.len())
        }
        _ => 0,
    };
    let mut out = Vec::with_capacity(48 + report.name.as_str().len() + report.id.as_str().len() + body);
    out.push(VERSION);
    out.push(TYPE_REPORT);
    field(&mut out, NAME, report.name.as_str().as_bytes());
    field(&mut out, ID, report.id.as_str().as_bytes());
    let encoded_payload = |out: &mut Vec<u8>, payload: &Encoded| {
        field(out, CODEC, &[payload.codec]);
        field(out, PAYLOAD, &payload.bytes);
    };
    match &report.body {
        ReportBody::Sent => field(&mut out, STATUS, &[STATUS_SENT]),
        ReportBody::Progress(value) => {
            field(&mut out, STATUS, &[STATUS_PROGRESS]);
            if let Some(value) = value {
                encoded_payload(&mut out, value);
            }
        }
        ReportBody::Success(Value::Encoded(value)) => {
            field(&mut out, STATUS, &[STATUS_SUCCESS]);
            encoded_payload(&mut out, value);
        }
        ReportBody::Success(Value::Local(_)) => {
            return Err(BrokerError::new(BrokerErrorKind::Config, "an in-process result cannot be sent as bytes"));
        }
        ReportBody::Failure(error) => {
            field(&mut out, STATUS, &[STATUS_FAILURE]);
            error_fields(&mut out, error);
            if error.attempts() > 1 {
                field(&mut out, ATTEMPT, &error.attempts().to_le_bytes());
            }
        }
        ReportBody::Retrying { attempt, after, error } => {
            field(&mut out, STATUS, &[STATUS_RETRYING]);
            error_fields(&mut out, error);
            field(&mut out, ATTEMPT, &attempt.to_le_bytes());
            field(&mut out, AFTER, &duration_millis(*after).to_le_bytes());
        }
    }
    out.push(END);
    Ok(out)
}

fn error_fields(out: &mut Vec<u8>, error: &TaskError) {
    field(out, ERROR_KIND, &[error.kind().code()]);
    field(out, ERROR_MESSAGE, error.message().as_bytes());
    if let Some(payload) = error.raw_payload() {
        field(out, CODEC, &[payload.codec]);
        field(out, PAYLOAD, &payload.bytes);
    }
}

/// Decodes a report.
pub fn decode_report(bytes: &[u8]) -> Result<ReportMessage<'static>, BrokerError> {
    decode_report_from(bytes.to_vec(), &Known::default())
}

/// Decodes a report, reusing the buffer of `bytes` for its value (no new allocation) and
/// sharing the strings in `known`.
pub fn decode_report_from(bytes: Vec<u8>, known: &Known<'_>) -> Result<ReportMessage<'static>, BrokerError> {
    let mut reader = Reader::new(&bytes, TYPE_REPORT)?;
    let (mut name, mut id, mut status, mut codec, mut payload) = (None, None, None, None, None);
    let (mut error_kind, mut error_message) = (None, None);
    let (mut attempt, mut after) = (None, None);
    while let Some((tag, value)) = reader.next_field()? {
        match tag {
            NAME => name = Some(known.name(value)?),
            ID => id = Some(TaskId::new(utf8(value, "id")?)),
            STATUS => status = Some(fixed::<1>(value, "status")?[0]),
            CODEC => codec = Some(fixed::<1>(value, "codec")?[0]),
            PAYLOAD => payload = Some(reader.range_of(value)),
            ERROR_KIND => error_kind = Some(TaskErrorKind::from_code(fixed::<1>(value, "error kind")?[0])),
            ERROR_MESSAGE => error_message = Some(utf8(value, "error message")?.to_owned()),
            ATTEMPT => attempt = Some(u32::from_le_bytes(fixed(value, "attempt")?)),
            AFTER => after = Some(Duration::from_millis(u64::from_le_bytes(fixed(value, "retry wait")?))),
            _ => {}
        }
    }
    let encoded = match (codec, payload) {
        (Some(codec), Some(range)) => Some(Encoded::new(codec, take_range(bytes, range))),
        (None, None) => None,
        _ => return Err(malformed("report payload without codec (or codec without payload)")),
    };
    let body = match status {
        Some(STATUS_SENT) => ReportBody::Sent,
        Some(STATUS_PROGRESS) => ReportBody::Progress(encoded),
        Some(STATUS_SUCCESS) => {
            ReportBody::Success(Value::Encoded(encoded.ok_or_else(|| malformed("success report without value"))?))
        }
        Some(status @ (STATUS_FAILURE | STATUS_RETRYING)) => {
            let kind = error_kind.unwrap_or(TaskErrorKind::Other);
            let message = error_message.unwrap_or_default();
            let error = match encoded {
                Some(payload) => TaskError::with_payload(kind, message, payload),
                None => TaskError::new(kind, message),
            };
            if status == STATUS_FAILURE {
                ReportBody::Failure(error.with_attempts(attempt.unwrap_or(1)))
            } else {
                ReportBody::Retrying {
                    attempt: attempt.ok_or_else(|| malformed("retrying report without attempt"))?,
                    after: after.ok_or_else(|| malformed("retrying report without wait"))?,
                    error,
                }
            }
        }
        Some(other) => return Err(malformed(format!("unknown report status {other}"))),
        None => return Err(malformed("report without status")),
    };
    Ok(ReportMessage {
        name: name.ok_or_else(|| malformed("report without name"))?,
        id: id.ok_or_else(|| malformed("report without id"))?,
        body,
    })
}

/// How long the report at the start of `bytes` is, through its end marker (without
/// decoding it): where the next report of a batch stored as one value starts.
pub fn report_len(bytes: &[u8]) -> Result<usize, BrokerError> {
    Reader::new(bytes, TYPE_REPORT)?.message_len()
}

/// What the first bytes of a report say, as far as they go: its call, and whether it is a
/// final report (success or failure). A broker reads it from a report too large to decode.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReportHead {
    /// The task name, if the bytes hold it whole.
    pub name: Option<TaskName>,
    /// The call id, if the bytes hold it whole.
    pub id: Option<TaskId>,
    /// Whether it is a final report, if the bytes hold its status.
    pub final_report: Option<bool>,
}

/// Reads the [`ReportHead`] of a report from its first bytes (a prefix of any length).
pub fn report_head(prefix: &[u8]) -> ReportHead {
    let mut head = ReportHead::default();
    let Ok(mut reader) = Reader::new(prefix, TYPE_REPORT) else { return head };
    while let Ok(Some((tag, value))) = reader.field_or_end() {
        match tag {
            NAME => head.name = std::str::from_utf8(value).ok().map(TaskName::from),
            ID => head.id = std::str::from_utf8(value).ok().map(TaskId::new),
            STATUS => head.final_report = value.first().map(|s| matches!(*s, STATUS_SUCCESS | STATUS_FAILURE)),
            _ => {}
        }
    }
    head
}

/// Decodes reports written back to back in one value (a broker may store a batch of reports
/// as one), handing each to `each` in order: the report, or why it could not be read. A
/// single report decodes without a copy. One that cannot be read is skipped when its length
/// is known; when it is not, where the next one starts is unknown and the batch ends there.
pub fn decode_reports_from(
    bytes: Vec<u8>,
    known: &Known<'_>,
    mut each: impl FnMut(Result<ReportMessage<'static>, BrokerError>),
) {
    let first = Reader::new(&bytes, TYPE_REPORT).and_then(Reader::message_len);
    match first {
        Ok(len) if len == bytes.len() => return each(decode_report_from(bytes, known)),
        Err(e) => return each(Err(e)),
        Ok(_) => {}
    }
    let mut at = 0;
    while at < bytes.len() {
        match Reader::new(&bytes[at..], TYPE_REPORT).and_then(Reader::message_len) {
            Ok(len) => {
                each(decode_report_from(bytes[at..at + len].to_vec(), known));
                at += len;
            }
            Err(e) => return each(Err(e)),
        }
    }
}

fn field(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    let mut len = value.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(value);
}

fn malformed(message: impl Into<std::borrow::Cow<'static, str>>) -> BrokerError {
    BrokerError::new(BrokerErrorKind::Malformed, message)
}

fn utf8<'a>(value: &'a [u8], what: &'static str) -> Result<&'a str, BrokerError> {
    std::str::from_utf8(value)
        .map_err(|e| BrokerError::with_source(BrokerErrorKind::Malformed, format!("{what} is not UTF-8"), e))
}

fn fixed<const N: usize>(value: &[u8], what: &'static str) -> Result<[u8; N], BrokerError> {
    value.try_into().map_err(|_| malformed(format!("{what} has {} bytes, expected {N}", value.len())))
}

struct Reader<'a> {
    all: &'a [u8],
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], expected_type: u8) -> Result<Reader<'a>, BrokerError> {
        match bytes {
            [VERSION, ty, rest @ ..] if *ty == expected_type => Ok(Reader { all: bytes, rest }),
            [VERSION, ty, ..] => Err(malformed(format!("message type {ty}, expected {expected_type}"))),
            [VERSION] => Err(malformed("message truncated after its version")),
            [version, ..] => Err(malformed(format!("unknown message format version {version}"))),
            [] => Err(malformed("empty message")),
        }
    }

    /// Where a field's value (a slice of this reader's input) lies in the input.
    fn range_of(&self, value: &[u8]) -> std::ops::Range<usize> {
        let start = value.as_ptr() as usize - self.all.as_ptr() as usize;
        start..start + value.len()
    }

    fn next_field(&mut self) -> Result<Option<(u8, &'a [u8])>, BrokerError> {
        let field = self.field_or_end()?;
        if field.is_none() && !self.rest.is_empty() {
            return Err(malformed(format!("{} bytes after the end of the message", self.rest.len())));
        }
        Ok(field)
    }

    /// How long the message is, through its end marker (bytes after it are not read).
    fn message_len(mut self) -> Result<usize, BrokerError> {
        while self.field_or_end()?.is_some() {}
        Ok(self.all.len() - self.rest.len())
    }

    /// The next field, or `None` at the end marker (leaving what follows it in `rest`).
    fn field_or_end(&mut self) -> Result<Option<(u8, &'a [u8])>, BrokerError> {
        let Some((&tag, rest)) = self.rest.split_first() else {
            return Err(malformed("message truncated (no end marker)"));
        };
        if tag == END {
            self.rest = rest;
            return Ok(None);
        }
        let mut len: u64 = 0;
        let mut shift = 0;
        let mut rest = rest;
        loop {
            let Some((&byte, tail)) = rest.split_first() else {
                return Err(malformed("message truncated in a field length"));
            };
            rest = tail;
            if shift > 56 {
                return Err(malformed("field length overflows"));
            }
            len |= u64::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if len > rest.len() as u64 {
            return Err(malformed(format!("field {tag} claims {len} bytes, {} remain", rest.len())));
        }
        let (value, tail) = rest.split_at(len as usize);
        self.rest = tail;
        Ok(Some((tag, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> TaskMessage {
        TaskMessage::new(
            TaskName::from("tasks.add"),
            TaskId::new("0190a5b2-0000-7000-8000-000000000001"),
            0xdead_beef_0102_0304,
            Payload::Encoded(Encoded::new(1, vec![0x92, 0x02, 0x03])),
        )
        .with_options(TaskOptions { ignore_report: false, monitor_progress: true, at_most_once: true })
        .with_reply_to(ReplyTo::Address(Arc::from("reply.1")))
    }

    #[test]
    fn task_round_trips() {
        let bytes = encode_task(&task()).unwrap();
        let back = decode_task(&bytes).unwrap();
        assert_eq!(back.name, "tasks.add");
        assert_eq!(back.id, "0190a5b2-0000-7000-8000-000000000001");
        assert_eq!(back.fingerprint, 0xdead_beef_0102_0304);
        assert_eq!(back.options, TaskOptions { ignore_report: false, monitor_progress: true, at_most_once: true });
        assert!(matches!(&back.reply_to, ReplyTo::Address(a) if &**a == "reply.1"));
        assert_eq!(back.args.encoded(), Some(&Encoded::new(1, vec![0x92, 0x02, 0x03])));
    }

    #[test]
    fn lifecycle_fields_round_trip_and_keep_the_tail() {
        let due = time(1_800_000_000_123);
        let policy = RetryPolicy::new(4)
            .backoff(Backoff::exponential(Duration::from_millis(250)).cap(Duration::from_secs(90)).jitter(false));
        let message =
            task().with_attempt(3).with_due(Some(due)).with_expires(Some(time(1_800_000_060_000))).with_retry(policy);
        let bytes = encode_task(&message).unwrap();
        assert_eq!(&bytes[bytes.len() - 4..], &[OPTIONS, 1, OPT_MONITOR_PROGRESS | OPT_AT_MOST_ONCE, END]);
        let back = decode_task(&bytes).unwrap();
        assert_eq!((back.attempt, back.due, back.retry), (3, Some(due), policy));
        assert_eq!(back.expires.map(millis), Some(1_800_000_060_000));
        assert_eq!(back.retry.get_backoff().get_cap(), Duration::from_secs(90));
        // A plain message carries none of them (and costs nothing for them).
        let plain = encode_task(&task()).unwrap();
        let back = decode_task(&plain).unwrap();
        assert_eq!((back.attempt, back.due, back.expires, back.retry), (1, None, None, RetryPolicy::NONE));
        assert!(plain.len() < bytes.len() - 40);
        for fixed_policy in [RetryPolicy::new(1).backoff(Backoff::fixed(Duration::from_secs(2))), RetryPolicy::new(9)] {
            let bytes = encode_task(&task().with_retry(fixed_policy)).unwrap();
            assert_eq!(decode_task(&bytes).unwrap().retry, fixed_policy);
        }
    }

    #[test]
    fn retrying_and_repeated_failures_round_trip() {
        let error =
            TaskError::with_payload(TaskErrorKind::Failed, "busy", Encoded::new(1, vec![0xa4, b'b', b'u', b's', b'y']));
        let retrying = ReportMessage {
            name: TaskName::from("t"),
            id: TaskId::new("1"),
            body: ReportBody::Retrying { attempt: 2, after: Duration::from_millis(1_500), error: error.clone() },
        };
        let bytes = encode_report(&retrying).unwrap();
        assert_eq!(report_head(&bytes).final_report, Some(false), "a retry is not the end");
        match decode_report(&bytes).unwrap().body {
            ReportBody::Retrying { attempt, after, error: back } => {
                assert_eq!((attempt, after), (2, Duration::from_millis(1_500)));
                assert_eq!(back, error);
            }
            other => panic!("{other:?}"),
        }
        let last = ReportMessage {
            name: TaskName::from("t"),
            id: TaskId::new("1"),
            body: ReportBody::Failure(error.clone().with_attempts(3)),
        };
        match decode_report(&encode_report(&last).unwrap()).unwrap().body {
            ReportBody::Failure(back) => assert_eq!((back.attempts(), back.message()), (3, "busy")),
            other => panic!("{other:?}"),
        }
        assert_eq!(TaskErrorKind::from_code(TaskErrorKind::Expired.code()), TaskErrorKind::Expired);
    }

    #[test]
    fn truncated_task_keeps_identity() {
        let bytes = encode_task(&task()).unwrap();
        for cut in 0..bytes.len() {
            let err = decode_task(&bytes[..cut]).unwrap_err();
            assert_eq!(err.error.kind(), BrokerErrorKind::Malformed);
        }
        // Cut near the end: name, id and reply address were read.
        let err = decode_task(&bytes[..bytes.len() - 2]).unwrap_err();
        assert_eq!(err.name.unwrap(), "tasks.add");
        assert_eq!(err.id.unwrap(), "0190a5b2-0000-7000-8000-000000000001");
        assert_eq!(&*err.reply_to.unwrap(), "reply.1");
    }

    #[test]
    fn the_redelivery_mark_is_recognised() {
        let mut bytes = encode_task(&task()).unwrap();
        let (_, redelivered) = decode_delivery(bytes.clone(), &Known::default()).unwrap();
        assert!(!redelivered);
        bytes.pop();
        bytes.extend_from_slice(REDELIVERED_MARK);
        let (message, redelivered) = decode_delivery(bytes, &Known::default()).unwrap();
        assert!(redelivered);
        assert_eq!(message.id, "0190a5b2-0000-7000-8000-000000000001");
    }

    #[test]
    fn bytes_after_the_end_are_malformed() {
        let mut bytes = encode_task(&task()).unwrap();
        bytes.push(0);
        assert!(decode_task(&bytes).unwrap_err().error.to_string().contains("after the end"));
        assert!(decode_task(&[VERSION]).unwrap_err().error.to_string().contains("truncated"));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut bytes = encode_task(&task()).unwrap();
        let end = bytes.pop().unwrap();
        field(&mut bytes, 200, b"from the future");
        bytes.push(end);
        assert_eq!(decode_task(&bytes).unwrap().name, "tasks.add");
    }

    #[test]
    fn garbage_is_malformed() {
        for garbage in [&b""[..], b"\x00", b"hello world", b"\x01\x02\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"] {
            assert_eq!(decode_task(garbage).unwrap_err().error.kind(), BrokerErrorKind::Malformed);
            assert_eq!(decode_report(garbage).unwrap_err().kind(), BrokerErrorKind::Malformed);
        }
    }

    #[test]
    fn reports_round_trip() {
        let bodies = [
            ReportBody::Sent,
            ReportBody::Progress(None),
            ReportBody::Progress(Some(Encoded::new(2, b"0.5".to_vec()))),
            ReportBody::Success(Value::Encoded(Encoded::new(1, vec![6]))),
            ReportBody::Failure(TaskError::with_payload(TaskErrorKind::Failed, "no", Encoded::new(1, vec![1]))),
            ReportBody::Failure(TaskError::new(TaskErrorKind::Panic, "boom")),
        ];
        for body in bodies {
            let expected = format!("{body:?}");
            let report = ReportMessage { name: TaskName::from("n"), id: TaskId::new("1"), body };
            let back = decode_report(&encode_report(&report).unwrap()).unwrap();
            assert_eq!((back.name.as_str(), back.id.as_str()), ("n", "1"));
            assert_eq!(format!("{:?}", back.body), expected);
        }
    }

    /// Reports written back to back decode one by one, in order; a bad one whose length is
    /// known is skipped, one whose length is not ends the batch.
    #[test]
    fn reports_back_to_back_decode_in_order() {
        let report = |id: &str, value: u8| {
            let body = ReportBody::Success(Value::Encoded(Encoded::new(1, vec![value])));
            encode_report(&ReportMessage { name: TaskName::from("n"), id: TaskId::new(id), body }).unwrap()
        };
        // (id and value) of each report, `None` for each error.
        let decode = |bytes: Vec<u8>| {
            let mut got = Vec::new();
            decode_reports_from(bytes, &Known::default(), |r| {
                got.push(r.ok().map(|r| {
                    let ReportBody::Success(Value::Encoded(e)) = r.body else { panic!("a success") };
                    (r.id.as_str().to_owned(), e.bytes[0])
                }))
            });
            got
        };
        let ok = |id: &str, v: u8| Some((id.to_owned(), v));
        assert_eq!(decode(report("a", 1)), [ok("a", 1)]);
        let batch = [report("a", 1), report("b", 2), report("c", 3)].concat();
        assert_eq!(decode(batch.clone()), [ok("a", 1), ok("b", 2), ok("c", 3)]);

        // b without its status: its length is known, so c still decodes.
        let mut no_status = report("b", 2);
        let at = no_status.windows(3).position(|w| w == [STATUS, 1, STATUS_SUCCESS]).unwrap();
        no_status.drain(at..at + 3);
        let skipped = [report("a", 1), no_status, report("c", 3)].concat();
        assert_eq!(decode(skipped), [ok("a", 1), None, ok("c", 3)]);

        let mut truncated = batch[..batch.len() - 1].to_vec(); // c lost its end marker
        truncated.splice(0..0, report("z", 9));
        assert_eq!(decode(truncated), [ok("z", 9), ok("a", 1), ok("b", 2), None]);
        assert_eq!(decode(Vec::new()), [None], "an empty value is malformed");
    }
}
