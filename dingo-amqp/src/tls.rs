//! The TLS connector of `amqps://` connections, built once at connect from the options' CA,
//! client certificate and key files (every problem a configuration error naming its file),
//! and used for every connection after.

use dingo_core::{BrokerError, BrokerErrorKind};

use crate::options::AmqpOptions;

/// What opens TLS streams: the system's roots, or the options' CA and client certificate.
#[derive(Clone)]
pub(crate) struct Connector {
    #[cfg(feature = "tls")]
    pub(crate) inner: native_tls::TlsConnector,
}

impl Connector {
    /// Reads and checks the options' TLS files and builds the connector.
    #[cfg(feature = "tls")]
    pub(crate) fn new(options: &AmqpOptions) -> Result<Connector, BrokerError> {
        use dingo_core::broker::tls::TlsPem;
        use native_tls::{Certificate, Identity, TlsConnector};

        let display = |path: &Option<std::path::PathBuf>| path.as_deref().map(|p| p.display().to_string());
        let invalid = |what: String, e: native_tls::Error| {
            BrokerError::with_source(BrokerErrorKind::Config, format!("{what} is not usable: {e}"), e)
        };
        let pem = TlsPem::load(
            options.tls_ca_file.as_deref(),
            options.tls_cert_file.as_deref(),
            options.tls_key_file.as_deref(),
        )?;
        let ca_file = || format!("the TLS CA file `{}`", display(&options.tls_ca_file).unwrap_or_default());
        let identity_files = || {
            format!(
                "the TLS client certificate `{}` with key `{}`",
                display(&options.tls_cert_file).unwrap_or_default(),
                display(&options.tls_key_file).unwrap_or_default()
            )
        };
        let mut builder = TlsConnector::builder();
        if let Some(ca) = &pem.ca {
            // In place of the system's roots, as on Redis (the client library does so there).
            builder.disable_built_in_roots(true);
            for block in dingo_core::broker::tls::certificates(ca) {
                builder.add_root_certificate(Certificate::from_pem(block).map_err(|e| invalid(ca_file(), e))?);
            }
        }
        if let Some((cert, key)) = &pem.identity {
            builder.identity(Identity::from_pkcs8(cert, key).map_err(|e| invalid(identity_files(), e))?);
        }
        // Building checks that the key is the certificate's.
        let inner = builder.build().map_err(|e| {
            let what = if pem.identity.is_some() { identity_files() } else { "the TLS settings".to_owned() };
            invalid(what, e)
        })?;
        Ok(Connector { inner })
    }

    /// Without the `tls` feature there is no `amqps://` (the URL is refused first).
    #[cfg(not(feature = "tls"))]
    pub(crate) fn new(_: &AmqpOptions) -> Result<Connector, BrokerError> {
        Err(BrokerError::new(BrokerErrorKind::Config, "amqps:// needs the `tls` feature of dingo-amqp"))
    }
}

/// Whether the options name any TLS file.
pub(crate) fn any_file(options: &AmqpOptions) -> bool {
    options.tls_ca_file.is_some() || options.tls_cert_file.is_some() || options.tls_key_file.is_some()
}
