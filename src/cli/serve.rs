//! `agent-lifecycle serve`: logging, the store, the service, the listener
//! and the signals.

use std::{future::Future, net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::{Args, ValueEnum};
use tracing::info;
use tracing_subscriber::EnvFilter;

use agent_lifecycle::{
    AgentLifecycleService,
    config::{DEFAULT_STORE, StoreUrl, parse_duration},
    server,
    service::{DEFAULT_EVENT_BUFFER, DEFAULT_MAX_BATCH, ServiceConfig},
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

/// Flags of `serve`; each is also an `AGENT_LIFECYCLE_<NAME>` variable.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address.
    #[arg(
        long,
        env = "AGENT_LIFECYCLE_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    listen: SocketAddr,
    /// Store: `memory`, `sqlite://PATH`, or `postgres://USER[:PASSWORD]@HOST[:PORT]/DB`
    /// (several servers may share one PostgreSQL database).
    #[arg(long, env = "AGENT_LIFECYCLE_STORE", default_value = DEFAULT_STORE)]
    store: StoreUrl,
    /// Log format.
    #[arg(long, env = "AGENT_LIFECYCLE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG also works.
    #[arg(long, env = "AGENT_LIFECYCLE_LOG", default_value = "info")]
    log: String,
    /// Events the broadcast channel buffers before a slow watcher is
    /// backfilled from the event log.
    #[arg(long, env = "AGENT_LIFECYCLE_EVENT_BUFFER", default_value_t = DEFAULT_EVENT_BUFFER)]
    event_buffer: usize,
    /// Idle time before a watch stream gets a progress message.
    #[arg(long, env = "AGENT_LIFECYCLE_PROGRESS_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    progress_interval: Duration,
    /// Keep at most this many newest events (memory store default: 100000;
    /// SQLite default: all).
    #[arg(long, env = "AGENT_LIFECYCLE_RETAIN_EVENTS")]
    retain_events: Option<u64>,
    /// Delete events older than this (e.g. 30d); default: keep.
    #[arg(long, env = "AGENT_LIFECYCLE_RETAIN_FOR", value_parser = parse_duration)]
    retain_for: Option<Duration>,
    /// How often compaction runs when retention is set.
    #[arg(long, env = "AGENT_LIFECYCLE_COMPACTION_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    compaction_interval: Duration,
    /// Largest group commit.
    #[arg(long, env = "AGENT_LIFECYCLE_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH)]
    max_batch: usize,
}

fn init_logging(args: &ServeArgs) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(value),
        _ => EnvFilter::try_new(&args.log),
    }
    .context("invalid log filter")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let result = match args.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
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
    init_logging(&args)?;
    let shutdown = shutdown_signal()?;
    let retention = Retention {
        max_events: args.retain_events,
        max_age: args.retain_for,
    };
    let config = ServiceConfig {
        event_buffer: args.event_buffer,
        retention,
        compaction_interval: args.compaction_interval,
        progress_interval: args.progress_interval,
        max_batch: args.max_batch,
        ..ServiceConfig::default()
    };
    let started = std::time::Instant::now();
    // Opening and loading block (file and network I/O), so they run on the
    // blocking pool.
    let url = args.store.clone();
    let service = tokio::task::spawn_blocking(move || {
        let store = url
            .open(&retention)
            .with_context(|| format!("cannot open the store {url}"))?;
        AgentLifecycleService::open(store, config)
            .with_context(|| format!("cannot load the store {url}"))
    })
    .await
    .context("opening the store")??;
    info!(store = %args.store, elapsed_ms = started.elapsed().as_millis() as u64, "store ready");
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // One machine-readable line on stdout, so that scripts and tests that
    // pass port 0 learn the real address.
    let local = listener.local_addr().context("reading the bound address")?;
    println!("listening on {local}");
    server::run(listener, service, shutdown).await?;
    Ok(())
}
