//! Outgoing HTTP(S), set up once for every part of the automation that
//! calls out: the Hugging Face poller and driver, the webhook deliverer.
//!
//! HTTPS is verified against the Mozilla root set compiled into the binary
//! (`webpki-roots`, so a machine without a system certificate store works
//! too) plus the CA certificates a section's `ca_file` adds; plain `http://`
//! is allowed (a local mirror, a receiver on the same host). HTTP/1.1, with
//! the client's connection pool.

use hyper::body::Body;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::pki_types::CertificateDer;

/// An HTTP client whose requests carry bodies of type `B`.
pub type HttpsClient<B> = Client<HttpsConnector<HttpConnector>, B>;

/// The client configuration of outgoing HTTPS: the compiled-in public roots
/// and `extra_roots`.
///
/// # Errors
/// An extra root is not a valid CA certificate.
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A client for `https://` (verified as [`client_config`] says) and
/// `http://` URLs.
///
/// # Errors
/// An extra root is not a valid CA certificate.
pub fn client<B>(extra_roots: &[CertificateDer<'static>]) -> Result<HttpsClient<B>, rustls::Error>
where
    B: Body + Send,
    B::Data: Send,
{
    let tls = client_config(extra_roots)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}
