//! The client for a URL and the TLS options: the CA, client certificate and key files are
//! read, checked and parsed at connect, every problem a configuration error naming its file;
//! and whether a URL turned verification off (`#insecure`).

use dingo_core::broker::support::redact_url;
use dingo_core::broker::tls::TlsPem;
use dingo_core::{BrokerError, BrokerErrorKind};
use redis::{ConnectionAddr, IntoConnectionInfo};

use crate::options::RedisOptions;

/// The client for `url` (dingo's query keys taken off) with the options' TLS files.
pub(crate) fn client(url: &str, options: &RedisOptions) -> Result<redis::Client, BrokerError> {
    let config = |message: String| BrokerError::new(BrokerErrorKind::Config, message);
    let info = url.into_connection_info().map_err(|e| {
        BrokerError::with_source(BrokerErrorKind::Config, format!("invalid redis URL {}", redact_url(url)), e)
    })?;
    let files = [&options.tls_ca_file, &options.tls_cert_file, &options.tls_key_file];
    if files.iter().all(|f| f.is_none()) {
        return redis::Client::open(info).map_err(|e| {
            BrokerError::with_source(BrokerErrorKind::Config, format!("invalid redis URL {}", redact_url(url)), e)
        });
    }
    match info.addr() {
        ConnectionAddr::TcpTls { insecure: true, .. } => Err(config(format!(
            "redis URL {}: `#insecure` turns certificate checks off, and the TLS files given \
             (`cacertfile`, `certfile`, `keyfile`) would be ignored: give one or the other",
            redact_url(url)
        ))),
        ConnectionAddr::TcpTls { .. } => {
            let pem = TlsPem::load(
                options.tls_ca_file.as_deref(),
                options.tls_cert_file.as_deref(),
                options.tls_key_file.as_deref(),
            )?;
            with_tls(info, pem, options)
        }
        _ => Err(config(format!(
            "redis URL {}: TLS files (`cacertfile`, `certfile`, `keyfile`) need a `rediss://` URL",
            redact_url(url)
        ))),
    }
}

/// Parses the files as the TLS library will (each on its own first, so that an error names
/// its file), then builds the client.
#[cfg(feature = "tls")]
fn with_tls(info: redis::ConnectionInfo, pem: TlsPem, options: &RedisOptions) -> Result<redis::Client, BrokerError> {
    use redis::{ClientTlsConfig, TlsCertificates};

    let invalid = |what: String, e: redis::RedisError| {
        // The library's words (`Unable to parse root certificate PEM: …`) say what failed.
        let message = format!("{what} is not usable: {}", e.detail().unwrap_or(&e.to_string()));
        BrokerError::with_source(BrokerErrorKind::Config, message, e)
    };
    let display =
        |path: &Option<std::path::PathBuf>| path.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
    let client_tls = pem.identity.map(|(client_cert, client_key)| ClientTlsConfig { client_cert, client_key });
    if let Some(ca) = &pem.ca {
        let certs = TlsCertificates { client_tls: None, root_cert: Some(ca.clone()) };
        redis::Client::build_with_tls(info.clone(), certs)
            .map_err(|e| invalid(format!("the TLS CA file `{}`", display(&options.tls_ca_file)), e))?;
    }
    if let Some(client_tls) = &client_tls {
        let what = format!(
            "the TLS client certificate `{}` with key `{}`",
            display(&options.tls_cert_file),
            display(&options.tls_key_file)
        );
        let certs = TlsCertificates { client_tls: Some(client_tls.clone()), root_cert: None };
        redis::Client::build_with_tls(info.clone(), certs).map_err(|e| invalid(what.clone(), e))?;
        // The client library checks that the key is the certificate's only as it connects
        // (and calls a mismatch a failed command): check it here, as it will.
        native_tls::Identity::from_pkcs8(&client_tls.client_cert, &client_tls.client_key)
            .and_then(|identity| native_tls::TlsConnector::builder().identity(identity).build())
            .map_err(|e| BrokerError::with_source(BrokerErrorKind::Config, format!("{what} is not usable: {e}"), e))?;
    }
    redis::Client::build_with_tls(info, TlsCertificates { client_tls, root_cert: pem.ca })
        .map_err(|e| invalid("the TLS files".to_owned(), e))
}

/// Without the `tls` feature the URL cannot be `rediss://` (the library refuses it first).
#[cfg(not(feature = "tls"))]
fn with_tls(_: redis::ConnectionInfo, _: TlsPem, _: &RedisOptions) -> Result<redis::Client, BrokerError> {
    Err(BrokerError::new(BrokerErrorKind::Config, "rediss:// needs the `tls` feature of dingo-redis"))
}

/// Whether the client's connections skip verifying the server's certificate and host name
/// (the URL's `#insecure` fragment).
pub(crate) fn unverified(client: &redis::Client) -> bool {
    matches!(client.get_connection_info().addr(), ConnectionAddr::TcpTls { insecure: true, .. })
}

/// What a refused TLS handshake means, for a start-up error (see
/// [`refusal`](dingo_core::broker::tls::refusal)); `None` for other errors.
pub(crate) fn refusal(server: &str, e: &redis::RedisError) -> Option<String> {
    dingo_core::broker::tls::refusal(server, &e.to_string())
}
