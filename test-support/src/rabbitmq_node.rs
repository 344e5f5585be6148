//! A RabbitMQ node of the test's own, for what the shared node must never be given (a TLS
//! listener, certificates): its own node name, ports, configuration, data and log
//! directories, its own `HOME` (Erlang cookie), and no plugins. It joins nothing and the
//! shared node is never touched (only the host's `epmd` learns one more name). Booting takes
//! seconds; killed, and its directory removed, on drop.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::certs::Certs;

/// Where the server script lives (`/usr/sbin/rabbitmq-server` wraps it in `su rabbitmq`,
/// which drops the environment).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

/// How long a node may take to boot (it takes about 5 s on an idle machine).
const BOOT: Duration = Duration::from_secs(90);

/// A private node with a TLS listener only.
pub struct Node {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Node {
    /// A node listening with TLS only on a free port of 127.0.0.1, with this certificate and
    /// key (one of `certs`), checking client certificates against the CA of `certs`; with `require_client_cert`, a client without
    /// one is refused (`fail_if_no_peer_cert`). `None` (skipped loudly, or failed under
    /// `DINGO_REQUIRE_SERVICES=1`) when RabbitMQ is not installed.
    pub fn start_tls(certs: &Certs, (cert, key): (PathBuf, PathBuf), require_client_cert: bool) -> Option<Node> {
        if !std::path::Path::new(SERVER).exists() {
            assert!(!crate::services_required(), "RabbitMQ is not installed ({SERVER})");
            eprintln!("SKIPPED: RabbitMQ is not installed ({SERVER})");
            return None;
        }
        let free = || TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
        let (port, dist_port) = (free(), free());
        let name = crate::unique("dingo-tls").replace('.', "-");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("a directory for the node");
        let config = format!(
            "listeners.tcp = none\nlisteners.ssl.default = 127.0.0.1:{port}\nssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\nssl_options.keyfile = {}\nssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = {require_client_cert}\n",
            certs.ca().display(),
            cert.display(),
            key.display()
        );
        std::fs::write(dir.join("rabbitmq.conf"), config).expect("write rabbitmq.conf");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("write rabbitmq-env.conf");
        let child = Command::new(SERVER)
            // Not the host's /etc/rabbitmq/rabbitmq-env.conf: it names the shared node.
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_NODENAME", format!("{name}@localhost"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_SERVER_ERL_ARGS", "-kernel inet_dist_use_interface {127,0,0,1}")
            // Its own Erlang cookie.
            .env("HOME", &dir)
            // The script then execs the VM (instead of waiting on it in the background), so
            // killing the child kills the node.
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rabbitmq-server");
        let mut node = Node { child, port, dir };
        let deadline = Instant::now() + BOOT;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // The listener opens once the node has booted.
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            let exited = node.child.try_wait().expect("poll rabbitmq-server");
            assert!(exited.is_none(), "the test's RabbitMQ node exited: {exited:?}; see {}", node.dir.display());
            assert!(Instant::now() < deadline, "the test's RabbitMQ node did not listen within {BOOT:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(node)
    }

    /// `amqps://guest:guest@127.0.0.1:PORT/%2f` (guest may connect from the loopback).
    pub fn url(&self) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
