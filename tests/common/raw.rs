//! Raw gRPC for hostile-input tests: request messages sent as the exact
//! bytes given (the server's decoder sees them as they are), whole HTTP/2
//! request bodies sent as given (broken gRPC framing), a hand-written
//! protobuf wire encoder, and a small seeded PRNG.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http_body_util::{BodyExt, Full};
use tonic::{
    Code, Status, Streaming,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{Service, http},
    transport::Channel,
};

/// The lifecycle service's gRPC name.
pub const SERVICE: &str = "agentlifecycle.v1.AgentLifecycleService";

/// `/SERVICE/METHOD`.
pub fn path(method: &str) -> String {
    format!("/{SERVICE}/{method}")
}

/// A codec whose messages are bytes: encoding copies them, decoding takes
/// everything the frame holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Calls the lifecycle service with message bodies given as bytes.
#[derive(Clone)]
pub struct RawClient {
    grpc: tonic::client::Grpc<Channel>,
}

impl RawClient {
    /// A client on `channel`.
    pub fn new(channel: Channel) -> Self {
        RawClient {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))
    }

    /// A unary call of `method` whose request message is `body`.
    pub async fn unary(&mut self, method: &str, body: Bytes) -> Result<Bytes, Status> {
        self.ready().await?;
        let path = path(method).parse().expect("method path");
        self.grpc
            .unary(tonic::Request::new(body), path, BytesCodec)
            .await
            .map(tonic::Response::into_inner)
    }

    /// A client-streaming call of `method` sending `bodies`, one message
    /// each, then ending the stream.
    pub async fn client_streaming(
        &mut self,
        method: &str,
        bodies: Vec<Bytes>,
    ) -> Result<Bytes, Status> {
        self.ready().await?;
        let path = path(method).parse().expect("method path");
        let messages = futures_util::stream::iter(bodies);
        self.grpc
            .client_streaming(tonic::Request::new(messages), path, BytesCodec)
            .await
            .map(tonic::Response::into_inner)
    }

    /// A server-streaming call of `method`: the stream once the response
    /// headers arrived, or the status the call ended with.
    pub async fn server_streaming(
        &mut self,
        method: &str,
        body: Bytes,
    ) -> Result<Streaming<Bytes>, Status> {
        self.ready().await?;
        let path = path(method).parse().expect("method path");
        self.grpc
            .server_streaming(tonic::Request::new(body), path, BytesCodec)
            .await
            .map(tonic::Response::into_inner)
    }
}

/// A gRPC length-prefixed message: `flag`, the `declared` length (big
/// endian) and `payload`, which need not be that long.
pub fn frame(flag: u8, declared: u32, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flag);
    out.extend_from_slice(&declared.to_be_bytes());
    out.extend_from_slice(payload);
    out.into()
}

/// The gRPC status of a call whose whole HTTP/2 request body is `body`,
/// with the usual gRPC request headers plus `headers`; `Err` when no gRPC
/// status came back (the stream or connection failed, or `limit` passed).
pub async fn http_call(
    channel: &Channel,
    method: &str,
    headers: &[(&'static str, &'static str)],
    body: Bytes,
    limit: Duration,
) -> Result<Status, String> {
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path(method))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(tonic::body::Body::new(Full::new(body)))
        .map_err(|e| e.to_string())?;
    let mut channel = channel.clone();
    let call = async move {
        std::future::poll_fn(|cx| channel.poll_ready(cx))
            .await
            .map_err(|e| format!("channel not ready: {e}"))?;
        let response = channel
            .call(request)
            .await
            .map_err(|e| format!("no response: {e}"))?;
        if response.headers().contains_key("grpc-status") {
            return Ok(Status::from_header_map(response.headers()).expect("status header"));
        }
        let collected = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("response body failed: {e}"))?;
        let trailers = collected.trailers().ok_or("the response has no trailers")?;
        Status::from_header_map(trailers).ok_or_else(|| "the trailers carry no grpc-status".into())
    };
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?
}

/// Whether `status` is tonic's answer to a request message prost cannot
/// decode (gRPC maps parse failures to INTERNAL).
pub fn is_decode_error(status: &Status) -> bool {
    status.code() == Code::Internal && status.message().starts_with("failed to decode Protobuf")
}

/// Protobuf wire types.
pub mod wire {
    pub const VARINT: u8 = 0;
    pub const FIXED64: u8 = 1;
    pub const LEN: u8 = 2;
    pub const START_GROUP: u8 = 3;
    pub const FIXED32: u8 = 5;
}

/// Appends protobuf wire format, valid or not.
#[derive(Clone, Debug, Default)]
pub struct Wire(pub Vec<u8>);

impl Wire {
    /// An empty message.
    pub fn new() -> Self {
        Wire(Vec::new())
    }

    /// A varint, in its shortest form.
    pub fn varint(mut self, mut value: u64) -> Self {
        while value >= 0x80 {
            self.0.push((value as u8) | 0x80);
            value >>= 7;
        }
        self.0.push(value as u8);
        self
    }

    /// A field key.
    pub fn key(self, field: u32, wire_type: u8) -> Self {
        self.varint((u64::from(field) << 3) | u64::from(wire_type))
    }

    /// A varint field.
    pub fn uint(self, field: u32, value: u64) -> Self {
        self.key(field, wire::VARINT).varint(value)
    }

    /// A length-delimited field.
    pub fn bytes(self, field: u32, value: &[u8]) -> Self {
        let mut out = self.key(field, wire::LEN).varint(value.len() as u64);
        out.0.extend_from_slice(value);
        out
    }

    /// Bytes as they are.
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub fn into_bytes(self) -> Bytes {
        self.0.into()
    }
}

/// xorshift64*: deterministic for a seed, good enough to pick cases.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// `bytes` as hex, the first `max` of them, for failure messages.
pub fn hex(bytes: &[u8], max: usize) -> String {
    let mut text: String = bytes.iter().take(max).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > max {
        text.push_str(&format!("...({} bytes)", bytes.len()));
    }
    text
}

/// A channel over one TCP connection that [`Cut`] can close abruptly,
/// with whatever streams are open on it.
pub async fn cuttable_channel(url: &str) -> (Channel, Cut) {
    let cut = Cut::default();
    let connector = CuttableConnector(cut.clone());
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect_with_connector(connector)
        .await
        .expect("connect");
    (channel, cut)
}

/// Shuts down the sockets a [`cuttable_channel`] connected.
#[derive(Clone, Debug, Default)]
pub struct Cut(std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>);

impl Cut {
    /// Shuts the connection down in both directions, streams open or not.
    pub fn cut(&self) {
        for socket in self.0.lock().expect("sockets").drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[derive(Clone)]
struct CuttableConnector(Cut);

impl Service<http::Uri> for CuttableConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let sockets = self.0.clone();
        Box::pin(async move {
            let authority = uri.authority().expect("host and port").as_str().to_string();
            let stream = tokio::net::TcpStream::connect(authority).await?;
            stream.set_nodelay(true)?;
            let std = stream.into_std()?;
            sockets.0.lock().expect("sockets").push(std.try_clone()?);
            Ok(hyper_util::rt::TokioIo::new(
                tokio::net::TcpStream::from_std(std)?,
            ))
        })
    }
}
