//! The broker's one AMQP connection, shared by its threads (each works on channels of its
//! own), and reconnection: with backoff, reported as events.
//!
//! amiquip does not reconnect. A thread whose channel failed tells the session
//! ([`Session::channel_failed`], naming the connection generation it had), which drops the
//! connection if it opens no channel any more, then asks [`Session::channel`] for a new
//! channel: on the current connection, or on a new one dialled with backoff until it
//! succeeds or the thread is told to stop. Threads that ask together share one reconnection.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use amiquip::{
    Auth, Channel, Connection, ConnectionBlockedNotification, ConnectionOptions, ConnectionTuning, Consumer,
    ConsumerMessage,
};
use crossbeam_channel::Receiver;
use dingo_core::broker::support::{OVERSIZE_KEPT, connect_retrying, io_reason};
use dingo_core::event::{Event, EventKind, EventSinks, Level, Origin};
use dingo_core::{BrokerError, BrokerErrorKind};

use crate::options::AmqpOptions;
use crate::tls::Connector;
use dingo_core::broker::kit::lock;

/// Where and how to connect, parsed from an `amqp://user:pass@host:port/vhost` URL.
#[derive(Clone)]
pub(crate) struct Address {
    host: String,
    port: u16,
    user: String,
    password: String,
    vhost: String,
    tls: bool,
    /// For `amqps://`: made by [`with_tls`](Address::with_tls), once.
    connector: Option<Connector>,
}

impl std::fmt::Debug for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password; the virtual host as a URL has it (`/` is `%2f`).
        const VHOST: &percent_encoding::AsciiSet =
            &percent_encoding::CONTROLS.add(b'/').add(b'%').add(b'?').add(b'#').add(b' ').add(b'@');
        let scheme = if self.tls { "amqps" } else { "amqp" };
        let vhost = percent_encoding::utf8_percent_encode(&self.vhost, VHOST);
        write!(f, "{scheme}://{}@{}:{}/{vhost}", self.user, self.host, self.port)
    }
}

impl Address {
    /// Parses the URL (without dingo's query options). Missing parts take RabbitMQ's URI
    /// defaults: guest/guest, localhost, 5672 (5671 for `amqps`), vhost `/`.
    pub(crate) fn parse(url: &str) -> Result<Address, BrokerError> {
        let config = |message: String| BrokerError::new(BrokerErrorKind::Config, message);
        let parsed = url::Url::parse(url).map_err(|e| config(format!("invalid AMQP URL: {e}")))?;
        let tls = match parsed.scheme() {
            "amqp" => false,
            "amqps" => true,
            other => return Err(config(format!("`{other}://` is not an AMQP URL (amqp:// or amqps://)"))),
        };
        if tls && !cfg!(feature = "tls") {
            return Err(config("amqps:// needs the `tls` feature of dingo-amqp".to_owned()));
        }
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        let host = match parsed.host_str() {
            Some("") | None => "localhost".to_owned(),
            Some(host) => host.trim_start_matches('[').trim_end_matches(']').to_owned(),
        };
        let user = if parsed.username().is_empty() { "guest".to_owned() } else { decode(parsed.username()) };
        let password = parsed.password().map_or_else(|| "guest".to_owned(), decode);
        let path = parsed.path().strip_prefix('/').unwrap_or(parsed.path());
        if path.contains('/') {
            return Err(config(format!("the AMQP URL's path must be one virtual host, not `{path}`")));
        }
        let vhost = if path.is_empty() { "/".to_owned() } else { decode(path) };
        let port = parsed.port().unwrap_or(if tls { 5671 } else { 5672 });
        Ok(Address { host, port, user, password, vhost, tls, connector: None })
    }

    /// Builds the TLS connector of an `amqps://` address from the options' files (see
    /// [`Connector::new`]); TLS files for an `amqp://` address are an error.
    pub(crate) fn with_tls(mut self, options: &AmqpOptions) -> Result<Address, BrokerError> {
        match self.tls {
            true => self.connector = Some(Connector::new(options)?),
            false if crate::tls::any_file(options) => {
                return Err(BrokerError::new(
                    BrokerErrorKind::Config,
                    format!("{self:?}: TLS files (`cacertfile`, `certfile`, `keyfile`) need an `amqps://` URL"),
                ));
            }
            false => {}
        }
        Ok(self)
    }

    /// Opens a connection: TCP with `TCP_NODELAY` (without it a request-reply round trip
    /// takes ~44 ms of Nagle and delayed ACKs instead of ~0.3 ms), then the AMQP handshake.
    ///
    /// A server that is not there (yet) fails with [`BrokerErrorKind::Connection`] and a
    /// short reason (`connection refused`); one that refuses the credentials or the virtual
    /// host with [`BrokerErrorKind::Config`] and a message saying what to check.
    fn open(&self, options: &AmqpOptions) -> Result<Connection, BrokerError> {
        let unreachable = |e: std::io::Error| {
            let reason = io_reason(e.kind()).map_or_else(|| e.to_string(), str::to_owned);
            BrokerError::with_source(BrokerErrorKind::Connection, reason, e)
        };
        let addresses: Vec<SocketAddr> =
            (self.host.as_str(), self.port).to_socket_addrs().map_err(unreachable)?.collect();
        let mut last = std::io::Error::other("the host name resolved to no address");
        let mut stream = None;
        for address in addresses {
            match TcpStream::connect_timeout(&address, options.connect_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or(last).map_err(unreachable)?;
        stream.set_nodelay(true).map_err(unreachable)?;
        let stream = mio::net::TcpStream::from_stream(stream).map_err(unreachable)?;
        let heartbeat = u16::try_from(options.heartbeat.as_secs()).unwrap_or(u16::MAX);
        let connection_options = ConnectionOptions::default()
            .auth(Auth::Plain { username: self.user.clone(), password: self.password.clone() })
            .virtual_host(self.vhost.clone())
            .heartbeat(heartbeat)
            .connection_timeout(Some(options.connect_timeout))
            // Tells operators (and `rabbitmqctl list_connections client_properties`) whose
            // connection this is.
            .information(Some(format!("dingo, namespace {}", options.namespace)));
        // A message body over the size limit is kept to its first bytes as it arrives: it is
        // not decoded anyway (see `AmqpOptions::max_message_size`).
        let tuning = ConnectionTuning::default().truncate_bodies_over(options.max_message_size, OVERSIZE_KEPT);
        let opened = if self.tls {
            self.open_tls(stream, connection_options, tuning)
        } else {
            Connection::insecure_open_stream(stream, connection_options, tuning)
        };
        opened.map_err(|e| self.handshake_error(e))
    }

    fn handshake_error(&self, error: amiquip::Error) -> BrokerError {
        use amiquip::Error::*;
        // A refused certificate, on either side (the server's refusal of the client's comes
        // after the handshake in TLS 1.3, as a read error): waiting will not change it.
        if self.tls {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                text = format!("{text}: {cause}");
                source = cause.source();
            }
            if let Some(message) = dingo_core::broker::tls::refusal(&format!("RabbitMQ at {self:?}"), &text) {
                return BrokerError::with_source(BrokerErrorKind::Config, message, error);
            }
        }
        let (kind, message) = match &error {
            InvalidCredentials => (
                BrokerErrorKind::Config,
                format!("RabbitMQ at {self:?} refused the credentials: check the user and password in the URL"),
            ),
            // ACCESS_REFUSED, NOT_ALLOWED: the virtual host is missing or not the user's.
            ServerClosedConnection { code: 403 | 530, .. } => (
                BrokerErrorKind::Config,
                format!(
                    "RabbitMQ at {self:?} refused access to virtual host `{}`: check that it exists and that user `{}` may use it",
                    self.vhost, self.user
                ),
            ),
            UnsupportedAuthMechanism { .. }
            | TlsFeatureNotEnabled
            | UnsupportedLocale { .. }
            | FrameMaxTooSmall { .. } => {
                (BrokerErrorKind::Config, format!("RabbitMQ at {self:?} refused the connection's settings"))
            }
            UnexpectedSocketClose => {
                (BrokerErrorKind::Connection, "the connection was closed during the AMQP handshake".to_owned())
            }
            ConnectionTimeout => (BrokerErrorKind::Connection, "the AMQP handshake timed out".to_owned()),
            IoErrorReadingSocket { source } | IoErrorWritingSocket { source } => {
                (BrokerErrorKind::Connection, io_reason(source.kind()).map_or_else(|| error.to_string(), str::to_owned))
            }
            _ => (BrokerErrorKind::Connection, error.to_string()),
        };
        BrokerError::with_source(kind, message, error)
    }

    #[cfg(feature = "tls")]
    fn open_tls(
        &self,
        stream: mio::net::TcpStream,
        options: ConnectionOptions<Auth>,
        tuning: ConnectionTuning,
    ) -> Result<Connection, amiquip::Error> {
        let connector = match &self.connector {
            Some(connector) => connector.inner.clone(),
            None => native_tls::TlsConnector::new()
                .map_err(|e| amiquip::Error::IoErrorWritingSocket { source: std::io::Error::other(e) })?,
        };
        Connection::open_tls_stream(connector, &self.host, stream, options, tuning)
    }

    #[cfg(not(feature = "tls"))]
    fn open_tls(
        &self,
        _: mio::net::TcpStream,
        _: ConnectionOptions<Auth>,
        _: ConnectionTuning,
    ) -> Result<Connection, amiquip::Error> {
        Err(amiquip::Error::TlsFeatureNotEnabled)
    }
}

/// A broker error from an amiquip error; connection-level failures are `Unavailable`
/// (transient), the server refusing something is `Protocol`.
pub(crate) fn amqp_error(what: &str, error: amiquip::Error) -> BrokerError {
    let kind = match &error {
        amiquip::Error::InvalidCredentials
        | amiquip::Error::UnsupportedAuthMechanism { .. }
        | amiquip::Error::TlsFeatureNotEnabled => BrokerErrorKind::Config,
        amiquip::Error::ServerClosedChannel { .. } => BrokerErrorKind::Protocol,
        _ => BrokerErrorKind::Connection,
    };
    match &error {
        // RabbitMQ refuses to declare a queue again with other arguments.
        amiquip::Error::ServerClosedChannel { code: 406, message, .. } if message.contains("arg 'x-max-length") => {
            let message = format!(
                "{what}: a dead-letter queue exists with other bounds than max_dead_letters and max_dead_letter_bytes \
                 (declared by an older dingo, without bounds, or with other options); see \
                 AmqpOptions::max_dead_letters for the way out"
            );
            BrokerError::with_source(BrokerErrorKind::Config, message, error)
        }
        _ => BrokerError::with_source(kind, what.to_owned(), error),
    }
}

/// The shared connection and its generation (how many connections were made).
pub(crate) struct Session {
    address: Address,
    options: AmqpOptions,
    events: EventSinks,
    state: Mutex<State>,
    closed: AtomicBool,
}

struct State {
    connection: Option<Connection>,
    generation: u64,
    lost_since: Option<Instant>,
    /// RabbitMQ's `connection.blocked` / `unblocked` notifications for the current
    /// connection (resource alarms: publishing waits while blocked).
    blocked: Receiver<ConnectionBlockedNotification>,
}

/// A channel and the generation of the connection it was opened on.
pub(crate) struct Opened {
    pub(crate) channel: Channel,
    pub(crate) generation: u64,
}

impl Session {
    /// Connects now, trying again for [`connect_retry`](AmqpOptions::connect_retry) while
    /// the server cannot be reached; bad credentials fail at once.
    pub(crate) fn connect(address: Address, options: AmqpOptions, events: EventSinks) -> Result<Session, BrokerError> {
        let server = format!("RabbitMQ at {address:?}");
        let mut connection =
            connect_retrying(&server, options.connect_retry, options.reconnect_backoff, || address.open(&options))?;
        let blocked = blocked_notifications(&mut connection);
        Ok(Session {
            address,
            options,
            events,
            state: Mutex::new(State { connection: Some(connection), generation: 1, lost_since: None, blocked }),
            closed: AtomicBool::new(false),
        })
    }

    /// Another session to the same server: a connection of its own, made now.
    pub(crate) fn sibling(&self) -> Result<Session, BrokerError> {
        Session::connect(self.address.clone(), self.options.clone(), self.events.clone())
    }

    /// A new channel, reconnecting with backoff while the connection is down; `None` once
    /// `stop` is set or the session is closed.
    pub(crate) fn channel(&self, what: &str, stop: &AtomicBool) -> Option<Opened> {
        self.channel_until(what, stop, None)
    }

    /// [`channel`](Session::channel), giving up at `deadline` too.
    pub(crate) fn channel_until(&self, what: &str, stop: &AtomicBool, deadline: Option<Instant>) -> Option<Opened> {
        let mut pause = self.options.reconnect_backoff.0;
        loop {
            let late = deadline.is_some_and(|d| Instant::now() >= d);
            if stop.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire) || late {
                return None;
            }
            let mut state = self.lock();
            if let Some(connection) = state.connection.as_mut() {
                match connection.open_channel(None) {
                    Ok(channel) => return Some(Opened { channel, generation: state.generation }),
                    Err(e) => {
                        // The connection opens no channel: it is gone.
                        self.lost(&mut state, what, &e.to_string());
                    }
                }
            }
            match self.address.open(&self.options) {
                Ok(mut connection) => {
                    state.blocked = blocked_notifications(&mut connection);
                    state.connection = Some(connection);
                    state.generation += 1;
                    if let Some(since) = state.lost_since.take() {
                        self.events.emit(Event::new(
                            Origin::Consumer,
                            Level::Info,
                            EventKind::ConnectionRestored,
                            format!("RabbitMQ connection restored after {:.1?}", since.elapsed()),
                        ));
                    }
                    continue;
                }
                Err(e) => {
                    if state.lost_since.is_none() {
                        state.lost_since = Some(Instant::now());
                        self.events.emit(Event::new(
                            Origin::Consumer,
                            Level::Warning,
                            EventKind::ConnectionLost,
                            format!(
                                "RabbitMQ at {:?} unreachable ({}); retrying",
                                self.address,
                                dingo_core::error::chain(&e)
                            ),
                        ));
                    }
                }
            }
            drop(state);
            sleep_unless(stop, pause);
            pause = (pause * 2).min(self.options.reconnect_backoff.1);
        }
    }

    /// A thread's channel failed on connection `generation`: if that is still the current
    /// connection and it is dead, drop it now (the next [`channel`](Session::channel)
    /// reconnects), so every thread learns of the loss at once.
    pub(crate) fn channel_failed(&self, generation: u64, what: &str, error: &str) {
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        // Probe: a connection that still opens a channel is alive (only a channel failed).
        let alive = state.connection.as_mut().is_some_and(|c| c.open_channel(None).map(Channel::close).is_ok());
        if !alive {
            self.lost(&mut state, what, error);
        }
    }

    fn lost(&self, state: &mut MutexGuard<'_, State>, what: &str, error: &str) {
        if let Some(connection) = state.connection.take() {
            // Closing a dead connection returns at once; a hung one is cut by its heartbeat.
            drop(connection);
            state.lost_since = Some(Instant::now());
            self.events.emit(Event::new(
                Origin::Consumer,
                Level::Warning,
                EventKind::ConnectionLost,
                format!("RabbitMQ connection lost ({what}: {error}); reconnecting"),
            ));
        }
    }

    /// The `connection.blocked` notifications of the current connection.
    pub(crate) fn blocked(&self) -> Receiver<ConnectionBlockedNotification> {
        self.lock().blocked.clone()
    }

    /// Whether [`close`](Session::close) was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Closes the connection (threads still holding channels see them fail).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let connection = self.lock().connection.take();
        if let Some(connection) = connection {
            let _ = connection.close();
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent if a holder panicked (single assignments).
        lock(&self.state)
    }
}

/// Where RabbitMQ's resource-alarm notifications for `connection` arrive (none if amiquip
/// cannot listen: the connection is then already failing).
fn blocked_notifications(connection: &mut Connection) -> Receiver<ConnectionBlockedNotification> {
    connection.listen_for_connection_blocked().unwrap_or_else(|_| crossbeam_channel::never())
}

/// Cancels a consumer and waits (up to a second) until amiquip confirms it, handing
/// deliveries that were already on their way to `on_delivery`. Dropping a consumer as soon as
/// its cancellation returns is not safe in amiquip 0.4: its I/O thread then tries to tell the
/// dropped receiver that the consumer is cancelled, fails, and kills the whole connection.
pub(crate) fn cancelled(consumer: &Consumer<'_>, mut on_delivery: impl FnMut(amiquip::Delivery)) {
    if consumer.cancel().is_err() {
        return;
    }
    let until = Instant::now() + Duration::from_secs(1);
    while let Ok(message) = consumer.receiver().recv_deadline(until) {
        match message {
            ConsumerMessage::Delivery(delivery) => on_delivery(delivery),
            _ => return,
        }
    }
}

/// Pauses between a thread's attempts to serve a channel: a channel that breaks soon after
/// it opened (a declaration the server refuses, a message it rejects) must not make the
/// thread open channels in a tight loop.
pub(crate) struct Backoff {
    first: Duration,
    longest: Duration,
    next: Duration,
}

impl Backoff {
    /// How long a channel must have served for its loss to count as a fresh start.
    const HEALTHY: Duration = Duration::from_secs(5);

    pub(crate) fn new(options: &AmqpOptions) -> Backoff {
        let (first, longest) = options.reconnect_backoff;
        Backoff { first, longest, next: first }
    }

    /// A channel that served since `opened` broke: pauses (unless it served long enough to
    /// count as healthy), doubling the pause each time in a row, until `stop`.
    pub(crate) fn broke(&mut self, opened: Instant, stop: &AtomicBool) {
        if opened.elapsed() >= Self::HEALTHY {
            self.next = self.first;
            return;
        }
        sleep_unless(stop, self.next);
        self.next = (self.next * 2).min(self.longest);
    }
}

/// Sleeps for `pause`, waking early (in steps of 10 ms) when `stop` is set.
pub(crate) fn sleep_unless(stop: &AtomicBool, pause: Duration) {
    let until = Instant::now() + pause;
    while !stop.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(10)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_rabbitmq_defaults() {
        let a = Address::parse("amqp://u%40x:p%2Fw@rabbit.local:5673/prod").expect("valid");
        assert_eq!((a.user.as_str(), a.password.as_str()), ("u@x", "p/w"));
        assert_eq!((a.host.as_str(), a.port, a.vhost.as_str()), ("rabbit.local", 5673, "prod"));
        let a = Address::parse("amqp://127.0.0.1").expect("valid");
        assert_eq!((a.user.as_str(), a.password.as_str(), a.port, a.vhost.as_str()), ("guest", "guest", 5672, "/"));
        let a = Address::parse("amqp://h/%2f").expect("valid");
        assert_eq!(a.vhost, "/");
    }

    #[test]
    fn bad_urls_are_config_errors() {
        for url in ["http://h", "amqp://h/a/b", "not a url"] {
            let error = Address::parse(url).expect_err(url);
            assert_eq!(error.kind(), BrokerErrorKind::Config, "{url}");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let a = Address::parse("amqp://user:secret@h:5672/v").expect("valid");
        assert_eq!(format!("{a:?}"), "amqp://user@h:5672/v");
        let a = Address::parse("amqp://guest:guest@127.0.0.1:5672/%2f").expect("valid");
        assert_eq!(format!("{a:?}"), "amqp://guest@127.0.0.1:5672/%2F");
    }
}
