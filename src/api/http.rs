//! The HTTP listener (`--http-listen`):
//!
//! - `/metrics`: the Prometheus text format (every metric of the service's
//!   one registry; the store's oldest retained sequence and size are read
//!   at each scrape);
//! - `/`: the live fleet dashboard, one self-contained page (no build step)
//!   over the three JSON endpoints below;
//! - `/api/agents`: every agent, as JSON; `?as_of=SEQUENCE` or
//!   `?as_of_ms=MILLIS` (since the epoch): as they were then (the
//!   dashboard's time slider);
//! - `/api/range`: the retained log's ends (oldest and head sequences and
//!   their commit times), the slider's bounds;
//! - `/api/history?agent=ID`: the agent's newest 1,000 transitions, oldest
//!   first (the dashboard's timeline);
//! - `/api/events`: committed events as server-sent events (one `data:` line
//!   of JSON per event, a comment while idle), live from the moment of the
//!   request;
//! - `/api/distribution`: agents per state over the last hour, from the
//!   event log.
//!
//! HTTP/1.1. The listener has no authentication: bind it where only the
//! people and systems allowed to see the whole fleet reach it.

use std::{convert::Infallible, future::Future};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Frame, body::Incoming, header};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{
    AgentLifecycleService,
    domain::{Agent, LifecycleEvent},
    service::{WatchItem, WatchRequest},
};

/// The dashboard page.
const DASHBOARD: &str = include_str!("../../static/dashboard.html");

/// A response body: a whole text, or a stream of events.
type Body = BoxBody<Bytes, Infallible>;

/// The Prometheus text exposition format's content type.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves HTTP on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    service: AgentLifecycleService,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "accepting an HTTP connection failed");
                    continue;
                }
            },
        };
        let service = service.clone();
        tokio::spawn(async move {
            let handler = hyper::service::service_fn(move |request| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(answer(&service, &request).await) }
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), handler)
                .await
            {
                debug!(%peer, error = %err, "HTTP connection ended");
            }
        });
    }
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed());
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// Milliseconds since the Unix epoch (what JavaScript's `Date` takes).
fn millis(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An agent as the dashboard reads it.
fn agent_json(agent: &Agent) -> serde_json::Value {
    json!({
        "agent_id": agent.id.to_string(),
        "name": &*agent.name,
        "labels": &*agent.labels,
        "state": agent.state.as_str(),
        "version": agent.version,
        "updated_ms": millis(agent.updated_at),
    })
}

/// An event as the dashboard reads it.
fn event_json(event: &LifecycleEvent) -> serde_json::Value {
    let record = &event.record;
    json!({
        "sequence": record.sequence,
        "agent_id": record.agent_id.to_string(),
        "from": record.from.map(|s| s.as_str()),
        "to": record.to.as_str(),
        "at_ms": millis(record.at),
        "reason": record.reason,
        "triggered_by": record.triggered_by,
        "principal": record.principal,
        "agent": agent_json(&event.agent),
    })
}

fn json_response(value: &serde_json::Value) -> Response<Body> {
    text(StatusCode::OK, "application/json", value.to_string())
}

/// `/api/events`: server-sent events from now on, until the client goes or
/// the service shuts down.
async fn events(service: &AgentLifecycleService) -> Response<Body> {
    let watcher = match service.watch(WatchRequest::default()).await {
        Ok(watcher) => watcher,
        Err(err) => {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("{err}\n"),
            );
        }
    };
    let frames = futures_util::stream::unfold(watcher, |mut watcher| async move {
        let item = watcher.next().await?;
        let chunk = match item {
            Ok(WatchItem::Event(event)) => format!("data: {}\n\n", event_json(&event)),
            Ok(WatchItem::Progress { head_sequence }) => format!(": head {head_sequence}\n\n"),
            // No snapshot is asked for.
            Ok(WatchItem::SnapshotAgent(_) | WatchItem::SnapshotComplete { .. }) => String::new(),
            Err(err) => format!(
                "event: end\ndata: {}\n\n",
                json!({ "error": err.to_string() })
            ),
        };
        Some((chunk, watcher))
    })
    .map(|chunk| Ok::<_, Infallible>(Frame::data(Bytes::from(chunk))));
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// `/api/distribution`: agents per state at 30 points of the last hour.
async fn distribution(service: &AgentLifecycleService) -> Response<Body> {
    let fleet = crate::automation::analytics::for_fleet(
        service,
        std::time::Duration::from_secs(3600),
        &crate::domain::Labels::new(),
        30,
        0,
    )
    .await;
    match fleet {
        Ok(fleet) => {
            let points: Vec<_> = fleet
                .distribution
                .iter()
                .map(|(at, counts)| {
                    let counts: serde_json::Map<String, serde_json::Value> = counts
                        .iter()
                        .map(|(s, n)| (s.as_str().to_string(), json!(n)))
                        .collect();
                    json!({ "at_ms": millis(*at), "agents": counts })
                })
                .collect();
            json_response(&json!({ "points": points }))
        }
        Err(err) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!("{err}\n"),
        ),
    }
}

/// The value of `key` in a query string.
fn query_value<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn bad_request(message: impl Into<String>) -> Response<Body> {
    text(
        StatusCode::BAD_REQUEST,
        "text/plain; charset=utf-8",
        message.into() + "\n",
    )
}

/// A failed read: the client's for a point out of range, else the server's.
fn read_failed(err: &crate::Error) -> Response<Body> {
    let status = match err {
        crate::Error::SequenceCompacted { .. }
        | crate::Error::TimeCompacted { .. }
        | crate::Error::SequenceNotYetWritten { .. } => StatusCode::BAD_REQUEST,
        crate::Error::AgentNotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(status, "text/plain; charset=utf-8", format!("{err}\n"))
}

/// `/api/agents`: now, or at `as_of` (a sequence) or `as_of_ms`.
async fn agents(service: &AgentLifecycleService, query: Option<&str>) -> Response<Body> {
    use crate::service::AsOf;
    let point = match (query_value(query, "as_of"), query_value(query, "as_of_ms")) {
        (Some(sequence), _) => match sequence.parse() {
            Ok(sequence) => Some(AsOf::Sequence(sequence)),
            Err(_) => return bad_request(format!("as_of={sequence:?} is not a sequence")),
        },
        (None, Some(ms)) => match ms.parse::<u64>() {
            Ok(ms) => Some(AsOf::Time(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )),
            Err(_) => return bad_request(format!("as_of_ms={ms:?} is not a number")),
        },
        (None, None) => None,
    };
    let Some(point) = point else {
        let agents: Vec<_> = service
            .get_all_agent_statuses()
            .into_values()
            .map(|info| agent_json(&info.agent))
            .collect();
        return json_response(&json!({ "agents": agents }));
    };
    let read = async {
        let sequence = service.resolve_as_of(point).await?;
        Ok::<_, crate::Error>((sequence, service.fleet_as_of(sequence).await?))
    };
    match read.await {
        Ok((sequence, fleet)) => {
            let agents: Vec<_> = fleet.iter().map(|a| agent_json(&a.agent)).collect();
            json_response(&json!({ "agents": agents, "as_of_sequence": sequence }))
        }
        Err(err) => read_failed(&err),
    }
}

/// `/api/range`: the oldest retained event and the head, with their times.
async fn range(service: &AgentLifecycleService) -> Response<Body> {
    let read = async {
        service.catch_up_with_store().await?;
        let head = service.head_sequence();
        let oldest = service.oldest_sequence().await?;
        let ends = service.commit_times(oldest, head).await?;
        Ok::<_, crate::Error>((oldest, head, ends))
    };
    match read.await {
        Ok((oldest, head, (first, last))) => json_response(&json!({
            "oldest_sequence": oldest,
            "oldest_ms": first.map(millis),
            "head_sequence": head,
            "head_ms": last.map(millis),
        })),
        Err(err) => read_failed(&err),
    }
}

/// `/api/history?agent=ID`: the agent's newest transitions, oldest first.
async fn history(service: &AgentLifecycleService, query: Option<&str>) -> Response<Body> {
    let Some(id) = query_value(query, "agent") else {
        return bad_request("agent=ID is required");
    };
    let Ok(id) = id.parse::<uuid::Uuid>() else {
        return bad_request(format!("agent={id:?} is not a UUID"));
    };
    let query = crate::service::HistoryQuery {
        limit: 1000,
        ..Default::default()
    };
    match service
        .history(crate::domain::AgentId::from(id), query)
        .await
    {
        Ok(page) => {
            let transitions: Vec<_> = page
                .transitions
                .iter()
                .map(|r| {
                    json!({
                        "sequence": r.sequence,
                        "from": r.from.map(|s| s.as_str()),
                        "to": r.to.as_str(),
                        "at_ms": millis(r.at),
                        "reason": r.reason,
                        "triggered_by": r.triggered_by,
                    })
                })
                .collect();
            json_response(
                &json!({ "transitions": transitions, "now_ms": millis(std::time::SystemTime::now()) }),
            )
        }
        Err(err) => read_failed(&err),
    }
}

async fn answer(service: &AgentLifecycleService, request: &Request<Incoming>) -> Response<Body> {
    if request.method() == Method::GET {
        match request.uri().path() {
            "/" => return text(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
            "/api/agents" => return agents(service, request.uri().query()).await,
            "/api/range" => return range(service).await,
            "/api/history" => return history(service, request.uri().query()).await,
            "/api/events" => return events(service).await,
            "/api/distribution" => return distribution(service).await,
            _ => {}
        }
    }
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            if let Err(err) = service.refresh_store_metrics().await {
                warn!(error = %err, "reading the store's size for a scrape failed");
            }
            text(
                StatusCode::OK,
                METRICS_CONTENT_TYPE,
                service.metrics().encode_text(),
            )
        }
        (_, "/metrics") => text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; try / or /metrics\n",
        ),
    }
}
