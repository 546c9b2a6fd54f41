//! OpenTelemetry tracing: with an OTLP endpoint configured
//! (`--otlp-endpoint`), every span (one per RPC, one per commit batch) is
//! exported over OTLP/gRPC; without one nothing is set up and nothing is
//! sent. A W3C `traceparent` in a request's metadata makes the request's
//! span a child of the caller's trace (see `grpc::layer`).
//!
//! The SDK's batch processor exports from a thread of its own, while the
//! OTLP/gRPC client (tonic) needs a tokio runtime: the exporter here runs
//! every export on a small runtime of its own.

use std::{sync::Arc, time::Duration};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The OTLP exporter, run on its own runtime.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = Arc::clone(&self.inner);
        let task = self.runtime.spawn(async move {
            tokio::time::timeout(EXPORT_TIMEOUT, inner.export(batch))
                .await
                .unwrap_or(Err(OTelSdkError::Timeout(EXPORT_TIMEOUT)))
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
}

/// The tracing pipeline while it runs; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// Owns the export runtime (dropped after the provider).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// The OTLP pipeline to `endpoint` (`http://HOST:PORT` of a collector's
/// OTLP/gRPC receiver) and the tracing layer that feeds it.
///
/// # Errors
/// The export runtime cannot start, or the endpoint is not a valid URL.
pub fn otlp<S>(
    endpoint: &str,
) -> Result<
    (
        Telemetry,
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    ),
    String,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the OTLP export runtime: {e}"))?;
    let exporter = {
        // The tonic channel is built inside the runtime it will run on.
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: Arc::new(exporter),
            runtime: runtime.handle().clone(),
        })
        .with_resource(
            Resource::builder()
                .with_service_name("agent-lifecycle")
                .build(),
        )
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("agent-lifecycle"));
    Ok((
        Telemetry {
            provider,
            runtime: Some(runtime),
        },
        layer,
    ))
}

impl Telemetry {
    /// Exports what is left and stops.
    pub fn shutdown(mut self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("OTLP: shutting down the exporter: {err}");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
