//! Identity of a call: the task's [`TaskName`], the call's [`TaskId`], and the [`IdMaker`]s
//! that produce ids. A call is identified by the pair ([`CallKey`]): the same id under two
//! names never mixes.

use std::borrow::Borrow;
use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The name of a task, e.g. `my_crate::tasks::add` or `billing.charge`.
///
/// Registered names are `'static` (no allocation, no reference counting when cloned); names
/// decoded from the wire share one allocation.
#[derive(Clone)]
pub struct TaskName(NameRepr);

#[derive(Clone)]
enum NameRepr {
    Static(&'static str),
    Shared(Arc<str>),
}

impl TaskName {
    /// A name from a string literal (or any `'static` string).
    pub const fn from_static(name: &'static str) -> TaskName {
        TaskName(NameRepr::Static(name))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            NameRepr::Static(s) => s,
            NameRepr::Shared(s) => s,
        }
    }
}

impl From<&str> for TaskName {
    fn from(name: &str) -> TaskName {
        TaskName(NameRepr::Shared(Arc::from(name)))
    }
}

impl From<String> for TaskName {
    fn from(name: String) -> TaskName {
        TaskName(NameRepr::Shared(Arc::from(name)))
    }
}

impl From<&TaskName> for TaskName {
    fn from(name: &TaskName) -> TaskName {
        name.clone()
    }
}

impl PartialEq for TaskName {
    fn eq(&self, other: &TaskName) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for TaskName {}

impl PartialEq<str> for TaskName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for TaskName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Hash for TaskName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl Borrow<str> for TaskName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for TaskName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TaskName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

const INLINE: usize = 38;

/// The id of one call, unique per task name (a UUIDv7 by default).
///
/// Ids of up to 38 bytes (every UUID) are stored inline: making and cloning one does not
/// allocate.
#[derive(Clone)]
pub struct TaskId(IdRepr);

#[derive(Clone)]
enum IdRepr {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Arc<str>),
}

impl TaskId {
    /// An id from a string.
    pub fn new(id: &str) -> TaskId {
        if id.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..id.len()].copy_from_slice(id.as_bytes());
            TaskId(IdRepr::Inline { len: id.len() as u8, buf })
        } else {
            TaskId(IdRepr::Heap(Arc::from(id)))
        }
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Inline bytes are only ever copied from a `&str` or written as ASCII digits and
            // hex, so they are valid UTF-8; the fallback is unreachable.
            IdRepr::Inline { len, buf } => std::str::from_utf8(&buf[..*len as usize]).unwrap_or_default(),
            IdRepr::Heap(s) => s,
        }
    }

    fn bytes(&self) -> &[u8] {
        match &self.0 {
            IdRepr::Inline { len, buf } => &buf[..*len as usize],
            IdRepr::Heap(s) => s.as_bytes(),
        }
    }

    fn from_ascii(ascii: &[u8]) -> TaskId {
        let mut buf = [0u8; INLINE];
        buf[..ascii.len()].copy_from_slice(ascii);
        TaskId(IdRepr::Inline { len: ascii.len() as u8, buf })
    }
}

impl From<&str> for TaskId {
    fn from(id: &str) -> TaskId {
        TaskId::new(id)
    }
}

impl From<String> for TaskId {
    fn from(id: String) -> TaskId {
        TaskId::new(&id)
    }
}

impl From<&String> for TaskId {
    fn from(id: &String) -> TaskId {
        TaskId::new(id)
    }
}

impl PartialEq for TaskId {
    fn eq(&self, other: &TaskId) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for TaskId {}

impl PartialEq<str> for TaskId {
    fn eq(&self, other: &str) -> bool {
        self.bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for TaskId {
    fn eq(&self, other: &&str) -> bool {
        self.bytes() == other.as_bytes()
    }
}

impl PartialOrd for TaskId {
    fn partial_cmp(&self, other: &TaskId) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TaskId {
    fn cmp(&self, other: &TaskId) -> std::cmp::Ordering {
        self.bytes().cmp(other.bytes())
    }
}

impl Hash for TaskId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.bytes());
        state.write_u8(0xff);
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// The identity of one call: (task name, id).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CallKey {
    /// The task's name.
    pub name: TaskName,
    /// The call's id.
    pub id: TaskId,
}

impl CallKey {
    /// A key from its parts.
    pub fn new(name: impl Into<TaskName>, id: impl Into<TaskId>) -> CallKey {
        CallKey { name: name.into(), id: id.into() }
    }
}

impl fmt::Display for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.name, self.id)
    }
}

impl fmt::Debug for CallKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Makes the ids of calls. Must be thread-safe and unique per task name.
///
/// Selectable per task with [`App::set_id_maker`](crate::App::set_id_maker).
pub trait IdMaker: Send + Sync + 'static {
    /// The next id.
    fn next_id(&self) -> TaskId;
}

/// The default [`IdMaker`]: UUIDv7 (RFC 9562), unique and time-ordered.
///
/// The first 48 bits are the Unix time in milliseconds; within one millisecond a thread's ids
/// keep increasing (a 42-bit counter started at a random value); 32 more bits are random.
#[derive(Debug, Default, Clone, Copy)]
pub struct UuidV7;

thread_local! {
    static V7_STATE: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
}

impl UuidV7 {
    /// Makes one UUIDv7 as 16 bytes.
    pub fn generate() -> [u8; 16] {
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let (ms, counter, random) = V7_STATE.with(|state| {
            let (last_ms, counter, mut rng) = state.get();
            if rng == 0 {
                rng = seed();
            }
            let (ms, counter) = if now_ms > last_ms {
                (now_ms, wyrand(&mut rng) & COUNTER_SEED_MASK)
            } else {
                // Same millisecond (or the clock went back): keep the last timestamp and count
                // up, so ids stay ordered; on counter overflow borrow the next millisecond.
                let next = (counter + 1) & COUNTER_MASK;
                if next == 0 { (last_ms + 1, 0) } else { (last_ms, next) }
            };
            let random = wyrand(&mut rng);
            state.set((ms, counter, rng));
            (ms, counter, random)
        });
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        // version 7 and the high 12 counter bits
        let rand_a = ((counter >> 30) & 0x0fff) as u16 | 0x7000;
        bytes[6..8].copy_from_slice(&rand_a.to_be_bytes());
        // variant 0b10, the low 30 counter bits, 32 random bits
        let rand_b = (0b10u64 << 62) | ((counter & 0x3fff_ffff) << 32) | (random & 0xffff_ffff);
        bytes[8..].copy_from_slice(&rand_b.to_be_bytes());
        bytes
    }
}

const COUNTER_MASK: u64 = (1 << 42) - 1;
/// A fresh millisecond starts the counter in its lower half, leaving room to count up.
const COUNTER_SEED_MASK: u64 = (1 << 41) - 1;

fn seed() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    hasher.finish() | 1
}

fn wyrand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0xa076_1d64_78bd_642f);
    let t = u128::from(*state) * u128::from(*state ^ 0xe703_7ed1_a0b4_28db);
    ((t >> 64) ^ t) as u64
}

impl IdMaker for UuidV7 {
    fn next_id(&self) -> TaskId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let bytes = UuidV7::generate();
        let mut out = [0u8; 36];
        let mut o = 0;
        for (i, b) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                out[o] = b'-';
                o += 1;
            }
            out[o] = HEX[(b >> 4) as usize];
            out[o + 1] = HEX[(b & 0xf) as usize];
            o += 2;
        }
        TaskId::from_ascii(&out)
    }
}

/// An [`IdMaker`] counting "1", "2", "3", … (Go dingo's `SeqIDMaker`).
///
/// Ids repeat across processes and restarts: use it for tests and in-process apps, or give
/// each task its own maker.
#[derive(Debug)]
pub struct Sequential {
    next: AtomicU64,
}

impl Sequential {
    /// A maker whose first id is "1".
    pub fn new() -> Sequential {
        Sequential::starting_at(1)
    }

    /// A maker whose first id is `first`.
    pub fn starting_at(first: u64) -> Sequential {
        Sequential { next: AtomicU64::new(first) }
    }
}

impl Default for Sequential {
    fn default() -> Sequential {
        Sequential::new()
    }
}

impl IdMaker for Sequential {
    fn next_id(&self) -> TaskId {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut rest = n;
        loop {
            i -= 1;
            digits[i] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        TaskId::from_ascii(&digits[i..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn uuid_v7_has_version_variant_and_is_ordered() {
        let ids: Vec<TaskId> = (0..10_000).map(|_| UuidV7.next_id()).collect();
        for id in &ids {
            let s = id.as_str();
            assert_eq!(s.len(), 36);
            assert_eq!(&s[14..15], "7", "{s}");
            assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
        }
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1], "{} !< {}", pair[0], pair[1]);
        }
        let unique: HashSet<&TaskId> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn uuid_v7_is_unique_across_threads() {
        let all: Vec<TaskId> = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..4).map(|_| s.spawn(|| (0..20_000).map(|_| UuidV7.next_id()).collect::<Vec<_>>())).collect();
            handles.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
        });
        let unique: HashSet<&TaskId> = all.iter().collect();
        assert_eq!(unique.len(), 80_000);
    }

    #[test]
    fn sequential_counts_from_one() {
        let maker = Sequential::new();
        let ids: Vec<String> = (0..3).map(|_| maker.next_id().to_string()).collect();
        assert_eq!(ids, ["1", "2", "3"]);
        assert_eq!(Sequential::starting_at(u64::MAX).next_id(), "18446744073709551615");
    }

    #[test]
    fn task_id_inline_and_heap_compare_by_content() {
        let long = "x".repeat(100);
        assert_eq!(TaskId::new(&long).as_str(), long);
        assert_eq!(TaskId::new("abc"), TaskId::from(String::from("abc")));
        let mut set = HashSet::new();
        set.insert(TaskId::new("abc"));
        assert!(set.contains(&TaskId::new("abc")));
    }
}
