//! WatchEvents with each event encoded once.
//!
//! The generated server encodes every message of every stream itself, so an
//! event fanned out to N watchers would be converted and encoded N times.
//! [`LifecycleServer`] wraps the generated server and answers the WatchEvents
//! path with a codec whose items are already-encoded messages: a live event
//! is encoded by the first stream that sends it and cached on the event
//! (`LifecycleEvent::encoded`); every other stream copies the bytes. The
//! wire format is exactly `WatchEventsResponse`, so clients see no
//! difference. Every other path goes to the generated server.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::{Stream, StreamExt};
use prost::Message;
use tonic::{
    Status,
    body::Body as TonicBody,
    codec::{Codec, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, StdError, http},
    server::{Grpc, NamedService, ServerStreamingService},
};

use super::{
    LifecycleHandler,
    handler::{event_message, item_to_pb},
    pb::{self, agent_lifecycle_service_server::AgentLifecycleServiceServer},
};
use crate::{
    domain::{LifecycleEvent, TransitionPolicy},
    service::WatchItem,
};

const WATCH_PATH: &str = "/agentlifecycle.v1.AgentLifecycleService/WatchEvents";

/// A message of a watch stream, ready for the wire.
pub enum Encoded {
    /// A live or replayed event; its cached encoding is written.
    Event(Arc<LifecycleEvent>),
    /// Anything else (progress, snapshot), encoded for this stream alone.
    Message(Box<pb::WatchEventsResponse>),
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
    /// Serves `handler`, refusing request messages over `max_request_bytes`.
    pub fn new(handler: LifecycleHandler, max_request_bytes: usize) -> Self {
        LifecycleServer {
            generated: AgentLifecycleServiceServer::new(handler.clone())
                .max_decoding_message_size(max_request_bytes),
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
        let limit = self.max_request_bytes;
        let codec = WatchCodec(Arc::new(self.handler.policy().clone()));
        Box::pin(async move {
            let mut grpc = Grpc::new(codec).apply_max_message_size_config(Some(limit), None);
            Ok(grpc.server_streaming(route, request).await)
        })
    }
}

struct WatchRoute(LifecycleHandler);

type EncodedStream = Pin<Box<dyn Stream<Item = Result<Encoded, Status>> + Send>>;

impl ServerStreamingService<pb::WatchEventsRequest> for WatchRoute {
    type Response = Encoded;
    type ResponseStream = EncodedStream;
    type Future = BoxFuture<tonic::Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: tonic::Request<pb::WatchEventsRequest>) -> Self::Future {
        let handler = self.0.clone();
        Box::pin(async move {
            let watcher = handler.open_watcher(request.into_inner())?;
            let policy = handler.policy().clone();
            let stream = futures_util::stream::unfold(
                (watcher, policy),
                |(mut watcher, policy)| async move {
                    let item = watcher.next().await?;
                    let message = item
                        .map(|item| match item {
                            WatchItem::Event(event) => Encoded::Event(event),
                            other => Encoded::Message(Box::new(item_to_pb(other, &policy))),
                        })
                        .map_err(Status::from);
                    Some((message, (watcher, policy)))
                },
            );
            Ok(tonic::Response::new(stream.boxed()))
        })
    }
}

/// Encodes [`Encoded`] items (events with the server's policy, for their
/// `valid_transitions`) and decodes requests with prost.
struct WatchCodec(Arc<TransitionPolicy>);

impl Codec for WatchCodec {
    type Encode = Encoded;
    type Decode = pb::WatchEventsRequest;
    type Encoder = WatchEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::WatchEventsRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        WatchEncoder(Arc::clone(&self.0))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct WatchEncoder(Arc<TransitionPolicy>);

impl Encoder for WatchEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            Encoded::Event(event) => {
                let bytes = event
                    .encoded
                    .get_or_init(|| event_message(&event, &self.0).encode_to_vec());
                bytes::BufMut::put_slice(dst, bytes);
            }
            Encoded::Message(message) => message
                .encode(dst)
                .expect("encoding into a growable buffer cannot run out of space"),
        }
        Ok(())
    }
}
