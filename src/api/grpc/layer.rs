//! `CallLayer`: the one place that sees every RPC the server answers.
//!
//! `server.rs` applies it with `Server::builder().layer(..)`, so it wraps
//! tonic's router: the lifecycle service (WatchEvents included, although
//! `handler/watch.rs` routes that path itself), health, reflection, and
//! paths no service knows. A tonic interceptor on the generated server
//! would miss WatchEvents and the other services. For each call it:
//!
//! 1. establishes the [`Caller`] and inserts it into the request's http
//!    extensions, which tonic hands on as `tonic::Request::extensions()`;
//!    handlers read it with [`caller_of`]. With an [`Authenticator`] it
//!    authenticates the call (a bearer token, or the client certificate's
//!    common name under mutual TLS) and checks the principal's role against
//!    the method ([`super::access`]): UNAUTHENTICATED or PERMISSION_DENIED
//!    end the call here, before any service sees it. Health and reflection
//!    stay open. Without one every caller is anonymous;
//! 2. opens the call's `grpc` span (field `method`: the gRPC path) and runs
//!    the call inside it;
//! 3. measures the call and hands a [`CallRecord`] to its [`CallObserver`].
//!
//! Depends on tonic's http types, `tracing` and the domain's [`Caller`] only.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tonic::{
    Code,
    codegen::http,
    transport::server::{TcpConnectInfo, TlsConnectInfo},
};
use tower::{Layer, Service};
use tracing::{Instrument, info_span, warn};

use super::{
    access::{self, Access},
    rate_limit::Limits,
};
use crate::{api::auth::Authenticator, domain::Caller};

/// The caller the [`CallLayer`] established for `request`; anonymous when
/// the request did not pass through one (a handler called directly).
pub fn caller_of<T>(request: &tonic::Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_default()
}

/// One call as the layer saw it, from the request's arrival to the response
/// headers.
///
/// For a unary call that is the whole call: tonic sends the headers once the
/// handler has answered. For a streaming call it is the opening of the
/// stream; the messages that follow are not part of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallRecord<'a> {
    /// The gRPC path, `/package.Service/Method`.
    pub method: &'a str,
    /// From the request's arrival at the layer to the response headers.
    pub duration: Duration,
    /// The status code, when known without reading the body:
    /// - `Some(code)` from a trailers-only response, whose headers carry
    ///   `grpc-status` (every error raised before the first message);
    /// - `Some(Code::Cancelled)` when the call was dropped before its
    ///   response headers (the client went away or the connection closed);
    /// - `None` when the status follows in the trailers (every success and
    ///   a stream's later error), or the inner service failed instead of
    ///   answering.
    pub code: Option<Code>,
}

/// Receives a [`CallRecord`] for every call the layer sees.
///
/// Called once per call on the task serving it: when its response headers
/// are ready (before they are sent), or when the call is dropped before
/// that. Keep it short and never block.
pub trait CallObserver: Send + Sync + 'static {
    /// Records one call.
    fn observe(&self, call: &CallRecord<'_>);
}

/// An observer that records nothing: the server keeps no per-call metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct IgnoreCalls;

impl CallObserver for IgnoreCalls {
    fn observe(&self, _call: &CallRecord<'_>) {}
}

/// Two observers, in order.
struct Both(Arc<dyn CallObserver>, Arc<dyn CallObserver>);

impl CallObserver for Both {
    fn observe(&self, call: &CallRecord<'_>) {
        self.0.observe(call);
        self.1.observe(call);
    }
}

/// Wraps every served call: caller, span, measurement (see the module doc).
#[derive(Clone)]
pub struct CallLayer {
    /// Where each call's record goes.
    observer: Arc<dyn CallObserver>,
    /// The identity every call gets when no authentication is configured.
    caller: Caller,
    /// Authenticates every call that is not open.
    auth: Option<Arc<Authenticator>>,
    /// Per-principal request rates.
    limits: Option<Arc<Limits>>,
}

impl CallLayer {
    /// A layer handing every call's record to `observer`.
    pub fn new(observer: Arc<dyn CallObserver>) -> Self {
        CallLayer {
            observer,
            caller: Caller::anonymous(),
            auth: None,
            limits: None,
        }
    }

    /// Limits every authenticated principal's request rate by `limits`.
    pub fn with_limits(mut self, limits: Arc<Limits>) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Authenticates every call with `auth`.
    pub fn with_auth(mut self, auth: Arc<Authenticator>) -> Self {
        self.auth = Some(auth);
        self
    }

    /// The caller of `request`, or the status that refuses it.
    fn caller<B>(&self, request: &http::Request<B>) -> Result<Caller, tonic::Status> {
        let Some(auth) = &self.auth else {
            return Ok(self.caller.clone());
        };
        let path = request.uri().path();
        let needs = access::access(path);
        if needs == Access::Open {
            return Ok(Caller::anonymous());
        }
        let authorization = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.peer_certs());
        let caller = auth
            .authenticate(authorization, certs.as_deref().map(Vec::as_slice))
            .map_err(|err| {
                warn!(method = path, error = %err, "refused: unauthenticated");
                tonic::Status::from(crate::Error::Unauthenticated(err.to_string()))
            })?;
        if !access::allows(caller.role, needs) {
            warn!(
                method = path,
                principal = %caller,
                role = %caller.role,
                "refused: permission denied"
            );
            let method = path.rsplit('/').next().unwrap_or(path);
            return Err(tonic::Status::from(caller.denied(format!("call {method}"))));
        }
        if let Some(limits) = &self.limits {
            limits.admit_request(&caller).map_err(tonic::Status::from)?;
        }
        Ok(caller)
    }

    /// Hands every call's record to `extra` as well.
    pub fn also_observe(mut self, extra: Arc<dyn CallObserver>) -> Self {
        self.observer = Arc::new(Both(self.observer, extra));
        self
    }

    /// Gives every call `caller`, standing in for authentication in tests.
    #[cfg(test)]
    fn with_caller(mut self, caller: Caller) -> Self {
        self.caller = caller;
        self
    }
}

impl Default for CallLayer {
    /// Anonymous callers, records ignored.
    fn default() -> Self {
        CallLayer::new(Arc::new(IgnoreCalls))
    }
}

impl std::fmt::Debug for CallLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallLayer")
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> CallService<S> {
        CallService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`CallLayer`] makes of the one it wraps.
#[derive(Clone, Debug)]
pub struct CallService<S> {
    inner: S,
    layer: CallLayer,
}

impl<S, B, ResBody> Service<http::Request<B>> for CallService<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let mut pending = PendingCall {
            observer: Arc::clone(&self.layer.observer),
            // Shares the request's bytes: no copy of the path.
            uri: request.uri().clone(),
            started: Instant::now(),
            open: true,
        };
        let span = info_span!("grpc", method = %pending.uri.path());
        adopt_remote_parent(&span, request.headers());
        let caller = match span.in_scope(|| self.layer.caller(&request)) {
            Ok(caller) => caller,
            Err(status) => {
                pending.finish(Some(status.code()));
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        };
        request.extensions_mut().insert(caller);
        let response = span.in_scope(|| self.inner.call(request));
        Box::pin(async move {
            let result = response.instrument(span).await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .map(|value| Code::from_bytes(value.as_bytes())),
                Err(_) => None,
            };
            pending.finish(code);
            result
        })
    }
}

/// Reads a W3C Trace Context from the request's metadata.
struct Headers<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Makes `span` a child of the caller's trace when the request carries a
/// `traceparent` (a no-op without an OTLP exporter installed).
fn adopt_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !headers.contains_key("traceparent") {
        return;
    }
    let context =
        opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Headers(headers));
    // An invalid traceparent leaves the span a root, as if there were none.
    let _ = span.set_parent(context);
}

/// A call between its arrival and its response headers. Dropped while
/// still open, it records the call as cancelled.
struct PendingCall {
    observer: Arc<dyn CallObserver>,
    uri: http::Uri,
    started: Instant,
    /// No record handed out yet.
    open: bool,
}

impl PendingCall {
    fn finish(&mut self, code: Option<Code>) {
        self.open = false;
        self.observer.observe(&CallRecord {
            method: self.uri.path(),
            duration: self.started.elapsed(),
            code,
        });
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if self.open {
            self.finish(Some(Code::Cancelled));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{convert::Infallible, sync::Mutex};

    use tokio::{net::TcpListener, sync::oneshot};
    use tonic::{
        Status,
        body::Body,
        codegen::BoxFuture,
        server::{Grpc, NamedService, UnaryService},
        transport::{Channel, Server, server::TcpIncoming},
    };
    use tonic_prost::ProstCodec;

    use super::*;
    use crate::api::grpc::pb::{self, agent_lifecycle_service_client::AgentLifecycleServiceClient};

    /// Keeps every record: method and code.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(String, Option<Code>)>>);

    impl CallObserver for Recorder {
        fn observe(&self, call: &CallRecord<'_>) {
            self.0
                .lock()
                .expect("not poisoned")
                .push((call.method.to_string(), call.code));
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<(String, Option<Code>)> {
            std::mem::take(&mut *self.0.lock().expect("not poisoned"))
        }
    }

    /// A one-method gRPC service answering with the caller its request
    /// carries, read as every handler reads it.
    #[derive(Clone)]
    struct EchoCaller;

    impl NamedService for EchoCaller {
        const NAME: &'static str = "test.EchoCaller";
    }

    impl Service<http::Request<Body>> for EchoCaller {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Self::Error>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            Box::pin(async move {
                let mut grpc = Grpc::new(ProstCodec::default());
                Ok(grpc.unary(Echo, request).await)
            })
        }
    }

    struct Echo;

    impl UnaryService<pb::GetAgentRequest> for Echo {
        type Response = pb::GetAgentResponse;
        type Future = std::future::Ready<Result<tonic::Response<Self::Response>, Status>>;

        fn call(&mut self, request: tonic::Request<pb::GetAgentRequest>) -> Self::Future {
            let caller = caller_of(&request);
            std::future::ready(Ok(tonic::Response::new(pb::GetAgentResponse {
                agent: Some(pb::Agent {
                    name: caller.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            })))
        }
    }

    /// Through tonic's real transport, a handler sees the caller the layer
    /// established: tonic carries http extensions into the request's
    /// `extensions()`. The layer observes the call as well.
    #[tokio::test]
    async fn handlers_see_the_caller_the_layer_established() {
        let recorder = Arc::new(Recorder::default());
        let layer = CallLayer::new(recorder.clone()).with_caller(Caller::principal("alice"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .layer(layer)
                .add_service(EchoCaller)
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                }),
        );
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("ready");
        let response: tonic::Response<pb::GetAgentResponse> = grpc
            .unary(
                tonic::Request::new(pb::GetAgentRequest::default()),
                http::uri::PathAndQuery::from_static("/test.EchoCaller/Echo"),
                ProstCodec::default(),
            )
            .await
            .expect("echo");
        assert_eq!(response.into_inner().agent.expect("agent").name, "alice");
        assert_eq!(
            recorder.take(),
            vec![("/test.EchoCaller/Echo".to_string(), None)]
        );
        drop(grpc);
        stop.send(()).expect("server running");
        server.await.expect("joined").expect("served");
    }

    /// The server as `server.rs` wires it: every call passes the layer, the
    /// lifecycle service's WatchEvents and health included; trailers-only
    /// errors carry their code, successes leave it to the trailers.
    #[tokio::test]
    async fn every_served_call_is_observed() {
        let recorder = Arc::new(Recorder::default());
        let service = crate::AgentLifecycleService::in_memory().expect("service");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(crate::app::server::run_with(
            listener,
            service.clone(),
            crate::automation::health::HeartbeatMonitor::new(
                service,
                crate::automation::health::HealthSettings::default(),
            ),
            CallLayer::new(recorder.clone()),
            async {
                let _ = stopped.await;
            },
        ));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut client = AgentLifecycleServiceClient::new(channel.clone());
        client
            .register_agent(pb::RegisterAgentRequest::default())
            .await
            .expect("register");
        let err = client
            .get_agent(pb::GetAgentRequest {
                agent_id: "x".into(),
                ..Default::default()
            })
            .await
            .expect_err("invalid id");
        assert_eq!(err.code(), Code::InvalidArgument);
        let err = client
            .watch_events(pb::WatchEventsRequest {
                start_sequence: 1_000,
                ..Default::default()
            })
            .await
            .expect_err("not yet written");
        assert_eq!(err.code(), Code::OutOfRange);
        let stream = client
            .watch_events(pb::WatchEventsRequest::default())
            .await
            .expect("watch");
        drop(stream);
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health");

        let service = "/agentlifecycle.v1.AgentLifecycleService";
        assert_eq!(
            recorder.take(),
            vec![
                (format!("{service}/RegisterAgent"), None),
                (format!("{service}/GetAgent"), Some(Code::InvalidArgument)),
                (format!("{service}/WatchEvents"), Some(Code::OutOfRange)),
                (format!("{service}/WatchEvents"), None),
                ("/grpc.health.v1.Health/Check".to_string(), None),
            ]
        );
        drop(client);
        stop.send(()).expect("server running");
        server.await.expect("joined").expect("served");
    }
}
