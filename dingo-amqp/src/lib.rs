//! The RabbitMQ broker of [dingo](https://docs.rs/dingo): task transport and report
//! transport over AMQP 0-9-1 (through `amiquip`), with at-least-once delivery.
//!
//! ```no_run
//! use dingo_core::App;
//! use dingo_amqp::{AmqpBroker, AmqpOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
//! let worker = App::builder().broker(AmqpBroker::connect_with(url, AmqpOptions::new().namespace("shop"))?).build()?;
//! worker.register("double", |n: i64| n * 2)?;
//! worker.allocate("double", 4)?;
//!
//! // Another process (or the same one): calls through the same server and namespace.
//! let caller = App::connect("amqp://guest:guest@127.0.0.1:5672/%2f?namespace=shop")?;
//! let doubled: i64 = caller.call("double", 21i64)?.wait()?;
//! # Ok(())
//! # }
//! ```
//!
//! With the `amqp` feature of `dingo`, `App::connect("amqp://…")` works too. Either role can
//! be played alone: tasks on RabbitMQ and reports on Redis, say
//! (`App::builder().tasks(amqp).reports(redis)`).
//!
//! # Topology
//!
//! Declared by the library, idempotently, whenever an app registers a task (caller or
//! worker side), and again after every reconnection:
//!
//! | name | kind | what |
//! | --- | --- | --- |
//! | `NS.task.NAME` | queue (durable, or quorum) | the task's messages; dead-letters to `NS.dead` |
//! | `NS.dead` | direct exchange | dead letters, routed by the task queue's name |
//! | `NS.dead.NAME` | queue, `x-max-length` 10,000 and `x-max-length-bytes` 64 MiB (RabbitMQ drops the oldest past either: [`max_dead_letters`](AmqpOptions::max_dead_letters)) | the task's dead letters ([below](#dead-letters)) |
//! | `NS.cancels` | stream queue (durable in every namespace), `x-max-age` 7 days ([`cancel_retention`](AmqpOptions::cancel_retention)), 1 MiB segments | cancels, and the markers subscriptions read up to ([below](#cancels)) |
//! | `NS.reply.ID` | queue, expires unused after the result TTL | reports for one caller process |
//! | `NS.delay.K`, K = 0 to 27 | queue (quorum; transient in a transient namespace), `x-message-ttl` 2^K × 10 ms, no consumers; dead-letters to exchange `NS.delay.(K-1)` (level 0: to `NS.delay.exit`) | delayed messages, level K of the chain ([below](#delays)) |
//! | `NS.delay.K` | topic exchange | routes on bit K of the delay: `1` to queue `NS.delay.K`, `0` on to exchange `NS.delay.(K-1)` |
//! | `NS.delay.exit` | headers exchange | every task queue is bound to it by its name (header `dingo-queue`) |
//!
//! `NS` is the [`namespace`](AmqpOptions::namespace). Task messages go through the default
//! exchange straight to their queue, published `mandatory`: a message that reaches no queue
//! comes back and fails its call (`UnknownTask`); it is never dropped silently. The delay
//! levels are declared by the delayed messages a broker sends, as far as their delays reach
//! (a delay uses the levels up to its highest bit: a first delay of a second declares levels
//! 0 to 6, not all 28); `NS.delay.exit` and each task queue's binding to it are declared
//! with the task.
//!
//! # TLS
//!
//! `amqps://` URLs (port 5671 by default) need the crate's `tls` feature (`amqp-tls` on
//! `dingo`; the system's OpenSSL through `native-tls`). The server's certificate must chain
//! to a trusted CA and name the URL's host. Three settings, as URL query keys (those of
//! RabbitMQ's URI spec, the same on the Redis broker) or [`AmqpOptions`] fields, cover
//! private CAs and mutual TLS:
//!
//! | URL key | option | file (PEM) |
//! | --- | --- | --- |
//! | `cacertfile` | [`tls_ca_file`](AmqpOptions::tls_ca_file) | the CAs to trust, *instead of* the system's |
//! | `certfile` | [`tls_cert_file`](AmqpOptions::tls_cert_file) | the client certificate, for servers with `fail_if_no_peer_cert = true` |
//! | `keyfile` | [`tls_key_file`](AmqpOptions::tls_key_file) | its key, unencrypted PKCS#8 (`-----BEGIN PRIVATE KEY-----`) |
//!
//! ```no_run
//! # fn main() -> Result<(), dingo_core::BrokerError> {
//! use dingo_amqp::{AmqpBroker, AmqpOptions};
//!
//! let options = AmqpOptions::new()
//!     .tls_ca_file("/etc/dingo/ca.pem")
//!     .tls_client_cert("/etc/dingo/client.pem", "/etc/dingo/client.key");
//! let broker = AmqpBroker::connect_with("amqps://dingo:secret@rabbit.internal/%2f", options)?;
//! # Ok(())
//! # }
//! ```
//!
//! The files are read, checked and parsed once, at connect: one missing, unreadable or not
//! what it should be (a certificate, a PKCS#8 key that is the certificate's) is a
//! [`Config`](dingo_core::BrokerErrorKind::Config) error naming the file, as are TLS files
//! with an `amqp://` URL. A server whose certificate is refused (untrusted CA, another host
//! name) or that refuses the client's is a `Config` error too, not waited for (a server that
//! wants a client certificate may also just close the connection: TLS 1.3 checks it after
//! the client's side of the handshake, and a reset can overtake its alert). There is no way
//! to turn verification off; to trust a self-signed server, give its certificate as
//! `cacertfile`.
//!
//! A RabbitMQ configuration these settings were tested against (`integration/tests/amqp_tls.rs` starts
//! a private node with it, see `test-support/src/rabbitmq_node.rs`):
//!
//! ```text
//! listeners.ssl.default = 5671
//! ssl_options.cacertfile = /etc/rabbitmq/ca.pem
//! ssl_options.certfile   = /etc/rabbitmq/server.pem
//! ssl_options.keyfile    = /etc/rabbitmq/server.key
//! ssl_options.verify     = verify_peer
//! ssl_options.fail_if_no_peer_cert = true   # mutual TLS: every client shows a certificate
//! ```
//!
//! # Guarantees
//!
//! - **At least once.** Task messages are persistent on durable queues and published with
//!   asynchronous publisher confirms (batched, never one wait per message); messages not
//!   confirmed when a connection breaks are published again. Workers take tasks with manual
//!   acknowledgement and a per-consumer prefetch; a task is acknowledged only after its
//!   final report is published *and confirmed*. A worker process that dies leaves its
//!   unacknowledged tasks to RabbitMQ, which redelivers them, marked as such
//!   ([`Context::redelivered`](dingo_core::Context::redelivered)), and counted (see
//!   [below](#the-redelivery-limit)). A late report of a task that was redelivered meanwhile
//!   may reach its caller twice; the caller keeps the first.
//! - **At most once, per task.** With `CallOptions::at_most_once` (usually a task's default)
//!   a task message is transient, published on a second channel without confirms, and
//!   acknowledged as it is delivered, before it runs; its final report takes that channel
//!   too (unless its call's progress reports still wait for confirms, which it must not
//!   overtake). Nothing at most once is published twice. A message without a confirm that
//!   the connection takes down with it is lost without a word: wait for at-most-once calls
//!   with a timeout. One that went out on the confirmed channel instead (while the other
//!   was down, or RabbitMQ blocked the connection) and is still unconfirmed when that
//!   channel breaks may or may not have been queued: its caller gets a failure saying so.
//!   One RabbitMQ returns (no queue) fails its call, as at least once.
//! - **Reports** go to one reply queue per caller process, each carrying its task id as
//!   correlation id; one listener thread routes them to handles by (task name, id). Reports
//!   published before the caller waits are kept, and a wait that times out loses nothing.
//!   The reply queue is not exclusive (an exclusive queue dies with its connection, and the
//!   reports in it): it outlives a reconnection and expires once unused for the
//!   [`result_ttl`](AmqpOptions::result_ttl), as do the reports in it. Direct reply-to is
//!   not used: it is at most once.
//! - **Dead letters.** A message that cannot run — it does not decode, names a task the
//!   worker does not have, or has another signature — is published to the dead-letter
//!   exchange with the reason (header `x-dingo-reason`), and acknowledged once that is
//!   confirmed; its caller, when it can be identified and reports travel through RabbitMQ
//!   too, gets a failure report (the worker's own checks — unknown task, other signature —
//!   report through whatever report transport the app uses), and the worker goes on.
//!   Messages RabbitMQ dead-letters itself land in the same queue. They are listed,
//!   replayed and purged through [`Admin`](dingo_core::broker::Admin) ([below](#dead-letters)).
//! - **Size limits on receipt.** [`max_message_size`](AmqpOptions::max_message_size) holds
//!   for deliveries too: a task message over it is not decoded; a copy of its first 4 KiB
//!   goes to the dead letters with the reason (its length), the original is acknowledged,
//!   and its caller is told if those bytes name it. A report over it is dropped, or, when it
//!   is a result whose call its first bytes name, replaced by an `Encode` failure of that
//!   call. Both raise a `TooLarge` event and count in [`Stats::oversize`]. The connection
//!   keeps only the first 4 KiB of such a message as it arrives (the rest is read and
//!   dropped), so it costs no memory beyond them.
//! - **Reconnection.** amiquip does not reconnect; dingo does, with exponential backoff,
//!   reported as `ConnectionLost` / `ConnectionRestored` events: the connection is dialled
//!   again, topology declared again, consumers started again, unconfirmed messages published
//!   again. Heartbeats are on ([`heartbeat`](AmqpOptions::heartbeat)), and the socket has
//!   `TCP_NODELAY` (without it each request-reply round trip waits ~40 ms for Nagle and
//!   delayed ACKs). At start-up, [`AmqpBroker::connect`] waits
//!   [`connect_retry`](AmqpOptions::connect_retry) (30 s) for a server that is not up yet.
//! - **Resource alarms.** When RabbitMQ runs low on memory or disk it blocks publishing
//!   connections; dingo reports it (a `Warning` event, and an `Info` one when it unblocks)
//!   and calls wait meanwhile, within [`max_unconfirmed`](AmqpOptions::max_unconfirmed) and
//!   their enqueue timeout, then go through.
//!
//! # Delays
//!
//! A task message due later (a countdown, an ETA, a retry after its backoff) waits in
//! RabbitMQ, never in a worker's memory, and needs no plugin (the delayed-message exchange
//! is not replicated and missing on most servers). It goes through a chain of 28 TTL'd
//! queues, the binary decomposition of its delay (as Celery 5.5's "native delayed
//! delivery"): its remaining delay, counted from its `due` time when it is published and
//! rounded up to a unit of 10 ms, is written in binary, D = Σ 2^K; level K's queue keeps
//! every message 2^K units, then dead-letters it to the next lower level whose bit is set,
//! and after the last to the task's own queue. So a message waits exactly D units (plus a
//! few milliseconds per level it passes; all of them hold it at most ~31 days). Every
//! message in one level's queue has that level's TTL, so the one at the head is always the
//! first to expire: a long delay never holds up a short one behind it (RabbitMQ expires
//! messages at the head of a queue only, so a single queue of per-message TTLs would). The
//! route is the routing key, the delay's bits as words, least significant first (`1.0.1`
//! for 5 units), matched by one topic exchange per level; the destination is a header,
//! matched at the exit (a headers exchange): a topic pattern made of a task queue's name
//! could match other names, or hold `*` and `#`. `topology.rs` has the details.
//!
//! - **Persistent and confirmed** like every task message (published again if its channel
//!   breaks before the confirm, then with what is left of its delay): a delayed message
//!   survives the restart of every worker process and of RabbitMQ (the TTL of a message
//!   counts from when it entered its queue; one that expired while the node was down moves
//!   on as the node starts).
//! - **Quorum delay queues.** In a durable namespace (the default) the delay queues are
//!   quorum queues whatever the task queues are, dead-lettering `at-least-once`
//!   (`x-dead-letter-strategy`, with `x-overflow=reject-publish`): a message leaves a level
//!   only once the next has it, so a broker that stops in the middle of a hop loses nothing
//!   (RabbitMQ 3.10 or later: earlier versions refuse a TTL on a quorum queue). Classic
//!   queues dead-letter at most once: with classic delay queues a `rabbitmqctl stop_app`
//!   with 200 delayed tasks lost one, once, in CI. A transient namespace
//!   ([`durable(false)`](AmqpOptions::durable)) has classic transient delay queues: none of
//!   it outlives the node anyway.
//! - **Never early.** Each level's TTL counts from when the message entered it, so the
//!   chain never delivers before the due time by the sender's clock. A worker that takes a
//!   task not yet due by its own clock (another host's clock, or a delay longer than the
//!   chain's ~31 days) sends it round the chain again with the rest, confirmed before the
//!   delivery is acknowledged; so delays have no upper bound. A message whose due time has
//!   passed when it is published goes straight to its queue.
//! - **Not redeliveries.** A message that arrives through the chain is a fresh delivery to
//!   its queue (RabbitMQ's `redelivered` flag is off; the `x-death` headers the hops add
//!   are not read), so the hops count neither towards
//!   [`max_redeliveries`](AmqpOptions::max_redeliveries) nor in
//!   [`Context::redelivered`](dingo_core::Context::redelivered).
//! - **Dead letters.** A message that arrived through the chain keeps the chain's routing
//!   key, by which RabbitMQ's own dead-lettering would route it (to no dead-letter queue):
//!   so dingo copies every such delivery, whatever its size, and dead-letters it itself,
//!   with its reason; one whose copy cannot be published is given back instead of rejected
//!   (it comes back counted as a redelivery, published again under its queue's name).
//! - A delayed message whose task queue was deleted while it waited reaches no queue at the
//!   exit: the quorum delay queues, dead-lettering at least once, keep it in level 0 (where
//!   [`AmqpBroker::delayed_len`] does not count it) and try again every few minutes until
//!   a queue takes it (3 minutes, seen on RabbitMQ 3.10); a transient namespace's classic
//!   ones drop it.
//! - [`AmqpBroker::delayed_len`] counts what waits in the chain, [`Stats::delayed`] what was
//!   sent into it.
//!
//! # Cancels
//!
//! A message cannot be taken out of the middle of a RabbitMQ queue, so a cancel is a record
//! every worker reads before it starts a task: [`Admin::cancel`](dingo_core::broker::Admin::cancel)
//! (what `App::cancel` and `Handle::cancel` call) publishes the call's task name, id and
//! `until` (headers `dingo-cancel-task`, `dingo-cancel-id`, `dingo-cancel-until`) into the
//! namespace's stream queue `NS.cancels`, and returns once RabbitMQ confirmed it. A stream
//! is read, not drained: each broker that consumes tasks has one consumer thread
//! (`dingo-amqp-cancels`) reading it from its first message, then live, into the set its
//! workers check before they start a task and that `ctx.is_cancelled()` reads
//! ([`Consumer::cancels`](dingo_core::broker::Consumer::cancels)).
//!
//! - **Workers that start later, or reconnect.** Before a subscription consumes — when it
//!   starts and on every new channel after a broken one — it publishes a marker of its own
//!   into the stream (confirmed) and waits until its consumer read it. A stream keeps the
//!   order in which RabbitMQ stored its messages, so every cancel confirmed before then is
//!   in the set before the first task arrives: a call cancelled while no worker ran, or
//!   while a worker was cut off, does not start. (The subscription's consumer waits up to
//!   twice the connect timeout for its marker, and tries again, with a `ReceiveFailed`
//!   event, if it does not come: workers get no tasks until it does.)
//! - **Running workers.** A cancel reaches the set of a live consumer as RabbitMQ delivers
//!   it: a few milliseconds (7–15 ms from the cancel call on one machine, in
//!   `integration/tests/amqp_admin.rs`); the cancel's own broker puts it in its set at once.
//!   A task delivered in that window may start; it then sees `ctx.is_cancelled()` turn true.
//!   If only the cancel consumer's channel breaks while the task consumers go on, cancels
//!   sent meanwhile reach the set once it has read on from where it stopped.
//! - **Bounded.** Each cancel lapses at its `until` (the app's `cancel_ttl`, a day by
//!   default) and is pruned from the set every second; the stream drops messages older than
//!   [`cancel_retention`](AmqpOptions::cancel_retention) (7 days), a 1 MiB segment at a
//!   time. A cancel lasting longer than that is honoured by workers that read it before it
//!   was dropped, not by later ones. Reading the stream from its start costs a new worker
//!   what the stream holds: small messages (headers only), tens of thousands a second.
//! - **Transient namespaces.** RabbitMQ's streams are always durable: a transient
//!   namespace's cancel stream outlives a restart of the node (harmless: its cancels still
//!   lapse). [`AmqpBroker::delete_topology`] deletes it.
//! - **Resource alarms.** A cancel and a marker are publishes: while RabbitMQ blocks
//!   publishing (a resource alarm), `cancel` fails after the connect timeout, and a
//!   subscription that starts or reconnects waits for the alarm to end before it consumes
//!   (with a `ReceiveFailed` event each time its wait runs out). Subscriptions already
//!   consuming go on.
//! - **RabbitMQ 3.10.** A stream just declared has no writer for a few milliseconds, and a
//!   message published then crashes the publishing channel and the whole connection
//!   (`INTERNAL_ERROR`). So declaring the stream waits until a consumer can attach, before
//!   anything is published into it. Several brokers declaring one new stream at once can
//!   still meet it (seen once in CI, six brokers starting together), so everything a broker
//!   does with the stream — declaring, publishing cancels and markers, reading — goes
//!   through a connection of its own, apart from its tasks' (a consuming broker holds two):
//!   the crash takes only that one, which reconnects, the reader reading on from where it
//!   stopped and subscriptions up to their markers again, so no cancel is missed; in a
//!   reader's first 10 s the event for it is an info, not a warning.
//!
//! # Dead letters
//!
//! [`Admin`](dingo_core::broker::Admin) works on `NS.dead.NAME`:
//!
//! - **Listing** (`dead_letters`) fetches the letters unacknowledged and gives them back in
//!   their places: oldest first, each with its reason (`x-dingo-reason`, or RabbitMQ's own
//!   for messages it dead-lettered), its time (`x-dingo-dead-at`, set when dingo
//!   dead-letters, in milliseconds; else the `x-death` record's, in seconds) and the call it
//!   holds (when its bytes decode). `dead_count` is the queue's message count (letters a
//!   listing or replay holds at that moment are not counted).
//! - **Replay** sends [`DeadLetter::replay_bytes`](dingo_core::DeadLetter::replay_bytes)
//!   (attempt 1, no due time, no expiry, same id) to the task queue as a fresh message —
//!   none of the dead letter's headers, so no redelivery count, and not marked redelivered —
//!   in AMQP transactions on a channel of its own: each copy is published and its letter
//!   acknowledged in one `tx.commit` per 100 letters. A replaying process killed half-way
//!   leaves each letter either replayed (and gone from the dead letters) or still dead,
//!   never both: RabbitMQ discards a transaction its client did not commit and gives the
//!   letters back (tested with 1,000 letters and a SIGKILL). Atomicity across the two
//!   queues holds against a client that dies, not against a node that crashes in the
//!   middle of a commit. The task queue is declared first (a copy published to no queue
//!   would be lost with its letter acknowledged). Letters not selected are fetched too, to
//!   read their ids, and given back in their places.
//! - **Purges**: `purge_dead` purges the queue (`Select::All`) or acknowledges the selected
//!   letters and gives back the others; `purge` purges a task queue (`queue.purge`), after
//!   waiting for the confirms of the task messages this broker sent before it (at-most-once
//!   messages have none: one sent just before may escape). Both return exact counts.
//!
//! # Retries
//!
//! The worker decides a retry; the broker publishes the next attempt (same name and id,
//! its attempt number one higher, due after its backoff: through the delay chain) and
//! acknowledges the delivery of the failed attempt only once RabbitMQ confirmed the next,
//! whichever broker the delivery came from. A refused or lost publish leaves the delivery
//! unacknowledged: it comes back (after its channel closes) and the same attempt runs again
//! — a crash never consumes an attempt, the attempt number lives in the message. The
//! window between the confirm and the acknowledgement is at least once: a worker killed
//! there leaves both the next attempt (queued) and the failed one (redelivered, and run
//! again as the same attempt), so an attempt may run twice; the caller keeps the first
//! final report.
//!
//! # The redelivery limit
//!
//! A task that crashes the process running it (an abort, the kernel's OOM killer) would
//! otherwise come back forever and take every worker down in turn. A task redelivered
//! [`max_redeliveries`](AmqpOptions::max_redeliveries) times (default 5, as on Redis) after
//! its worker stopped before finishing it is dead-lettered the next time, before it runs:
//! reason `redelivered N times: every worker that took it stopped before finishing it …` in
//! `x-dingo-reason` ([dead letters](#dead-letters)), a `DeadLettered` event, counted in
//! [`Stats::dead_lettered`], and its caller gets a failure of kind
//! [`WorkerLost`](dingo_core::TaskErrorKind::WorkerLost) (when reports travel through
//! RabbitMQ too).
//!
//! The count is dingo's, the same on classic and quorum queues: RabbitMQ's `redelivered`
//! flag says only that a message was delivered before, and a quorum queue's
//! `x-delivery-count` (RabbitMQ 3.10) counts every return — a reject with requeue, a closed
//! channel — so it cannot tell a crash from a give-back (nor is `x-delivery-limit` set: it
//! would dead-letter without telling the caller). A worker that receives a task marked
//! redelivered publishes it again to its queue with the count raised (header
//! `x-dingo-redelivered`), confirmed, then acknowledges the original; the copy runs when it
//! comes round, at the back of the queue. A crash at any point leaves the original to be
//! counted again: the count is never lost (at worst the task is there twice). Nothing dingo
//! gives back on purpose reaches the queue marked redelivered: a stopping pool cancels its
//! consumers first and hands back the tasks they delivered and no thread started the same
//! way, published again unmarked and uncounted (so does a busy pool, below). What does count
//! is everything RabbitMQ requeues: the tasks a dying process held, started or only
//! prefetched (RabbitMQ cannot tell them apart, nor can Redis's lease), and those of a
//! connection that broke. The normal path costs nothing: only deliveries marked redelivered
//! are looked at.
//!
//! # Prefetch and long tasks
//!
//! RabbitMQ hands each pool up to [`prefetch`](AmqpOptions::prefetch) (128) tasks ahead of
//! its threads; a deep prefetch is what makes short tasks fast, as each is acknowledged
//! only once its report is confirmed. Behind a long task, though, tasks prefetched by a pool
//! whose every thread is busy would wait for it while other worker processes sit idle
//! (Celery's `-Ofair` problem). So a pool whose threads all stay busy for
//! [`hand_back_after`](AmqpOptions::hand_back_after) (200 ms) while tasks wait in its
//! prefetch, and whose queues have other consumers, pauses: it cancels its consumers and
//! hands back what they had delivered (to the back of the queues, uncounted), until one of
//! its threads comes for a task again. While threads are free this costs nothing (the
//! consumer thread looks every 50 ms whether the workers still take tasks). The trade-off:
//! tasks handed back lose their place in the queue, and a pool whose every thread keeps
//! running tasks longer than `hand_back_after` hands back its prefetch at each of them; for
//! such workloads set `prefetch` to the number of threads, and nothing waits behind a long
//! task in the first place.
//!
//! # Long tasks and RabbitMQ's consumer timeout
//!
//! RabbitMQ closes a channel whose delivery stays unacknowledged longer than its
//! `consumer_timeout` (30 minutes by default). dingo acknowledges when the task's report is
//! confirmed, so a task running longer than that loses its channel: RabbitMQ requeues every
//! unacknowledged task of that channel, dingo consumes again on a new channel, and the long
//! task runs again (its first run's late report may still reach the caller) — and counts as
//! a redelivery, so after `max_redeliveries` such rounds it is dead-lettered. For tasks
//! longer than the timeout, raise `consumer_timeout` in `rabbitmq.conf` (or, from RabbitMQ
//! 3.12, per queue with a policy).
//!
//! # Options
//!
//! [`AmqpOptions`] documents every setting and its default. The URL's query sets the common
//! ones (see [`AmqpBroker::connect`]).
#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod broker;
mod conn;
mod options;
mod tls;
mod topology;

pub use broker::{AmqpBroker, Stats};
/// A dead letter, as [`Admin::dead_letters`](dingo_core::broker::Admin::dead_letters)
/// lists it (the type every broker uses).
pub use dingo_core::DeadLetter;
pub use options::AmqpOptions;

use dingo_core::app::{AppBuilder, BrokerScheme};

fn configure(url: &str, builder: AppBuilder) -> Result<AppBuilder, dingo_core::Error> {
    Ok(builder.broker(AmqpBroker::connect(url)?))
}

inventory::submit! { BrokerScheme { scheme: "amqp", configure } }
inventory::submit! { BrokerScheme { scheme: "amqps", configure } }
