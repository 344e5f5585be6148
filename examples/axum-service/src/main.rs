//! The async web service of `dingo-axum-example`: its routes (see the crate docs) on an app
//! on Redis, with the worker threads in the same process.
//!
//! ```text
//! cargo run -p dingo-axum-example -- [--redis URL] [--namespace NS] [--listen ADDR]
//!     [--threads N] [--deadline SECS] [--serve-for SECS] [--self-test]
//!
//! curl 'http://127.0.0.1:3000/add?a=2&b=3'                           # {"sum":5}
//! curl -i 'http://127.0.0.1:3000/add?a=9223372036854775807&b=1'      # 422 {"error":"… overflows …","kind":"failed"}
//! curl 'http://127.0.0.1:3000/squares?n=10'                          # {"n":10,"sum":385}
//! curl -N 'http://127.0.0.1:3000/squares/stream?n=10&pause_ms=300'   # event: progress / data: {"done":1,"of":10} …
//! ```
//!
//! The server is `--redis` or `DINGO_REDIS_URL` (default `redis://127.0.0.1:6379`), the key
//! prefix `--namespace` or `DINGO_NAMESPACE` (default `dingo-axum-example`); a server not up
//! yet is waited for `DINGO_CONNECT_RETRY_S` seconds (default 30). It listens on `--listen`
//! (default `127.0.0.1:3000`, port 0 for any) until Ctrl-C, or for `--serve-for` seconds;
//! `--self-test` (what CI runs; on any free port unless `--listen` says) sends one request
//! to each route, prints the replies, checks them and stops. Stopping is graceful: open
//! event streams end with a `shutdown` failure (their calls cancelled), awaited calls are
//! answered (within their deadline), then the app lets running tasks finish.
//!
//! Caller and worker in two processes: run this program with `--threads 0` (it only calls)
//! and, on the same server and namespace, any program that links this crate and serves its
//! tasks — `dingo_axum_example::tasks::serve(&app, 4)` on its app, then waits until told to
//! stop and closes the app (as `examples/redis_worker.rs` does). Both sides share the
//! crate's task definitions, so the names and signatures agree.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use dingo::App;
use dingo::error::MainError;
use dingo::redis::{RedisBroker, RedisOptions};
use dingo_axum_example::Service;

/// How long past the deadline the stopping server waits for awaited calls.
const GRACE: Duration = Duration::from_secs(5);

struct Args {
    redis: String,
    namespace: String,
    listen: Option<String>,
    threads: usize,
    deadline: Duration,
    serve_for: Option<Duration>,
    self_test: bool,
}

impl Args {
    fn parse() -> Result<Args, MainError> {
        let env_or = |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.to_owned());
        let mut args = Args {
            redis: env_or("DINGO_REDIS_URL", "redis://127.0.0.1:6379"),
            namespace: env_or("DINGO_NAMESPACE", "dingo-axum-example"),
            listen: None,
            threads: 4,
            deadline: Duration::from_secs(30),
            serve_for: None,
            self_test: false,
        };
        let mut flags = std::env::args().skip(1);
        while let Some(flag) = flags.next() {
            if flag == "--self-test" {
                args.self_test = true;
                continue;
            }
            let value = flags.next().ok_or(format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--redis" => args.redis = value,
                "--namespace" => args.namespace = value,
                "--listen" => args.listen = Some(value),
                "--threads" => args.threads = value.parse()?,
                "--deadline" => args.deadline = Duration::from_secs_f64(value.parse()?),
                "--serve-for" => args.serve_for = Some(Duration::from_secs_f64(value.parse()?)),
                other => return Err(format!("unknown flag {other}").into()),
            }
        }
        Ok(args)
    }
}

fn main() -> Result<(), MainError> {
    let args = Args::parse()?;
    let patience = std::env::var("DINGO_CONNECT_RETRY_S").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let options = RedisOptions::new().namespace(&args.namespace).connect_retry(Duration::from_secs(patience));
    eprintln!("connecting to {} (namespace {})", dingo::broker::support::redact_url(&args.redis), args.namespace);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // The async tasks run on the server's runtime (they sleep on tokio's timer).
    let broker = RedisBroker::connect_with(&args.redis, options)?;
    let app = App::builder().broker(broker).tokio_runtime(runtime.handle().clone()).build()?;
    if args.threads > 0 {
        dingo_axum_example::tasks::serve(&app, args.threads)?;
    }

    let served = runtime.block_on(serve(app.clone(), &args));
    // Blocking, so outside the runtime's tasks, but before the runtime goes: the running
    // tasks (async ones on the runtime) finish and report first.
    app.close()?;
    // Cancels of calls whose requests went away run on the blocking pool: let them finish.
    runtime.shutdown_timeout(Duration::from_secs(5));
    served
}

/// Serves the routes until Ctrl-C, `--serve-for` or the end of `--self-test`.
async fn serve(app: App, args: &Args) -> Result<(), MainError> {
    // A self-test takes any free port unless told otherwise.
    let listen = args.listen.as_deref().unwrap_or(if args.self_test { "127.0.0.1:0" } else { "127.0.0.1:3000" });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr} ({} worker thread(s) per task)", args.threads);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = Service::new(app).deadline(args.deadline);
    let server = axum::serve(listener, service.router()).with_graceful_shutdown(async {
        let _ = stopped.await;
    });
    let mut server = tokio::spawn(server.into_future());

    let outcome = if args.self_test {
        tokio::task::spawn_blocking(move || self_test(addr)).await?
    } else {
        let serve_for = async {
            match args.serve_for {
                Some(time) => tokio::time::sleep(time).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            signalled = tokio::signal::ctrl_c() => signalled.map_err(MainError::from),
            () = serve_for => Ok(()),
            served = &mut server => return Ok(served??),
        }
    };

    println!("stopping");
    // Event streams end now (they may last as long as their call); awaited calls are
    // answered within the deadline.
    service.stop();
    let _ = stop.send(());
    match tokio::time::timeout(args.deadline + GRACE, &mut server).await {
        Ok(served) => served??,
        // Their connections are dropped with the runtime.
        Err(_) => println!("requests still open after {:?}: dropped", args.deadline + GRACE),
    }
    outcome
}

/// One request to each route, with a plain HTTP/1.0 client (the body ends with the
/// connection: no chunked encoding to undo); each reply printed and checked.
fn self_test(addr: SocketAddr) -> Result<(), MainError> {
    let stream = "event: sent\ndata: {}\n\nevent: started\ndata: {}\n\n\
                  event: progress\ndata: {\"done\":1,\"of\":3}\n\n\
                  event: progress\ndata: {\"done\":2,\"of\":3}\n\n\
                  event: progress\ndata: {\"done\":3,\"of\":3}\n\n\
                  event: result\ndata: {\"n\":3,\"sum\":14}\n\n";
    let overflow = r#"{"error":"9223372036854775807 + 1 overflows a 64-bit integer","kind":"failed"}"#;
    let checks = [
        ("/add?a=2&b=3", 200, r#"{"sum":5}"#),
        ("/add?a=9223372036854775807&b=1", 422, overflow),
        ("/squares?n=3", 200, r#"{"n":3,"sum":14}"#),
        ("/squares/stream?n=3&pause_ms=50", 200, stream),
    ];
    for (path, status, body) in checks {
        let (got_status, got_body) = get(addr, path)?;
        println!("GET {path} -> {got_status}\n{}", got_body.trim_end());
        if (got_status, got_body.as_str()) != (status, body) {
            return Err(format!("GET {path}: expected {status} with {body:?}").into());
        }
    }
    println!("self-test passed");
    Ok(())
}

fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), MainError> {
    let mut connection = TcpStream::connect(addr)?;
    connection.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(connection, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reply = String::new();
    connection.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").ok_or("a reply without a blank line after its head")?;
    let status = head.split(' ').nth(1).ok_or("a reply without a status")?.parse()?;
    Ok((status, body.to_owned()))
}
