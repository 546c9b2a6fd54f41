//! `bench ceiling`: the baseline every other figure is read against. A bare
//! tonic echo server (a process of its own, `bench echo-server`, with the
//! lifecycle server's HTTP/2 settings; see `echo_server.rs`) answers
//! 100-byte unary calls; the same closed-loop client as `bench transition`
//! (N workers, one request in flight each, over C connections) measures
//! throughput, latency and the server's CPU time per call (from `/proc` of
//! its PID). [`EchoBaseline`] is that server and its load, which
//! `--baseline` and `--durable-baseline` of the other benchmarks reuse.

mod echo_server;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use tonic::{Status, codegen::http, transport::Channel};

use crate::cli::process::{ServerCommand, ServerProcess};

use self::echo_server::{DURABLE_PATH, ECHO_PATH};
pub(super) use self::echo_server::{HEAD_PATH, PUBLISH_PATH, RawCodec, SUBSCRIBE_PATH, serve};
use super::{
    LoadArgs, ensure_positive,
    server::TempDir,
    stats::{Latencies, median, nanos, rate, secs},
};

/// Bytes per call, about a TransitionAgent request.
const PAYLOAD: usize = 100;

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

/// One call of the bare echo on `channel`; whether it was answered within
/// the tool's deadline.
pub(super) async fn echo_once(channel: Channel, payload: Bytes) -> bool {
    let mut grpc = tonic::client::Grpc::new(channel);
    let call = async {
        grpc.ready()
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        grpc.unary(
            tonic::Request::new(payload),
            http::uri::PathAndQuery::from_static(ECHO_PATH),
            RawCodec,
        )
        .await
    };
    matches!(
        tokio::time::timeout(super::client::CALL_TIMEOUT, call).await,
        Ok(Ok(_))
    )
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

    /// The connections to the server.
    pub(super) fn channels(&self) -> Vec<Channel> {
        self.channels.clone()
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
