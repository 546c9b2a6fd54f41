//! `bench echo-server`: the process `bench ceiling` and the baselines of
//! the other benchmarks load. It serves, with the lifecycle server's HTTP/2
//! and connection settings:
//!
//! - `Echo`: answers every unary call with its own bytes;
//! - the bare fan-out that `bench watch --baseline` reads its figures
//!   against: `Publish` puts a message on a tokio broadcast channel
//!   (capacity the server's default event buffer) with the next sequence
//!   number in its first 8 bytes, `Subscribe` streams the channel to each
//!   subscriber, `Head` answers the last sequence. No storage, no
//!   validation, no encoding: what a fan-out costs in tonic;
//! - started with `--durable DIR`, the durable echo, the baseline of a
//!   store that makes each change durable before its answer:
//!   `DurableEcho` hands its payload to one writer thread, which inserts
//!   every call waiting (up to the server's default batch) as rows of a
//!   bare SQLite file in DIR (WAL, `synchronous = FULL`, the store's
//!   cache), in one transaction and so one fsync, and then answers each
//!   call with its own bytes. No validation, no agents, no events: what
//!   group commit with an fsync before the answer costs on this disk, in
//!   tonic.
//!
//! Raw bytes in and out ([`RawCodec`]): nothing is encoded or decoded.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, mpsc},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::Stream;
use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{broadcast, oneshot};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, http},
    server::{Grpc, NamedService, ServerStreamingService, UnaryService},
    transport::Server,
};

use agent_lifecycle::service::DEFAULT_MAX_BATCH;

/// The echo method's path.
pub(super) const ECHO_PATH: &str = "/agentlifecycle.bench.Echo/Echo";
/// The bare fan-out's methods.
pub(in crate::cli::bench) const PUBLISH_PATH: &str = "/agentlifecycle.bench.Echo/Publish";
pub(in crate::cli::bench) const SUBSCRIBE_PATH: &str = "/agentlifecycle.bench.Echo/Subscribe";
pub(in crate::cli::bench) const HEAD_PATH: &str = "/agentlifecycle.bench.Echo/Head";
/// The durable echo's method.
pub(super) const DURABLE_PATH: &str = "/agentlifecycle.bench.Echo/DurableEcho";

/// Raw bytes in, raw bytes out.
#[derive(Clone, Copy, Debug, Default)]
pub(in crate::cli::bench) struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len)))
    }
}

/// The echo service: answers every call with its own bytes; and the bare
/// fan-out (see the module doc).
#[derive(Clone)]
struct EchoService {
    fanout: Arc<Fanout>,
    /// The durable echo's writer, when started with `--durable`.
    durable: Option<mpsc::Sender<DurableCall>>,
}

/// A durable echo call: its payload and where its answer goes.
type DurableCall = (Bytes, oneshot::Sender<Result<Bytes, String>>);

/// The durable echo's file: the store's pragmas, one table of payloads.
fn durable_open(dir: &Path) -> anyhow::Result<Connection> {
    let path = dir.join("durable-echo.db");
    let conn = Connection::open(&path).with_context(|| format!("opening {}", path.display()))?;
    conn.execute_batch(agent_lifecycle::store::SQLITE_PRAGMAS)
        .context("configuring the durable echo's file")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS echoes (sequence INTEGER PRIMARY KEY, payload BLOB NOT NULL);",
    )
    .context("creating the durable echo's table")?;
    Ok(conn)
}

/// The durable echo's writer thread: takes every call waiting (up to
/// [`DEFAULT_MAX_BATCH`]), inserts their payloads in one transaction, and
/// answers them after the commit; until every sender is gone.
fn durable_writer(mut conn: Connection, calls: mpsc::Receiver<DurableCall>) {
    let mut waiting = Vec::new();
    while let Ok(first) = calls.recv() {
        waiting.push(first);
        while waiting.len() < DEFAULT_MAX_BATCH {
            match calls.try_recv() {
                Ok(call) => waiting.push(call),
                Err(_) => break,
            }
        }
        let outcome = insert_payloads(&mut conn, &waiting).map_err(|err| err.to_string());
        for (payload, answer) in waiting.drain(..) {
            // A caller that went away needs no answer.
            let _ = answer.send(outcome.clone().map(|()| payload));
        }
    }
}

fn insert_payloads(conn: &mut Connection, calls: &[DurableCall]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut insert = tx.prepare_cached("INSERT INTO echoes (payload) VALUES (?1)")?;
        for (payload, _) in calls {
            insert.execute([payload.as_ref()])?;
        }
    }
    tx.commit()
}

struct DurableEcho(Option<mpsc::Sender<DurableCall>>);

impl UnaryService<Bytes> for DurableEcho {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let writer = self.0.clone();
        Box::pin(async move {
            let writer = writer.ok_or_else(|| {
                Status::failed_precondition("this echo server was started without --durable")
            })?;
            let (answer, answered) = oneshot::channel();
            writer
                .send((request.into_inner(), answer))
                .map_err(|_| Status::unavailable("the durable echo's writer stopped"))?;
            match answered.await {
                Ok(Ok(payload)) => Ok(tonic::Response::new(payload)),
                Ok(Err(err)) => Err(Status::internal(format!("durable echo: {err}"))),
                Err(_) => Err(Status::unavailable("the durable echo's writer stopped")),
            }
        })
    }
}

/// The bare fan-out's state.
struct Fanout {
    /// The last sequence handed out, locked while its message is sent so
    /// that the channel's order is sequence order.
    head: Mutex<u64>,
    bus: broadcast::Sender<Bytes>,
}

impl Fanout {
    /// Numbers `message` (its first 8 bytes, little-endian) and broadcasts
    /// it; the sequence, as 8 bytes.
    fn publish(&self, message: Bytes) -> Bytes {
        let mut numbered = BytesMut::from(message.as_ref());
        if numbered.len() < 8 {
            numbered.resize(8, 0);
        }
        let mut head = self.head.lock().unwrap_or_else(PoisonError::into_inner);
        *head += 1;
        numbered[..8].copy_from_slice(&head.to_le_bytes());
        // No subscriber is no error: nobody is listening yet.
        let _ = self.bus.send(numbered.freeze());
        Bytes::copy_from_slice(&head.to_le_bytes())
    }

    fn head(&self) -> Bytes {
        let head = *self.head.lock().unwrap_or_else(PoisonError::into_inner);
        Bytes::copy_from_slice(&head.to_le_bytes())
    }
}

struct Publish(Arc<Fanout>);

impl UnaryService<Bytes> for Publish {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(
            self.0.publish(request.into_inner()),
        )))
    }
}

struct Head(Arc<Fanout>);

impl UnaryService<Bytes> for Head {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, _request: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(self.0.head())))
    }
}

struct Subscribe(Arc<Fanout>);

/// A subscriber's messages; a subscriber that fell behind the channel's
/// capacity gets DATA_LOSS and the stream ends (no backfill here).
type Messages = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

impl ServerStreamingService<Bytes> for Subscribe {
    type Response = Bytes;
    type ResponseStream = Messages;
    type Future = std::future::Ready<Result<tonic::Response<Messages>, Status>>;

    fn call(&mut self, _request: tonic::Request<Bytes>) -> Self::Future {
        let receiver = self.0.bus.subscribe();
        let messages = futures_util::stream::unfold(Some(receiver), |receiver| async move {
            let mut receiver = receiver?;
            match receiver.recv().await {
                Ok(message) => Some((Ok(message), Some(receiver))),
                Err(broadcast::error::RecvError::Lagged(n)) => Some((
                    Err(Status::data_loss(format!("fell {n} messages behind"))),
                    None,
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(messages))))
    }
}

impl NamedService for EchoService {
    const NAME: &'static str = "agentlifecycle.bench.Echo";
}

struct Echo;

impl UnaryService<Bytes> for Echo {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(request.into_inner())))
    }
}

impl Service<http::Request<tonic::body::Body>> for EchoService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let fanout = Arc::clone(&self.fanout);
        let durable = self.durable.clone();
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec);
            Ok(match request.uri().path() {
                ECHO_PATH => grpc.unary(Echo, request).await,
                DURABLE_PATH => grpc.unary(DurableEcho(durable), request).await,
                PUBLISH_PATH => grpc.unary(Publish(fanout), request).await,
                HEAD_PATH => grpc.unary(Head(fanout), request).await,
                SUBSCRIBE_PATH => grpc.server_streaming(Subscribe(fanout), request).await,
                _ => Status::unimplemented("Echo, Publish, Subscribe and Head only").into_http(),
            })
        })
    }
}

/// `bench echo-server`: serves the echo on 127.0.0.1 (a free port, printed
/// as `listening on ADDR`) until SIGTERM or SIGINT, with the lifecycle
/// server's HTTP/2 and connection settings (`server::incoming`); with
/// `durable`, the durable echo too, on a file in that directory.
///
/// # Errors
/// The port cannot be bound, the durable echo's file cannot be made, or
/// serving failed.
pub(in crate::cli::bench) async fn serve(durable: Option<PathBuf>) -> anyhow::Result<()> {
    let durable = match durable {
        Some(dir) => {
            let conn = durable_open(&dir)?;
            let (writer, calls) = mpsc::channel();
            std::thread::Builder::new()
                .name("durable-echo".into())
                .spawn(move || durable_writer(conn, calls))
                .context("starting the durable echo's writer")?;
            Some(writer)
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the echo server")?;
    println!("listening on {}", listener.local_addr()?);
    let incoming = agent_lifecycle::app::server::incoming(listener);
    Server::builder()
        .max_concurrent_streams(agent_lifecycle::app::server::MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(EchoService {
            fanout: Arc::new(Fanout {
                head: Mutex::new(0),
                bus: broadcast::channel(agent_lifecycle::service::DEFAULT_EVENT_BUFFER).0,
            }),
            durable,
        })
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving the echo")
}
