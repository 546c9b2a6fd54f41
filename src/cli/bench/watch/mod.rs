//! `bench watch`: S event streams on a running server while writers commit
//! on a fixed schedule; latency from each write's scheduled time to its
//! receipt, deliveries/s, and a check that every stream sees every event
//! once, in order.
//!
//! The load is open: write k is scheduled at k / rate after the start and
//! carries its scheduled time (unix nanoseconds, in `reason`). A writer
//! that falls behind sends late writes at once, and their latency counts
//! from when they should have been sent, so a server that cannot keep up
//! shows it in the latency instead of slowing the load down (no coordinated
//! omission). A run whose commit rate falls below 99 % of the target
//! fails the target, and says so.
//!
//! With `--baseline` every run is followed by the same load on a bare
//! tonic fan-out (`ceiling/echo_server.rs`): a broadcast channel streamed
//! to each subscriber, with messages of the size of the events just
//! received.
//!
//! This module holds the flags, the set-up of each target and the medians;
//! `stream` the subscribers, `writer` the writers, `run` one run.

mod run;
mod stream;
mod writer;

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use tonic::transport::Channel;

use agent_lifecycle::app::config::parse_duration;

use self::{
    run::watch_run,
    stream::Target,
    writer::{Writer, bare_call, sequence_of},
};
use super::{
    ceiling::{EchoBaseline, HEAD_PATH},
    client::{Client, Worker, connect, connect_channels, create_agents, head_sequence},
    cpu::{self, ServerCpu, ServerCpuArgs},
    ensure_positive,
    stats::{Latencies, median, secs},
};

/// `bench watch`.
#[derive(Debug, Args)]
pub(super) struct WatchBenchArgs {
    /// Open WatchEvents streams (live, no filter).
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Aggregate commits per second of the writers: write k is scheduled
    /// at k / rate seconds after the start, whenever the one before it
    /// returned.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long the writers write per run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// gRPC connections the streams are spread over (writers use their
    /// own); default: one per subscriber, as separate monitors connect.
    #[arg(long)]
    connections: Option<usize>,
    /// Writers, each taking every W-th scheduled write with one request in
    /// flight; the achievable rate is at most writers / TransitionAgent
    /// latency.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// How long subscribers may take to receive the last event after the
    /// writers stop (and to receive the marker before they start).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Repetitions; every run is reported, then the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// After each run, the same subscribers, connections, writers and rate
    /// on a bare tonic fan-out (a broadcast channel streamed to each
    /// subscriber, messages the size of an encoded event; spawned here);
    /// each run is reported as ratios to it.
    #[arg(long)]
    baseline: bool,
    #[command(flatten)]
    cpu: ServerCpuArgs,
}

/// Share of the target commit rate a run must reach.
const TARGET_SHARE: f64 = 0.99;

/// One run's results.
#[derive(Debug)]
struct WatchRun {
    commits_per_sec: f64,
    /// Commit rate at least [`TARGET_SHARE`] of the target.
    met_rate: bool,
    deliveries_per_sec: f64,
    latency: Latencies,
    missing: u64,
    cpu_us_per_delivery: Option<f64>,
    message_bytes: usize,
}

impl WatchRun {
    fn line(&self, rate: u64) -> String {
        format!(
            "{:.1} commits/s ({:.1}% of {rate}/s: {}), {:.1} deliveries/s, scheduled-to-receive {}, missing {}, {}",
            self.commits_per_sec,
            self.commits_per_sec * 100.0 / rate as f64,
            if self.met_rate {
                "rate held"
            } else {
                "FAILS the target rate; its latency is not a result"
            },
            self.deliveries_per_sec,
            self.latency.line(),
            self.missing,
            cpu::show(self.cpu_us_per_delivery, "delivery")
        )
    }
}

/// Streams, writers and the server's CPU for one target.
struct Setup {
    target: Target,
    stream_channels: Vec<Channel>,
    writers: Vec<Writer>,
    /// Lifecycle: the marker agent; bare: a publisher.
    marker: Writer,
    /// Lifecycle: for the head sequence.
    client: Option<Client>,
    /// Bare: for the head sequence.
    head_channel: Option<Channel>,
    cpu: ServerCpu,
}

impl Setup {
    async fn head(&mut self) -> anyhow::Result<u64> {
        match (&mut self.client, &self.head_channel) {
            (Some(client), _) => head_sequence(client).await,
            (None, Some(channel)) => {
                sequence_of(&bare_call(channel, HEAD_PATH, Bytes::new()).await?)
            }
            (None, None) => bail!("no connection for the head sequence"),
        }
    }
}

/// Runs `bench watch`.
///
/// # Errors
/// Bad arguments, an unreachable server, a failed setup or a failed run.
pub(super) async fn run(server: &str, args: WatchBenchArgs) -> anyhow::Result<()> {
    ensure_positive("subscribers", args.subscribers)?;
    ensure_positive("writers", args.writers)?;
    ensure_positive("runs", args.runs)?;
    let connections = args.connections.unwrap_or(args.subscribers);
    ensure_positive("connections", connections)?;
    if args.rate == 0 || args.duration.is_zero() {
        bail!("--rate and --duration must be positive");
    }
    let writers = args
        .writers
        .min(usize::try_from(args.rate).unwrap_or(usize::MAX));
    println!(
        "bench watch: server {server}, subscribers {}, connections {connections}, rate {}/s by {writers} writers (open loop), duration {}, runs {}",
        args.subscribers,
        args.rate,
        secs(args.duration),
        args.runs
    );
    let per_connection = args.subscribers.div_ceil(connections);
    if per_connection > 1000 {
        println!(
            "  warning: {per_connection} streams per connection; the server allows 1024 concurrent streams per connection"
        );
    }
    let mut lifecycle = lifecycle_setup(server, &args, writers, connections).await?;
    let mut bare: Option<(EchoBaseline, Setup)> = None;
    if args.baseline {
        println!(
            "  baseline: a bare tonic fan-out (its own process) under the same load after each run"
        );
    }

    let mut runs = Vec::new();
    let mut baselines = Vec::new();
    for run in 1..=args.runs {
        let result = watch_run(&args, &mut lifecycle).await?;
        println!("run {run}/{}: {}", args.runs, result.line(args.rate));
        if args.baseline {
            if bare.is_none() {
                bare = Some(bare_setup(writers, connections, result.message_bytes).await?);
            }
            if let Some((_, setup)) = &mut bare {
                let base = watch_run(&args, setup).await?;
                println!(
                    "  bare fan-out ({}-byte messages): {}",
                    result.message_bytes,
                    base.line(args.rate)
                );
                println!("  {}", ratios(&result, &base));
                baselines.push(base);
            }
        }
        runs.push(result);
    }
    print_medians(&runs, &baselines, args.rate);
    Ok(())
}

/// The streams' connections, the writers' agents (and the marker's) on
/// their own connection, and the server's CPU: what every run on the
/// lifecycle server reuses.
async fn lifecycle_setup(
    server: &str,
    args: &WatchBenchArgs,
    writers: usize,
    connections: usize,
) -> anyhow::Result<Setup> {
    let cpu = ServerCpu::find(server, &args.cpu.server_pid);
    println!("  {}", cpu.describe());
    let stream_channels = connect_channels(server, connections).await?;
    let writer_channel = connect_channels(server, 1)
        .await?
        .pop()
        .context("no writer connection")?;
    let writer_client = vec![crate::cli::connect::client(writer_channel.clone())];
    let ids = create_agents(&writer_client, writers + 1, true, "bench-watch").await?;
    let mut workers: Vec<Writer> = ids
        .into_iter()
        .map(|agent_id| Writer::Lifecycle(Box::new(Worker::new(writer_channel.clone(), agent_id))))
        .collect();
    let marker = workers.pop().context("no marker agent")?;
    Ok(Setup {
        target: Target::Lifecycle,
        stream_channels,
        writers: workers,
        marker,
        client: writer_client.into_iter().next(),
        head_channel: None,
        cpu,
    })
}

/// The medians of the runs, and of the bare fan-out's with the median
/// ratios to it.
fn print_medians(runs: &[WatchRun], baselines: &[WatchRun], rate: u64) {
    println!(
        "median of {} runs: {}{}",
        runs.len(),
        median_run(runs, rate).line(rate),
        if runs.iter().all(|r| r.met_rate) {
            ""
        } else {
            "; at least one run FAILED the target rate"
        }
    );
    if !baselines.is_empty() {
        let base = median_run(baselines, rate);
        println!("median of the bare fan-out: {}", base.line(rate));
        let deliveries: Vec<f64> = runs
            .iter()
            .zip(baselines)
            .map(|(r, b)| r.deliveries_per_sec / b.deliveries_per_sec.max(f64::MIN_POSITIVE))
            .collect();
        let p99s: Vec<f64> = runs
            .iter()
            .zip(baselines)
            .map(|(r, b)| r.latency.p99() as f64 / (b.latency.p99().max(1)) as f64)
            .collect();
        println!(
            "median ratios to the bare fan-out: deliveries/s {:.2}, p99 {:.2}x",
            median(deliveries.into_iter()),
            median(p99s.into_iter())
        );
    }
}

async fn bare_setup(
    writers: usize,
    connections: usize,
    message_bytes: usize,
) -> anyhow::Result<(EchoBaseline, Setup)> {
    let echo = EchoBaseline::start(1, None).await?;
    let url = echo.url();
    let stream_channels = connect_channels(&url, connections).await?;
    let writer_channel = connect(&url).await?;
    let bytes = message_bytes.max(24);
    let bare = |channel: &Channel| Writer::Bare {
        channel: channel.clone(),
        bytes,
    };
    let setup = Setup {
        target: Target::Bare(bytes),
        stream_channels,
        writers: (0..writers).map(|_| bare(&writer_channel)).collect(),
        marker: bare(&writer_channel),
        client: None,
        head_channel: Some(writer_channel),
        cpu: ServerCpu::of(echo.pid()),
    };
    Ok((echo, setup))
}

fn ratios(run: &WatchRun, base: &WatchRun) -> String {
    format!(
        "ratios to the bare fan-out: deliveries/s {:.2}, p99 {:.2}x{}",
        run.deliveries_per_sec / base.deliveries_per_sec.max(f64::MIN_POSITIVE),
        run.latency.p99() as f64 / base.latency.p99().max(1) as f64,
        match (run.cpu_us_per_delivery, base.cpu_us_per_delivery) {
            (Some(a), Some(b)) => format!(
                ", server CPU per delivery {:.2}x",
                a / b.max(f64::MIN_POSITIVE)
            ),
            _ => String::new(),
        }
    )
}

fn median_run(runs: &[WatchRun], rate: u64) -> WatchRun {
    let latencies: Vec<Latencies> = runs.iter().map(|r| r.latency).collect();
    let cpu: Vec<f64> = runs.iter().filter_map(|r| r.cpu_us_per_delivery).collect();
    let commits_per_sec = median(runs.iter().map(|r| r.commits_per_sec));
    WatchRun {
        commits_per_sec,
        met_rate: commits_per_sec >= TARGET_SHARE * rate as f64,
        deliveries_per_sec: median(runs.iter().map(|r| r.deliveries_per_sec)),
        latency: Latencies::median_of(&latencies),
        missing: runs.iter().map(|r| r.missing).sum(),
        cpu_us_per_delivery: (!cpu.is_empty()).then(|| median(cpu.into_iter())),
        message_bytes: runs.iter().map(|r| r.message_bytes).max().unwrap_or(0),
    }
}
