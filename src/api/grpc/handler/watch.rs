//! WatchEvents, end to end: the RPC ([`LifecycleHandler::watch`]: validate,
//! open the watcher), the stream of its items ([`WatchStream`]), and the
//! serving side, [`LifecycleServer`], which answers the WatchEvents path
//! itself with each event encoded once and hands every other path to the
//! generated server.
//!
//! # Encoded once
//! The generated server encodes every message of every stream itself, so an
//! event fanned out to N watchers would be converted and encoded N times.
//! [`LifecycleServer`] answers the WatchEvents path before the generated
//! server sees it, with a codec that encodes [`WatchItem`]s: a live event is
//! encoded by the first stream that sends it and cached on the event
//! (`PublishedEvent::encoding`); every other stream copies the bytes.
//! Progress and snapshot items are encoded per stream. The wire format is
//! exactly `WatchEventsResponse`, so clients see no difference.
//!
//! # One WatchEvents implementation
//! The other way to one implementation, the generated trait's
//! `watch_events` returning this stream, would need other generated code:
//! the trait fixes the items to `pb::WatchEventsResponse` and the codec to
//! prost, and neither can carry bytes encoded once, so the server side
//! would have to be generated with another message type or codec than the
//! client side. Routing one path costs one comparison. The generated
//! `watch_events` ([`watch_events`]) is therefore unreachable and says so
//! (it answers UNIMPLEMENTED); the handler module is private, so the
//! handler is served only through [`LifecycleServer`].
//!
//! Depends on the service's watcher, the conversions, the layer's caller
//! and the rate limits' watch caps; of the transport, only tonic's codec
//! and server-streaming plumbing.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::Stream;
use prost::Message;
use tonic::{
    Request, Response, Status,
    body::Body as TonicBody,
    codec::{Codec, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, ServerStreamingService},
};

use super::LifecycleHandler;
use crate::{
    api::grpc::{
        MAX_RESPONSE_BYTES, convert,
        layer::caller_of,
        pb::{self, agent_lifecycle_service_server::AgentLifecycleServiceServer},
        rate_limit::{Limits, WatchPermit},
        status::not_routed,
    },
    automation::health::HeartbeatMonitor,
    domain::Role,
    service::{AgentLifecycleService, WatchItem, Watcher},
};

/// The WatchEvents path, answered here rather than by the generated server.
const WATCH_PATH: &str = "/agentlifecycle.v1.AgentLifecycleService/WatchEvents";

/// The items of one WatchEvents stream, before encoding: [`WatchEncoder`]
/// encodes them (events once for all streams).
pub type WatchItems = Pin<Box<dyn Stream<Item = Result<WatchItem, Status>> + Send>>;

impl LifecycleHandler {
    /// WatchEvents: validates the request, opens the watcher and returns
    /// its items. The one implementation of the RPC; [`LifecycleServer`]
    /// serves it.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad filter; OUT_OF_RANGE for a compacted or
    /// future `start_sequence`; UNAVAILABLE while shutting down. The stream
    /// itself ends with OUT_OF_RANGE (events compacted while it caught up)
    /// or UNAVAILABLE (shutdown).
    pub async fn watch(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<WatchItems, Status> {
        let caller = caller_of(&request);
        let permit = self.limits.open_watch(&caller)?;
        let mut watch = convert::watch_request_from_pb(request.into_inner())?;
        if caller.role == Role::Agent {
            // An agent principal watches its own agents only.
            if watch.agent_ids.is_empty() {
                watch.agent_ids = caller.agents.to_vec();
            }
            for id in &watch.agent_ids {
                caller.check_agent(*id)?;
            }
        }
        // On a shared store, events other processes committed are applied
        // first, so a stream resumed here from a sequence another process
        // handed out starts where it should.
        self.service.catch_up_with_store().await?;
        let watcher = self.service.watch(watch).await?;
        Ok(Box::pin(WatchStream {
            state: WatchState::Ready(Box::new(watcher)),
            _permit: permit,
        }))
    }
}

/// One WatchEvents stream's items: the watcher's [`Watcher::try_next`]
/// while items are ready, and a future of [`Watcher::wait`] (then
/// [`Watcher::next`]) only to wait.
/// An event already waiting costs no future, so a stream that keeps up
/// builds one future per wait rather than one per item.
struct WatchStream {
    state: WatchState,
    /// Counts the stream as open until the stream is dropped.
    _permit: WatchPermit,
}

/// The future that waits owns the watcher and hands it back with the item.
type WatchWait =
    Pin<Box<dyn Future<Output = (Box<Watcher>, Option<crate::error::Result<WatchItem>>)> + Send>>;

enum WatchState {
    /// Items may be ready (boxed: a pointer moves in and out of the wait).
    Ready(Box<Watcher>),
    Waiting(WatchWait),
    /// Only between the steps of one poll.
    Taken,
}

impl Stream for WatchStream {
    type Item = Result<WatchItem, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let (watcher, item) = match std::mem::replace(&mut self.state, WatchState::Taken) {
                WatchState::Ready(mut watcher) => match watcher.try_next() {
                    Some(item) => (watcher, item),
                    None => {
                        self.state = WatchState::Waiting(Box::pin(async move {
                            let item = match watcher.wait().await {
                                Some(item) => item,
                                None => watcher.next().await,
                            };
                            (watcher, item)
                        }));
                        continue;
                    }
                },
                WatchState::Waiting(mut wait) => match wait.as_mut().poll(cx) {
                    Poll::Ready(done) => done,
                    Poll::Pending => {
                        self.state = WatchState::Waiting(wait);
                        return Poll::Pending;
                    }
                },
                WatchState::Taken => return Poll::Ready(None),
            };
            self.state = WatchState::Ready(watcher);
            return Poll::Ready(item.map(|item| item.map_err(Status::from)));
        }
    }
}

/// The generated trait's stream type for WatchEvents, never produced.
pub(super) type GeneratedWatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

/// The generated trait's `watch_events`, never reached:
/// [`LifecycleServer`], the only way the handler is served, answers the
/// WatchEvents path itself with [`LifecycleHandler::watch`] before the
/// generated server sees it. The generated signature cannot carry events
/// encoded once, so it is not a second implementation; it answers
/// UNIMPLEMENTED.
pub(super) async fn watch_events(
    _request: Request<pb::WatchEventsRequest>,
) -> Result<Response<GeneratedWatchStream>, Status> {
    Err(not_routed(WATCH_PATH))
}

/// The lifecycle service as served: the generated server, with WatchEvents
/// answered by the encode-once path.
#[derive(Clone)]
pub struct LifecycleServer {
    generated: AgentLifecycleServiceServer<LifecycleHandler>,
    handler: LifecycleHandler,
    max_request_bytes: usize,
}

impl LifecycleServer {
    /// Serves `service`, refusing request messages over `max_request_bytes`.
    pub fn new(service: AgentLifecycleService, max_request_bytes: usize) -> Self {
        Self::with_handler(LifecycleHandler::new(service), max_request_bytes)
    }

    /// Serves `service`, recording heartbeats in `monitor` (the one that
    /// watches them).
    pub fn with_heartbeat_monitor(
        service: AgentLifecycleService,
        monitor: HeartbeatMonitor,
        max_request_bytes: usize,
    ) -> Self {
        Self::with_handler(
            LifecycleHandler::with_heartbeat_monitor(service, monitor),
            max_request_bytes,
        )
    }

    /// This server with `limits` (transition rates, watch caps).
    pub fn with_limits(self, limits: Arc<Limits>) -> Self {
        Self::with_handler(self.handler.with_limits(limits), self.max_request_bytes)
    }

    fn with_handler(handler: LifecycleHandler, max_request_bytes: usize) -> Self {
        LifecycleServer {
            generated: AgentLifecycleServiceServer::new(handler.clone())
                .max_decoding_message_size(max_request_bytes)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
            handler,
            max_request_bytes,
        }
    }
}

impl NamedService for LifecycleServer {
    const NAME: &'static str = pb::agent_lifecycle_service_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for LifecycleServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<TonicBody>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return self.generated.call(request);
        }
        let route = WatchRoute(self.handler.clone());
        let codec = WatchCodec(self.handler.service().clone());
        let limit = self.max_request_bytes;
        Box::pin(async move {
            let mut grpc = Grpc::new(codec)
                .apply_max_message_size_config(Some(limit), Some(MAX_RESPONSE_BYTES));
            Ok(grpc.server_streaming(route, request).await)
        })
    }
}

/// WatchEvents as tonic's server-streaming service: `LifecycleHandler::watch`.
struct WatchRoute(LifecycleHandler);

impl ServerStreamingService<pb::WatchEventsRequest> for WatchRoute {
    type Response = WatchItem;
    type ResponseStream = WatchItems;
    type Future = BoxFuture<tonic::Response<WatchItems>, Status>;

    fn call(&mut self, request: tonic::Request<pb::WatchEventsRequest>) -> Self::Future {
        let handler = self.0.clone();
        Box::pin(async move { handler.watch(request).await.map(tonic::Response::new) })
    }
}

/// Encodes [`WatchItem`]s and decodes requests with prost. Holds the
/// service for its policy: agents on the wire list their valid transitions.
struct WatchCodec(AgentLifecycleService);

impl Codec for WatchCodec {
    type Encode = WatchItem;
    type Decode = pb::WatchEventsRequest;
    type Encoder = WatchEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::WatchEventsRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        WatchEncoder(self.0.clone())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(crate::api::grpc::codec::settings())
    }
}

/// Encodes one stream's items: a live event from the bytes the first
/// stream to send it encoded, everything else as it comes.
struct WatchEncoder(AgentLifecycleService);

impl Encoder for WatchEncoder {
    type Item = WatchItem;
    type Error = Status;

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        crate::api::grpc::codec::settings()
    }

    fn encode(&mut self, item: WatchItem, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let policy = self.0.policy();
        match item {
            WatchItem::Event(event) => {
                let bytes = event
                    .encoding()
                    .get_or_init(|| convert::event_to_pb(&event, policy).encode_to_vec());
                bytes::BufMut::put_slice(dst, bytes);
            }
            other => convert::watch_item_to_pb(other, policy)
                .encode(dst)
                .map_err(|err| Status::internal(format!("encoding a watch item: {err}")))?,
        }
        Ok(())
    }
}
