//! One Redis connection that reconnects: with backoff, reporting loss and recovery as
//! events, reloading the scripts into a server that may have restarted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dingo_core::event::{Event, EventKind, EventSinks, Level, Origin};
use dingo_core::{BrokerError, BrokerErrorKind};

use crate::scripts;

/// A connection owned by one thread.
pub(crate) struct Conn {
    client: redis::Client,
    conn: Option<redis::Connection>,
    /// What the connection is for, in events ("task fetcher", "report listener", …).
    role: &'static str,
    origin: Origin,
    read_timeout: Duration,
    connect_timeout: Duration,
    backoff: (Duration, Duration),
    events: EventSinks,
    lost_since: Option<Instant>,
    /// How many connections were made: tells a reply that was written on this connection
    /// from one written on an earlier one.
    generation: u64,
    /// Whether each new connection first ends, at the server, the connections this one
    /// dropped (see [`Conn::fencing`]).
    fence: bool,
    /// The server's id and this client's address for the open connection (`CLIENT INFO`),
    /// when fencing.
    client_id: Option<(i64, String)>,
    /// Ids and addresses of connections dropped while broken, not yet ended at the server.
    orphans: Vec<(i64, String)>,
    /// Whether the server lets this client end its old connections (`CLIENT KILL`), once
    /// known.
    can_fence: Option<bool>,
    /// The name every new connection gives itself (`CLIENT SETNAME`), if any.
    name: Option<String>,
    /// Whether connections skip TLS verification (`#insecure`): each one opened is a warning.
    unverified: bool,
}

impl Conn {
    pub(crate) fn new(
        client: redis::Client,
        role: &'static str,
        origin: Origin,
        read_timeout: Duration,
        connect_timeout: Duration,
        backoff: (Duration, Duration),
        events: EventSinks,
    ) -> Conn {
        Conn {
            unverified: crate::tls::unverified(&client),
            client,
            conn: None,
            role,
            origin,
            read_timeout,
            connect_timeout,
            backoff,
            events,
            lost_since: None,
            generation: 0,
            fence: false,
            client_id: None,
            orphans: Vec::new(),
            can_fence: None,
            name: None,
        }
    }

    /// Names the connection at the server (`CLIENT SETNAME`, shown by `CLIENT LIST`): the
    /// open one now, every new one as it connects. Whitespace becomes `-` (names may not
    /// hold it). A server that refuses the name (ACL) only leaves the connection unnamed.
    pub(crate) fn named(mut self, name: &str) -> Conn {
        self.rename(name);
        self
    }

    /// See [`named`](Conn::named).
    pub(crate) fn rename(&mut self, name: &str) {
        let name: String = name.chars().map(|c| if c.is_whitespace() { '-' } else { c }).collect();
        if let Some(conn) = &mut self.conn {
            let _ = redis::cmd("CLIENT").arg("SETNAME").arg(&name).query::<()>(conn);
        }
        self.name = Some(name);
    }

    /// Makes every new connection end, at the server, the connections this one dropped
    /// while broken, before anything else runs on it: bytes a dropped connection still had
    /// on their way (the kernel keeps sending them after the socket is closed) can then
    /// never run after what is sent on the new one. A plain command whose outcome a broken
    /// connection left unknown can be followed by one that checks whether it applied.
    pub(crate) fn fencing(mut self) -> Conn {
        self.fence = true;
        self
    }

    /// Whether the open connection was fenced (see [`Conn::fencing`]): the server allows
    /// `CLIENT KILL` to this client. `false` while unknown.
    pub(crate) fn fenced(&self) -> bool {
        self.conn.is_some() && self.can_fence == Some(true)
    }

    /// Runs `f` once on the connection (connecting first if needed). A failed connection is
    /// dropped, so the next call reconnects.
    pub(crate) fn once<T>(
        &mut self,
        f: &mut dyn FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, redis::RedisError> {
        if self.conn.is_none() {
            self.conn = Some(self.connect()?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(redis::RedisError::from(std::io::Error::other("not connected")));
        };
        match f(conn) {
            Ok(value) => {
                if let Some(since) = self.lost_since.take() {
                    self.events.emit(Event::new(
                        self.origin,
                        Level::Info,
                        EventKind::ConnectionRestored,
                        format!("redis {} connection restored after {:.1?}", self.role, since.elapsed()),
                    ));
                }
                Ok(value)
            }
            Err(e) => {
                if is_connection_error(&e) || needs_reconnect(&e) {
                    self.conn = None;
                    self.orphans.extend(self.client_id.take());
                }
                if is_transient(&e) {
                    self.lost(&e);
                }
                Err(e)
            }
        }
    }

    /// Runs `f` until it succeeds, reconnecting with backoff between attempts; gives up
    /// (`None`) once `stop` is set. Errors other than transient ones (see [`is_transient`])
    /// are returned.
    pub(crate) fn retry<T>(
        &mut self,
        stop: &AtomicBool,
        f: &mut dyn FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Option<Result<T, redis::RedisError>> {
        self.retry_tracked(stop, &mut |c, _| f(c))
    }

    /// Like [`retry`](Conn::retry), telling `f` whether an earlier attempt may have
    /// reached the server (its command was written before the connection broke), so that
    /// it can leave out what must not run twice.
    ///
    /// A server that is not ready (see [`is_not_ready`]) is waited for like a lost
    /// connection: with backoff, until it serves commands again. What it refused did not run
    /// (of a round trip it refused only in part, what ran is kept and not sent again, see
    /// `scripts::run`), so the attempt it refused does not count as one that reached the
    /// server.
    pub(crate) fn retry_tracked<T>(
        &mut self,
        stop: &AtomicBool,
        f: &mut dyn FnMut(&mut redis::Connection, bool) -> redis::RedisResult<T>,
    ) -> Option<Result<T, redis::RedisError>> {
        let mut pause = self.backoff.0;
        let mut reached = false;
        loop {
            let result = match self.conn.is_some() {
                true => {
                    let again = reached;
                    reached = true;
                    let result = self.once(&mut |c| f(c, again));
                    if result.as_ref().is_err_and(is_not_ready) {
                        reached = again;
                    }
                    result
                }
                false => match self.connect() {
                    Ok(conn) => {
                        self.conn = Some(conn);
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(value) => return Some(Ok(value)),
                Err(e) if is_transient(&e) => {
                    if stop.load(Ordering::Acquire) {
                        return None;
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(self.backoff.1);
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Runs `f` once, and once more on a new connection if the open one turned out to be
    /// broken: for what is not worth waiting for (wake-ups, clean-up at shutdown).
    pub(crate) fn once_more(
        &mut self,
        f: &mut dyn FnMut(&mut redis::Connection) -> redis::RedisResult<()>,
    ) -> Result<(), redis::RedisError> {
        match self.once(f) {
            Err(e) if is_connection_error(&e) => self.once(f),
            other => other,
        }
    }

    /// Runs `f` for a short command that has no stop flag to heed: a broken connection is
    /// replaced and `f` tried once more at once; a server that is not ready is waited for
    /// with backoff, for up to `patience`. `f` must be safe to run twice (the attempt on the
    /// broken connection may have run).
    pub(crate) fn retry_briefly<T>(
        &mut self,
        patience: Duration,
        f: &mut dyn FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, redis::RedisError> {
        let deadline = Instant::now() + patience;
        let mut pause = self.backoff.0;
        let mut reconnected = false;
        loop {
            match self.once(f) {
                Err(e) if is_connection_error(&e) && !reconnected => reconnected = true,
                Err(e) if is_not_ready(&e) && Instant::now() + pause < deadline => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(self.backoff.1);
                }
                result => return result,
            }
        }
    }

    /// Which connection is open (`None`: none is): commands written on it are answered on it.
    pub(crate) fn generation(&self) -> Option<u64> {
        self.conn.as_ref().map(|_| self.generation)
    }

    fn connect(&mut self) -> redis::RedisResult<redis::Connection> {
        let conn = self.connect_once();
        if let Err(e) = &conn
            && is_transient(e)
        {
            self.lost(e);
        }
        conn
    }

    /// Opens and prepares a connection. A server still loading its data answers the
    /// handshake but refuses the scripts: that is an error (not ready) like any other here.
    fn connect_once(&mut self) -> redis::RedisResult<redis::Connection> {
        let mut conn = self.client.get_connection_with_timeout(self.connect_timeout)?;
        if self.unverified {
            self.events.emit(Event::new(
                self.origin,
                Level::Warning,
                EventKind::TlsUnverified,
                format!(
                    "redis {} connection to {} opened without TLS verification: the URL's `#insecure` turns the \
                     certificate and host name checks off",
                    self.role,
                    self.client.get_connection_info().addr()
                ),
            ));
        }
        conn.set_read_timeout(Some(self.read_timeout))?;
        conn.set_write_timeout(Some(self.connect_timeout))?;
        if self.fence {
            self.fence_orphans(&mut conn)?;
        }
        if let Some(name) = &self.name {
            let _ = redis::cmd("CLIENT").arg("SETNAME").arg(name).query::<()>(&mut conn);
        }
        // A server that restarted forgot the scripts.
        for script in scripts::all() {
            script.load(&mut conn)?;
        }
        self.generation += 1;
        Ok(conn)
    }

    /// Ends the dropped connections at the server (`CLIENT KILL ID … ADDR …`, which finds
    /// nothing if the server closed them already: then whatever they carried has run, or
    /// never will), and learns this connection's id and address. With no orphan, probes with
    /// an id no client has (`i64::MAX`), to learn whether the server allows it.
    ///
    /// A server that restarted numbers its clients from 1 again, and an old id may be another
    /// client's by now: an orphan is only ended if its id is below this connection's (ids
    /// only grow within one run of a server) and its address matches too.
    fn fence_orphans(&mut self, conn: &mut redis::Connection) -> redis::RedisResult<()> {
        let info = match redis::cmd("CLIENT").arg("INFO").query::<String>(conn) {
            Ok(info) => client_info(&info),
            Err(e) if is_connection_error(&e) => return Err(e),
            Err(_) => None,
        };
        let Some((id, addr)) = info else {
            // Not allowed (ACL): the caller keeps to commands that apply once anyway.
            self.can_fence = Some(false);
            self.orphans.clear();
            self.client_id = None;
            return Ok(());
        };
        let orphans: Vec<(i64, String)> = match self.orphans.is_empty() {
            true => vec![(i64::MAX, String::new())],
            false => std::mem::take(&mut self.orphans).into_iter().filter(|(old, _)| *old < id).collect(),
        };
        for (old, old_addr) in orphans {
            let mut kill = redis::cmd("CLIENT");
            kill.arg("KILL").arg("ID").arg(old);
            if !old_addr.is_empty() {
                kill.arg("ADDR").arg(&old_addr);
            }
            match kill.query::<i64>(conn) {
                Ok(_) => self.can_fence = Some(true),
                Err(e) if is_connection_error(&e) => return Err(e),
                Err(_) => self.can_fence = Some(false),
            }
        }
        self.orphans.clear();
        self.client_id = Some((id, addr));
        Ok(())
    }

    /// The connection broke or the server is not ready: said once per outage (its end is
    /// `ConnectionRestored`).
    fn lost(&mut self, error: &redis::RedisError) {
        if self.lost_since.is_none() {
            self.lost_since = Some(Instant::now());
            let message = if is_not_ready(error) {
                format!("redis is not ready for the {} connection ({error}); waiting for it", self.role)
            } else {
                format!("redis {} connection lost ({error}); reconnecting", self.role)
            };
            self.events.emit(Event::new(self.origin, Level::Warning, EventKind::ConnectionLost, message));
        }
    }
}

/// Whether an error means the connection is gone (as opposed to a command error).
pub(crate) fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// The `id` and `addr` fields of a `CLIENT INFO` reply.
fn client_info(info: &str) -> Option<(i64, String)> {
    let field = |name: &str| info.split_whitespace().find_map(|f| f.strip_prefix(name));
    Some((field("id=")?.parse().ok()?, field("addr=")?.to_owned()))
}

/// Whether a reply means the server cannot serve commands yet, and will: it is loading its
/// data (`LOADING`, after a restart, or a replica's full resynchronisation), another client's
/// script runs past its time limit (`BUSY`), a replica lost
/// its master (`MASTERDOWN`), a cluster is reconfiguring (`TRYAGAIN`, `CLUSTERDOWN`), too few
/// replicas to accept writes (`NOREPLICAS`), or the server turned into a replica under this
/// client in a failover (`READONLY`, `UNBLOCKED`: the next connection may reach the new
/// primary). The refused command did not run.
pub(crate) fn is_not_ready(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "NOREPLICAS" | "READONLY" | "UNBLOCKED")
    )
}

/// Whether a not-ready reply calls for a new connection (the server changed roles).
fn needs_reconnect(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("READONLY" | "UNBLOCKED"))
}

/// Whether waiting and trying again may succeed: the connection broke, or the server is
/// not ready.
pub(crate) fn is_transient(e: &redis::RedisError) -> bool {
    is_connection_error(e) || is_not_ready(e)
}

/// A redis error as a broker error.
pub(crate) fn broker_error(context: &'static str, e: redis::RedisError) -> BrokerError {
    let kind = if is_transient(&e) { BrokerErrorKind::Connection } else { BrokerErrorKind::Protocol };
    BrokerError::with_source(kind, context, e)
}
