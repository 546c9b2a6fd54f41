//! `bench ceiling`: the baseline every other figure is read against. A bare
//! tonic echo server (a process of its own, `bench echo-server`, with the
//! lifecycle server's HTTP/2 settings) answers 100-byte unary calls; the
//! same closed-loop client as `bench transition` (N workers, one request in
//! flight each, over C connections) measures throughput, latency and the
//! server's CPU time per call (from `/proc` of its PID).

use std::{
    convert::Infallible,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::{Buf, BufMut, Bytes};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, http},
    server::{Grpc, NamedService, UnaryService},
    transport::{Channel, Server, server::TcpIncoming},
};

use agent_lifecycle::process::{ServerCommand, ServerProcess};

use super::{
    LoadArgs, ensure_positive,
    stats::{Latencies, median, nanos, rate, secs},
};

/// The echo method's path.
const ECHO_PATH: &str = "/agentlifecycle.bench.Echo/Echo";

/// Bytes per call, about a TransitionAgent request.
const PAYLOAD: usize = 100;

/// Raw bytes in, raw bytes out.
#[derive(Clone, Copy, Debug, Default)]
struct RawCodec;

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

/// The echo service: answers every call with its own bytes.
#[derive(Clone, Copy, Debug)]
struct EchoService;

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
        Box::pin(async move {
            if request.uri().path() != ECHO_PATH {
                return Ok(Status::unimplemented("only Echo").into_http());
            }
            Ok(Grpc::new(RawCodec).unary(Echo, request).await)
        })
    }
}

/// `bench echo-server`: serves the echo on 127.0.0.1 (a free port, printed
/// as `listening on ADDR`) until SIGTERM or SIGINT, with the lifecycle
/// server's HTTP/2 settings.
///
/// # Errors
/// The port cannot be bound, or serving failed.
pub(super) async fn serve() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the echo server")?;
    println!("listening on {}", listener.local_addr()?);
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    Server::builder()
        .max_concurrent_streams(agent_lifecycle::server::MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(EchoService)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving the echo")
}

/// One worker's run: echoes back to back until `end`, latencies of those
/// started after `warm_end`.
async fn echo_worker(channel: Channel, warm_end: Instant, end: Instant) -> (Vec<u64>, u64) {
    let mut grpc = tonic::client::Grpc::new(channel);
    let path = http::uri::PathAndQuery::from_static(ECHO_PATH);
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

/// Runs `bench ceiling`.
///
/// # Errors
/// Bad arguments, the echo server not starting, a panicked worker.
pub(super) async fn run(args: LoadArgs) -> anyhow::Result<()> {
    ensure_positive("concurrency", args.concurrency)?;
    ensure_positive("connections", args.connections)?;
    ensure_positive("runs", args.runs)?;
    let binary = std::env::current_exe().context("locating this executable")?;
    let command = ServerCommand::new(binary).leading(["bench", "echo-server"]);
    let server = tokio::task::spawn_blocking(move || {
        ServerProcess::start(&command, Duration::from_secs(30))
    })
    .await
    .context("starting the echo server")??;
    let url = server.url();
    let mut channels = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        channels.push(super::client::connect(&url).await?);
    }
    println!(
        "ceiling: bare tonic echo, {PAYLOAD}-byte payload, {} workers over {} connections, {} per run ({} warm-up), {} runs",
        args.concurrency,
        args.connections,
        secs(args.duration),
        secs(args.warmup),
        args.runs
    );
    let mut throughputs = Vec::new();
    let mut cpu_per_call = Vec::new();
    let mut all = Vec::new();
    for run in 1..=args.runs {
        let start = Instant::now();
        let warm_end = start + args.warmup;
        let end = warm_end + args.duration;
        let mut tasks = Vec::with_capacity(args.concurrency);
        for i in 0..args.concurrency {
            let channel = channels[i % channels.len()].clone();
            tasks.push(tokio::spawn(echo_worker(channel, warm_end, end)));
        }
        // The server's CPU time over the measured part of the run.
        tokio::time::sleep_until(warm_end.into()).await;
        let cpu_before = server.cpu_time()?;
        let mut latencies = Vec::new();
        let mut errors = 0;
        for task in tasks {
            let (l, e) = task.await.context("an echo worker panicked")?;
            latencies.extend(l);
            errors += e;
        }
        let cpu = server.cpu_time()?.saturating_sub(cpu_before);
        let calls = latencies.len() as u64;
        let per_second = rate(calls, args.duration);
        let cpu_us = if calls > 0 {
            cpu.as_secs_f64() * 1e6 / calls as f64
        } else {
            0.0
        };
        let stats = Latencies::from_samples(latencies);
        println!(
            "run {run}/{}: {per_second:.1} echoes/s ({calls} in {})  {}  server CPU {cpu_us:.1} us/call  errors {errors}",
            args.runs,
            secs(args.duration),
            stats.line()
        );
        throughputs.push(per_second);
        cpu_per_call.push(cpu_us);
        all.push(stats);
    }
    println!(
        "median: {:.1} echoes/s  {}  server CPU {:.1} us/call",
        median(throughputs.into_iter()),
        Latencies::median_of(&all).line(),
        median(cpu_per_call.into_iter())
    );
    Ok(())
}
