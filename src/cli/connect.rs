//! How the client commands and the bench tool reach a server: plain or TLS
//! (`https://` URLs, or `--tls-ca`), with a client certificate for mutual
//! TLS, and a bearer token on every call.
//!
//! The settings are those of this invocation, set once by [`install`] before
//! any command runs; every connection the process opens uses them.

use std::{path::PathBuf, sync::OnceLock};

use anyhow::{Context, anyhow};
use clap::Args;
use tonic::{
    Request,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

use agent_lifecycle::{
    api::grpc::pb::agent_lifecycle_service_client::AgentLifecycleServiceClient,
    client::ClientOptions,
};

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

/// The token interceptor of the library's client.
pub use agent_lifecycle::client::Credentials;

/// A client of the lifecycle service with this invocation's credentials.
pub type Client = AgentLifecycleServiceClient<InterceptedService<Channel, Credentials>>;

/// What every connection of this process uses.
#[derive(Clone, Debug, Default)]
struct Connector {
    credentials: Credentials,
    options: ClientOptions,
}

static CONNECTOR: OnceLock<Connector> = OnceLock::new();

/// Checks `args` and makes them this process's connection settings.
///
/// # Errors
/// A token that cannot be a header value, or unreadable PEM files.
pub fn install(args: &ConnectArgs) -> anyhow::Result<()> {
    let read =
        |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let tls_identity_pem = match (&args.tls_client_cert, &args.tls_client_key) {
        (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
        (None, None) => None,
        _ => anyhow::bail!("--tls-client-cert and --tls-client-key go together"),
    };
    let options = ClientOptions {
        token: args.token.clone(),
        tls_ca_pem: args.tls_ca.as_ref().map(read).transpose()?,
        tls_identity_pem,
        ..ClientOptions::default()
    };
    let credentials = Credentials::bearer(options.token.as_deref())
        .map_err(|_| anyhow!("--token must be printable ASCII"))?;
    CONNECTOR
        .set(Connector {
            credentials,
            options,
        })
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
    agent_lifecycle::client::endpoint(url, &connector().options).map_err(|e| anyhow!("{e}"))
}

/// Puts this process's token on `request` (for calls made without
/// [`Client`]).
pub fn authorize<T>(request: &mut Request<T>) {
    connector().credentials.authorize(request);
}

/// A client over `channel` that sends this process's token.
pub fn client(channel: Channel) -> Client {
    AgentLifecycleServiceClient::with_interceptor(channel, connector().credentials)
}
