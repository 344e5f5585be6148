//! A throwaway certificate authority, made at test time with the `openssl` command: a CA, a
//! server certificate for `127.0.0.1` and `localhost`, one for another host, a client
//! certificate (mutual TLS), and a second CA that signed none of them (an untrusted one).
//! Keys are P-256, in PKCS#8 (`-----BEGIN PRIVATE KEY-----`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The files, in a directory of their own (removed on drop).
pub struct Certs {
    dir: PathBuf,
}

/// A new P-256 key, unencrypted.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

impl Certs {
    /// Makes them, or `None` (skipped loudly, or failed under `DINGO_REQUIRE_SERVICES=1`)
    /// when `openssl` is not installed.
    pub fn generate() -> Option<Certs> {
        let installed = Command::new("openssl").arg("version").stdout(Stdio::null()).status();
        if !installed.is_ok_and(|s| s.success()) {
            assert!(!crate::services_required(), "openssl is not installed");
            eprintln!("SKIPPED: openssl is not installed");
            return None;
        }
        let dir = std::env::temp_dir().join(crate::unique("dingo-certs"));
        std::fs::create_dir_all(&dir).expect("a directory for the certificates");
        let certs = Certs { dir };
        for ca in ["ca", "other-ca"] {
            certs.openssl(&format!(
                "req -x509 {NEW_KEY} -days 2 -subj /CN=dingo-test-{ca} -keyout {ca}.key -out {ca}.pem \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
            ));
        }
        certs.issue("server", 2, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n");
        certs.issue("elsewhere", 3, "subjectAltName=DNS:elsewhere.invalid\nextendedKeyUsage=serverAuth\n");
        certs.issue("client", 4, "extendedKeyUsage=clientAuth\n");
        Some(certs)
    }

    /// `NAME.key` and `NAME.pem`, a certificate for it that the CA signed, with these
    /// extensions.
    fn issue(&self, name: &str, serial: u32, extensions: &str) {
        std::fs::write(self.dir.join(format!("{name}.ext")), extensions).expect("write the extensions");
        self.openssl(&format!("req {NEW_KEY} -subj /CN=dingo-test-{name} -keyout {name}.key -out {name}.csr"));
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -set_serial {serial} -days 2 -extfile {name}.ext \
             -out {name}.pem"
        ));
    }

    fn openssl(&self, args: &str) {
        let out =
            Command::new("openssl").args(args.split_whitespace()).current_dir(&self.dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {args} failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The CA that signed the server and client certificates (PEM).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA that signed none of them.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.pem")
    }

    /// The server's certificate (for `127.0.0.1` and `localhost`) and key.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("server.pem"), self.dir.join("server.key"))
    }

    /// A server certificate (and key) the CA signed for another host only
    /// (`elsewhere.invalid`).
    pub fn elsewhere(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("elsewhere.pem"), self.dir.join("elsewhere.key"))
    }

    /// The client's certificate and key.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("client.pem"), self.dir.join("client.key"))
    }

    /// The directory (for files a test writes beside them).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
