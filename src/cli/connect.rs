//! How the client commands and the bench tool reach a server: plain or TLS
//! (`https://` URLs, or `--tls-ca`), with a client certificate for mutual
//! TLS, and a bearer token on every call.
//!
//! The settings are those of this invocation, set once by [`install`] before
//! any command runs; every connection the process opens uses them.

use std::{path::PathBuf, sync::OnceLock, time::Duration};

use anyhow::{Context, anyhow};
use clap::Args;
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use agent_lifecycle::api::grpc::pb::agent_lifecycle_service_client::AgentLifecycleServiceClient;

/// Connection flags, global to every client command and `bench`.
#[derive(Clone, Debug, Default, Args)]
pub struct ConnectArgs {
    /// Bearer token sent with every call (`authorization: Bearer TOKEN`).
    #[arg(
        long,
        global = true,
        env = "AGENT_LIFECYCLE_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the server's certificate; implies
    /// TLS. Without it, https:// servers are checked against the public
    /// roots compiled in.
    #[arg(long, global = true, env = "AGENT_LIFECYCLE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --tls-client-key.
    #[arg(long, global = true, env = "AGENT_LIFECYCLE_TLS_CLIENT_CERT")]
    pub tls_client_cert: Option<PathBuf>,
    /// The private key of --tls-client-cert (PEM).
    #[arg(long, global = true, env = "AGENT_LIFECYCLE_TLS_CLIENT_KEY")]
    pub tls_client_key: Option<PathBuf>,
}

/// Puts the token on every call.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A client of the lifecycle service with this invocation's credentials.
pub type Client = AgentLifecycleServiceClient<InterceptedService<Channel, Credentials>>;

/// What every connection of this process uses.
#[derive(Clone, Debug, Default)]
struct Connector {
    credentials: Credentials,
    tls: Option<ClientTlsConfig>,
}

static CONNECTOR: OnceLock<Connector> = OnceLock::new();

/// Checks `args` and makes them this process's connection settings.
///
/// # Errors
/// A token that cannot be a header value, or unreadable PEM files.
pub fn install(args: &ConnectArgs) -> anyhow::Result<()> {
    let authorization = args
        .token
        .as_ref()
        .map(|token| {
            format!("Bearer {token}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| anyhow!("--token must be printable ASCII"))
        })
        .transpose()?;
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let mut tls = None;
    if let Some(ca) = &args.tls_ca {
        tls = Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)));
    }
    match (&args.tls_client_cert, &args.tls_client_key) {
        (Some(cert), Some(key)) => {
            let config = tls.unwrap_or_else(|| ClientTlsConfig::new().with_webpki_roots());
            tls = Some(config.identity(Identity::from_pem(read(cert)?, read(key)?)));
        }
        (None, None) => {}
        _ => anyhow::bail!("--tls-client-cert and --tls-client-key go together"),
    }
    let connector = Connector {
        credentials: Credentials { authorization },
        tls,
    };
    CONNECTOR
        .set(connector)
        .map_err(|_| anyhow!("connection settings installed twice"))
}

fn connector() -> Connector {
    CONNECTOR.get().cloned().unwrap_or_default()
}

/// The endpoint for `url` with this process's TLS settings (TLS for
/// https:// URLs and whenever --tls-ca or a client certificate is given).
///
/// # Errors
/// A malformed URL or TLS settings.
pub fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .with_context(|| format!("bad server address {url:?}"))?;
    let tls = match connector().tls {
        Some(tls) => Some(tls),
        None if url.starts_with("https://") => Some(ClientTlsConfig::new().with_webpki_roots()),
        None => None,
    };
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .with_context(|| format!("TLS settings for {url}"))?;
    }
    Ok(endpoint.connect_timeout(Duration::from_secs(10)))
}

/// Puts this process's token on `request` (for calls made without
/// [`Client`]).
pub fn authorize<T>(request: &mut Request<T>) {
    if let Some(value) = connector().credentials.authorization {
        request.metadata_mut().insert("authorization", value);
    }
}

/// A client over `channel` that sends this process's token.
pub fn client(channel: Channel) -> Client {
    AgentLifecycleServiceClient::with_interceptor(channel, connector().credentials)
}
