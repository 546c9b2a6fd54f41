//! The server: the lifecycle service plus grpc.health.v1 and server
//! reflection (v1 and v1alpha) on one listener, all behind one
//! [`CallLayer`] (caller, request span, per-call record), with size limits
//! and graceful shutdown.
//!
//! Shutdown order: health turns NOT_SERVING, open watch streams end with
//! UNAVAILABLE after their last delivered event, tonic stops accepting and
//! waits for in-flight calls, then the commit thread flushes and the store
//! closes.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{Stream, TryStreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::{
    Server,
    server::{Connected, TcpConnectInfo, TcpIncoming},
};
use tonic_health::ServingStatus;
use tonic_reflection::server as reflection;
use tracing::{info, warn};

use crate::{
    api::grpc::MAX_REQUEST_BYTES,
    api::grpc::{CallLayer, LifecycleServer, pb},
    automation::health::{HealthSettings, HeartbeatMonitor},
    service::AgentLifecycleService,
};

/// Concurrent HTTP/2 streams per connection (watch streams included).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// How long shutdown waits for open calls (a health Watch, a slow unary
/// call) after the watch streams ended, before closing their connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// HTTP/2 keepalive pings, so dead peers of long watch streams are noticed.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// How the server meets its clients: the layer around every call
/// (authentication, spans, per-call records) and TLS.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Around every call served.
    pub calls: CallLayer,
    /// TLS (and mutual TLS, when it names a client CA); plain HTTP/2
    /// without it.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Rate limits and watch caps (none by default).
    pub limits: std::sync::Arc<crate::api::grpc::rate_limit::Limits>,
}

impl From<CallLayer> for ServeOptions {
    fn from(calls: CallLayer) -> Self {
        ServeOptions {
            calls,
            ..ServeOptions::default()
        }
    }
}

/// The connections `listener` accepts, as the server serves them:
/// `TCP_NODELAY` set, and written through [`Unvectored`].
pub fn incoming(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<Unvectored>> + Send + 'static {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map_ok(|stream| Unvectored {
            stream,
            read_since_write: false,
        })
}

/// An accepted connection that tells HTTP/2 it has no vectored writes.
///
/// h2 sends a DATA payload over 256 bytes as an I/O vector of its own on a
/// connection with vectored writes, and then writes nothing more until that
/// vector is written: the trailers of a unary response, and every further
/// message of a watch stream, leave in a system call each. Without vectored
/// writes it copies payloads under 1 KiB into its 16 KiB write buffer, so a
/// TransitionAgent response (about 250 bytes: headers, message, trailers)
/// leaves in one `write`, and a watch stream's events queued together leave
/// together. Copying a few hundred bytes costs far less than a system call.
///
/// A write after requests came in also waits one turn of the scheduler:
/// the connection's task is woken by the first answer that completes, and
/// the answers of the other calls that complete in the same turn would
/// each leave in a `write` of their own after it. Yielding once lets them
/// join the write buffer first, so answers finished together leave
/// together (at 64 calls in flight over 4 connections, 0.13-0.21 `sendto` per
/// call instead of 0.9).
#[derive(Debug)]
pub struct Unvectored {
    stream: TcpStream,
    /// Whether requests came in since the last write waited its turn: only
    /// then may other answers be about to complete (a watch stream's
    /// connection, which only sends, does not wait).
    read_since_write: bool,
}

impl Connected for Unvectored {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Unvectored {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > filled {
            self.read_since_write = true;
        }
        read
    }
}

impl AsyncWrite for Unvectored {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.read_since_write {
            self.read_since_write = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Reflection could not be built from the descriptor set.
    #[error("building reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Closing the service failed.
    #[error("closing: {0}")]
    Close(#[from] crate::Error),
}

/// Serves `service` on `listener` until `shutdown` completes, then shuts
/// down gracefully and closes the service. Callers are anonymous and no
/// per-call records are kept ([`CallLayer::default`]); heartbeats are
/// watched by a health monitor with the default settings.
///
/// # Errors
/// See [`ServerError`].
pub async fn run(
    listener: TcpListener,
    service: AgentLifecycleService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let health = HeartbeatMonitor::new(service.clone(), HealthSettings::default());
    let monitor = tokio::spawn(health.clone().run());
    let served = run_with(listener, service, health, ServeOptions::default(), shutdown).await;
    // The monitor holds the service: end it, so that the store is released
    // when this returns.
    monitor.abort();
    let _ = monitor.await;
    served
}

/// The reflection services, both versions, describing the lifecycle
/// service, the health service and google.rpc's status and error details
/// (so that reflection clients such as grpcurl can show an error's
/// ErrorInfo, BadRequest and PreconditionFailure).
fn reflection() -> Result<
    (
        reflection::v1::ServerReflectionServer<impl reflection::v1::ServerReflection>,
        reflection::v1alpha::ServerReflectionServer<impl reflection::v1alpha::ServerReflection>,
    ),
    ServerError,
> {
    let sets = [
        pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_types::pb::FILE_DESCRIPTOR_SET,
    ];
    let builder = || {
        sets.iter()
            .fold(reflection::Builder::configure(), |builder, set| {
                builder.register_encoded_file_descriptor_set(set)
            })
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// [`run`], with `heartbeats` recording the heartbeats received (the
/// health monitor, if any, is the caller's to run), and `options`' layer
/// around every call served and its TLS.
///
/// # Errors
/// See [`ServerError`].
pub async fn run_with(
    listener: TcpListener,
    service: AgentLifecycleService,
    heartbeats: HeartbeatMonitor,
    options: impl Into<ServeOptions>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let ServeOptions { calls, tls, limits } = options.into();
    let mut calls = calls.with_limits(std::sync::Arc::clone(&limits));
    // Per-call metrics in the service's registry, once per registry (a
    // service served twice keeps the first server's).
    if let Ok(rpc) = crate::api::grpc::observe::RpcMetrics::register(service.metrics().registry()) {
        calls = calls.also_observe(std::sync::Arc::new(rpc));
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<LifecycleServer>().await;
    health.set_service_status("", ServingStatus::Serving).await;

    let (reflection_v1, reflection_v1alpha) = reflection()?;

    let lifecycle =
        LifecycleServer::with_heartbeat_monitor(service.clone(), heartbeats, MAX_REQUEST_BYTES)
            .with_limits(limits);

    let local = listener.local_addr().ok();
    let incoming = incoming(listener);
    let (signalled, grace) = tokio::sync::oneshot::channel::<()>();
    let stopping = {
        let service = service.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            info!("shutting down: health NOT_SERVING, ending watch streams");
            health.set_not_serving::<LifecycleServer>().await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            service.begin_shutdown();
            let _ = signalled.send(());
        }
    };
    if let Some(addr) = local {
        info!(%addr, "serving gRPC");
    }
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let serve = builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .layer(calls)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(lifecycle)
        .serve_with_incoming_shutdown(incoming, stopping);
    tokio::pin!(serve);
    let served = tokio::select! {
        served = &mut serve => served,
        () = async {
            if grace.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "calls still open after the grace period; closing their connections");
            Ok(())
        }
    };
    // Flush and close the store whatever happened to the transport.
    service.begin_shutdown();
    service.close().await?;
    served?;
    info!("stopped");
    Ok(())
}
