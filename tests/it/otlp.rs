//! OpenTelemetry tracing over OTLP, from the real binary to a collector the
//! test runs: with `--otlp-endpoint`, the server exports a span per RPC
//! (named `grpc`, with the method) that continues the caller's W3C
//! `traceparent`, and a span per commit batch; the last spans are flushed
//! when the server stops.

use crate::common;

use std::sync::{Arc, Mutex};

use agent_lifecycle::api::grpc::pb;
use common::process::ServerProcess;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::Span,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// Keeps every span it receives.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.0.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            other => Some(format!("{other:?}")),
        })
}

/// Multi-threaded: the collector answers while the test blocks on the
/// server's exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_and_continue_the_callers_trace() {
    let collector = Collector::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    let endpoint = format!("http://{addr}");
    let mut server = ServerProcess::start(&["--store", "memory", "--otlp-endpoint", &endpoint]);
    let mut client = server.client().await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let parent_id = "b7ad6b7169203331";
    let mut request = Request::new(pb::RegisterAgentRequest::default());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01")
            .parse()
            .expect("header value"),
    );
    client.register_agent(request).await.expect("register");
    client
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect("list");
    // Stopping flushes the spans still in the batch.
    drop(client);
    assert!(server.terminate().success(), "{}", server.log());

    let spans = collector.0.lock().expect("spans").clone();
    let register = spans
        .iter()
        .find(|s| {
            s.name == "grpc"
                && attribute(s, "method").is_some_and(|m| m.ends_with("/RegisterAgent"))
        })
        .unwrap_or_else(|| panic!("a RegisterAgent span among {spans:#?}{}", server.log()));
    assert_eq!(hex(&register.trace_id), trace_id, "the caller's trace");
    assert_eq!(
        hex(&register.parent_span_id),
        parent_id,
        "the caller's span"
    );
    let list = spans
        .iter()
        .find(|s| attribute(s, "method").is_some_and(|m| m.ends_with("/ListAgents")))
        .expect("a ListAgents span");
    assert_ne!(
        hex(&list.trace_id),
        trace_id,
        "a call without traceparent starts a trace"
    );
    assert!(
        spans.iter().any(|s| s.name == "commit"),
        "a commit batch span among {spans:#?}"
    );
    served.abort();
}
