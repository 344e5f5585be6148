//! What a Redis user needs to run dingo, checked when a broker connects: every command
//! dingo runs, on keys of the namespace, with the arguments it gives them. A user denied one
//! is refused at once with the command's name, rather than failing at first use — where an
//! at-most-once task would already be taken (a plain `RPOP`) and its report could never be
//! stored.
//!
//! One table, [`NEEDED`], is the check, the [`acl_rules`] a least-privilege user is given,
//! and (in a test) a list every command in the crate's sources must be on.

use dingo_core::{BrokerError, BrokerErrorKind};

use crate::keys;
use crate::scripts;

/// An argument of a command in [`NEEDED`].
#[derive(Clone, Copy)]
enum Arg {
    /// A key of a task's queue (`NS:{T}:…`).
    Queue,
    /// The set of declared tasks (`NS:tasks`).
    Tasks,
    /// A control list (`NS:ctl:…`).
    Control,
    /// A literal.
    Lit(&'static str),
}

use Arg::{Control, Lit, Queue, Tasks};

/// Every command dingo needs (outside scripts and inside them), named as ACL rules name
/// them, with arguments of the shape dingo uses. Not listed, because dingo does without
/// them (they are used when allowed): `HELLO` and `INFO` (the server's version: either
/// will do), `CLIENT SETNAME` (connections stay unnamed), `CLIENT INFO` and `CLIENT KILL`
/// (sends go as numbered scripts), `SORT` (fetches move tasks through Lua), `SCAN`
/// ([`purge_namespace`](crate::RedisBroker::purge_namespace), a tool, alone uses it) and
/// `ZCARD` ([`delayed_len`](crate::RedisBroker::delayed_len), for inspection).
const NEEDED: &[(&str, &[Arg])] = &[
    ("ping", &[]),
    ("echo", &[Lit("x")]),
    ("script|load", &[Lit("return 0")]),
    ("evalsha", &[Lit("0000000000000000000000000000000000000000"), Lit("1"), Queue]),
    ("multi", &[]),
    ("exec", &[]),
    ("time", &[]),
    ("blpop", &[Control, Queue, Lit("1")]),
    ("blmpop", &[Lit("1"), Lit("2"), Control, Queue, Lit("LEFT"), Lit("COUNT"), Lit("1")]),
    ("lpush", &[Queue, Lit("x")]),
    ("rpush", &[Queue, Lit("x")]),
    ("lpop", &[Queue, Lit("1")]),
    ("rpop", &[Queue, Lit("1")]),
    ("lmove", &[Queue, Queue, Lit("RIGHT"), Lit("LEFT")]),
    ("llen", &[Queue]),
    ("lrange", &[Queue, Lit("0"), Lit("1")]),
    ("ltrim", &[Queue, Lit("0"), Lit("1")]),
    ("lrem", &[Queue, Lit("1"), Lit("x")]),
    ("get", &[Queue]),
    ("set", &[Queue, Lit("x"), Lit("PX"), Lit("1"), Lit("GET")]),
    ("del", &[Queue]),
    ("unlink", &[Queue]),
    ("pexpire", &[Queue, Lit("1")]),
    ("zadd", &[Queue, Lit("1"), Lit("x")]),
    ("zrem", &[Queue, Lit("x")]),
    ("zscore", &[Queue, Lit("x")]),
    ("zrangebyscore", &[Queue, Lit("0"), Lit("1")]),
    ("sadd", &[Tasks, Lit("x")]),
    ("sismember", &[Tasks, Lit("x")]),
];

/// Commands dingo uses where the user may run them, and does without otherwise (see
/// [`NEEDED`]), in the order [`acl_rules`] grants them. `client|kill` and `sort` are left
/// out of the rules: they are in `@dangerous`.
const OPTIONAL: &[&str] = &["hello", "client|setname", "client|info"];

/// The ACL rules of a least-privilege Redis user for dingo on `namespace`: its keys only,
/// no pub/sub channels, and only the commands dingo runs, none of them in `@dangerous`
/// (`CLIENT KILL` and `SORT` speed sends and fetches up where allowed; without them every
/// guarantee holds, at some cost in Redis CPU).
///
/// Give them to a user in the server's ACL file (`user NAME on >PASSWORD RULES`) or with
/// `ACL SETUSER NAME on >PASSWORD RULES`. A namespace's glob characters (`*?[]\`) are
/// escaped; it must not hold whitespace (an ACL file could not hold the pattern). A URL
/// with a database other than 0 needs `+select` as well;
/// [`purge_namespace`](crate::RedisBroker::purge_namespace) needs `+scan`, and
/// [`delayed_len`](crate::RedisBroker::delayed_len) `+zcard`.
///
/// ```
/// assert_eq!(
///     dingo_redis::acl_rules("shop"),
///     "resetkeys ~shop:* resetchannels -@all +ping +echo +script|load +evalsha +multi +exec \
///      +time +blpop +blmpop +lpush +rpush +lpop +rpop +lmove +llen +lrange +ltrim +lrem +get \
///      +set +del +unlink +pexpire +zadd +zrem +zscore +zrangebyscore +sadd +sismember +hello \
///      +client|setname +client|info -@dangerous"
/// );
/// ```
pub fn acl_rules(namespace: &str) -> String {
    let mut pattern = String::with_capacity(namespace.len() + 2);
    for c in namespace.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    let mut rules = format!("resetkeys ~{pattern}:* resetchannels -@all");
    for command in NEEDED.iter().map(|(command, _)| *command).chain(OPTIONAL.iter().copied()) {
        rules.push_str(" +");
        rules.push_str(command);
    }
    rules.push_str(" -@dangerous");
    rules
}

/// Checks, on a connection of the broker's user, that it may run every command in
/// [`NEEDED`] on `namespace`'s keys: one script (`redis.acl_check_cmd`, Redis 7.0) that
/// changes nothing. A refusal names the commands.
/// `server` (`redis at URL`) begins the error's message.
pub(crate) fn check(conn: &mut redis::Connection, namespace: &str, server: &str) -> Result<(), BrokerError> {
    let queue = format!("{namespace}:{{dingo.access}}:probe");
    let tasks = keys::tasks(namespace);
    let control = keys::control(namespace, "dingo.access");
    let mut probe = scripts::PROBE.key(&queue);
    for (command, args) in NEEDED {
        let (name, sub) = command.split_once('|').map_or((*command, None), |(n, s)| (n, Some(s)));
        probe.arg(name).arg(args.len() + usize::from(sub.is_some()));
        if let Some(sub) = sub {
            probe.arg(sub);
        }
        for arg in *args {
            match arg {
                Queue => probe.arg(&queue),
                Tasks => probe.arg(&tasks),
                Control => probe.arg(&control),
                Lit(lit) => probe.arg(*lit),
            };
        }
    }
    let denied: Vec<usize> = probe.invoke(conn).map_err(|e| refusal(server, namespace, e))?;
    if denied.is_empty() {
        return Ok(());
    }
    let names: Vec<String> =
        denied.iter().filter_map(|k| NEEDED.get(k.wrapping_sub(1))).map(|(command, _)| display(command)).collect();
    Err(BrokerError::new(
        BrokerErrorKind::Config,
        format!(
            "{server}: the user may not run {} on the keys of namespace `{namespace}`, which dingo needs: grant {} \
             (see `dingo::redis::acl_rules`)",
            names.join(", "),
            if names.len() == 1 { "it" } else { "them" },
        ),
    ))
}

/// What a refused probe means: a command dingo needs before it can check the others
/// (`SCRIPT LOAD`, `EVALSHA`) is denied, or the namespace's keys are; anything else is
/// passed on as it came.
fn refusal(server: &str, namespace: &str, e: redis::RedisError) -> BrokerError {
    if e.code() != Some("NOPERM") {
        return crate::conn::broker_error("checking the redis user's permissions failed", e);
    }
    let detail = e.detail().unwrap_or("");
    // "this user has no permissions to run the 'evalsha' command"
    let message = match detail.split('\'').nth(1) {
        Some(command) if detail.contains("to run") => {
            format!(
                "{server}: the user may not run {}, which dingo needs: grant it (see `dingo::redis::acl_rules`)",
                display(command)
            )
        }
        _ => format!(
            "{server}: the user may not use the keys of namespace `{namespace}` ({detail}): grant `~{namespace}:*` \
             (see `dingo::redis::acl_rules`)"
        ),
    };
    BrokerError::with_source(BrokerErrorKind::Config, message, e)
}

/// `script|load` → `SCRIPT LOAD`.
fn display(command: &str) -> String {
    command.replace('|', " ").to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command in the crate's sources, with its subcommand for `CLIENT` and `SCRIPT`.
    fn used() -> Vec<String> {
        let sources = [
            include_str!("broker.rs"),
            include_str!("conn.rs"),
            include_str!("scripts.rs"),
            include_str!("scripts/resp.rs"),
            include_str!("scripts/sequence.rs"),
            include_str!("lua/includes/bury.lua"),
            include_str!("lua/includes/seen.lua"),
            include_str!("lua/complete.lua"),
            include_str!("lua/dead.lua"),
            include_str!("lua/delay.lua"),
            include_str!("lua/fetch.lua"),
            include_str!("lua/give_back.lua"),
            include_str!("lua/probe.lua"),
            include_str!("lua/promote.lua"),
            include_str!("lua/push.lua"),
            include_str!("lua/reap.lua"),
            include_str!("lua/renew.lua"),
            include_str!("lua/cancel.lua"),
            include_str!("lua/cancels.lua"),
            include_str!("lua/unbury.lua"),
            include_str!("lua/retire.lua"),
            include_str!("lua/trim.lua"),
            include_str!("broker/completer.rs"),
            include_str!("broker/fetcher.rs"),
            include_str!("broker/flusher.rs"),
            include_str!("broker/keeper.rs"),
            include_str!("broker/listener.rs"),
            include_str!("broker/promoter.rs"),
            include_str!("broker/settle.rs"),
            include_str!("broker/writer.rs"),
        ];
        let mut used = Vec::new();
        for source in sources {
            for opening in ["redis.call('", "redis.pcall('", "Call::command(\"", "cmd(\""] {
                for (at, _) in source.match_indices(opening) {
                    let rest = &source[at + opening.len()..];
                    let name: String = rest.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
                    if name.is_empty() || name.chars().any(|c| c.is_ascii_lowercase()) {
                        continue;
                    }
                    let mut command = name.to_lowercase();
                    let after = &rest[name.len()..];
                    if let Some(sub) = after.strip_prefix("\").arg(\"") {
                        let sub: String = sub.chars().take_while(|c| c.is_ascii_alphabetic()).collect();
                        if matches!(command.as_str(), "client" | "script") {
                            command = format!("{command}|{}", sub.to_lowercase());
                        }
                    }
                    used.push(command);
                }
            }
        }
        used.sort();
        used.dedup();
        used
    }

    #[test]
    fn every_command_in_the_sources_is_checked_or_optional() {
        let used = used();
        assert!(used.len() > 20, "the scan found the commands: {used:?}");
        // Used where allowed, done without otherwise (see `NEEDED`).
        let without = ["hello", "info", "client|setname", "client|info", "client", "sort", "scan", "zcard"];
        for command in &used {
            let checked = NEEDED.iter().any(|(needed, _)| needed == command);
            assert!(checked || without.contains(&command.as_str()), "`{command}` is used but not checked");
        }
        // `client` alone is the fencing's `CLIENT KILL` (its subcommand is not a literal).
        assert!(used.contains(&"client".to_owned()) && used.contains(&"sort".to_owned()));
    }

    #[test]
    fn the_crate_docs_show_the_rules() {
        let line = format!("//! user shop-app on >PASSWORD {}\n", acl_rules("shop"));
        assert!(include_str!("lib.rs").contains(&line), "the crate docs should show {line}");
    }

    #[test]
    fn rules_escape_the_namespace_globs() {
        let rules = acl_rules(r"a*b?[c]\d");
        assert!(rules.starts_with(r"resetkeys ~a\*b\?\[c\]\\d:* resetchannels -@all +ping "), "{rules}");
        assert!(rules.ends_with(" +client|info -@dangerous"), "{rules}");
    }

    #[test]
    fn refused_commands_are_named_as_users_type_them() {
        assert_eq!(display("script|load"), "SCRIPT LOAD");
        assert_eq!(display("evalsha"), "EVALSHA");
    }
}
