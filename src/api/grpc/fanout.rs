//! The lifecycle service as served: the generated server for every unary
//! RPC, and WatchEvents with each event encoded once.
//!
//! The generated server encodes every message of every stream itself, so an
//! event fanned out to N watchers would be converted and encoded N times.
//! [`LifecycleServer`] answers the WatchEvents path before the generated
//! server sees it, with a codec that encodes [`WatchItem`]s: a live event is
//! encoded by the first stream that sends it and cached on the event
//! (`LifecycleEvent::encoded`); every other stream copies the bytes.
//! Progress and snapshot items are encoded per stream. The wire format is
//! exactly `WatchEventsResponse`, so clients see no difference.
//!
//! # One WatchEvents implementation
//! The RPC's logic is `LifecycleHandler::watch` in `handler.rs` (validate,
//! open the watcher, yield its items); this module routes the path to it
//! and encodes the items. The other way to one implementation, the
//! generated trait's `watch_events` returning this stream, would need other
//! generated code: the trait fixes the items to `pb::WatchEventsResponse`
//! and the codec to prost, and neither can carry bytes encoded once, so the
//! server side would have to be generated with another message type or
//! codec than the client side. Routing one path costs one comparison. The
//! generated `watch_events` is therefore unreachable and says so (it
//! answers UNIMPLEMENTED); the handler module is private, so the handler is
//! served only through [`LifecycleServer`].

use std::{
    convert::Infallible,
    task::{Context, Poll},
};

use prost::Message;
use tonic::{
    Status,
    body::Body as TonicBody,
    codec::{Codec, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, ServerStreamingService},
};

use super::{
    convert,
    handler::{LifecycleHandler, WatchItems},
    pb::{self, agent_lifecycle_service_server::AgentLifecycleServiceServer},
};
use crate::service::{AgentLifecycleService, WatchItem};

/// The WatchEvents path, answered here rather than by the generated server.
const WATCH_PATH: &str = "/agentlifecycle.v1.AgentLifecycleService/WatchEvents";

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

    /// Serves `service`, recording heartbeats in `health` (the one the
    /// health monitor watches).
    pub fn with_health(
        service: AgentLifecycleService,
        health: crate::automation::health::Health,
        max_request_bytes: usize,
    ) -> Self {
        Self::with_handler(
            LifecycleHandler::with_health(service, health),
            max_request_bytes,
        )
    }

    /// This server with `limits` (transition rates, watch caps).
    pub fn with_limits(self, limits: std::sync::Arc<super::limits::Limits>) -> Self {
        Self::with_handler(self.handler.with_limits(limits), self.max_request_bytes)
    }

    fn with_handler(handler: LifecycleHandler, max_request_bytes: usize) -> Self {
        LifecycleServer {
            generated: AgentLifecycleServiceServer::new(handler.clone())
                .max_decoding_message_size(max_request_bytes)
                .max_encoding_message_size(super::MAX_RESPONSE_BYTES),
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
                .apply_max_message_size_config(Some(limit), Some(super::MAX_RESPONSE_BYTES));
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
        tonic_prost::ProstDecoder::default()
    }
}

struct WatchEncoder(AgentLifecycleService);

impl Encoder for WatchEncoder {
    type Item = WatchItem;
    type Error = Status;

    fn encode(&mut self, item: WatchItem, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        let policy = self.0.policy();
        match item {
            WatchItem::Event(event) => {
                let bytes = event
                    .encoded
                    .get_or_init(|| convert::event_to_pb(&event, policy).encode_to_vec());
                bytes::BufMut::put_slice(dst, bytes);
            }
            other => convert::watch_item_to_pb(other, policy)
                .encode(dst)
                .expect("encoding into a growable buffer cannot run out of space"),
        }
        Ok(())
    }
}
