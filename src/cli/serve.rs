//! `agent-lifecycle serve`: logging, the store, the service, the listener
//! and the signals.

use std::{future::Future, net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, ValueEnum};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::info;
use tracing_subscriber::EnvFilter;

use agent_lifecycle::{
    AgentLifecycleService,
    api::auth::Authenticator,
    api::grpc::{
        CallLayer,
        limits::{LimitSettings, Limits},
    },
    api::tls,
    app::config::{ConfigFile, DEFAULT_STORE, StoreUrl, parse_duration},
    app::server::{self, ServeOptions},
    app::telemetry::Telemetry,
    automation::health::Health,
    service::{DEFAULT_EVENT_BUFFER, DEFAULT_MAX_BATCH, DEFAULT_PROGRESS_INTERVAL, ServiceConfig},
    store::Retention,
};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Flags of `serve`; each is also an `AGENT_LIFECYCLE_<NAME>` variable and
/// a key of the `--config` file. A flag or variable wins over the file, the
/// file over the default.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys with `_` for `-`) and
    /// a `[policy]` section (see examples/agent-lifecycle.toml).
    #[arg(long, env = "AGENT_LIFECYCLE_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "AGENT_LIFECYCLE_LISTEN")]
    listen: Option<SocketAddr>,
    /// OTLP/gRPC endpoint (`http://HOST:4317`) to export traces to: a span
    /// per RPC and per commit batch, children of the caller's W3C
    /// `traceparent`; off when unset.
    #[arg(long, env = "AGENT_LIFECYCLE_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// HTTP address for `/metrics` (Prometheus); off when unset. It has no
    /// authentication: bind it where only the monitoring system reaches.
    #[arg(long, env = "AGENT_LIFECYCLE_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Store: `memory`, `sqlite://PATH`, or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (several servers may share one PostgreSQL database)
    /// [default: sqlite://./data/agent-lifecycle.db].
    #[arg(long, env = "AGENT_LIFECYCLE_STORE")]
    store: Option<StoreUrl>,
    /// Log format [default: human].
    #[arg(long, env = "AGENT_LIFECYCLE_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG also works [default: info].
    #[arg(long, env = "AGENT_LIFECYCLE_LOG")]
    log: Option<String>,
    /// Events the broadcast channel buffers before a slow watcher is
    /// backfilled from the event log [default: 4096].
    #[arg(long, env = "AGENT_LIFECYCLE_EVENT_BUFFER")]
    event_buffer: Option<usize>,
    /// A watch stream's clock: an interval in which it was sent nothing
    /// ends with a progress message [default: 10s].
    #[arg(long, env = "AGENT_LIFECYCLE_PROGRESS_INTERVAL", value_parser = parse_duration)]
    progress_interval: Option<Duration>,
    /// Keep at most this many newest events (memory store default: 100000;
    /// SQLite and PostgreSQL default: all).
    #[arg(long, env = "AGENT_LIFECYCLE_RETAIN_EVENTS")]
    retain_events: Option<u64>,
    /// Delete events older than this (e.g. 30d); default: keep.
    #[arg(long, env = "AGENT_LIFECYCLE_RETAIN_FOR", value_parser = parse_duration)]
    retain_for: Option<Duration>,
    /// How often compaction runs when retention is set [default: 1s].
    #[arg(long, env = "AGENT_LIFECYCLE_COMPACTION_INTERVAL", value_parser = parse_duration)]
    compaction_interval: Option<Duration>,
    /// Largest group commit [default: 1024].
    #[arg(long, env = "AGENT_LIFECYCLE_MAX_BATCH")]
    max_batch: Option<usize>,
    /// How long a client request_id is remembered, so that a retry returns
    /// the original answer (across restarts) [default: 1h].
    #[arg(long, env = "AGENT_LIFECYCLE_REQUEST_ID_WINDOW", value_parser = parse_duration)]
    request_id_window: Option<Duration>,
    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "AGENT_LIFECYCLE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "AGENT_LIFECYCLE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA (PEM): mutual TLS. With
    /// [auth] principals a certificate is optional (a token also
    /// authenticates) and its common name names the principal; without,
    /// every client must present one.
    #[arg(long, env = "AGENT_LIFECYCLE_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Listen on a non-loopback address without authentication (every
    /// caller is admin). Without it, such a server refuses to start.
    #[arg(long, env = "AGENT_LIFECYCLE_INSECURE")]
    insecure: bool,
}

/// The settings in force: flags and variables over the file over defaults.
struct Settings {
    otlp_endpoint: Option<String>,
    listen: SocketAddr,
    http_listen: Option<SocketAddr>,
    store: StoreUrl,
    log_format: LogFormat,
    log: String,
    retention: Retention,
    service: ServiceConfig,
    /// The Hugging Face poller, when `[hf]` is configured.
    hf: Option<agent_lifecycle::automation::hf::HfSettings>,
    /// The health monitor's settings.
    health: agent_lifecycle::automation::health::HealthSettings,
    /// Authentication and TLS.
    serving: ServeOptions,
    /// Whether anyone reaching the port is authenticated (principals or a
    /// required client certificate).
    authenticated: bool,
    /// `--insecure`.
    insecure: bool,
}

/// The layer (authentication) and TLS that the settings describe.
fn serving(args: &ServeArgs, file: &ConfigFile) -> anyhow::Result<(ServeOptions, bool)> {
    let path = |flag: &Option<PathBuf>, key: &Option<String>| {
        flag.clone().or_else(|| key.as_ref().map(PathBuf::from))
    };
    let mut calls = CallLayer::default();
    let principals = match &file.auth {
        Some(auth) => auth.principals().map_err(|e| anyhow::anyhow!("{e}"))?,
        None => Vec::new(),
    };
    if !principals.is_empty() {
        let auth = Authenticator::new(&principals).map_err(|e| anyhow::anyhow!("{e}"))?;
        calls = calls.with_auth(std::sync::Arc::new(auth));
    }
    let cert = path(&args.tls_cert, &file.tls_cert);
    let key = path(&args.tls_key, &file.tls_key);
    let client_ca = path(&args.tls_client_ca, &file.tls_client_ca);
    let tls = match (cert, key) {
        (None, None) => {
            if client_ca.is_some() {
                anyhow::bail!("--tls-client-ca needs --tls-cert and --tls-key");
            }
            None
        }
        (Some(_), None) | (None, Some(_)) => {
            anyhow::bail!("--tls-cert and --tls-key go together")
        }
        (Some(cert), Some(key)) => {
            // Read and check now, so a bad file stops the start with its name.
            tls::certificates(&cert)?;
            tls::private_key(&key)?;
            let read = |p: &PathBuf| {
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let mut config =
                ServerTlsConfig::new().identity(Identity::from_pem(read(&cert)?, read(&key)?));
            if let Some(ca) = &client_ca {
                tls::certificates(ca)?;
                config = config
                    .client_ca_root(Certificate::from_pem(read(ca)?))
                    .client_auth_optional(!principals.is_empty());
            }
            Some(config)
        }
    };
    let authenticated = !principals.is_empty() || client_ca.is_some();
    let limits = match &file.limits {
        Some(limits) => limits.settings().map_err(|e| anyhow::anyhow!("{e}"))?,
        None => LimitSettings::default(),
    };
    let serving = ServeOptions {
        calls,
        tls,
        limits: std::sync::Arc::new(Limits::new(limits)),
    };
    Ok((serving, authenticated))
}

impl Settings {
    fn resolve(args: ServeArgs) -> anyhow::Result<Settings> {
        let file = match &args.config {
            Some(path) => ConfigFile::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
            None => ConfigFile::default(),
        };
        let (serving, authenticated) = serving(&args, &file)?;
        let insecure = args.insecure || file.insecure.unwrap_or(false);
        let store = match (args.store, &file.store) {
            (Some(store), _) => store,
            (None, Some(text)) => text.parse().map_err(|e: String| anyhow::anyhow!("{e}"))?,
            (None, None) => DEFAULT_STORE
                .parse()
                .map_err(|e: String| anyhow::anyhow!("{e}"))?,
        };
        let log_format = match (args.log_format, file.log_format.as_deref()) {
            (Some(format), _) => format,
            (None, Some("json")) => LogFormat::Json,
            _ => LogFormat::Human,
        };
        if args.retain_events.or(file.retain_events) == Some(0) {
            anyhow::bail!("--retain-events must be at least 1 (the newest event is always kept)");
        }
        let retention = Retention {
            max_events: args.retain_events.or(file.retain_events),
            max_age: args.retain_for.or(ConfigFile::duration(&file.retain_for)),
        };
        let service = ServiceConfig {
            event_buffer: args
                .event_buffer
                .or(file.event_buffer)
                .unwrap_or(DEFAULT_EVENT_BUFFER),
            retention,
            compaction_interval: args
                .compaction_interval
                .or(ConfigFile::duration(&file.compaction_interval))
                .unwrap_or(Duration::from_secs(1)),
            progress_interval: args
                .progress_interval
                .or(ConfigFile::duration(&file.progress_interval))
                .unwrap_or(DEFAULT_PROGRESS_INTERVAL),
            max_batch: args
                .max_batch
                .or(file.max_batch)
                .unwrap_or(DEFAULT_MAX_BATCH),
            policy: file.transition_policy.clone(),
            request_window: args
                .request_id_window
                .or(ConfigFile::duration(&file.request_id_window))
                .unwrap_or(agent_lifecycle::service::DEFAULT_REQUEST_WINDOW),
            ..ServiceConfig::default()
        };
        Ok(Settings {
            otlp_endpoint: args.otlp_endpoint.clone().or(file.otlp_endpoint.clone()),
            http_listen: args.http_listen.or(file.http_listen),
            listen: args.listen.or(file.listen).unwrap_or(SocketAddr::from((
                [127, 0, 0, 1],
                agent_lifecycle::DEFAULT_PORT,
            ))),
            store,
            log_format,
            serving,
            authenticated,
            insecure,
            log: args.log.or(file.log).unwrap_or_else(|| "info".into()),
            retention,
            service,
            health: file
                .health
                .as_ref()
                .map(|h| h.settings())
                .unwrap_or_default(),
            hf: file
                .hf
                .as_ref()
                .map(|hf| hf.settings())
                .transpose()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        })
    }
}

/// Installs the logger, and the OTLP trace exporter when an endpoint is
/// configured (its spans are filtered on their own, at `info`, whatever
/// the log filter).
fn init_logging(args: &Settings) -> anyhow::Result<Option<Telemetry>> {
    use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(value),
        _ => EnvFilter::try_new(&args.log),
    }
    .context("invalid log filter")?;
    let (telemetry, otel) = match &args.otlp_endpoint {
        Some(endpoint) => {
            let (telemetry, layer) =
                agent_lifecycle::app::telemetry::otlp(endpoint).map_err(|e| anyhow::anyhow!(e))?;
            let layer = layer.with_filter(EnvFilter::new("agent_lifecycle=info"));
            (Some(telemetry), Some(layer))
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(otel);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match args.log_format {
        LogFormat::Human => registry.with(fmt.with_filter(filter)).try_init(),
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_filter(filter),
            )
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(telemetry)
}

/// Installs the SIGINT and SIGTERM handlers now (so a signal that arrives
/// right after start-up is not fatal) and returns the future that completes
/// on the first of them.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => info!(signal = "SIGINT", "signal received"),
            _ = terminate.recv() => info!(signal = "SIGTERM", "signal received"),
        }
    })
}

/// Ctrl-C where there are no Unix signals.
#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// Runs the server until SIGINT or SIGTERM.
///
/// # Errors
/// The store cannot be opened, the address cannot be bound, or serving
/// failed.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(args)?;
    let telemetry = init_logging(&settings)?;
    let result = serve(settings).await;
    if let Some(telemetry) = telemetry {
        // Export the last spans; the exporter's runtime may not be dropped
        // on an async worker.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
    result
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    if !settings.listen.ip().is_loopback() && !settings.authenticated && !settings.insecure {
        anyhow::bail!(
            "refusing to listen on {} without authentication: configure [auth] principals \
             (or --tls-client-ca), or pass --insecure to serve every caller as admin",
            settings.listen
        );
    }
    if !settings.listen.ip().is_loopback() && !settings.authenticated {
        tracing::warn!(
            listen = %settings.listen,
            "--insecure: serving without authentication on a non-loopback address; every caller is admin"
        );
    }
    let shutdown = shutdown_signal()?;
    let retention = settings.retention;
    let config = settings.service;
    let started = std::time::Instant::now();
    // Opening and loading block (file and network I/O), so they run on the
    // blocking pool.
    let url = settings.store.clone();
    let service = tokio::task::spawn_blocking(move || {
        let store = url
            .open(&retention)
            .with_context(|| format!("cannot open the store {url}"))?;
        AgentLifecycleService::open(store, config)
            .with_context(|| format!("cannot load the store {url}"))
    })
    .await
    .context("opening the store")??;
    info!(store = %settings.store, elapsed_ms = started.elapsed().as_millis() as u64, "store ready");
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    // One machine-readable line on stdout, so that scripts and tests that
    // pass port 0 learn the real address.
    let local = listener.local_addr().context("reading the bound address")?;
    println!("listening on {local}");
    let http = match settings.http_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for HTTP on {addr}"))?;
            let bound = listener
                .local_addr()
                .context("reading the bound HTTP address")?;
            println!("http listening on {bound}");
            if !bound.ip().is_loopback() {
                tracing::warn!(%bound, "/metrics has no authentication; it is reachable beyond this host");
            }
            Some(tokio::spawn(agent_lifecycle::api::http::serve(
                listener,
                service.clone(),
                std::future::pending(),
            )))
        }
        None => None,
    };
    if let Some(hf) = settings.hf {
        tokio::spawn(agent_lifecycle::automation::hf::run(service.clone(), hf));
    }
    let health = Health::new(service.clone(), settings.health);
    let monitor = tokio::spawn(health.clone().run());
    let served = server::run_with(listener, service, health, settings.serving, shutdown).await;
    monitor.abort();
    let _ = monitor.await;
    if let Some(http) = http {
        http.abort();
        let _ = http.await;
    }
    served?;
    Ok(())
}
