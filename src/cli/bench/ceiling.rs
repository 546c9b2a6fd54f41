//! `bench ceiling`: the baseline every other figure is read against. A bare
//! tonic echo server (a process of its own, `bench echo-server`, with the
//! lifecycle server's HTTP/2 settings) answers 100-byte unary calls; the
//! same closed-loop client as `bench transition` (N workers, one request in
//! flight each, over C connections) measures throughput, latency and the
//! server's CPU time per call (from `/proc` of its PID).
//!
//! The same process serves the bare fan-out that `bench watch --baseline`
//! reads its figures against: `Publish` puts a message on a tokio
//! broadcast channel (capacity the server's default event buffer) with the
//! next sequence number in its first 8 bytes, `Subscribe` streams the
//! channel to each subscriber, `Head` answers the last sequence. No
//! storage, no validation, no encoding: what a fan-out costs in tonic.
//!
//! Started with `--durable DIR`, the same process also serves the durable
//! echo, the baseline of a store that makes each change durable before its
//! answer: `DurableEcho` hands its payload to one writer thread, which
//! inserts every call waiting (up to the server's default batch) as rows of
//! a bare SQLite file in DIR (WAL, `synchronous = FULL`, the store's
//! cache), in one transaction and so one fsync, and then answers each call
//! with its own bytes. No validation, no agents, no events: what group
//! commit with an fsync before the answer costs on this disk, in tonic.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, mpsc},
    task::{Context, Poll},
    time::{Duration, Instant},
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
    transport::{Channel, Server},
};

use agent_lifecycle::service::DEFAULT_MAX_BATCH;

use crate::cli::process::{ServerCommand, ServerProcess};

use super::{
    LoadArgs, ensure_positive,
    server::TempDir,
    stats::{Latencies, median, nanos, rate, secs},
};

/// The echo method's path.
const ECHO_PATH: &str = "/agentlifecycle.bench.Echo/Echo";
/// The bare fan-out's methods.
pub(super) const PUBLISH_PATH: &str = "/agentlifecycle.bench.Echo/Publish";
pub(super) const SUBSCRIBE_PATH: &str = "/agentlifecycle.bench.Echo/Subscribe";
pub(super) const HEAD_PATH: &str = "/agentlifecycle.bench.Echo/Head";
/// The durable echo's method.
const DURABLE_PATH: &str = "/agentlifecycle.bench.Echo/DurableEcho";

/// Bytes per call, about a TransitionAgent request.
const PAYLOAD: usize = 100;

/// Raw bytes in, raw bytes out.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RawCodec;

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
pub(super) async fn serve(durable: Option<PathBuf>) -> anyhow::Result<()> {
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

/// Which echo a load calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EchoKind {
    /// The bare echo: the ceiling of any unary call.
    Plain,
    /// The durable echo: the ceiling of a call answered after an fsync.
    Durable,
}

impl EchoKind {
    fn path(self) -> &'static str {
        match self {
            EchoKind::Plain => ECHO_PATH,
            EchoKind::Durable => DURABLE_PATH,
        }
    }
}

/// One worker's run: echoes back to back until `end`, latencies of those
/// started after `warm_end`.
async fn echo_worker(
    channel: Channel,
    kind: EchoKind,
    warm_end: Instant,
    end: Instant,
) -> (Vec<u64>, u64) {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = http::uri::PathAndQuery::from_static(kind.path());
    let payload = Bytes::from(vec![7u8; PAYLOAD]);
    let mut latencies = Vec::new();
    let mut errors = 0;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let ready = grpc.ready().await;
        let answer = match ready {
            Ok(()) => {
                grpc.unary(tonic::Request::new(payload.clone()), path.clone(), RawCodec)
                    .await
            }
            Err(err) => Err(Status::unavailable(err.to_string())),
        };
        match answer {
            Ok(_) if started >= warm_end => latencies.push(nanos(started.elapsed())),
            Ok(_) => {}
            Err(_) => {
                errors += 1;
                if errors > 100 {
                    break;
                }
            }
        }
    }
    (latencies, errors)
}

/// One measured load on the echo: what `bench ceiling` reports per run,
/// and what `--baseline` sets beside each run of another benchmark.
#[derive(Debug)]
pub(super) struct EchoFigures {
    pub(super) per_second: f64,
    pub(super) latencies: Latencies,
    pub(super) cpu_us: f64,
    pub(super) errors: u64,
}

impl EchoFigures {
    /// Rate, latencies, server CPU per call and errors, on one line.
    pub(super) fn line(&self) -> String {
        format!(
            "{:.1}/s  {}  server CPU {:.1} us/call  errors {}",
            self.per_second,
            self.latencies.line(),
            self.cpu_us,
            self.errors
        )
    }
}

/// A running echo server (a process of its own) and connections to it.
pub(super) struct EchoBaseline {
    // Declared before `dir`, so that the server is stopped before its
    // directory is removed.
    server: ServerProcess,
    channels: Vec<Channel>,
    /// The durable echo's directory, when it serves one.
    dir: Option<TempDir>,
}

impl EchoBaseline {
    /// The server's PID.
    pub(super) fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// The server's URL.
    pub(super) fn url(&self) -> String {
        self.server.url()
    }

    /// Spawns `bench echo-server` from this executable and opens
    /// `connections` connections to it; with `durable`, the server also
    /// serves the durable echo, on a file in a directory of its own under
    /// `durable`, removed when this is dropped.
    ///
    /// # Errors
    /// The directory cannot be made, or the server does not start or
    /// cannot be reached.
    pub(super) async fn start(connections: usize, durable: Option<&Path>) -> anyhow::Result<Self> {
        let binary = std::env::current_exe().context("locating this executable")?;
        let mut command = ServerCommand::new(binary).leading(["bench", "echo-server"]);
        let dir = match durable {
            Some(parent) => {
                let dir = TempDir(parent.join(format!(
                    "agent-lifecycle-durable-echo-{}",
                    std::process::id()
                )));
                std::fs::create_dir_all(&dir.0)
                    .with_context(|| format!("creating {}", dir.0.display()))?;
                command = command.args([std::ffi::OsStr::new("--durable"), dir.0.as_os_str()]);
                Some(dir)
            }
            None => None,
        };
        let server = tokio::task::spawn_blocking(move || {
            ServerProcess::start(&command, Duration::from_secs(30))
        })
        .await
        .context("starting the echo server")??;
        let url = server.url();
        let mut channels = Vec::with_capacity(connections);
        for _ in 0..connections {
            channels.push(super::client::connect(&url).await?);
        }
        Ok(EchoBaseline {
            server,
            channels,
            dir,
        })
    }

    /// Whether the server serves the durable echo.
    pub(super) fn durable(&self) -> bool {
        self.dir.is_some()
    }

    /// `concurrency` workers over the connections calling `kind` for
    /// `warmup`, then measured for `duration`.
    ///
    /// # Errors
    /// `/proc` of the server cannot be read, or a worker panicked.
    pub(super) async fn measure(
        &self,
        kind: EchoKind,
        concurrency: usize,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<EchoFigures> {
        let start = Instant::now();
        let warm_end = start + warmup;
        let end = warm_end + duration;
        let mut tasks = Vec::with_capacity(concurrency);
        for i in 0..concurrency {
            let channel = self.channels[i % self.channels.len()].clone();
            tasks.push(tokio::spawn(echo_worker(channel, kind, warm_end, end)));
        }
        // The server's CPU time over the measured part of the run.
        tokio::time::sleep_until(warm_end.into()).await;
        let cpu_before = self.server.cpu_time()?;
        let mut latencies = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (l, e) = task.await.context("an echo worker panicked")?;
            latencies.extend(l);
            errors += e;
        }
        let cpu = self.server.cpu_time()?.saturating_sub(cpu_before);
        let calls = latencies.len() as u64;
        let cpu_us = if calls > 0 {
            cpu.as_secs_f64() * 1e6 / calls as f64
        } else {
            0.0
        };
        Ok(EchoFigures {
            per_second: rate(calls, duration),
            latencies: Latencies::from_samples(latencies),
            cpu_us,
            errors,
        })
    }
}

/// Runs `bench ceiling`; with `--durable-baseline`, each run also loads
/// the durable echo and reports its ratio to the echo.
///
/// # Errors
/// Bad arguments, the echo server not starting, a panicked worker.
pub(super) async fn run(args: LoadArgs) -> anyhow::Result<()> {
    ensure_positive("concurrency", args.concurrency)?;
    ensure_positive("connections", args.connections)?;
    ensure_positive("runs", args.runs)?;
    let echo = EchoBaseline::start(args.connections, args.durable_baseline.as_deref()).await?;
    println!(
        "ceiling: bare tonic echo, {PAYLOAD}-byte payload, {} workers over {} connections, {} per run ({} warm-up), {} runs",
        args.concurrency,
        args.connections,
        secs(args.duration),
        secs(args.warmup),
        args.runs
    );
    if let Some(dir) = &args.durable_baseline {
        println!(
            "  and the durable echo: each call a row of a bare SQLite file under {}, one fsync per batch",
            dir.display()
        );
    }
    let mut throughputs = Vec::new();
    let mut cpu_per_call = Vec::new();
    let mut all = Vec::new();
    let mut durable_ratios = Vec::new();
    for run in 1..=args.runs {
        let figures = echo
            .measure(
                EchoKind::Plain,
                args.concurrency,
                args.warmup,
                args.duration,
            )
            .await?;
        println!(
            "run {run}/{}: {:.1} echoes/s  {}  server CPU {:.1} us/call  errors {}",
            args.runs,
            figures.per_second,
            figures.latencies.line(),
            figures.cpu_us,
            figures.errors
        );
        if echo.durable() {
            let durable = echo
                .measure(
                    EchoKind::Durable,
                    args.concurrency,
                    args.warmup,
                    args.duration,
                )
                .await?;
            let ratio = durable.per_second / figures.per_second.max(f64::MIN_POSITIVE);
            println!(
                "  durable echo just after: {}  ->  ratio {ratio:.2}",
                durable.line()
            );
            durable_ratios.push(ratio);
        }
        throughputs.push(figures.per_second);
        cpu_per_call.push(figures.cpu_us);
        all.push(figures.latencies);
    }
    println!(
        "median: {:.1} echoes/s  {}  server CPU {:.1} us/call",
        median(throughputs.into_iter()),
        Latencies::median_of(&all).line(),
        median(cpu_per_call.into_iter())
    );
    if !durable_ratios.is_empty() {
        println!(
            "median ratio of the durable echo to the echo: {:.2}",
            median(durable_ratios.into_iter())
        );
    }
    Ok(())
}
