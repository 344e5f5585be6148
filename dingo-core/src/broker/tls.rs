//! The PEM files of a TLS connection — certificate authorities to trust, a client certificate
//! and its key (mutual TLS) — read and checked the same way by every broker, so that a
//! missing, unreadable or misformatted file is a configuration error naming the file, at
//! connect, whatever TLS library parses it afterwards.
//!
//! Both brokers take the same URL query keys, those of RabbitMQ's URI spec: `cacertfile`,
//! `certfile` and `keyfile` (file paths, percent-encoded where needed).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{BrokerError, BrokerErrorKind};

/// URL query key of the CA file.
pub const CA_FILE_KEY: &str = "cacertfile";
/// URL query key of the client certificate file.
pub const CERT_FILE_KEY: &str = "certfile";
/// URL query key of the client key file.
pub const KEY_FILE_KEY: &str = "keyfile";

/// The contents of the TLS files a connection was given, checked to hold what they should.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsPem {
    /// The certificate authorities to trust (PEM, one or more certificates), if a CA file
    /// was given.
    pub ca: Option<Vec<u8>>,
    /// The client certificate (PEM, the chain from the leaf) and its unencrypted PKCS#8 key
    /// (PEM), if given.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("TlsPem")
            .field("ca", &self.ca.as_ref().map(Vec::len))
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl TlsPem {
    /// Reads and checks the files: a CA file must hold a PEM certificate, a certificate file
    /// too, a key file an unencrypted PKCS#8 key (`-----BEGIN PRIVATE KEY-----`); a
    /// certificate comes with its key. Every error is [`BrokerErrorKind::Config`] and names
    /// the file (never its contents).
    ///
    /// ```
    /// use dingo_core::BrokerErrorKind;
    /// use dingo_core::broker::tls::TlsPem;
    ///
    /// assert_eq!(TlsPem::load(None, None, None).unwrap(), TlsPem::default());
    /// let error = TlsPem::load(Some("/no/such/ca.pem".as_ref()), None, None).unwrap_err();
    /// assert_eq!(error.kind(), BrokerErrorKind::Config);
    /// assert!(error.to_string().starts_with("cannot read the TLS CA file `/no/such/ca.pem`"), "{error}");
    /// ```
    pub fn load(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<TlsPem, BrokerError> {
        let ca = ca.map(|path| read(path, File::Ca)).transpose()?;
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some((read(cert, File::Cert)?, read(key, File::Key)?)),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(config(format!(
                    "the TLS client certificate `{}` has no key: give `{KEY_FILE_KEY}` too",
                    cert.display()
                )));
            }
            (None, Some(key)) => {
                return Err(config(format!(
                    "the TLS client key `{}` has no certificate: give `{CERT_FILE_KEY}` too",
                    key.display()
                )));
            }
        };
        Ok(TlsPem { ca, identity })
    }
}

/// A file path given as a URL query value (percent-decoded), or an error naming the key.
///
/// ```
/// use dingo_core::broker::tls::path_from_query;
///
/// assert_eq!(path_from_query("cacertfile", "/etc/ssl/my%20ca.pem").unwrap(), std::path::Path::new("/etc/ssl/my ca.pem"));
/// assert!(path_from_query("cacertfile", "").is_err());
/// ```
pub fn path_from_query(key: &str, value: &str) -> Result<PathBuf, String> {
    if value.is_empty() {
        return Err(format!("`{key}` wants a file path"));
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' => match (bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b))) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 3;
                }
                _ => return Err(format!("`{key}` holds a bad percent escape: `{value}`")),
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map(PathBuf::from).map_err(|_| format!("`{key}` is not UTF-8 once decoded: `{value}`"))
}

/// The certificates of a PEM bundle, each block on its own (TLS libraries often read one
/// certificate per call, and would drop the rest of a bundle without a word).
///
/// ```
/// let bundle = b"junk\n-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----\n";
/// let blocks = dingo_core::broker::tls::certificates(bundle);
/// assert_eq!(blocks.len(), 2);
/// assert_eq!(blocks[1], b"-----BEGIN CERTIFICATE-----\nB\n-----END CERTIFICATE-----");
/// ```
pub fn certificates(pem: &[u8]) -> Vec<&[u8]> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let mut blocks = Vec::new();
    let mut rest = pem;
    while let Some(start) = find(rest, BEGIN) {
        let Some(len) = find(&rest[start..], END) else { break };
        let end = start + len + END.len();
        blocks.push(&rest[start..end]);
        rest = &rest[end..];
    }
    blocks
}

/// What a TLS handshake refused by either side means, from the TLS library's error text
/// (OpenSSL's words), as a start-up error message: the server's certificate is not trusted
/// (another CA, another host name), or the server wants a client certificate it was not
/// given or does not trust. Waiting does not change a certificate: brokers fail at once
/// with [`BrokerErrorKind::Config`]. `None` for other errors.
///
/// ```
/// let text = "SSL Handshake error: certificate verify failed: (self-signed certificate in certificate chain)";
/// let message = dingo_core::broker::tls::refusal("redis at rediss://h:6380", text).unwrap();
/// assert!(message.starts_with("redis at rediss://h:6380: the server's TLS certificate was refused (self-signed"));
/// assert_eq!(dingo_core::broker::tls::refusal("s", "connection refused"), None);
/// ```
pub fn refusal(server: &str, text: &str) -> Option<String> {
    const FAILED: &str = "certificate verify failed";
    if let Some(at) = text.find(FAILED) {
        // OpenSSL's reason, in the parentheses that follow (`self-signed certificate in
        // certificate chain`, `Hostname mismatch`).
        let after = &text[at + FAILED.len()..];
        let reason = after.split_once('(').and_then(|(_, r)| r.split_once(')')).map_or(FAILED, |(reason, _)| reason);
        return Some(format!(
            "{server}: the server's TLS certificate was refused ({reason}): give the CA that signed it with \
             `{CA_FILE_KEY}` (`tls_ca_file`), and connect by a name the certificate holds"
        ));
    }
    let alerts = ["alert certificate required", "alert bad certificate", "alert unknown ca"];
    let alert = alerts.iter().find(|a| text.contains(*a))?;
    Some(format!(
        "{server} refused the TLS connection (`{}`): it asks for a client certificate its CA signed; give it with \
         `{CERT_FILE_KEY}` and `{KEY_FILE_KEY}` (`tls_client_cert`)",
        alert.trim_start_matches("alert ")
    ))
}

#[derive(Clone, Copy)]
enum File {
    Ca,
    Cert,
    Key,
}

impl fmt::Display for File {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            File::Ca => "TLS CA file",
            File::Cert => "TLS client certificate file",
            File::Key => "TLS client key file",
        })
    }
}

fn config(message: String) -> BrokerError {
    BrokerError::new(BrokerErrorKind::Config, message)
}

fn read(path: &Path, file: File) -> Result<Vec<u8>, BrokerError> {
    let bytes = std::fs::read(path).map_err(|e| {
        BrokerError::with_source(
            BrokerErrorKind::Config,
            format!("cannot read the {file} `{}`: {e}", path.display()),
            e,
        )
    })?;
    let holds = |label: &str| contains(&bytes, format!("-----BEGIN {label}-----").as_bytes());
    let problem = match file {
        File::Ca | File::Cert if holds("CERTIFICATE") => None,
        File::Ca | File::Cert => Some("holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)".to_owned()),
        File::Key if holds("PRIVATE KEY") => None,
        File::Key if holds("ENCRYPTED PRIVATE KEY") => Some(
            "holds an encrypted key: dingo needs it unencrypted (PKCS#8, `-----BEGIN PRIVATE KEY-----`)".to_owned(),
        ),
        File::Key if holds("RSA PRIVATE KEY") || holds("EC PRIVATE KEY") => Some(format!(
            "holds a key in the older form (PKCS#1 or SEC1): dingo needs PKCS#8 (`-----BEGIN PRIVATE KEY-----`); \
             convert it with `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.pk8`",
            path.display()
        )),
        File::Key => Some("holds no PEM private key (`-----BEGIN PRIVATE KEY-----`)".to_owned()),
    };
    match problem {
        Some(problem) => Err(config(format!("the {file} `{}` {problem}", path.display()))),
        None => Ok(bytes),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";

    /// A directory of the test's own with these files in it.
    fn files(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dingo-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        for (file, text) in files {
            std::fs::write(dir.join(file), text).expect("write");
        }
        dir
    }

    #[test]
    fn files_are_read_and_paired() {
        let dir = files("ok", &[("ca.pem", CERT), ("c.pem", CERT), ("k.pem", KEY)]);
        let pem =
            TlsPem::load(Some(&dir.join("ca.pem")), Some(&dir.join("c.pem")), Some(&dir.join("k.pem"))).expect("valid");
        assert_eq!(pem.ca.as_deref(), Some(CERT.as_bytes()));
        assert_eq!(pem.identity, Some((CERT.as_bytes().to_vec(), KEY.as_bytes().to_vec())));
        assert!(!format!("{pem:?}").contains("MIIB"), "{pem:?}");
        let error = TlsPem::load(None, Some(&dir.join("c.pem")), None).expect_err("no key");
        assert_eq!(error.kind(), BrokerErrorKind::Config);
        assert_eq!(
            error.to_string(),
            format!("the TLS client certificate `{}` has no key: give `keyfile` too", dir.join("c.pem").display())
        );
        let error = TlsPem::load(None, None, Some(&dir.join("k.pem"))).expect_err("no certificate");
        assert!(error.to_string().contains("has no certificate: give `certfile` too"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let rsa = "-----BEGIN RSA PRIVATE KEY-----\nsecret\n-----END RSA PRIVATE KEY-----\n";
        let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nsecret\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let dir = files("bad", &[("junk", "secret"), ("rsa", rsa), ("enc", encrypted), ("c.pem", CERT)]);
        let cases = [
            (
                Some("missing"),
                None,
                None,
                "cannot read the TLS CA file `{D}/missing`: No such file or directory (os error 2)",
            ),
            (
                Some("junk"),
                None,
                None,
                "the TLS CA file `{D}/junk` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
            ),
            (
                None,
                Some("junk"),
                Some("rsa"),
                "the TLS client certificate file `{D}/junk` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)",
            ),
            (
                None,
                Some("c.pem"),
                Some("junk"),
                "the TLS client key file `{D}/junk` holds no PEM private key (`-----BEGIN PRIVATE KEY-----`)",
            ),
            (
                None,
                Some("c.pem"),
                Some("enc"),
                "the TLS client key file `{D}/enc` holds an encrypted key: dingo needs it unencrypted (PKCS#8, \
                 `-----BEGIN PRIVATE KEY-----`)",
            ),
            (
                None,
                Some("c.pem"),
                Some("rsa"),
                "the TLS client key file `{D}/rsa` holds a key in the older form (PKCS#1 or SEC1): dingo needs PKCS#8 \
                 (`-----BEGIN PRIVATE KEY-----`); convert it with `openssl pkcs8 -topk8 -nocrypt -in {D}/rsa -out {D}/rsa.pk8`",
            ),
        ];
        for (ca, cert, key, expected) in cases {
            let path = |name: Option<&str>| name.map(|n| dir.join(n));
            let error =
                TlsPem::load(path(ca).as_deref(), path(cert).as_deref(), path(key).as_deref()).expect_err(expected);
            assert_eq!(error.kind(), BrokerErrorKind::Config);
            let message = error.to_string();
            assert_eq!(message, expected.replace("{D}", &dir.display().to_string()));
            assert!(!message.contains("secret"), "{message}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn query_paths_are_percent_decoded() {
        assert_eq!(path_from_query("k", "/a/b%2Bc%20d.pem").expect("valid"), Path::new("/a/b+c d.pem"));
        assert_eq!(path_from_query("k", "rel/ca.pem").expect("valid"), Path::new("rel/ca.pem"));
        assert_eq!(path_from_query("k", "/a%2").expect_err("short"), "`k` holds a bad percent escape: `/a%2`");
        assert_eq!(path_from_query("k", "/a%zz").expect_err("not hex"), "`k` holds a bad percent escape: `/a%zz`");
        assert_eq!(path_from_query("k", "").expect_err("empty"), "`k` wants a file path");
        assert_eq!(path_from_query("k", "%ff").expect_err("not UTF-8"), "`k` is not UTF-8 once decoded: `%ff`");
    }
}
