//! `agent-lifecycle serve`: logging, the store, the service, the listener
//! and the signals.

use std::future::Future;

use anyhow::Context;
use tracing::info;
use tracing_subscriber::EnvFilter;

use agent_lifecycle::{
    AgentLifecycleService,
    app::{
        config::{Config, LogFormat, Settings},
        server,
        telemetry::Telemetry,
    },
    automation::{
        drivers::{
            self, DriverSettings,
            docker::{self, DOCKER_DRIVER, DockerDriver},
            hf::HfDriver,
            k8s::{self, K8S_DRIVER, KubernetesDriver},
        },
        health::{FollowedPlatform, HeartbeatMonitor},
        notify,
    },
    domain::ExternalSource,
};

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
pub async fn run(args: Config) -> anyhow::Result<()> {
    let settings = args.resolve().map_err(|e| anyhow::anyhow!("{e}"))?;
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
    let mut followed = Vec::new();
    if let Some(hf) = settings.hf {
        if settings.hf_act {
            followed.push(FollowedPlatform {
                source: ExternalSource::HfSpace,
                observer: ExternalSource::HfSpace.trigger(),
            });
            let driver = HfDriver::new(hf.clone()).context("the Hugging Face driver")?;
            tokio::spawn(drivers::run(
                service.clone(),
                std::sync::Arc::new(driver),
                DriverSettings::default(),
            ));
        }
        tokio::spawn(agent_lifecycle::automation::hf::run(service.clone(), hf));
    }
    if let Some(docker) = settings.docker {
        let act = docker.act;
        let driver = DockerDriver::new(docker).map_err(|e| anyhow::anyhow!(e))?;
        if act {
            tokio::spawn(drivers::run(
                service.clone(),
                driver.clone(),
                DriverSettings::default(),
            ));
        }
        tokio::spawn(docker::observe(service.clone(), driver));
        followed.push(FollowedPlatform {
            source: ExternalSource::Docker,
            observer: DOCKER_DRIVER,
        });
    }
    if let Some(kubernetes) = settings.kubernetes {
        let client = k8s::client(&kubernetes)
            .await
            .map_err(|e| anyhow::anyhow!("the Kubernetes driver: {e}"))?;
        if kubernetes.act {
            tokio::spawn(drivers::run(
                service.clone(),
                std::sync::Arc::new(KubernetesDriver::new(client.clone())),
                DriverSettings::default(),
            ));
        }
        tokio::spawn(k8s::watch::run(service.clone(), client, kubernetes));
        followed.push(FollowedPlatform {
            source: ExternalSource::Kubernetes,
            observer: K8S_DRIVER,
        });
    }
    for webhook in settings.notify {
        tokio::spawn(notify::run(service.clone(), webhook));
    }
    let health = HeartbeatMonitor::new(service.clone(), settings.health).following(followed);
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
