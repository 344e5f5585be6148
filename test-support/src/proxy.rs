//! A loopback TCP proxy for fault injection: put it between a client and a server, then cut
//! the connections, refuse new ones for a while, or drop bytes on open connections, as a
//! flaky network, a restarting server or a network partition would.
//!
//! ```no_run
//! use dingo_test_support::proxy::Proxy;
//!
//! let proxy = Proxy::start("127.0.0.1:6379".parse().unwrap()).unwrap();
//! let url = format!("redis://127.0.0.1:{}", proxy.port());
//! // … connect clients to `url`, then:
//! proxy.cut(); // every open connection dropped, new ones accepted
//! proxy.pause(); // an outage: connections dropped and new ones refused …
//! proxy.resume(); // … until now
//! proxy.partition(); // connections stay open, but nothing gets through …
//! proxy.resume(); // … until now (the connections that lost bytes are dropped)
//! proxy.hold(); // what clients send on open connections is held back …
//! proxy.release(); // … and delivered late, even if the client gave up meanwhile
//! ```
//!
//! Each accepted connection gets its own upstream connection and two pump threads (one per
//! direction); bytes in flight when a connection is dropped are lost, as on a real network.
//! Every thread is named and joined: by [`cut`](Proxy::cut) for the pumps, by `Drop` for all.

use dingo::broker::kit::lock;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the proxy waits for the upstream server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running proxy; stopped (every connection dropped, every thread joined) on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    stopping: AtomicBool,
    paused: AtomicBool,
    /// Bytes are dropped both ways.
    partitioned: AtomicBool,
    /// Bytes from the server are dropped.
    muted: AtomicBool,
    accepted: AtomicU64,
    refused: AtomicU64,
    links: Mutex<Vec<Link>>,
}

/// One proxied connection: both sockets (to shut them down) and its two pump threads.
struct Link {
    client: TcpStream,
    server: TcpStream,
    pumps: Vec<JoinHandle<()>>,
    /// Some bytes were dropped (partition, mute): the connection cannot go on after a resume.
    damaged: Arc<AtomicBool>,
    /// Bytes from the client are kept, not forwarded, until released (see [`Proxy::hold`]).
    held: Arc<AtomicBool>,
}

impl Link {
    fn shut(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }

    fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::SeqCst)
    }

    fn is_finished(&self) -> bool {
        self.pumps.iter().all(JoinHandle::is_finished)
    }

    fn join(self) {
        for pump in self.pumps {
            let _ = pump.join();
        }
    }
}

impl Proxy {
    /// Starts a proxy to `upstream`, listening on `127.0.0.1` on a free port.
    pub fn start(upstream: SocketAddr) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream,
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            partitioned: AtomicBool::new(false),
            muted: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            links: Mutex::new(Vec::new()),
        });
        let accepting = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name(format!("proxy-accept-{}", addr.port()))
            .spawn(move || accept_loop(&listener, &accepting))?;
        Ok(Proxy { addr, shared, acceptor: Some(acceptor) })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to (on `127.0.0.1`), for building URLs.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Drops every open connection, both ways (bytes in flight are lost); new connections
    /// are still accepted. Returns, once their threads have finished, how many connections
    /// were open.
    pub fn cut(&self) -> usize {
        let links = std::mem::take(&mut *lock(&self.shared.links));
        drop_links(links)
    }

    /// Starts an outage: drops every open connection and refuses new ones (accepted and
    /// closed at once, so clients see the connection fail) until [`resume`](Proxy::resume).
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// Starts a network partition: open connections stay open but every byte sent either
    /// way is dropped (requests never reach the server, replies never reach the client);
    /// new connections are refused. Clients notice only by their own timeouts.
    pub fn partition(&self) {
        self.shared.partitioned.store(true, Ordering::SeqCst);
    }

    /// Starts dropping every byte the server sends, on open and new connections: requests
    /// reach the server and run, their replies are lost on the way back.
    pub fn mute(&self) {
        self.shared.muted.store(true, Ordering::SeqCst);
    }

    /// Holds back what clients send on the connections open now: their bytes are kept, not
    /// forwarded, until [`release`](Proxy::release) — and then delivered even if the client
    /// has closed its end meanwhile, as a kernel goes on sending what a closed socket had
    /// written (a command that timed out on a client can still reach the server, late).
    /// New connections are not held.
    pub fn hold(&self) {
        for link in lock(&self.shared.links).iter() {
            link.held.store(true, Ordering::SeqCst);
        }
    }

    /// Delivers what [`hold`](Proxy::hold) kept, and forwards again.
    pub fn release(&self) {
        for link in lock(&self.shared.links).iter() {
            link.held.store(false, Ordering::SeqCst);
        }
    }

    /// Ends a [`pause`](Proxy::pause), [`partition`](Proxy::partition) or
    /// [`mute`](Proxy::mute): new connections are forwarded again, and the connections that
    /// lost bytes are dropped (their streams are broken; a real client would have timed out).
    pub fn resume(&self) {
        let damaged = {
            let mut links = lock(&self.shared.links);
            self.shared.paused.store(false, Ordering::SeqCst);
            self.shared.partitioned.store(false, Ordering::SeqCst);
            self.shared.muted.store(false, Ordering::SeqCst);
            let (damaged, intact) = std::mem::take(&mut *links).into_iter().partition(Link::is_damaged);
            *links = intact;
            damaged
        };
        drop_links(damaged);
    }

    /// Whether the proxy is paused.
    pub fn is_paused(&self) -> bool {
        self.shared.paused.load(Ordering::SeqCst)
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections refused so far (while paused, or when the server did not answer).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.shared.links).iter().filter(|link| !link.is_finished()).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // The acceptor blocks in `accept`: a connection of our own wakes it to see the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.cut();
    }
}

/// Shuts the connections down and joins their threads; how many were still open.
fn drop_links(links: Vec<Link>) -> usize {
    let count = links.iter().filter(|link| !link.is_finished()).count();
    for link in &links {
        link.held.store(false, Ordering::SeqCst);
        link.shut();
    }
    for link in links {
        link.join();
    }
    count
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next = 0u64;
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if shared.paused.load(Ordering::SeqCst) || shared.partitioned.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(&shared.upstream, CONNECT_TIMEOUT) else {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        next += 1;
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        // Under the lock, so `cut` and `open` see the connection as soon as bytes can flow.
        let mut links = lock(&shared.links);
        if let Ok(link) = link(shared, client, server, next) {
            // A pause that began while this connection was being set up must drop it too.
            if shared.paused.load(Ordering::SeqCst) || shared.stopping.load(Ordering::SeqCst) {
                link.shut();
            }
            links.retain(|link| !link.is_finished());
            links.push(link);
        }
    }
}

/// Starts the two pumps of one connection.
fn link(shared: &Arc<Shared>, client: TcpStream, server: TcpStream, n: u64) -> io::Result<Link> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let damaged = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicBool::new(false));
    let up = Pump { shared: shared.clone(), damaged: damaged.clone(), downstream: false, held: Some(held.clone()) };
    let up = up.spawn(format!("proxy-up-{n}"), client.try_clone()?, server.try_clone()?)?;
    let down = Pump { shared: shared.clone(), damaged: damaged.clone(), downstream: true, held: None };
    let down = match down.spawn(format!("proxy-down-{n}"), server.try_clone()?, client.try_clone()?) {
        Ok(down) => down,
        Err(e) => {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            let _ = up.join();
            return Err(e);
        }
    };
    Ok(Link { client, server, pumps: vec![up, down], damaged, held })
}

/// One direction of a connection.
struct Pump {
    shared: Arc<Shared>,
    damaged: Arc<AtomicBool>,
    /// Server to client.
    downstream: bool,
    /// Client to server: whether the client's bytes are held back (see [`Proxy::hold`]).
    held: Option<Arc<AtomicBool>>,
}

impl Pump {
    /// Copies `from` to `to` until either side ends, then closes both (a connection half
    /// gone is a connection gone). Bytes that a partition or mute drops are read and thrown
    /// away, so the sender never blocks.
    fn spawn(self, name: String, mut from: TcpStream, mut to: TcpStream) -> io::Result<JoinHandle<()>> {
        if self.held.is_some() {
            // Wakes up now and then to deliver what a release freed.
            from.set_read_timeout(Some(Duration::from_millis(10)))?;
        }
        std::thread::Builder::new().name(name).spawn(move || {
            let mut buffer = [0u8; 16 * 1024];
            let mut kept = Vec::new();
            loop {
                match from.read(&mut buffer) {
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                        if !kept.is_empty() && !self.holds() && to.write_all(&std::mem::take(&mut kept)).is_err() {
                            break;
                        }
                    }
                    Ok(0) | Err(_) => break,
                    Ok(_) if self.drops() => self.damaged.store(true, Ordering::SeqCst),
                    Ok(n) if self.holds() => kept.extend_from_slice(&buffer[..n]),
                    Ok(n) => {
                        if to.write_all(&std::mem::take(&mut kept)).is_err() || to.write_all(&buffer[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            if !kept.is_empty() {
                // The client is gone; what it sent still arrives, once released.
                while self.holds() && !self.shared.stopping.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if to.write_all(&kept).is_ok() {
                    std::thread::sleep(Duration::from_millis(200)); // time for the server to read it
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        })
    }

    fn holds(&self) -> bool {
        self.held.as_ref().is_some_and(|held| held.load(Ordering::SeqCst))
    }

    fn drops(&self) -> bool {
        self.shared.partitioned.load(Ordering::SeqCst) || (self.downstream && self.shared.muted.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port, serving until the test process ends.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let _ = std::thread::Builder::new().name("echo".into()).spawn(move || {
                        let mut stream = stream;
                        let mut buffer = [0u8; 1024];
                        while let Ok(n) = stream.read(&mut buffer) {
                            if n == 0 || stream.write_all(&buffer[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            })
            .expect("spawn");
        addr
    }

    fn client(proxy: &Proxy) -> TcpStream {
        let stream = TcpStream::connect(proxy.addr()).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        stream
    }

    /// Sends `text` and reads its echo (`None` if the connection is gone).
    fn echo(stream: &mut TcpStream, text: &[u8]) -> Option<Vec<u8>> {
        stream.write_all(text).ok()?;
        let mut got = vec![0u8; text.len()];
        stream.read_exact(&mut got).ok()?;
        Some(got)
    }

    /// Reads until the connection ends: `true` if it did (EOF or reset) within the timeout.
    fn is_closed(stream: &mut TcpStream) -> bool {
        let mut buffer = [0u8; 16];
        match stream.read(&mut buffer) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut),
        }
    }

    #[test]
    fn forwards_both_ways() {
        let proxy = Proxy::start(echo_server()).expect("start");
        let mut a = client(&proxy);
        let mut b = client(&proxy);
        assert_eq!(echo(&mut a, b"hello").as_deref(), Some(&b"hello"[..]));
        assert_eq!(echo(&mut b, b"world").as_deref(), Some(&b"world"[..]));
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        assert_eq!(echo(&mut a, &big), Some(big));
        assert_eq!(proxy.accepted(), 2);
        assert_eq!(proxy.open(), 2);
    }

    #[test]
    fn cut_drops_open_connections_and_keeps_accepting() {
        let proxy = Proxy::start(echo_server()).expect("start");
        let mut a = client(&proxy);
        assert!(echo(&mut a, b"1").is_some());
        assert_eq!(proxy.cut(), 1);
        assert!(is_closed(&mut a), "the cut connection must end");
        assert_eq!(proxy.open(), 0);
        let mut b = client(&proxy);
        assert_eq!(echo(&mut b, b"again").as_deref(), Some(&b"again"[..]));
        assert_eq!(proxy.accepted(), 2);
        assert_eq!(proxy.refused(), 0);
    }

    #[test]
    fn pause_refuses_until_resumed() {
        let proxy = Proxy::start(echo_server()).expect("start");
        let mut a = client(&proxy);
        assert!(echo(&mut a, b"1").is_some());
        proxy.pause();
        assert!(proxy.is_paused());
        assert!(is_closed(&mut a), "an open connection ends when the proxy pauses");
        let mut refused = client(&proxy);
        assert!(is_closed(&mut refused), "a new connection is refused while paused");
        assert_eq!(proxy.refused(), 1);
        proxy.resume();
        let mut b = client(&proxy);
        assert_eq!(echo(&mut b, b"back").as_deref(), Some(&b"back"[..]));
        assert_eq!(proxy.accepted(), 2);
    }

    #[test]
    fn partition_drops_bytes_both_ways_until_resumed() {
        let proxy = Proxy::start(echo_server()).expect("start");
        let mut a = client(&proxy);
        assert!(echo(&mut a, b"1").is_some());
        a.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        proxy.partition();
        a.write_all(b"lost").expect("the connection stays open");
        let mut buffer = [0u8; 4];
        let err = a.read(&mut buffer).expect_err("nothing comes back");
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err:?}");
        let mut refused = client(&proxy);
        assert!(is_closed(&mut refused), "no new connection during a partition");
        proxy.resume();
        a.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        assert!(is_closed(&mut a), "a connection that lost bytes is dropped on resume");
        let mut b = client(&proxy);
        assert_eq!(echo(&mut b, b"healed").as_deref(), Some(&b"healed"[..]));
    }

    #[test]
    fn mute_drops_replies_only() {
        // An upstream that counts what reaches it and answers nothing.
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = listener.local_addr().expect("addr");
        let received = Arc::new(AtomicU64::new(0));
        let counted = received.clone();
        let mute_server = std::thread::Builder::new().name("mute-upstream".into()).spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut buffer = [0u8; 64];
                while let Ok(n @ 1..) = stream.read(&mut buffer) {
                    counted.fetch_add(n as u64, Ordering::SeqCst);
                    let _ = stream.write_all(b"reply");
                }
            }
        });
        mute_server.expect("spawn");
        let proxy = Proxy::start(upstream).expect("start");
        let mut a = client(&proxy);
        a.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        proxy.mute();
        a.write_all(b"12345").expect("write");
        let mut buffer = [0u8; 5];
        assert!(a.read(&mut buffer).is_err(), "the reply is dropped");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while received.load(Ordering::SeqCst) < 5 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(received.load(Ordering::SeqCst), 5, "the request got through");
        proxy.resume();
        let mut b = client(&proxy);
        b.write_all(b"x").expect("write");
        b.read_exact(&mut buffer).expect("replies flow again");
        assert_eq!(&buffer, b"reply");
    }

    #[test]
    fn unreachable_upstream_is_a_refused_connection() {
        // A port nobody listens on: bind one, then free it.
        let free = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
        let proxy = Proxy::start(free).expect("start");
        let mut a = client(&proxy);
        assert!(is_closed(&mut a));
        assert_eq!(proxy.refused(), 1);
        assert_eq!(proxy.accepted(), 0);
    }

    #[test]
    fn drop_stops_everything() {
        let proxy = Proxy::start(echo_server()).expect("start");
        let addr = proxy.addr();
        let mut a = client(&proxy);
        assert!(echo(&mut a, b"1").is_some());
        drop(proxy);
        assert!(is_closed(&mut a));
        let refused = TcpStream::connect(addr).map(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            is_closed(&mut s)
        });
        assert!(refused.unwrap_or(true), "nothing listens after drop");
    }
}
