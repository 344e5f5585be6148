//! The service over real HTTP: its router on a tokio runtime on `127.0.0.1:0`, an app on
//! Redis in a namespace of its own per test, a blocking client (`ureq`) on the test's
//! threads. Skipped (loudly) without Redis, failed instead with `DINGO_REQUIRE_SERVICES=1`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dingo::App;
use dingo_axum_example::Service;
use dingo_test_support::redis::Redis;
use serde_json::{Value, json};

/// The service's router on its own runtime, the app it calls, its Redis namespace.
struct Server {
    service: Service,
    addr: SocketAddr,
    agent: ureq::Agent,
    runtime: Option<tokio::runtime::Runtime>,
    app: App,
    // Dropped last: deletes the namespace.
    _redis: Redis,
}

impl Server {
    /// `threads` worker threads per task, calls answered within `deadline`; `None` to skip.
    fn start(threads: usize, deadline: Duration) -> Option<Server> {
        let redis = Redis::setup()?;
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let app = App::builder().broker(redis.broker()).tokio_runtime(runtime.handle().clone()).build().expect("app");
        dingo_axum_example::tasks::serve(&app, threads).expect("workers");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("address");
        let service = Service::new(app.clone()).deadline(deadline);
        runtime.spawn(axum::serve(listener, service.router()).into_future());
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build();
        Some(Server { service, addr, agent: config.into(), runtime: Some(runtime), app, _redis: redis })
    }

    /// `GET path`: the status and the body as JSON.
    fn get(&self, path: &str) -> (u16, Value) {
        let mut reply = self.agent.get(format!("http://{}{path}", self.addr)).call().expect("request");
        let status = reply.status().as_u16();
        let body = reply.body_mut().read_to_string().expect("body");
        let body = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body:?}"));
        (status, body)
    }

    /// `GET path` of an event stream: the reply, after checking its status and type.
    fn stream(&self, path: &str) -> Events {
        let reply = self.agent.get(format!("http://{}{path}", self.addr)).call().expect("request");
        assert_eq!(reply.status().as_u16(), 200, "GET {path}");
        let content_type = reply.headers().get("content-type").and_then(|v| v.to_str().ok());
        assert_eq!(content_type, Some("text/event-stream"), "GET {path}");
        Events { lines: BufReader::new(reply.into_body().into_reader()) }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.app.close();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Server-sent events, read as they come: `(event, data as JSON)`.
struct Events {
    lines: BufReader<ureq::BodyReader<'static>>,
}

impl Iterator for Events {
    type Item = (String, Value);

    fn next(&mut self) -> Option<(String, Value)> {
        let (mut event, mut data) = (String::from("message"), None::<String>);
        loop {
            let mut line = String::new();
            if self.lines.read_line(&mut line).expect("read the stream") == 0 {
                assert!(data.is_none(), "the stream ended inside an event");
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if let Some(data) = data.take() {
                    let value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{event}: {e}: {data:?}"));
                    return Some((event, value));
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment (keep-alive)
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_owned(),
                "data" => data.get_or_insert_with(String::new).push_str(value),
                other => panic!("unexpected field {other:?} in {line:?}"),
            }
        }
    }
}

const DEADLINE: Duration = Duration::from_secs(20);

#[test]
fn results_are_exact() {
    let Some(server) = Server::start(2, DEADLINE) else { return };
    for (a, b) in [(2i64, 3i64), (-7, 7), (i64::MAX - 1, 1), (i64::MIN, 0), (-40, 2)] {
        assert_eq!(server.get(&format!("/add?a={a}&b={b}")), (200, json!({ "sum": a + b })), "{a} + {b}");
    }
    assert_eq!(server.get("/squares?n=10"), (200, json!({ "n": 10, "sum": 385 })));
    assert_eq!(server.get("/squares?n=0"), (200, json!({ "n": 0, "sum": 0 })));
}

#[test]
fn fifty_concurrent_requests_are_all_exact() {
    let Some(server) = Server::start(4, DEADLINE) else { return };
    let started = Instant::now();
    std::thread::scope(|scope| {
        let requests: Vec<_> = (0..50i64)
            .map(|i| {
                let server = &server;
                scope.spawn(move || (i, server.get(&format!("/add?a={i}&b={}", i * 1000))))
            })
            .collect();
        for request in requests {
            let (i, reply) = request.join().expect("request thread");
            assert_eq!(reply, (200, json!({ "sum": i * 1001 })), "request {i}");
        }
    });
    println!("50 concurrent requests answered in {:?}", started.elapsed());
}

#[test]
fn a_task_failure_is_a_422_with_its_message() {
    let Some(server) = Server::start(1, DEADLINE) else { return };
    let expected = json!({ "error": "9223372036854775807 + 1 overflows a 64-bit integer", "kind": "failed" });
    assert_eq!(server.get(&format!("/add?a={}&b=1", i64::MAX)), (422, expected));
    let expected = json!({ "error": "n = 1001 is more than 1000 steps", "kind": "failed" });
    assert_eq!(server.get("/squares?n=1001"), (422, expected));
    // The service goes on.
    assert_eq!(server.get("/add?a=1&b=1"), (200, json!({ "sum": 2 })));
}

#[test]
fn progress_streams_in_order_and_ends_with_the_result() {
    let Some(server) = Server::start(1, DEADLINE) else { return };
    let events: Vec<_> = server.stream("/squares/stream?n=5&pause_ms=20").collect();
    let mut expected = vec![("sent".to_owned(), json!({})), ("started".to_owned(), json!({}))];
    expected.extend((1..=5).map(|done| ("progress".to_owned(), json!({ "done": done, "of": 5 }))));
    expected.push(("result".to_owned(), json!({ "n": 5, "sum": 55 })));
    assert_eq!(events, expected);
}

#[test]
fn a_failure_ends_the_stream() {
    let Some(server) = Server::start(1, DEADLINE) else { return };
    let events: Vec<_> = server.stream("/squares/stream?n=1001").collect();
    let failure = json!({ "error": "n = 1001 is more than 1000 steps", "kind": "failed" });
    let expected = [("sent", json!({})), ("started", json!({})), ("failure", failure)];
    assert_eq!(events, expected.map(|(event, data)| (event.to_owned(), data)));
}

/// With one worker thread, a call that outlived its deadline must have been cancelled for
/// the next one to run in time.
#[test]
fn past_its_deadline_a_call_is_a_504_and_is_cancelled() {
    let deadline = Duration::from_secs(2);
    let Some(server) = Server::start(1, deadline) else { return };
    let started = Instant::now();
    let expected = json!({ "error": "no result within 2s: the call was cancelled", "kind": "timeout" });
    // 200 steps of 50 ms: 10 s of work.
    assert_eq!(server.get("/squares?n=200&pause_ms=50"), (504, expected));
    assert!(started.elapsed() >= deadline);
    assert_eq!(server.get("/squares?n=2"), (200, json!({ "n": 2, "sum": 5 })), "the first call still runs");
    println!("504, then the next call answered, in {:?}", started.elapsed());
}

/// A client that leaves an event stream cancels its call (same check as above).
#[test]
fn leaving_a_stream_cancels_its_call() {
    let Some(server) = Server::start(1, Duration::from_secs(2)) else { return };
    let mut events = server.stream("/squares/stream?n=200&pause_ms=50");
    let progress = events.find(|(event, _)| event == "progress");
    assert_eq!(progress, Some(("progress".to_owned(), json!({ "done": 1, "of": 200 }))));
    drop(events); // closes the connection
    assert_eq!(server.get("/squares?n=2"), (200, json!({ "n": 2, "sum": 5 })), "the streamed call still runs");
}

/// Stopping the service ends its open streams, each with a `shutdown` failure, and cancels
/// their calls (same check as above); new streams are refused, awaited calls go on.
#[test]
fn stopping_ends_the_streams_and_cancels_their_calls() {
    let Some(server) = Server::start(1, Duration::from_secs(2)) else { return };
    let mut events = server.stream("/squares/stream?n=200&pause_ms=50");
    assert_eq!(events.find(|(event, _)| event == "progress").map(|(event, _)| event).as_deref(), Some("progress"));
    server.service.stop();
    let rest: Vec<_> = events.collect();
    let shutdown = json!({ "error": "the service is stopping: the call was cancelled", "kind": "shutdown" });
    assert_eq!(rest.last(), Some(&("failure".to_owned(), shutdown)), "{rest:?}");
    assert!(rest[..rest.len() - 1].iter().all(|(event, _)| event == "progress"), "{rest:?}");
    let refused = json!({ "error": "the service is stopping", "kind": "shutdown" });
    assert_eq!(server.get("/squares/stream?n=2"), (503, refused));
    assert_eq!(server.get("/squares?n=2"), (200, json!({ "n": 2, "sum": 5 })), "the streamed call still runs");
}
