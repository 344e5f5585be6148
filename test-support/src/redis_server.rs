//! A `redis-server` of the test's own, on a free port, for faults the shared server must never
//! see: killed (SIGKILL, like a crash) and started again on the same port and directory,
//! with whatever configuration the test gives it (persistence, ACL files, a slow load, TLS).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::faults::wait_until;

/// A private `redis-server`; killed, and its directory removed, on drop.
pub struct Server {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    /// Serves TLS only (`--tls-port`, no plain port).
    tls: bool,
}

impl Server {
    /// A server on a free port keeping nothing on disk, or `None` (skipped loudly, or failed
    /// under `DINGO_REQUIRE_SERVICES=1`) when `redis-server` is not installed.
    pub fn start_fresh() -> Option<Server> {
        Server::start_with(&[])
    }

    /// A server with these extra arguments (`redis-server` options, e.g. `["--appendonly",
    /// "yes"]`; by default it keeps nothing on disk), kept for every restart.
    pub fn start_with(args: &[&str]) -> Option<Server> {
        if !Server::installed() {
            return None;
        }
        let mut server = Server::on(free_port(), args);
        server.start();
        Some(server)
    }

    /// A server whose users are defined by `acl`, the lines of an ACL file (`user NAME on
    /// >PASSWORD RULES`, kept in the server's directory and passed as `--aclfile`), with these
    /// extra arguments. The file must keep `default` able to run `PING` without a password
    /// (`user default on nopass …`): that is how the start is waited for.
    pub fn start_with_users(acl: &str, args: &[&str]) -> Option<Server> {
        if !Server::installed() {
            return None;
        }
        let mut server = Server::on(free_port(), args);
        let file = server.dir.join("users.acl");
        std::fs::write(&file, acl).expect("write the ACL file");
        server.args.extend(["--aclfile".to_owned(), file.to_string_lossy().into_owned()]);
        server.start();
        Some(server)
    }

    /// A server on `port` (one a test chose beforehand, e.g. to point a program at it before
    /// it runs) with these extra arguments and nothing kept on disk, not started yet (see
    /// [`spawn`](Server::spawn)). Check [`installed`](Server::installed) first.
    pub fn on(port: u16, args: &[&str]) -> Server {
        let dir = std::env::temp_dir().join(crate::unique("dingo-redis-server"));
        std::fs::create_dir_all(&dir).expect("a directory for the server");
        let mut all: Vec<String> = ["--save", "", "--appendonly", "no"].iter().map(|a| (*a).to_owned()).collect();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        Server { child: None, port, dir, args: all, tls: false }
    }

    /// A server on a free port that speaks TLS only (no plain port), with this certificate
    /// and key (one of `certs`), trusting the CA of `certs` for client certificates; with `auth_clients`
    /// every client must present one (mutual TLS, `--tls-auth-clients yes`), without, none
    /// is asked for. `None` as [`start_with`](Server::start_with).
    pub fn start_tls(
        certs: &crate::certs::Certs,
        (cert, key): (PathBuf, PathBuf),
        auth_clients: bool,
    ) -> Option<Server> {
        if !Server::installed() {
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
        let (cert, key, ca) = (cert.display().to_string(), key.display().to_string(), certs.ca().display().to_string());
        let auth = if auth_clients { "yes" } else { "no" };
        let args =
            ["--tls-cert-file", &cert, "--tls-key-file", &key, "--tls-ca-cert-file", &ca, "--tls-auth-clients", auth];
        let mut server = Server::on(port, &args);
        server.tls = true;
        server.start();
        Some(server)
    }

    /// Whether `redis-server` is installed; if not, the test is skipped loudly (or fails
    /// under `DINGO_REQUIRE_SERVICES=1`).
    pub fn installed() -> bool {
        let installed = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status();
        if !installed.is_ok_and(|s| s.success()) {
            assert!(!crate::services_required(), "redis-server is not installed");
            eprintln!("SKIPPED: redis-server is not installed");
            return false;
        }
        true
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a [TLS](Server::start_tls) server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (its data files, if it keeps any).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts (again) on the same port and waits until it answers PING (a server loading its
    /// data answers `LOADING` instead: see [`spawn`](Server::spawn)).
    pub fn start(&mut self) {
        self.spawn();
        if self.tls {
            // PING would need a TLS client; a fresh server has nothing to load.
            return;
        }
        let port = self.port;
        let child = self.child.as_mut().expect("just spawned");
        wait_until("the test's redis-server answers PING", || {
            // Exited: it could not take the port (the PING would reach someone else).
            let exited = child.try_wait().expect("poll redis-server");
            assert!(exited.is_none(), "redis-server on port {port} exited: {exited:?}");
            Server::ping(port) == Some(*b"+PONG\r\n")
        });
    }

    /// Starts (again) and returns once it accepts connections, without waiting for it to
    /// load its data.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let port = self.port.to_string();
        let ports: &[&str] = match self.tls {
            true => &["--port", "0", "--tls-port", &port],
            false => &["--port", &port],
        };
        let child = Command::new("redis-server")
            .args(ports)
            .args(["--bind", "127.0.0.1"])
            .args(["--daemonize", "no", "--logfile", ""])
            .args(&self.args)
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let port = self.port;
        let tls = self.tls;
        let accepts = move || match tls {
            true => TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200))
                .is_ok(),
            false => Server::ping(port).is_some(),
        };
        wait_until("the test's redis-server accepts connections", accepts);
    }

    /// The first bytes of the server's answer to PING (`+PONG\r\n`, or `-LOADING` while it
    /// loads), `None` when it does not answer.
    pub fn ping(port: u16) -> Option<[u8; 7]> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
        stream.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").ok()?;
        stream.read_exact(&mut reply).ok()?;
        Some(reply)
    }

    /// Whether the server answers `LOADING` (it is loading its data).
    pub fn loading(&self) -> bool {
        Server::ping(self.port).is_some_and(|reply| reply.starts_with(b"-LOADIN"))
    }

    /// SIGKILL, like a crash: what it had not written to disk is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
