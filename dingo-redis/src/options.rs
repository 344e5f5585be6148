//! [`RedisOptions`]: every knob of the Redis broker, with the defaults documented.

use std::path::PathBuf;
use std::time::Duration;

use dingo_core::broker::tls::{CA_FILE_KEY, CERT_FILE_KEY, KEY_FILE_KEY, path_from_query};

/// Settings of a [`RedisBroker`](crate::RedisBroker).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "builder methods return the changed value; they do not change it in place"]
pub struct RedisOptions {
    /// Prefix of every key, so several apps can share one server. Default `dingo`.
    pub namespace: String,
    /// How long a worker owns a task it took. It renews the lease every third of it while the
    /// task runs; a task whose worker stopped renewing (the process died) goes back to its
    /// queue once the lease ends. Default 15 s.
    pub lease: Duration,
    /// How often each consumer process looks for expired leases of the queues it serves.
    /// Default 1 s.
    pub reap_interval: Duration,
    /// A task redelivered this many times (its workers kept dying) is dead-lettered instead.
    /// Default 5.
    pub max_redeliveries: u32,
    /// How long reports wait for their caller (the reply list's expiry, renewed on every
    /// report). Default 1 day.
    pub result_ttl: Duration,
    /// The most messages moved by one script: fetched, sent or completed together.
    /// Default 256.
    pub batch: usize,
    /// How many tasks a subscription holds ahead of its workers (leased, renewed, given back
    /// on stop); at least the app's own prefetch. Default 256.
    pub prefetch: usize,
    /// How long a blocking wait (for tasks, for reports) lasts on the server before it is
    /// renewed; the client's read timeout is this plus [`read_margin`](RedisOptions::read_margin).
    /// Default 1 s.
    pub block_timeout: Duration,
    /// Added to the block timeout for the socket read timeout: a reply that arrives after a
    /// client-side timeout would be lost by the client library. Default 2 s.
    pub read_margin: Duration,
    /// Timeout for connecting and for non-blocking commands. Default 5 s.
    pub command_timeout: Duration,
    /// Messages a producer may hold before `send` blocks (back-pressure while Redis is slow or
    /// away). Default 65,536.
    pub send_buffer: usize,
    /// Largest encoded message accepted, checked when sending and when receiving (before
    /// decoding). A larger task fails its call (`TooLarge`); one that arrives anyway (pushed
    /// by another producer) is not decoded: it goes to the dead letters with its first 4 KiB
    /// only ([`OVERSIZE_KEPT`](dingo_core::broker::support::OVERSIZE_KEPT)), the reason
    /// giving its length, and its caller, if those 4 KiB name it, gets a `BadPayload`
    /// failure. A larger report is dropped unread, with a `TooLarge` event; a final one
    /// whose call its first bytes name fails that call (`Encode`). Redis cannot read part
    /// of a list element, nor tell its length without reading it, so an oversize message is
    /// read once (Redis bounds a value at `proto-max-bulk-len`, 512 MB by default) and
    /// dropped before it is decoded; a limit on what is read would need every fetch to pass
    /// its messages through Lua. Default 16 MiB.
    pub max_message_size: usize,
    /// How many dead letters a queue keeps; past it the oldest are dropped (counted in
    /// [`Stats::dead_letters_dropped`](crate::Stats::dead_letters_dropped), with a
    /// `DeadLettersDropped` event). 0: no bound by count. Default 10,000.
    pub max_dead_letters: usize,
    /// How many reports nobody waits for (early, of dropped handles, forged) a caller keeps
    /// at most, the oldest dropped first, with a warning event
    /// ([`UnclaimedLimit`](dingo_core::broker::router::UnclaimedLimit)). Default 100,000.
    pub max_unclaimed: usize,
    /// How many bytes of such reports a caller keeps at most. Default 64 MiB.
    pub max_unclaimed_bytes: usize,
    /// How many bytes of dead letters (reason and message) a queue keeps; past it the oldest
    /// are dropped, as past [`max_dead_letters`](RedisOptions::max_dead_letters). A dead
    /// letter larger than this alone is dropped itself (the older ones stay): keep it above
    /// [`max_message_size`](RedisOptions::max_message_size). 0: no bound by bytes. Default
    /// 64 MiB.
    pub max_dead_letter_bytes: usize,
    /// First and longest pause between reconnection attempts (doubling in between), at
    /// start-up too. Default 10 ms and 2 s.
    pub reconnect_backoff: (Duration, Duration),
    /// How long [`connect`](crate::RedisBroker::connect) keeps trying while the server
    /// cannot be reached (refused, timed out, still loading its data), so a process started
    /// with its server waits for it; bad credentials, a bad URL or a server older than 7.0
    /// fail at once. Zero tries once; [`Duration::MAX`] never gives up. The wait is logged
    /// through `tracing` (target `dingo`). Default 30 s
    /// ([`CONNECT_RETRY`](dingo_core::broker::support::CONNECT_RETRY) says why).
    pub connect_retry: Duration,
    /// How long a caller waits hot (polls) for a result, when that call is the only one of
    /// the process in flight as the wait begins, before it sleeps. Polling keeps a core busy
    /// for up to this long and saves the wake-up, which costs tens of microseconds on virtual
    /// machines whose idle cores wake slowly. Polling longer than a round trip usually takes
    /// costs more than it saves: the polling core is one the worker and Redis could use when
    /// they share the machine (on 2 cores, 500 µs doubled the p99 of 80 µs). Waits that
    /// begin while other calls are in flight sleep at once. Zero turns it off. Default 80 µs.
    pub wait_spin: Duration,
    /// PEM file of the certificate authorities a `rediss://` server's certificate must chain
    /// to, instead of the system's trust store (which it replaces, it does not add to):
    /// for servers whose certificates a private CA signed. URL key `cacertfile`. Default
    /// none (the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of the client certificate presented to a `rediss://` server that asks for
    /// one (mutual TLS, `tls-auth-clients yes`), with the chain up to its CA after it if
    /// there is one; given with [`tls_key_file`](RedisOptions::tls_key_file). URL key
    /// `certfile`. Default none.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key, unencrypted PKCS#8 (`-----BEGIN
    /// PRIVATE KEY-----`; `openssl pkcs8 -topk8 -nocrypt` converts other forms). URL key
    /// `keyfile`. Default none.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions {
            namespace: "dingo".to_owned(),
            lease: Duration::from_secs(15),
            reap_interval: Duration::from_secs(1),
            max_redeliveries: 5,
            result_ttl: Duration::from_secs(24 * 3600),
            batch: 256,
            prefetch: 256,
            block_timeout: Duration::from_secs(1),
            read_margin: Duration::from_secs(2),
            command_timeout: Duration::from_secs(5),
            send_buffer: 65_536,
            max_message_size: 16 << 20,
            max_dead_letters: 10_000,
            max_unclaimed: dingo_core::broker::router::UnclaimedLimit::default().reports,
            max_unclaimed_bytes: dingo_core::broker::router::UnclaimedLimit::default().bytes,
            max_dead_letter_bytes: 64 << 20,
            reconnect_backoff: (Duration::from_millis(10), Duration::from_secs(2)),
            connect_retry: dingo_core::broker::support::CONNECT_RETRY,
            wait_spin: Duration::from_micros(80),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// The query keys a Redis URL may hold: dingo's, then the client library's.
const URL_KEYS: [&str; 21] = [
    "namespace",
    "lease_ms",
    "prefetch",
    "batch",
    "result_ttl_s",
    "block_timeout_ms",
    "max_redeliveries",
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
    "protocol",
    "db",
    "user",
    "pass",
];

impl RedisOptions {
    /// The defaults.
    pub fn new() -> RedisOptions {
        RedisOptions::default()
    }

    /// Sets [`namespace`](RedisOptions::namespace).
    pub fn namespace(mut self, namespace: impl Into<String>) -> RedisOptions {
        self.namespace = namespace.into();
        self
    }

    /// Sets [`lease`](RedisOptions::lease).
    pub fn lease(mut self, lease: Duration) -> RedisOptions {
        self.lease = lease.max(Duration::from_millis(100));
        self
    }

    /// Sets [`reap_interval`](RedisOptions::reap_interval).
    pub fn reap_interval(mut self, interval: Duration) -> RedisOptions {
        self.reap_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// Sets [`max_redeliveries`](RedisOptions::max_redeliveries).
    pub fn max_redeliveries(mut self, count: u32) -> RedisOptions {
        self.max_redeliveries = count;
        self
    }

    /// Sets [`result_ttl`](RedisOptions::result_ttl).
    pub fn result_ttl(mut self, ttl: Duration) -> RedisOptions {
        self.result_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// Sets [`batch`](RedisOptions::batch).
    pub fn batch(mut self, batch: usize) -> RedisOptions {
        self.batch = batch.clamp(1, 4096);
        self
    }

    /// Sets [`prefetch`](RedisOptions::prefetch).
    pub fn prefetch(mut self, tasks: usize) -> RedisOptions {
        self.prefetch = tasks.max(1);
        self
    }

    /// Sets [`block_timeout`](RedisOptions::block_timeout) (whole milliseconds, at least 1).
    pub fn block_timeout(mut self, timeout: Duration) -> RedisOptions {
        self.block_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Sets [`command_timeout`](RedisOptions::command_timeout).
    pub fn command_timeout(mut self, timeout: Duration) -> RedisOptions {
        self.command_timeout = timeout;
        self
    }

    /// Sets [`send_buffer`](RedisOptions::send_buffer).
    pub fn send_buffer(mut self, messages: usize) -> RedisOptions {
        self.send_buffer = messages.max(1);
        self
    }

    /// Sets [`max_message_size`](RedisOptions::max_message_size).
    pub fn max_message_size(mut self, bytes: usize) -> RedisOptions {
        self.max_message_size = bytes;
        self
    }

    /// Sets [`max_unclaimed`](RedisOptions::max_unclaimed).
    pub fn max_unclaimed(mut self, reports: usize) -> RedisOptions {
        self.max_unclaimed = reports;
        self
    }

    /// Sets [`max_unclaimed_bytes`](RedisOptions::max_unclaimed_bytes).
    pub fn max_unclaimed_bytes(mut self, bytes: usize) -> RedisOptions {
        self.max_unclaimed_bytes = bytes;
        self
    }

    /// Sets [`max_dead_letters`](RedisOptions::max_dead_letters) (0: no bound by count).
    pub fn max_dead_letters(mut self, count: usize) -> RedisOptions {
        self.max_dead_letters = count;
        self
    }

    /// Sets [`max_dead_letter_bytes`](RedisOptions::max_dead_letter_bytes) (0: no bound by
    /// bytes).
    pub fn max_dead_letter_bytes(mut self, bytes: usize) -> RedisOptions {
        self.max_dead_letter_bytes = bytes;
        self
    }

    /// Sets [`reconnect_backoff`](RedisOptions::reconnect_backoff).
    pub fn reconnect_backoff(mut self, first: Duration, longest: Duration) -> RedisOptions {
        self.reconnect_backoff = (first, longest.max(first));
        self
    }

    /// Sets [`connect_retry`](RedisOptions::connect_retry).
    pub fn connect_retry(mut self, patience: Duration) -> RedisOptions {
        self.connect_retry = patience;
        self
    }

    /// Sets [`tls_ca_file`](RedisOptions::tls_ca_file): the certificate authorities (PEM)
    /// trusted instead of the system's.
    ///
    /// ```
    /// use dingo_redis::RedisOptions;
    ///
    /// let options = RedisOptions::new()
    ///     .tls_ca_file("/etc/dingo/ca.pem")
    ///     .tls_client_cert("/etc/dingo/client.pem", "/etc/dingo/client.key");
    /// assert_eq!(options.tls_ca_file.as_deref(), Some("/etc/dingo/ca.pem".as_ref()));
    /// ```
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> RedisOptions {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Sets [`tls_cert_file`](RedisOptions::tls_cert_file) and
    /// [`tls_key_file`](RedisOptions::tls_key_file): the client certificate and its key
    /// (PEM), for servers that authenticate clients by certificate (mutual TLS).
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> RedisOptions {
        self.tls_cert_file = Some(cert.into());
        self.tls_key_file = Some(key.into());
        self
    }

    /// Splits dingo's settings off a URL's query string: `namespace`, `lease_ms`,
    /// `prefetch`, `batch`, `result_ttl_s`, `block_timeout_ms`, `max_redeliveries`,
    /// `wait_spin_us`, `connect_retry_s`, `max_unclaimed`, `max_unclaimed_bytes`,
    /// `max_message_size`, `max_dead_letters`, `max_dead_letter_bytes` (bytes), and the TLS
    /// files `cacertfile`, `certfile` and `keyfile` (paths, percent-encoded where needed)
    /// override these options; the client library's
    /// own keys (`protocol`; `db`, `user`, `pass` for `redis+unix`) stay in the URL, and
    /// any other key is an error (a misspelt option should not pass unnoticed). Returns the
    /// URL left for the client and the options.
    pub(crate) fn apply_url(mut self, url: &str) -> Result<(String, RedisOptions), String> {
        let (base, fragment) = match url.split_once('#') {
            Some((base, fragment)) => (base, Some(fragment)),
            None => (url, None),
        };
        let Some((address, query)) = base.split_once('?') else { return Ok((url.to_owned(), self)) };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let number = || value.parse::<u64>().map_err(|_| format!("`{key}` wants a whole number, not `{value}`"));
            match key {
                "namespace" if !value.is_empty() => self = self.namespace(value),
                "namespace" => return Err("`namespace` must not be empty".to_owned()),
                "lease_ms" => self = self.lease(Duration::from_millis(number()?)),
                "prefetch" => self = self.prefetch(usize::try_from(number()?).unwrap_or(usize::MAX)),
                "batch" => self = self.batch(usize::try_from(number()?).unwrap_or(usize::MAX)),
                "result_ttl_s" => self = self.result_ttl(Duration::from_secs(number()?)),
                "block_timeout_ms" => self = self.block_timeout(Duration::from_millis(number()?)),
                "max_redeliveries" => self = self.max_redeliveries(u32::try_from(number()?).unwrap_or(u32::MAX)),
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
                "max_dead_letters" => self = self.max_dead_letters(usize::try_from(number()?).unwrap_or(usize::MAX)),
                "max_dead_letter_bytes" => {
                    self = self.max_dead_letter_bytes(usize::try_from(number()?).unwrap_or(usize::MAX))
                }
                "protocol" | "db" | "user" | "pass" => kept.push(pair),
                _ => return Err(format!("unknown option `{key}` (known: {})", URL_KEYS.join(", "))),
            }
        }
        let mut rest = address.to_owned();
        if !kept.is_empty() {
            rest.push('?');
            rest.push_str(&kept.join("&"));
        }
        if let Some(fragment) = fragment {
            rest.push('#');
            rest.push_str(fragment);
        }
        Ok((rest, self))
    }

    /// Sets [`wait_spin`](RedisOptions::wait_spin).
    pub fn wait_spin(mut self, spin: Duration) -> RedisOptions {
        self.wait_spin = spin;
        self
    }

    /// The socket read timeout of blocking connections.
    pub(crate) fn blocking_read_timeout(&self) -> Duration {
        self.block_timeout + self.read_margin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_query_sets_options_and_keeps_the_rest() {
        let (url, options) = RedisOptions::new()
            .apply_url("redis://:pw@host:6380/2?namespace=shop&lease_ms=3000&protocol=resp3&prefetch=64#insecure")
            .expect("valid");
        assert_eq!(url, "redis://:pw@host:6380/2?protocol=resp3#insecure");
        assert_eq!(options.namespace, "shop");
        assert_eq!(options.lease, Duration::from_secs(3));
        assert_eq!(options.prefetch, 64);
        assert_eq!(options.batch, RedisOptions::default().batch);
    }

    /// Every key the error lists is one the parser takes (the list is kept by hand).
    #[test]
    fn every_listed_url_key_is_taken() {
        for key in URL_KEYS {
            let value = match key {
                "namespace" | "user" | "pass" => "a",
                "protocol" => "resp2",
                _ => "1",
            };
            let url = format!("redis://h/?{key}={value}");
            assert!(RedisOptions::new().apply_url(&url).is_ok(), "{url}");
        }
    }

    #[test]
    fn url_query_sets_the_tls_files() {
        let (url, options) = RedisOptions::new()
            .apply_url(
                "rediss://h:6380/0?cacertfile=/etc/ca.pem&certfile=/etc/my%20client.pem&keyfile=k.pem&protocol=resp3",
            )
            .expect("valid");
        assert_eq!(url, "rediss://h:6380/0?protocol=resp3");
        assert_eq!(options.tls_ca_file.as_deref(), Some("/etc/ca.pem".as_ref()));
        assert_eq!(options.tls_cert_file.as_deref(), Some("/etc/my client.pem".as_ref()));
        assert_eq!(options.tls_key_file.as_deref(), Some("k.pem".as_ref()));
        let error = RedisOptions::new().apply_url("rediss://h/?cacertfile=").expect_err("empty");
        assert_eq!(error, "`cacertfile` wants a file path");
        assert_eq!(RedisOptions::default().tls_ca_file, None);
    }

    #[test]
    fn url_without_query_is_untouched() {
        let (url, options) = RedisOptions::new().apply_url("redis://127.0.0.1:6379/0").expect("valid");
        assert_eq!((url.as_str(), options), ("redis://127.0.0.1:6379/0", RedisOptions::default()));
    }

    #[test]
    fn url_query_errors_name_the_key() {
        let error = RedisOptions::new().apply_url("redis://h/?lease_ms=soon").expect_err("invalid");
        assert_eq!(error, "`lease_ms` wants a whole number, not `soon`");
        assert!(RedisOptions::new().apply_url("redis://h/?namespace=").is_err());
    }

    #[test]
    fn url_query_sets_the_limits() {
        let defaults = RedisOptions::new();
        assert_eq!(
            (defaults.max_message_size, defaults.max_dead_letters, defaults.max_dead_letter_bytes),
            (16 << 20, 10_000, 64 << 20)
        );
        let url = "redis://h/?max_message_size=1000&max_dead_letters=3&max_dead_letter_bytes=0";
        let (url, options) = RedisOptions::new().apply_url(url).expect("valid");
        assert_eq!(url, "redis://h/");
        assert_eq!((options.max_message_size, options.max_dead_letters, options.max_dead_letter_bytes), (1000, 3, 0));
    }

    #[test]
    fn url_query_sets_the_start_up_retry() {
        assert_eq!(RedisOptions::new().connect_retry, Duration::from_secs(30));
        let (url, options) = RedisOptions::new().apply_url("redis://h:6379/0?connect_retry_s=90").expect("valid");
        assert_eq!((url.as_str(), options.connect_retry), ("redis://h:6379/0", Duration::from_secs(90)));
        let (_, options) = RedisOptions::new().apply_url("redis://h/?connect_retry_s=0").expect("valid");
        assert_eq!(options.connect_retry, Duration::ZERO);
    }

    #[test]
    fn a_misspelt_url_option_is_an_error_that_lists_the_known_ones() {
        let error = RedisOptions::new().apply_url("redis://h/?namespace=a&leas_ms=100").expect_err("misspelt");
        assert_eq!(
            error,
            "unknown option `leas_ms` (known: namespace, lease_ms, prefetch, batch, result_ttl_s, block_timeout_ms, \
             max_redeliveries, wait_spin_us, connect_retry_s, max_unclaimed, max_unclaimed_bytes, cacertfile, \
             certfile, keyfile, max_message_size, max_dead_letters, max_dead_letter_bytes, protocol, db, user, pass)"
        );
        let (url, _) = RedisOptions::new().apply_url("redis+unix:///tmp/r.sock?db=2&pass=pw").expect("client keys");
        assert_eq!(url, "redis+unix:///tmp/r.sock?db=2&pass=pw");
    }
}
