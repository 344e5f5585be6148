//! [`AmqpOptions`]: every knob of the RabbitMQ broker, with the defaults documented.

use std::path::PathBuf;
use std::time::Duration;

use dingo_core::broker::tls::{CA_FILE_KEY, CERT_FILE_KEY, KEY_FILE_KEY, path_from_query};

/// Settings of an [`AmqpBroker`](crate::AmqpBroker).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "builder methods return the changed value; they do not change it in place"]
pub struct AmqpOptions {
    /// Prefix of every queue and exchange name, so several apps can share one virtual host.
    /// Default `dingo`.
    pub namespace: String,
    /// Durable queues and persistent task messages (they survive a broker restart).
    /// Transient ones are faster and lost with the broker. Default `true`.
    pub durable: bool,
    /// Persistent reports in durable reply queues, so results survive a restart of RabbitMQ.
    /// Off by default, as Celery's `result_persistent`: reports are read by a caller that is
    /// alive, and persisting them costs RabbitMQ a disk write per call. Default `false`.
    pub persistent_reports: bool,
    /// Quorum queues (`x-queue-type=quorum`, replicated; for clusters). Implies durable.
    /// Default `false` (classic queues).
    pub quorum: bool,
    /// How many unacknowledged tasks RabbitMQ hands each subscription ahead of its workers
    /// (per-consumer QoS; at least the app's own prefetch). Default 128: short tasks need a
    /// deep prefetch, as a task is acknowledged only once its report is confirmed. Tasks
    /// prefetched behind threads that are all busy with long tasks do not wait for them: see
    /// [`hand_back_after`](AmqpOptions::hand_back_after).
    pub prefetch: u16,
    /// How long prefetched tasks may wait while every worker thread of their pool is busy
    /// (none took a task meanwhile) before the pool hands them back to their queues, for
    /// the other consumers of those queues, and stops consuming until one of its threads is
    /// free. Without it, one long task holds up to [`prefetch`](AmqpOptions::prefetch) short
    /// ones behind it while other worker processes sit idle (Celery's `-Ofair` problem). A
    /// task handed back goes to the back of its queue (published again, confirmed, then
    /// acknowledged; it does not count as a redelivery); with no other consumer nothing is
    /// handed back. The price: pools whose every thread runs tasks longer than this, beside
    /// other workers, hand back their prefetch at each such task; for those tasks set
    /// `prefetch` to the thread count, and nothing waits behind them. While threads are free
    /// it costs nothing. `None` turns it off. Default 200 ms.
    pub hand_back_after: Option<Duration>,
    /// How many times a task may be redelivered after the worker that took it stopped before
    /// finishing it (its process died or was killed, its connection broke) before it goes
    /// to the dead letters instead of running again, its caller told (`WorkerLost`): a task
    /// that crashes its worker must not take down every worker in turn. Tasks given back
    /// unstarted by a stopping or busy pool do not count. Default 5, as on Redis.
    pub max_redeliveries: u32,
    /// How many published messages may wait for their confirms (publisher confirms are
    /// asynchronous and batched); past it, `send` blocks (back-pressure while RabbitMQ is
    /// slow or away), at most the call's enqueue timeout. Default 4,096.
    pub max_unconfirmed: usize,
    /// AMQP heartbeat: a connection silent for about twice this long is considered dead.
    /// Default 10 s.
    pub heartbeat: Duration,
    /// Timeout for connecting (TCP and the AMQP handshake). Default 5 s.
    pub connect_timeout: Duration,
    /// Largest encoded message accepted, checked when sending and when receiving (before
    /// decoding). A larger task fails its call (`TooLarge`); a larger result reaches its
    /// caller as an `Encode` failure instead; a larger progress report is dropped, with an
    /// event. A task message that arrives over it anyway (published by another client) is
    /// not decoded: a copy of its first 4 KiB
    /// ([`OVERSIZE_KEPT`](dingo_core::broker::support::OVERSIZE_KEPT)) goes to the dead
    /// letters, its reason giving its length, the original is acknowledged, and its caller,
    /// if those 4 KiB name it, gets a `BadPayload` failure. A report that arrives over it is
    /// dropped with a `TooLarge` event; a final one whose call its first bytes name fails
    /// that call (`Encode`).
    ///
    /// amiquip, as published, reads a whole message into memory before handing it over (it
    /// allocates the announced length at once) and has no option to refuse a large one (the
    /// frame size, `frame_max`, only splits it); the vendored copy dingo uses keeps only the
    /// first 4 KiB of a body over this limit as its frames arrive, reading the rest from
    /// the socket and dropping it (`vendor/amiquip/DINGO.md`), so an oversize message costs
    /// a worker or a caller 4 KiB and a frame, not its size. The same holds for
    /// [`Admin::dead_letters`](dingo_core::broker::Admin::dead_letters): a dead letter over
    /// the limit is listed with its first 4 KiB. RabbitMQ's own bound is the
    /// node's `max_message_size` in `rabbitmq.conf` (per node, not per queue or virtual
    /// host; 128 MiB by default since RabbitMQ 3.8, never above 512 MiB): set it near this value on a node that
    /// serves dingo alone, and publishers are refused larger messages at the server.
    /// Default 16 MiB.
    pub max_message_size: usize,
    /// How many messages a task's dead-letter queue keeps (its `x-max-length`). Past it,
    /// RabbitMQ drops the oldest (its default overflow, `drop-head`), silently: dingo does
    /// not see those drops, so they are not counted (RabbitMQ's management statistics show
    /// the queue's length). 0 leaves the argument out (no bound by count). Default 10,000,
    /// as on Redis.
    ///
    /// The bounds are arguments of the queue's declaration, and RabbitMQ refuses a
    /// declaration whose arguments differ from the queue's (`PRECONDITION_FAILED -
    /// inequivalent arg 'x-max-length'`, which closes the channel). A dead-letter queue
    /// declared by an older dingo (without bounds) or with other bounds therefore makes
    /// declaring its task fail until one of these is done: delete the dead-letter queue
    /// (`NS.dead.TASK`; its messages go with it, so move them first, e.g. with a shovel), or
    /// set both bounds to what it was declared with (0 and 0 for an older dingo's) and bound
    /// it with a RabbitMQ policy instead (`rabbitmqctl set_policy dingo-dead '^NS\.dead\.'
    /// '{"max-length":10000,"max-length-bytes":67108864}' --apply-to queues`), which applies
    /// to existing queues without declaring them again.
    pub max_dead_letters: u32,
    /// How many bytes of message bodies a task's dead-letter queue keeps (its
    /// `x-max-length-bytes`); past it, the oldest are dropped as past
    /// [`max_dead_letters`](AmqpOptions::max_dead_letters). 0 leaves the argument out.
    /// Default 64 MiB, as on Redis.
    pub max_dead_letter_bytes: u64,
    /// How long the namespace's cancel stream (`NS.cancels`) keeps a cancel (its
    /// `x-max-age`): a worker that starts later still honours every cancel this young. A
    /// cancel lasts until its own `until` (the app's
    /// [`cancel_ttl`](dingo_core::AppBuilder::cancel_ttl), a day by default); one lasting
    /// longer than this is honoured by workers that started before it was dropped from the
    /// stream, not by later ones. RabbitMQ drops whole segments of 1 MiB, so a cancel may
    /// stay longer. Like the dead-letter bounds it is part of the stream's declaration: a
    /// stream declared with another value must be deleted (or the value set back) before
    /// workers consume. Default 7 days.
    pub cancel_retention: Duration,
    /// How long reports wait in a caller's reply queue, and how long an unused reply queue
    /// lives (its process gone). Default 1 day.
    pub result_ttl: Duration,
    /// How many reports nobody waits for (early, of dropped handles, forged) a caller keeps
    /// at most, the oldest dropped first, with a warning event
    /// ([`UnclaimedLimit`](dingo_core::broker::router::UnclaimedLimit)). Default 100,000.
    pub max_unclaimed: usize,
    /// How many bytes of such reports a caller keeps at most. Default 64 MiB.
    pub max_unclaimed_bytes: usize,
    /// First and longest pause between reconnection attempts (doubling in between), at
    /// start-up too. Default 10 ms and 2 s.
    pub reconnect_backoff: (Duration, Duration),
    /// How long [`connect`](crate::AmqpBroker::connect) keeps trying while the server
    /// cannot be reached (refused, timed out, closed during the handshake), so a process
    /// started with its server waits for it; bad credentials, a virtual host the user may
    /// not use or a bad URL fail at once. Zero tries once; [`Duration::MAX`] never gives up.
    /// The wait is logged through `tracing` (target `dingo`). Default 30 s
    /// ([`CONNECT_RETRY`](dingo_core::broker::support::CONNECT_RETRY) says why).
    pub connect_retry: Duration,
    /// How long a stopping subscription waits for the acknowledgements of tasks its workers
    /// finished (their reports still on their way) before it closes its channel; whatever is
    /// unacknowledged then goes back to the queue. Default 5 s.
    pub settle_grace: Duration,
    /// How long a caller waits hot (polls) for a result, when that call is the only one of
    /// the process in flight as the wait begins, before it sleeps (saves a thread wake-up).
    /// Zero turns it off, the default: a RabbitMQ round trip takes hundreds of microseconds,
    /// and a polling core is one RabbitMQ cannot use when they share a machine (on 2 cores,
    /// 300 µs of polling made the sequential p50 0.50 ms instead of 0.36 ms).
    pub wait_spin: Duration,
    /// PEM file of the certificate authorities an `amqps://` server's certificate must chain
    /// to, instead of the system's trust store (which it replaces, it does not add to):
    /// for servers whose certificates a private CA signed. URL key `cacertfile` (as in
    /// RabbitMQ's URI spec). Default none (the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of the client certificate presented to an `amqps://` server that asks for
    /// one (mutual TLS: RabbitMQ's `ssl_options.verify = verify_peer` with
    /// `fail_if_no_peer_cert = true`), with the chain up to its CA after it if there is one;
    /// given with [`tls_key_file`](AmqpOptions::tls_key_file). URL key `certfile`. Default
    /// none.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key, unencrypted PKCS#8 (`-----BEGIN
    /// PRIVATE KEY-----`; `openssl pkcs8 -topk8 -nocrypt` converts other forms). URL key
    /// `keyfile`. Default none.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for AmqpOptions {
    fn default() -> AmqpOptions {
        AmqpOptions {
            namespace: "dingo".to_owned(),
            durable: true,
            persistent_reports: false,
            quorum: false,
            prefetch: 128,
            hand_back_after: Some(Duration::from_millis(200)),
            max_redeliveries: 5,
            max_unconfirmed: 4096,
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_message_size: 16 << 20,
            max_dead_letters: 10_000,
            max_dead_letter_bytes: 64 << 20,
            result_ttl: Duration::from_secs(24 * 3600),
            max_unclaimed: dingo_core::broker::router::UnclaimedLimit::default().reports,
            max_unclaimed_bytes: dingo_core::broker::router::UnclaimedLimit::default().bytes,
            cancel_retention: Duration::from_secs(7 * 24 * 60 * 60),
            reconnect_backoff: (Duration::from_millis(10), Duration::from_secs(2)),
            connect_retry: dingo_core::broker::support::CONNECT_RETRY,
            settle_grace: Duration::from_secs(5),
            wait_spin: Duration::ZERO,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// The query keys an AMQP URL may hold.
const URL_KEYS: [&str; 21] = [
    "namespace",
    "durable",
    "quorum",
    "persistent_reports",
    "prefetch",
    "hand_back_after_ms",
    "max_redeliveries",
    "max_unconfirmed",
    "heartbeat",
    "connection_timeout",
    "result_ttl_s",
    "wait_spin_us",
    "connect_retry_s",
    "max_unclaimed",
    "max_unclaimed_bytes",
    CA_FILE_KEY,
    CERT_FILE_KEY,
    KEY_FILE_KEY,
    "max_message_size",
    "max_dead_letters",
    "max_dead_letter_bytes",
];

impl AmqpOptions {
    /// The defaults.
    pub fn new() -> AmqpOptions {
        AmqpOptions::default()
    }

    /// Sets [`namespace`](AmqpOptions::namespace).
    pub fn namespace(mut self, namespace: impl Into<String>) -> AmqpOptions {
        self.namespace = namespace.into();
        self
    }

    /// Sets [`durable`](AmqpOptions::durable).
    pub fn durable(mut self, durable: bool) -> AmqpOptions {
        self.durable = durable;
        self
    }

    /// Sets [`persistent_reports`](AmqpOptions::persistent_reports).
    pub fn persistent_reports(mut self, persistent: bool) -> AmqpOptions {
        self.persistent_reports = persistent;
        self
    }

    /// Sets [`quorum`](AmqpOptions::quorum) (quorum queues are always durable).
    pub fn quorum(mut self, quorum: bool) -> AmqpOptions {
        self.quorum = quorum;
        if quorum {
            self.durable = true;
        }
        self
    }

    /// Sets [`prefetch`](AmqpOptions::prefetch).
    pub fn prefetch(mut self, tasks: u16) -> AmqpOptions {
        self.prefetch = tasks.max(1);
        self
    }

    /// Sets [`hand_back_after`](AmqpOptions::hand_back_after) (`None`: prefetched tasks wait
    /// for their pool's threads, however long).
    pub fn hand_back_after(mut self, wait: Option<Duration>) -> AmqpOptions {
        self.hand_back_after = wait;
        self
    }

    /// Sets [`max_redeliveries`](AmqpOptions::max_redeliveries).
    pub fn max_redeliveries(mut self, count: u32) -> AmqpOptions {
        self.max_redeliveries = count;
        self
    }

    /// Sets [`max_unconfirmed`](AmqpOptions::max_unconfirmed).
    pub fn max_unconfirmed(mut self, messages: usize) -> AmqpOptions {
        self.max_unconfirmed = messages.max(1);
        self
    }

    /// Sets [`heartbeat`](AmqpOptions::heartbeat) (whole seconds, at least 1).
    pub fn heartbeat(mut self, interval: Duration) -> AmqpOptions {
        self.heartbeat = interval.max(Duration::from_secs(1));
        self
    }

    /// Sets [`connect_timeout`](AmqpOptions::connect_timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> AmqpOptions {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets [`max_message_size`](AmqpOptions::max_message_size).
    pub fn max_message_size(mut self, bytes: usize) -> AmqpOptions {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`max_dead_letters`](AmqpOptions::max_dead_letters) (0: no bound by count).
    pub fn max_dead_letters(mut self, count: u32) -> AmqpOptions {
        self.max_dead_letters = count;
        self
    }

    /// Sets [`max_dead_letter_bytes`](AmqpOptions::max_dead_letter_bytes) (0: no bound by
    /// bytes).
    pub fn max_dead_letter_bytes(mut self, bytes: u64) -> AmqpOptions {
        self.max_dead_letter_bytes = bytes;
        self
    }

    /// Sets [`cancel_retention`](AmqpOptions::cancel_retention) (whole seconds, at least
    /// 1 s).
    pub fn cancel_retention(mut self, retention: Duration) -> AmqpOptions {
        self.cancel_retention = retention.max(Duration::from_secs(1));
        self
    }

    /// Sets [`result_ttl`](AmqpOptions::result_ttl) (whole milliseconds, at least 1 s:
    /// RabbitMQ's queue expiry).
    pub fn result_ttl(mut self, ttl: Duration) -> AmqpOptions {
        self.result_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// Sets [`reconnect_backoff`](AmqpOptions::reconnect_backoff).
    pub fn reconnect_backoff(mut self, first: Duration, longest: Duration) -> AmqpOptions {
        self.reconnect_backoff = (first, longest.max(first));
        self
    }

    /// Sets [`connect_retry`](AmqpOptions::connect_retry).
    pub fn connect_retry(mut self, patience: Duration) -> AmqpOptions {
        self.connect_retry = patience;
        self
    }

    /// Sets [`max_unclaimed`](AmqpOptions::max_unclaimed).
    pub fn max_unclaimed(mut self, reports: usize) -> AmqpOptions {
        self.max_unclaimed = reports;
        self
    }

    /// Sets [`max_unclaimed_bytes`](AmqpOptions::max_unclaimed_bytes).
    pub fn max_unclaimed_bytes(mut self, bytes: usize) -> AmqpOptions {
        self.max_unclaimed_bytes = bytes;
        self
    }

    /// Sets [`settle_grace`](AmqpOptions::settle_grace).
    pub fn settle_grace(mut self, grace: Duration) -> AmqpOptions {
        self.settle_grace = grace;
        self
    }

    /// Sets [`wait_spin`](AmqpOptions::wait_spin).
    pub fn wait_spin(mut self, spin: Duration) -> AmqpOptions {
        self.wait_spin = spin;
        self
    }

    /// Sets [`tls_ca_file`](AmqpOptions::tls_ca_file): the certificate authorities (PEM)
    /// trusted instead of the system's.
    ///
    /// ```
    /// use dingo_amqp::AmqpOptions;
    ///
    /// let options = AmqpOptions::new()
    ///     .tls_ca_file("/etc/dingo/ca.pem")
    ///     .tls_client_cert("/etc/dingo/client.pem", "/etc/dingo/client.key");
    /// assert_eq!(options.tls_key_file.as_deref(), Some("/etc/dingo/client.key".as_ref()));
    /// ```
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> AmqpOptions {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Sets [`tls_cert_file`](AmqpOptions::tls_cert_file) and
    /// [`tls_key_file`](AmqpOptions::tls_key_file): the client certificate and its key
    /// (PEM), for servers that authenticate clients by certificate (mutual TLS).
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> AmqpOptions {
        self.tls_cert_file = Some(cert.into());
        self.tls_key_file = Some(key.into());
        self
    }

    /// Splits dingo's settings off a URL's query string: `namespace`, `durable`, `quorum`,
    /// `persistent_reports`, `prefetch`, `hand_back_after_ms` (0 turns it off),
    /// `max_redeliveries`, `max_unconfirmed`, `heartbeat` (seconds, as RabbitMQ's URI spec
    /// has it), `connection_timeout` (milliseconds, likewise), `result_ttl_s`, `wait_spin_us`,
    /// `connect_retry_s`, `max_unclaimed`, `max_unclaimed_bytes`, `max_message_size`,
    /// `max_dead_letters`, `max_dead_letter_bytes` (bytes), and the TLS files `cacertfile`,
    /// `certfile`, `keyfile` (paths, percent-encoded where needed; RabbitMQ's names). Any
    /// other key is an error (a misspelt option should not pass unnoticed). Returns the URL
    /// without its query, and the options.
    pub(crate) fn apply_url(mut self, url: &str) -> Result<(String, AmqpOptions), String> {
        let Some((address, query)) = url.split_once('?') else { return Ok((url.to_owned(), self)) };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || value.parse::<u64>().map_err(|_| format!("`{key}` wants a whole number, not `{value}`"));
            let flag = || match value {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(format!("`{key}` wants true or false, not `{value}`")),
            };
            match key {
                "namespace" if !value.is_empty() => self = self.namespace(value),
                "namespace" => return Err("`namespace` must not be empty".to_owned()),
                "durable" => self = self.durable(flag()?),
                "quorum" => self = self.quorum(flag()?),
                "persistent_reports" => self = self.persistent_reports(flag()?),
                "prefetch" => self = self.prefetch(u16::try_from(number()?).unwrap_or(u16::MAX)),
                "hand_back_after_ms" => {
                    let ms = number()?;
                    self = self.hand_back_after((ms > 0).then(|| Duration::from_millis(ms)));
                }
                "max_redeliveries" => self = self.max_redeliveries(u32::try_from(number()?).unwrap_or(u32::MAX)),
                "max_unconfirmed" => self = self.max_unconfirmed(usize::try_from(number()?).unwrap_or(usize::MAX)),
                "heartbeat" => self = self.heartbeat(Duration::from_secs(number()?)),
                "connection_timeout" => self = self.connect_timeout(Duration::from_millis(number()?)),
                "result_ttl_s" => self = self.result_ttl(Duration::from_secs(number()?)),
                "wait_spin_us" => self = self.wait_spin(Duration::from_micros(number()?)),
                "connect_retry_s" => self = self.connect_retry(Duration::from_secs(number()?)),
                "max_unclaimed" => self = self.max_unclaimed(usize::try_from(number()?).unwrap_or(usize::MAX)),
                "max_unclaimed_bytes" => {
                    self = self.max_unclaimed_bytes(usize::try_from(number()?).unwrap_or(usize::MAX))
                }
                CA_FILE_KEY => self.tls_ca_file = Some(path_from_query(key, value)?),
                CERT_FILE_KEY => self.tls_cert_file = Some(path_from_query(key, value)?),
                KEY_FILE_KEY => self.tls_key_file = Some(path_from_query(key, value)?),
                "max_message_size" => self = self.max_message_size(usize::try_from(number()?).unwrap_or(usize::MAX)),
                "max_dead_letters" => self = self.max_dead_letters(u32::try_from(number()?).unwrap_or(u32::MAX)),
                "max_dead_letter_bytes" => self = self.max_dead_letter_bytes(number()?),
                _ => return Err(format!("unknown option `{key}` (known: {})", URL_KEYS.join(", "))),
            }
        }
        if self.quorum && !self.durable {
            return Err("quorum queues are always durable: `quorum=true` with `durable=false`".to_owned());
        }
        Ok((address.to_owned(), self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_query_sets_options() {
        let (url, options) = AmqpOptions::new()
            .apply_url(
                "amqp://u:p@host:5673/vh?namespace=shop&prefetch=64&quorum=true&heartbeat=30&max_redeliveries=2\
                 &hand_back_after_ms=50",
            )
            .expect("valid");
        assert_eq!(url, "amqp://u:p@host:5673/vh");
        assert_eq!(options.namespace, "shop");
        assert_eq!(options.prefetch, 64);
        assert!(options.quorum && options.durable);
        assert_eq!(options.heartbeat, Duration::from_secs(30));
        assert_eq!(options.max_redeliveries, 2);
        assert_eq!(options.hand_back_after, Some(Duration::from_millis(50)));
        let (_, options) = AmqpOptions::new().apply_url("amqp://h/?hand_back_after_ms=0").expect("valid");
        assert_eq!(options.hand_back_after, None);
        assert_eq!(options.max_unconfirmed, AmqpOptions::default().max_unconfirmed);
    }

    #[test]
    fn url_query_sets_the_limits() {
        let defaults = AmqpOptions::new();
        assert_eq!(
            (defaults.max_message_size, defaults.max_dead_letters, defaults.max_dead_letter_bytes),
            (16 << 20, 10_000, 64 << 20)
        );
        let url = "amqp://h/%2f?max_message_size=1000&max_dead_letters=3&max_dead_letter_bytes=0";
        let (url, options) = AmqpOptions::new().apply_url(url).expect("valid");
        assert_eq!(url, "amqp://h/%2f");
        assert_eq!((options.max_message_size, options.max_dead_letters, options.max_dead_letter_bytes), (1000, 3, 0));
    }

    #[test]
    fn url_query_sets_the_start_up_retry() {
        assert_eq!(AmqpOptions::new().connect_retry, Duration::from_secs(30));
        let (url, options) = AmqpOptions::new().apply_url("amqp://h/%2f?connect_retry_s=5").expect("valid");
        assert_eq!((url.as_str(), options.connect_retry), ("amqp://h/%2f", Duration::from_secs(5)));
    }

    /// Every key the error lists is one the parser takes (the list is kept by hand).
    #[test]
    fn every_listed_url_key_is_taken() {
        for key in URL_KEYS {
            let value = match key {
                "namespace" => "shop",
                "durable" | "quorum" | "persistent_reports" => "true",
                _ => "1",
            };
            let url = format!("amqp://h/?{key}={value}");
            assert!(AmqpOptions::new().apply_url(&url).is_ok(), "{url}");
        }
    }

    #[test]
    fn url_query_sets_the_tls_files() {
        let (url, options) = AmqpOptions::new()
            .apply_url("amqps://h/vh?cacertfile=/etc/ca.pem&certfile=/etc/my%20client.pem&keyfile=k.pem&prefetch=3")
            .expect("valid");
        assert_eq!(url, "amqps://h/vh");
        assert_eq!(options.tls_ca_file.as_deref(), Some("/etc/ca.pem".as_ref()));
        assert_eq!(options.tls_cert_file.as_deref(), Some("/etc/my client.pem".as_ref()));
        assert_eq!(options.tls_key_file.as_deref(), Some("k.pem".as_ref()));
        assert_eq!(options.prefetch, 3);
        let error = AmqpOptions::new().apply_url("amqps://h/?keyfile=").expect_err("empty");
        assert_eq!(error, "`keyfile` wants a file path");
        assert_eq!(AmqpOptions::default().tls_ca_file, None);
    }

    #[test]
    fn url_without_query_is_untouched() {
        let (url, options) = AmqpOptions::new().apply_url("amqp://127.0.0.1:5672/%2f").expect("valid");
        assert_eq!((url.as_str(), options), ("amqp://127.0.0.1:5672/%2f", AmqpOptions::default()));
    }

    #[test]
    fn url_query_errors_name_the_key() {
        let error = AmqpOptions::new().apply_url("amqp://h/?prefetch=many").expect_err("invalid");
        assert!(error.contains("prefetch"), "{error}");
        let error = AmqpOptions::new().apply_url("amqp://h/?prefech=5").expect_err("misspelt");
        assert_eq!(
            error,
            "unknown option `prefech` (known: namespace, durable, quorum, persistent_reports, prefetch, \
             hand_back_after_ms, max_redeliveries, max_unconfirmed, heartbeat, connection_timeout, result_ttl_s, \
             wait_spin_us, connect_retry_s, max_unclaimed, max_unclaimed_bytes, cacertfile, certfile, keyfile, \
             max_message_size, max_dead_letters, max_dead_letter_bytes)"
        );
        assert!(AmqpOptions::new().apply_url("amqp://h/?quorum=true&durable=false").is_err());
        assert!(AmqpOptions::new().apply_url("amqp://h/?namespace=").is_err());
    }
}
