//! The Redis broker of [dingo](https://docs.rs/dingo): task transport and report transport
//! over one Redis server, with at-least-once delivery.
//!
//! ```no_run
//! use dingo_core::App;
//! use dingo_redis::{RedisBroker, RedisOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let broker = RedisBroker::connect_with("redis://127.0.0.1:6379", RedisOptions::new().namespace("shop"))?;
//! let worker = App::builder().broker(broker).build()?;
//! worker.register("double", |n: i64| n * 2)?;
//! worker.allocate("double", 4)?;
//!
//! // Another process (or the same one): calls through the same server and namespace.
//! let caller = App::builder().broker(RedisBroker::connect("redis://127.0.0.1:6379")?).build()?;
//! # let caller = App::builder().broker(RedisBroker::connect_with("redis://127.0.0.1:6379", RedisOptions::new().namespace("shop"))?).build()?;
//! let doubled: i64 = caller.call("double", 21i64)?.wait()?;
//! # Ok(())
//! # }
//! ```
//!
//! With the `redis` feature of `dingo`, `App::connect("redis://…")` works too.
//!
//! # Guarantees
//!
//! - **At least once.** Every worker thread is a *consumer* with its own processing list and
//!   one lease (a deadline in the queue's `consumers` sorted set, renewed every third of the
//!   lease by a keeper thread while the process lives). Taking tasks moves them from the
//!   queue to the consumer's processing list in one script; storing a final report and
//!   removing its task from the processing list is one script too, so a task is never
//!   marked done without its result, nor its result stored twice. A worker process that
//!   dies stops renewing; once its consumers' leases expire, any consumer process of the
//!   queue (a reaper runs every [`reap_interval`](RedisOptions::reap_interval)) moves their
//!   processing lists back to the front of the queue, marked redelivered
//!   ([`Context::redelivered`](dingo_core::Context::redelivered)). A task redelivered
//!   [`max_redeliveries`](RedisOptions::max_redeliveries) times (its workers keep dying: it
//!   may crash them) goes to the dead letters instead, and its caller gets a failure of kind
//!   `WorkerLost`. Long tasks are never stolen while their process renews. Two limits: every
//!   task in a dead worker's processing lists counts a redelivery, so healthy tasks fetched
//!   again and again together with one that crashes its worker can reach the limit with it
//!   (for tasks that may crash their process, keep the fetch small: `prefetch` = worker
//!   threads, `batch=1`); and the caller of a task given up is told once, as the reaper
//!   moves it (if that reaper's process dies at that moment, the caller waits out its own
//!   timeout; the dead letter is kept either way).
//! - **Fencing.** A consumer whose lease was taken over (its process stalled longer than the
//!   lease) cannot complete its tasks afterwards: the script checks the lease first, rejects
//!   the late report and the broker counts it ([`Stats::rejected_reports`]); the consumer
//!   then starts over under a new id.
//! - **Hard time limits.** When the watchdog writes off a worker thread whose task ran past
//!   its hard limit ([`TimeLimits`](dingo_core::TimeLimits)), the call fails with
//!   `TimeLimit` and exactly its message leaves the thread's processing list — stored after
//!   the settlements the thread still held (tasks it finished before, in their order), by
//!   the flusher or by the write-off itself, never by position out of turn. The tasks the thread
//!   had fetched but not started go back to the front of the queue at once (not after a
//!   lease) and run on other threads, its consumers are retired, and the thread is fenced:
//!   should it ever return, it settles, reports (progress included, through this broker)
//!   and fetches nothing.
//!   Its connection is closed at the write-off.
//! - **Retries apply once.** A connection that breaks while a command is on its way leaves
//!   the sender unsure whether it ran; it reconnects and sends it again. Every batch that
//!   sends, fetches, completes or trims is numbered per sender (one small key per sender and
//!   queue, see the key layout), so a retried batch changes nothing twice, and a retried
//!   fetch hands its worker the very tasks the lost reply carried (except at-most-once
//!   ones: those are lost, never run twice).
//! - **At most once, per task.** With `CallOptions::at_most_once` (usually a task's default)
//!   tasks wait in a list of their own, are sent and taken with plain commands (no script,
//!   no batch number) and run without a lease: cheaper, and lost if the worker dies while
//!   running them. Nothing at most once is sent twice: a message whose send was cut off
//!   before Redis answered may or may not be queued, and its caller gets a failure saying
//!   so rather than waiting for a result that may never come.
//! - **Delays.** A task due later — sent with a countdown or an ETA, or a retry waiting out
//!   its backoff — is kept by Redis in its queue's delayed set (a sorted set by due time),
//!   never in a worker's memory: it survives the restart of every worker process, and of
//!   Redis as far as Redis keeps its data (see [Durability](#durability)). Every process
//!   that consumes the queue promotes: one script moves the due tasks, oldest due first and
//!   up to 1,000 at a time, to where an immediate send would have put them (at-most-once ones
//!   to their own list) and wakes idle workers — so two processes promoting at once move
//!   each task once, and there is no scheduler process to keep alive. Promoters do not poll
//!   on a tick: each sleeps until the earliest due time, which the script gives by the
//!   server's clock (a promoter's own clock does not matter), and a send due before
//!   everything waiting wakes one of them (a token in `delayed:wake`); should the process
//!   that took the token die before it promotes, the others still look every second
//!   ([`Stats::promoted`]). A due time is the caller's wall clock (a countdown: its now plus
//!   the countdown), kept to the millisecond and never early (a task is promoted once its
//!   millisecond is over): a caller whose clock is off delays by as much more or less (keep
//!   clocks in sync). A delayed send is numbered like the others (a retried batch
//!   adds nothing a promoter may have moved meanwhile), and the same message sent twice —
//!   same call, attempt and due time — is one task.
//! - **Retries, in one step.** The next attempt of a failed task goes into the delayed set
//!   in the script that settles the attempt that failed (with the worker's next fetch, as a
//!   completion does), so a worker killed in between neither loses the retry nor makes it
//!   twice ([`Stats::retried`]); a worker whose lease was taken over retries nothing (the
//!   attempt runs again elsewhere: a crash never uses up an attempt). Retries of tasks of
//!   another transport are sent, then acknowledged.
//! - **Reports** go to one reply list per caller process and task, which expires after the
//!   [`result_ttl`](RedisOptions::result_ttl). One listener thread per process waits on all of
//!   them and routes each report to its call's handle by (task name, id). Reports that
//!   arrive before the handle waits are kept, a wait that times out loses nothing, and many
//!   waiting calls cost no connection each.
//! - **Dead letters.** A message that cannot run — it does not decode, names a task the
//!   worker does not have, or has another signature —, one whose retries ran out, and one
//!   redelivered [`max_redeliveries`](RedisOptions::max_redeliveries) times is moved to its
//!   queue's dead-letter list with the reason and the time
//!   ([`Admin::dead_letters`](dingo_core::broker::Admin::dead_letters), oldest first; entries
//!   buried before times were recorded are listed without one); its caller, when it can be
//!   identified, gets a failure report, and the worker goes on. The list keeps at most
//!   [`max_dead_letters`](RedisOptions::max_dead_letters) entries (10,000) in at most
//!   [`max_dead_letter_bytes`](RedisOptions::max_dead_letter_bytes) (64 MiB, counted by the
//!   scripts in `NS:{T}:dead:bytes`); past either, the oldest are dropped, counted in
//!   [`Stats::dead_letters_dropped`] with a `DeadLettersDropped` event.
//! - **Replay without duplicates.** [`Admin::replay`](dingo_core::broker::Admin::replay)
//!   sends letters back oldest first, in batches of up to 100 (1 MiB), each batch one script
//!   that removes the exact dead entries and pushes their fresh attempts
//!   ([`DeadLetter::replay_bytes`]: attempt 1, no due time, no expiry, no redelivery mark)
//!   where a send would put them, numbered like every batch (a batch sent again after its
//!   reply was lost applies once). A replaying process killed half-way leaves each letter
//!   either replayed or still dead — never both — and a replay in any process sends the
//!   rest. `purge_dead` takes exact entries the same way (or the whole list in one
//!   transaction), and `purge` empties both lists of waiting tasks in one transaction
//!   (delayed tasks and running ones stay), each returning the exact count.
//! - **Cancellation.** [`Admin::cancel`](dingo_core::broker::Admin::cancel) records the
//!   call's id in its queue's `cancelled` sorted set (scored by the cancel's end, pruned as
//!   cancels lapse, the key expiring with the last) and moves the queue's cancel generation
//!   on, in one script. Every fetch reads the generation of its queue (one `GET` inside the
//!   fetch script: nothing more while nobody cancels); a worker that finds one its process has
//!   not loaded loads the queue's cancels into the consumer's
//!   [`Cancels`](dingo_core::broker::Cancels) *before* it hands out what it fetched, so a
//!   call cancelled before it was fetched never starts — in any process, including one
//!   started after the cancel or cut off from Redis when it was made (it loads them with its
//!   first fetch), and whether the call was queued, delayed, a retry or redelivered. The
//!   lease keeper of every consuming process polls the generations every 100 ms, so a running
//!   task sees [`Context::is_cancelled`](dingo_core::Context::is_cancelled) within 100 ms
//!   plus a round trip. One window remains: a task a worker thread fetched *before* the
//!   cancel (prefetched behind the task it runs: at most `prefetch / workers` of them) still
//!   starts if its turn comes before the keeper's next poll (≤ 100 ms after the cancel); it
//!   then sees the cancel while running. For tasks that must never start once cancelled,
//!   keep the prefetch at one task per worker thread. A cancel's end is the canceller's clock,
//!   compared with the server's (keep clocks in sync).
//! - **Size limits on receipt.** [`max_message_size`](RedisOptions::max_message_size) holds
//!   for what is fetched too, not only for what is sent: a task message over it (pushed by
//!   another producer) is not decoded but dead-lettered with its first 4 KiB only (the
//!   reason gives its length), its caller told if those bytes name it; a report over it is
//!   dropped unread, or, when it is a result whose call its first bytes name, replaced by an
//!   `Encode` failure of that call. Both raise a `TooLarge` event and count in
//!   [`Stats::oversize`]. Redis cannot read part of a value, so such a message is read once.
//! - **Reconnection.** Every connection reconnects with exponential backoff, reported as
//!   `ConnectionLost` / `ConnectionRestored` events; work in flight is recovered by the
//!   lease rules. A worker stopped while Redis is away does not wait for it: what it could
//!   not store runs again after its lease. A server that is up but not ready — loading its
//!   data after a restart (`LOADING`, seconds for a large data set), a replica without its
//!   primary (`MASTERDOWN`), a cluster reconfiguring (`TRYAGAIN`, `CLUSTERDOWN`), too few
//!   replicas for writes (`NOREPLICAS`), another client's script past its time limit
//!   (`BUSY`), a failover under way (`READONLY`, `UNBLOCKED`: the connection is made again)
//!   — is waited for the same way: a batch it refused ran nothing and goes again as it was
//!   once it is ready; of one it refused only in part (it finished loading midway), what ran
//!   is kept and what it refused goes again under new batch numbers (each still applies
//!   once). Shutting down does not wait for a server that is not ready. At start-up,
//!   [`RedisBroker::connect`] waits [`connect_retry`](RedisOptions::connect_retry) (30 s)
//!   for a server that is not up yet, or not ready — or a replica (it refuses every write;
//!   during a failover it becomes the primary within the wait): after the wait, the error
//!   says the server is a replica. A primary demoted while dingo runs answers `READONLY`,
//!   which is waited for as above (each connection made again until it reaches a primary).
//!
//! # Durability
//!
//! At least once holds for what Redis keeps. A server without persistence (`--save ""
//! --appendonly no`) loses every queued task and stored result when it restarts; with
//! snapshots only, whatever came after the last one. With the append-only file and Redis's
//! default `appendfsync everysec`, a crash of the machine (power, kernel) — and, rarely, of
//! the server while a slow disk holds its writes back — loses up to about a second of
//! acknowledged writes: tasks the caller was told were queued, results and settlements.
//! `appendfsync always` closes that window at the cost of an `fsync` per write; dingo
//! batches its writes, so that is one per round trip, not one per task. Replication is
//! asynchronous: a failover to a replica can lose the writes it had not received yet.
//!
//! # Batching
//!
//! Nothing is one round trip per message. Callers queue task messages and go on; a writer
//! thread sends whatever has accumulated in one round trip, and a lone call, finding nothing
//! queued, is written by its caller at once. A worker thread takes up to
//! [`batch`](RedisOptions::batch) tasks at a time on its own connection, and the
//! completions of the tasks it ran ride with its next fetch — unless the task it runs
//! meanwhile takes longer than 200 µs: then they are stored at once, so a quick task's
//! result never waits for a slow one fetched after it ([`Stats::flushed`]). An idle worker
//! waits for work at the server, and costs no extra round trip when work comes.
//!
//! A caller waiting for its only call in flight polls for the result for up to
//! [`wait_spin`](RedisOptions::wait_spin) before it sleeps, which saves a thread wake-up on
//! the way back; a wait that begins while other calls are in flight sleeps at once.
//!
//! # Connections
//!
//! There is no pool to size: each thread that talks to Redis owns its connection, opened
//! when the thread first needs it — for callers, the task sender and the report listener
//! (one per broker, however many calls wait); for workers, a task fetcher per worker thread,
//! the lease keeper (which also reaps), the settlement flusher, the report writer, and the
//! delay promoter with its wake listener; and one for short commands (declarations,
//! inspection). A broker serving both roles holds at most `worker threads + 8`. Each connection names itself at the server (`CLIENT
//! SETNAME`), so `CLIENT LIST` shows `dingo:NAMESPACE:PROCESS:ROLE`.
//!
//! # TLS
//!
//! `rediss://` URLs need the crate's `tls` feature (`redis-tls` on `dingo`; the system's
//! OpenSSL through `native-tls`). The server's certificate must chain to a trusted CA and
//! name the URL's host. Three settings, as URL query keys (RabbitMQ's names, the same on
//! both brokers) or [`RedisOptions`] fields, cover private CAs and mutual TLS:
//!
//! | URL key | option | file (PEM) |
//! | --- | --- | --- |
//! | `cacertfile` | [`tls_ca_file`](RedisOptions::tls_ca_file) | the CAs to trust, *instead of* the system's |
//! | `certfile` | [`tls_cert_file`](RedisOptions::tls_cert_file) | the client certificate, for servers with `tls-auth-clients yes` |
//! | `keyfile` | [`tls_key_file`](RedisOptions::tls_key_file) | its key, unencrypted PKCS#8 (`-----BEGIN PRIVATE KEY-----`) |
//!
//! ```no_run
//! # fn main() -> Result<(), dingo_core::BrokerError> {
//! use dingo_redis::{RedisBroker, RedisOptions};
//!
//! let broker = RedisBroker::connect(
//!     "rediss://redis.internal:6380/0?cacertfile=/etc/dingo/ca.pem&certfile=/etc/dingo/client.pem&keyfile=/etc/dingo/client.key",
//! )?;
//! // The same with options:
//! let options = RedisOptions::new()
//!     .tls_ca_file("/etc/dingo/ca.pem")
//!     .tls_client_cert("/etc/dingo/client.pem", "/etc/dingo/client.key");
//! let broker = RedisBroker::connect_with("rediss://redis.internal:6380/0", options)?;
//! # Ok(())
//! # }
//! ```
//!
//! The files are read and checked at connect: one missing, unreadable or not what it should
//! be (a certificate, a PKCS#8 key that is the certificate's) is a
//! [`Config`](dingo_core::BrokerErrorKind::Config) error naming the file, as are TLS files
//! with a `redis://` URL. A server whose certificate is refused (untrusted CA, another host
//! name) or that refuses the client's is a `Config` error too, not waited for. A server that
//! wants a client certificate may also just close a connection without one (TLS 1.3 checks
//! it after the client's side of the handshake, and a reset can overtake its alert): then
//! the error says the connection was closed.
//!
//! **`#insecure`** (the client library's URL fragment, `rediss://host:6380/#insecure`) turns
//! the certificate and host name checks off: anyone on the path can then read and change
//! what the connection carries, passwords included. dingo keeps it working (for a test
//! server), logs a warning at connect and emits an
//! [`EventKind::TlsUnverified`](dingo_core::event::EventKind::TlsUnverified) warning for
//! every connection it opens that way; with TLS files it is an error (they would be ignored).
//! To trust a self-signed server, give its certificate as `cacertfile` instead.
//!
//! # Permissions
//!
//! Connecting checks that the URL's user may run every command dingo needs on the
//! namespace's keys (one script that changes nothing and asks `redis.acl_check_cmd`): a user
//! denied one gets a [`Config`](dingo_core::BrokerErrorKind::Config) error at once, naming
//! the commands (`… the user may not run EVALSHA, which dingo needs …`), before any of its
//! workers could take a task it would then fail to settle. The check uses a key of the
//! namespace that no task has (`NS:{dingo.access}:probe`): key patterns narrower than the
//! namespace (some of its tasks only) are refused too.
//!
//! [`acl_rules`] gives the rules of a least-privilege user: the namespace's keys only, no
//! pub/sub channels, only the commands dingo runs, nothing in `@dangerous`. For namespace
//! `shop`, the line of a Redis ACL file (`aclfile` in `redis.conf`) is:
//!
//! ```text
//! user shop-app on >PASSWORD resetkeys ~shop:* resetchannels -@all +ping +echo +script|load +evalsha +multi +exec +time +blpop +blmpop +lpush +rpush +lpop +rpop +lmove +llen +lrange +ltrim +lrem +get +set +del +unlink +pexpire +zadd +zrem +zscore +zrangebyscore +sadd +sismember +hello +client|setname +client|info -@dangerous
//! ```
//!
//! (or `ACL SETUSER shop-app on >PASSWORD` followed by the same rules), and the URL
//! `redis://shop-app:PASSWORD@host:6379/?namespace=shop`. The tests run the whole
//! conformance suite as such a user. A URL with a database other than 0 also needs
//! `+select`; [`RedisBroker::purge_namespace`] (a tool) needs `+scan`, and
//! [`RedisBroker::delayed_len`] (inspection) `+zcard`.
//!
//! Two fast paths use commands in `@dangerous`, where the user may run them: `CLIENT KILL`
//! (sends go as plain transactions, and a new connection first ends the ones it replaced,
//! so nothing they still carried can run after it) and `SORT … BY nosort … STORE` (a fetch
//! copies tasks into the processing list without passing them through Lua). A user denied
//! them loses no guarantee: sends go as numbered scripts from the start (a late copy of one
//! applies once) and fetches pop through Lua, at some cost in Redis CPU. The server's
//! version comes from `HELLO`, or `INFO` where the server does not answer `HELLO`.
//!
//! Permissions are not a boundary between apps that share a namespace: anyone who may
//! write its keys can queue tasks and forge reports. Give separate apps separate namespaces
//! and users.
//!
//! # Options
//!
//! [`RedisOptions`] documents every setting and its default. The URL's query sets the common
//! ones (`redis://host:6379/0?namespace=shop&lease_ms=30000`, see [`RedisBroker::connect`]).
//!
#![doc = include_str!("keys.md")]
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod access;
mod broker;
mod conn;
mod keys;
mod options;
mod scripts;
mod tls;

pub use access::acl_rules;
pub use broker::{RedisBroker, Stats};
/// What [`Admin::dead_letters`](dingo_core::broker::Admin::dead_letters) returns: the
/// project's one dead-letter type.
pub use dingo_core::DeadLetter;
pub use options::RedisOptions;

use dingo_core::app::{AppBuilder, BrokerScheme};

fn configure(url: &str, builder: AppBuilder) -> Result<AppBuilder, dingo_core::Error> {
    Ok(builder.broker(RedisBroker::connect(url)?))
}

inventory::submit! { BrokerScheme { scheme: "redis", configure } }
inventory::submit! { BrokerScheme { scheme: "rediss", configure } }
inventory::submit! { BrokerScheme { scheme: "redis+unix", configure } }
