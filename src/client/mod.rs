//! A Rust client of the server, for programs that drive or watch the fleet
//! (the CLI is one).
//!
//! - [`Client::connect`] reaches one server, or several of one PostgreSQL
//!   fleet ([`Client::connect_any`]), plain or TLS, with a bearer token.
//! - Every change ([`Client::transition`], [`Client::start`], ...) carries
//!   a `request_id` (one is made when the request has none) and is tried
//!   again on UNAVAILABLE and RESOURCE_EXHAUSTED, after RetryInfo's delay
//!   when the server gives one, else a doubling back-off: the server answers
//!   a repeated request id with the first outcome, so a change whose reply
//!   was lost is not made twice.
//! - [`Client::watch`] is a stream of events that resumes by itself: after
//!   any transport failure (a server restart, a cut connection, a process
//!   of the fleet going away) it reconnects, to the next server when there
//!   are several, from the sequence after the last one it yielded; it never
//!   yields an event twice or leaves one out, and reports compaction as
//!   [`ClientError::Compacted`].
//! - Failures are [`ClientError`]s carrying the server's ErrorInfo reason,
//!   the allowed targets of a refused transition, and RetryInfo's delay.
//! - [`Client::raw`] is the generated client, for everything else.
//!
//! ```no_run
//! use agent_lifecycle::client::{Client, ClientOptions, WatchItem, WatchOptions};
//! use futures_util::StreamExt;
//!
//! # async fn monitor() -> Result<(), agent_lifecycle::client::ClientError> {
//! let client = Client::connect("http://127.0.0.1:50051", ClientOptions::default()).await?;
//! let mut events = client.watch(WatchOptions::snapshot());
//! while let Some(item) = events.next().await {
//!     match item? {
//!         WatchItem::SnapshotAgent(agent) => println!("{} is {}", agent.agent_id, agent.state),
//!         WatchItem::Event(event) => println!("#{} {}", event.sequence, event.agent_id),
//!         _ => {}
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod call;
mod error;
mod watch;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

pub use self::{
    call::RetryPolicy,
    error::ClientError,
    watch::{Watch, WatchItem, WatchOptions},
};
use crate::api::grpc::pb::{self, agent_lifecycle_service_client::AgentLifecycleServiceClient};

/// The generated client, with the token on every call.
pub type RawClient = AgentLifecycleServiceClient<InterceptedService<Channel, Credentials>>;

/// How to reach the servers.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Sent as `authorization: Bearer TOKEN` on every call.
    pub token: Option<String>,
    /// The CA (PEM) that signed the servers' certificates; implies TLS.
    /// Without it, `https://` servers are checked against the public roots.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key (PEM), for mutual TLS.
    pub tls_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// How changes are tried again.
    pub retry: RetryPolicy,
    /// The deadline of every unary call (`None`: none).
    pub timeout: Option<Duration>,
}

/// Puts the token on every call.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Credentials {
    /// Credentials sending `token` as a bearer token.
    ///
    /// # Errors
    /// The token is not printable ASCII.
    pub fn bearer(token: Option<&str>) -> Result<Self, ClientError> {
        let authorization = token
            .map(|token| {
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::Config("the token must be printable ASCII".into()))
            })
            .transpose()?;
        Ok(Credentials { authorization })
    }

    /// Puts the token on `request`.
    pub fn authorize<T>(&self, request: &mut Request<T>) {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
    }
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.authorize(&mut request);
        Ok(request)
    }
}

/// The endpoint of `url` with the TLS of `options`: TLS for `https://`
/// URLs and whenever a CA or a client certificate is given.
///
/// # Errors
/// A malformed URL or TLS settings.
pub fn endpoint(url: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
    let bad = |what: String| ClientError::Config(what);
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad(format!("bad server address {url:?}: {e}")))?;
    let mut tls = options
        .tls_ca_pem
        .as_ref()
        .map(|ca| ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)));
    if let Some((cert, key)) = &options.tls_identity_pem {
        let config = tls.unwrap_or_else(|| ClientTlsConfig::new().with_webpki_roots());
        tls = Some(config.identity(Identity::from_pem(cert, key)));
    }
    if tls.is_none() && url.starts_with("https://") {
        tls = Some(ClientTlsConfig::new().with_webpki_roots());
    }
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| bad(format!("TLS settings for {url}: {e}")))?;
    }
    Ok(endpoint.connect_timeout(Duration::from_secs(10)))
}

/// A client of one server, or of the servers of one fleet.
#[derive(Clone)]
pub struct Client {
    /// One generated client per server (connecting lazily).
    servers: Arc<[RawClient]>,
    /// The server calls go to; moves on after a transport failure.
    current: Arc<AtomicUsize>,
    options: Arc<ClientOptions>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("servers", &self.servers.len())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the server at `url` (`http://HOST:PORT` or `https://`).
    ///
    /// # Errors
    /// A bad URL or TLS settings, or the server cannot be reached.
    pub async fn connect(url: &str, options: ClientOptions) -> Result<Self, ClientError> {
        let channel = endpoint(url, &options)?
            .connect()
            .await
            .map_err(|e| ClientError::Unavailable(format!("cannot reach {url}: {e}")))?;
        let credentials = Credentials::bearer(options.token.as_deref())?;
        Ok(Client {
            servers: Arc::new([AgentLifecycleServiceClient::with_interceptor(
                channel,
                credentials,
            )]),
            current: Arc::default(),
            options: Arc::new(options),
        })
    }

    /// A client of several servers of one fleet (processes on one
    /// PostgreSQL database): calls go to one of them and move to the next
    /// when it cannot be reached. Connects on first use.
    ///
    /// # Errors
    /// No URL, a bad URL or bad TLS settings.
    pub fn connect_any(urls: &[&str], options: ClientOptions) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::Config("no server address".into()));
        }
        let credentials = Credentials::bearer(options.token.as_deref())?;
        let servers = urls
            .iter()
            .map(|url| {
                let channel = endpoint(url, &options)?.connect_lazy();
                Ok(AgentLifecycleServiceClient::with_interceptor(
                    channel,
                    credentials.clone(),
                ))
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(Client {
            servers: servers.into(),
            current: Arc::default(),
            options: Arc::new(options),
        })
    }

    /// The generated client of the server calls go to now.
    pub fn raw(&self) -> RawClient {
        let index = self.current.load(Ordering::Relaxed) % self.servers.len();
        self.servers[index].clone()
    }

    /// Moves calls to the next server (after a transport failure).
    fn next_server(&self) {
        if self.servers.len() > 1 {
            self.current.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `message` with the per-call deadline.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(timeout) = self.options.timeout {
            request.set_timeout(timeout);
        }
        request
    }

    /// The agent now.
    ///
    /// # Errors
    /// NOT_FOUND and the other failures as [`ClientError`].
    pub async fn get_agent(&self, agent_id: &str) -> Result<pb::Agent, ClientError> {
        let request = pb::GetAgentRequest {
            agent_id: agent_id.to_string(),
            ..Default::default()
        };
        let response = self
            .read(
                |mut raw, request| async move { raw.get_agent(request).await },
                request,
            )
            .await?;
        response
            .agent
            .ok_or_else(|| ClientError::Protocol("GetAgent answered without an agent".into()))
    }

    /// Every agent matching `request`'s filters, every page (at
    /// `request.as_of` when set, every page at the point the first one
    /// resolved).
    ///
    /// # Errors
    /// The failures as [`ClientError`].
    pub async fn list_agents(
        &self,
        mut request: pb::ListAgentsRequest,
    ) -> Result<Vec<pb::Agent>, ClientError> {
        let mut agents = Vec::new();
        loop {
            let page = self
                .read(
                    |mut raw, request| async move { raw.list_agents(request).await },
                    request.clone(),
                )
                .await?;
            agents.extend(page.agents);
            if page.next_page_token.is_empty() {
                return Ok(agents);
            }
            request.page_token = page.next_page_token;
            if request.as_of.is_some() {
                request.as_of = Some(pb::AsOf {
                    point: Some(pb::as_of::Point::Sequence(page.as_of_sequence)),
                });
            }
        }
    }

    /// The newest committed sequence.
    ///
    /// # Errors
    /// The failures as [`ClientError`].
    pub async fn head_sequence(&self) -> Result<u64, ClientError> {
        let metrics = self
            .read(
                |mut raw, request| async move { raw.get_lifecycle_metrics(request).await },
                pb::GetLifecycleMetricsRequest::default(),
            )
            .await?;
        Ok(metrics.head_sequence)
    }
}
