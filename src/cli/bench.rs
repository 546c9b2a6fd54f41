//! `agent-lifecycle bench`: measurements of the server (see BENCHMARKS.md).
//!
//! - `transition`, `get`: closed-loop load on a running server (`--server`):
//!   N workers, one request in flight each, spread round-robin over C
//!   connections, until a deadline.
//! - `watch`: S event streams on a running server, writers committing at a
//!   fixed aggregate rate; commit-to-receive latency, completeness, order.
//! - `recovery`: spawns the server on a SQLite file of E events and measures
//!   how long a restart takes until it answers with the whole log loaded.
//! - `memory`: spawns the server and measures resident memory per agent.
//!
//! Every measurement is repeated `--runs` times: each run is printed, then the
//! median of the runs. Latency percentiles use the nearest rank over the
//! sorted per-request latencies of all workers of a run. Servers this tool
//! spawns are stopped on every exit path (SIGTERM, SIGKILL after 30 s).

use std::{
    future::Future,
    io::BufRead,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::MissedTickBehavior,
};
use tonic::{Response, Status, Streaming, transport::Channel};

use agent_lifecycle::{
    config::parse_duration,
    grpc::pb::{self, AgentState, agent_lifecycle_service_client::AgentLifecycleServiceClient},
};

type Client = AgentLifecycleServiceClient<Channel>;

/// Deadline of every unary call the tool makes.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight while creating agents.
const SETUP_CONCURRENCY: usize = 64;
/// Workers that populate the event log (`recovery`) or register (`memory`).
const LOAD_WORKERS: usize = 64;
/// Time a spawned server gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// A worker gives up after this many failed requests in a row.
const MAX_CONSECUTIVE_ERRORS: u64 = 100;
/// Recorded as `triggered_by` on every change the tool makes.
const TRIGGERED_BY: &str = "bench";

/// Benchmark arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// TransitionAgent throughput and latency on the server at --server:
    /// each worker flips its own agent ONLINE <-> IDLE.
    Transition(LoadArgs),
    /// GetAgent throughput and latency on the server at --server.
    Get(LoadArgs),
    /// WatchEvents fan-out on the server at --server: commit-to-receive
    /// latency, deliveries/s, no gap, no duplicate.
    Watch(WatchBenchArgs),
    /// Restart time of a server (spawned here) on a SQLite file of E events.
    Recovery(RecoveryArgs),
    /// Resident memory per registered agent of a server spawned here.
    Memory(MemoryArgs),
}

/// `bench transition` and `bench get`.
#[derive(Debug, Args)]
struct LoadArgs {
    /// Workers, one request in flight each, one agent each.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// gRPC connections (HTTP/2) the workers are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Measured time per run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before each run's measurement.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Repetitions; every run is reported, then the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// `bench watch`.
#[derive(Debug, Args)]
struct WatchBenchArgs {
    /// Open WatchEvents streams (live, no filter).
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Aggregate commits per second of the writers.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long the writers write per run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// gRPC connections the streams are spread over (writers use their own).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Writers, each at rate/writers with one request in flight; the
    /// achievable rate is at most writers / TransitionAgent latency.
    #[arg(long, default_value_t = 32)]
    writers: usize,
    /// How long subscribers may take to receive the last event after the
    /// writers stop (and to receive the marker before they start).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Repetitions; every run is reported, then the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// `bench recovery`.
#[derive(Debug, Args)]
struct RecoveryArgs {
    /// Events the SQLite file holds (populated unless it already has them).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Agents that populate the log.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Server binary; default: this executable.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Directory of bench.db; default: $TMPDIR/agent-lifecycle-bench.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Longest a start may take before the run fails.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    start_timeout: Duration,
    /// Restarts; every one is reported, then the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Where `bench memory` keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    /// The in-memory store.
    Memory,
    /// SQLite in a fresh directory (removed afterwards).
    Sqlite,
}

/// `bench memory`.
#[derive(Debug, Args)]
struct MemoryArgs {
    /// Agents to register.
    #[arg(long, default_value_t = 100_000)]
    agents: usize,
    /// Store of the spawned server.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    store: StoreKind,
    /// Server binary; default: this executable.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Parent of the temporary SQLite directory; default: $TMPDIR.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Longest a start may take before the run fails.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    start_timeout: Duration,
    /// Repetitions, each on a fresh server; every run is reported, then the
    /// median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Runs a benchmark. Ctrl-C ends it; servers it spawned are stopped.
///
/// # Errors
/// Bad arguments, an unreachable server, a failed setup or a failed run.
pub async fn run(server: &str, args: BenchArgs) -> anyhow::Result<()> {
    let bench = async move {
        match args.command {
            BenchCommand::Transition(load) => bench_load(server, LoadOp::Transition, load).await,
            BenchCommand::Get(load) => bench_load(server, LoadOp::Get, load).await,
            BenchCommand::Watch(watch) => bench_watch(server, watch).await,
            BenchCommand::Recovery(recovery) => bench_recovery(recovery).await,
            BenchCommand::Memory(memory) => bench_memory(memory).await,
        }
    };
    // Dropping the benchmark future on Ctrl-C drops its server guards.
    tokio::select! {
        result = bench => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

// ---------------------------------------------------------------------------
// Statistics and formatting

/// Latency percentiles of one run, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Latencies {
    count: usize,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Latencies {
    /// Sorts `samples` and takes nearest-rank percentiles.
    fn from_samples(mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        Latencies {
            count: samples.len(),
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            p999: percentile(&samples, 0.999),
            max: samples.last().copied().unwrap_or(0),
        }
    }

    fn line(&self) -> String {
        if self.count == 0 {
            return "p50 n/a  p99 n/a  p999 n/a".to_string();
        }
        format!(
            "p50 {}  p99 {}  p999 {}  max {}",
            ms(self.p50),
            ms(self.p99),
            ms(self.p999),
            ms(self.max)
        )
    }

    /// The per-metric median of several runs.
    fn median_of(runs: &[Latencies]) -> Latencies {
        let pick = |f: fn(&Latencies) -> u64| median(runs.iter().map(|l| f(l) as f64)) as u64;
        Latencies {
            count: runs.iter().map(|l| l.count).sum(),
            p50: pick(|l| l.p50),
            p99: pick(|l| l.p99),
            p999: pick(|l| l.p999),
            max: pick(|l| l.max),
        }
    }
}

/// Nearest-rank percentile of sorted samples (0 when empty).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median (mean of the two middle values for an even count; 0 when empty).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Nanoseconds as milliseconds with microsecond precision.
fn ms(nanos: u64) -> String {
    format!("{:.3}ms", nanos as f64 / 1e6)
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        0.0
    } else {
        count as f64 / elapsed.as_secs_f64()
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ensure_positive(name: &str, value: usize) -> anyhow::Result<()> {
    if value == 0 {
        bail!("--{name} must be at least 1");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// gRPC helpers

/// One connection: `tcp_nodelay`, its own HTTP/2 connection.
async fn connect(url: &str) -> anyhow::Result<Channel> {
    Channel::from_shared(url.to_string())
        .with_context(|| format!("bad server address {url:?}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// `count` independent connections, as clients.
async fn connect_clients(url: &str, count: usize) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        clients.push(Client::new(connect(url).await?));
    }
    Ok(clients)
}

/// A unary call with the tool's deadline; the reply message or an error
/// naming the call and the status.
async fn call<T>(
    what: &str,
    future: impl Future<Output = Result<Response<T>, Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(anyhow!("{what}: {:?}: {}", status.code(), status.message())),
        Err(_) => Err(anyhow!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

async fn head_sequence(client: &mut Client) -> anyhow::Result<u64> {
    let metrics = call(
        "GetLifecycleMetrics",
        client.get_lifecycle_metrics(pb::GetLifecycleMetricsRequest {}),
    )
    .await?;
    Ok(metrics.head_sequence)
}

/// Registers an agent; deploys and starts it (ONLINE) when `start`.
async fn create_agent(mut client: Client, name: String, start: bool) -> anyhow::Result<String> {
    let registered = call(
        "RegisterAgent",
        client.register_agent(pb::RegisterAgentRequest {
            name,
            triggered_by: TRIGGERED_BY.to_string(),
            ..Default::default()
        }),
    )
    .await?;
    let id = registered
        .agent
        .context("RegisterAgent returned no agent")?
        .agent_id;
    if start {
        call(
            "DeployAgent",
            client.deploy_agent(pb::DeployAgentRequest {
                agent_id: id.clone(),
                triggered_by: TRIGGERED_BY.to_string(),
                ..Default::default()
            }),
        )
        .await?;
        call(
            "StartAgent",
            client.start_agent(pb::StartAgentRequest {
                agent_id: id.clone(),
                triggered_by: TRIGGERED_BY.to_string(),
                ..Default::default()
            }),
        )
        .await?;
    }
    Ok(id)
}

/// `count` agents (ONLINE when `start`), created over `clients` round-robin
/// with [`SETUP_CONCURRENCY`] requests in flight; ids in creation order.
async fn create_agents(
    clients: &[Client],
    count: usize,
    start: bool,
    prefix: &str,
) -> anyhow::Result<Vec<String>> {
    if clients.is_empty() {
        bail!("no connection to create agents on");
    }
    stream::iter(0..count)
        .map(|i| {
            create_agent(
                clients[i % clients.len()].clone(),
                format!("{prefix}-{i}"),
                start,
            )
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await
}

fn flip(state: AgentState) -> AgentState {
    if state == AgentState::Online {
        AgentState::Idle
    } else {
        AgentState::Online
    }
}

/// The target that moves an agent in `state` between ONLINE and IDLE.
fn target_from(state: i32) -> AgentState {
    if state == AgentState::Online as i32 {
        AgentState::Idle
    } else {
        AgentState::Online
    }
}

fn timestamp_nanos(ts: &prost_types::Timestamp) -> i128 {
    i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos)
}

/// A worker's agent and where it goes next.
#[derive(Clone, Debug)]
struct Worker {
    client: Client,
    agent_id: String,
    target: AgentState,
}

impl Worker {
    /// One TransitionAgent to `target`; on success the next target flips.
    /// Returns the committed (sequence, commit time in ns since the epoch).
    async fn transition(&mut self) -> anyhow::Result<(u64, i128)> {
        let response = call(
            "TransitionAgent",
            self.client.transition_agent(pb::TransitionAgentRequest {
                agent_id: self.agent_id.clone(),
                target_state: self.target as i32,
                triggered_by: TRIGGERED_BY.to_string(),
                ..Default::default()
            }),
        )
        .await?;
        self.target = flip(self.target);
        let transition = response
            .transitions
            .first()
            .context("TransitionAgent returned no transition")?;
        let at = transition
            .timestamp
            .as_ref()
            .map(timestamp_nanos)
            .unwrap_or(0);
        Ok((transition.sequence, at))
    }

    /// After a failure: learn the agent's state so the next target is valid.
    async fn resync(&mut self) {
        let request = pb::GetAgentRequest {
            agent_id: self.agent_id.clone(),
        };
        if let Ok(response) = call("GetAgent", self.client.get_agent(request)).await
            && let Some(agent) = response.agent
        {
            self.target = target_from(agent.state);
        }
    }
}

// ---------------------------------------------------------------------------
// transition / get

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoadOp {
    Transition,
    Get,
}

impl LoadOp {
    fn unit(self) -> &'static str {
        match self {
            LoadOp::Transition => "transitions/s",
            LoadOp::Get => "gets/s",
        }
    }
}

/// What one worker saw in one run.
#[derive(Debug, Default)]
struct WorkerOutcome {
    /// Measured (after the warm-up) successful requests, ns.
    latencies: Vec<u64>,
    /// Every committed (sequence, commit time) of the run, warm-up included.
    commits: Vec<(u64, i128)>,
    errors: u64,
    first_error: Option<String>,
}

impl WorkerOutcome {
    fn failed(&mut self, err: &anyhow::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{err:#}"));
        }
    }
}

/// Requests back to back until `end`; latencies of those started after
/// `warm_end` are recorded.
async fn load_worker(
    op: LoadOp,
    mut worker: Worker,
    warm_end: Instant,
    end: Instant,
) -> (Worker, WorkerOutcome) {
    let mut out = WorkerOutcome::default();
    let mut consecutive_errors = 0;
    loop {
        let started = Instant::now();
        if started >= end {
            break;
        }
        let result = match op {
            LoadOp::Transition => worker.transition().await.map(Some),
            LoadOp::Get => {
                let request = pb::GetAgentRequest {
                    agent_id: worker.agent_id.clone(),
                };
                call("GetAgent", worker.client.get_agent(request))
                    .await
                    .map(|_| None)
            }
        };
        let latency = started.elapsed();
        match result {
            Ok(commit) => {
                consecutive_errors = 0;
                if let Some(commit) = commit {
                    out.commits.push(commit);
                }
                if started >= warm_end {
                    out.latencies.push(nanos(latency));
                }
            }
            Err(err) => {
                out.failed(&err);
                consecutive_errors += 1;
                if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                    break;
                }
                if op == LoadOp::Transition {
                    worker.resync().await;
                }
            }
        }
    }
    (worker, out)
}

/// Checks that committed sequences are contiguous and counts group commits
/// (a batch shares one commit time).
#[derive(Debug, Default, PartialEq)]
struct SequenceCheck {
    committed: u64,
    gaps: u64,
    duplicates: u64,
    batches: u64,
}

fn check_sequences(mut commits: Vec<(u64, i128)>) -> SequenceCheck {
    let mut check = SequenceCheck {
        committed: commits.len() as u64,
        ..Default::default()
    };
    commits.sort_unstable();
    for pair in commits.windows(2) {
        let (a, b) = (pair[0].0, pair[1].0);
        if b == a {
            check.duplicates += 1;
        } else if b > a + 1 {
            check.gaps += b - a - 1;
        }
    }
    let mut times: Vec<i128> = commits.iter().map(|c| c.1).collect();
    times.sort_unstable();
    times.dedup();
    check.batches = times.len() as u64;
    check
}

async fn bench_load(server: &str, op: LoadOp, args: LoadArgs) -> anyhow::Result<()> {
    ensure_positive("concurrency", args.concurrency)?;
    ensure_positive("connections", args.connections)?;
    ensure_positive("runs", args.runs)?;
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    let name = match op {
        LoadOp::Transition => "transition",
        LoadOp::Get => "get",
    };
    println!(
        "bench {name}: server {server}, concurrency {}, connections {}, duration {}, warmup {}, runs {}",
        args.concurrency,
        args.connections,
        secs(args.duration),
        secs(args.warmup),
        args.runs
    );
    let mut clients = connect_clients(server, args.connections).await?;
    let setup = Instant::now();
    let ids = create_agents(&clients, args.concurrency, true, &format!("bench-{name}")).await?;
    println!(
        "setup: {} agents registered, deployed, started in {}",
        ids.len(),
        secs(setup.elapsed())
    );
    let mut workers: Vec<Worker> = ids
        .into_iter()
        .enumerate()
        .map(|(i, agent_id)| Worker {
            client: clients[i % clients.len()].clone(),
            agent_id,
            target: AgentState::Idle,
        })
        .collect();

    let mut throughputs = Vec::new();
    let mut latencies = Vec::new();
    for run in 1..=args.runs {
        let head_before = head_sequence(&mut clients[0]).await?;
        let warm_end = Instant::now() + args.warmup;
        let end = warm_end + args.duration;
        let handles: Vec<_> = workers
            .drain(..)
            .map(|w| tokio::spawn(load_worker(op, w, warm_end, end)))
            .collect();
        let mut outcomes = Vec::with_capacity(handles.len());
        for handle in handles {
            let (worker, outcome) = handle.await.context("a worker panicked")?;
            workers.push(worker);
            outcomes.push(outcome);
        }
        let elapsed = Instant::now().saturating_duration_since(warm_end);
        let head_after = head_sequence(&mut clients[0]).await?;

        let errors: u64 = outcomes.iter().map(|o| o.errors).sum();
        let first_error = outcomes.iter().find_map(|o| o.first_error.clone());
        let mut samples = Vec::with_capacity(outcomes.iter().map(|o| o.latencies.len()).sum());
        let mut commits = Vec::new();
        for outcome in outcomes {
            samples.extend(outcome.latencies);
            commits.extend(outcome.commits);
        }
        let count = samples.len() as u64;
        let throughput = rate(count, elapsed);
        let lat = Latencies::from_samples(samples);
        println!(
            "run {run}/{}: {throughput:.1} {} ({count} in {})  {}  errors {errors}",
            args.runs,
            op.unit(),
            secs(elapsed),
            lat.line()
        );
        if op == LoadOp::Transition {
            let check = check_sequences(commits);
            let batch = if check.batches == 0 {
                0.0
            } else {
                check.committed as f64 / check.batches as f64
            };
            println!(
                "  sequences: {} committed (warm-up included), head +{}, gaps {}, duplicates {}; \
                 {} group commits, {batch:.1} transitions per commit",
                check.committed,
                head_after.saturating_sub(head_before),
                check.gaps,
                check.duplicates,
                check.batches
            );
        }
        if let Some(err) = first_error {
            println!("  first error: {err}");
        }
        throughputs.push(throughput);
        latencies.push(lat);
    }
    println!(
        "median of {} runs: {:.1} {}  {}",
        args.runs,
        median(throughputs.into_iter()),
        op.unit(),
        Latencies::median_of(&latencies).line()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// watch

/// What the coordinator tells subscribers.
#[derive(Clone, Copy, Debug, Default)]
struct Phase {
    /// Sequence of the marker event: report when received.
    marker: Option<u64>,
    /// Last committed sequence: stop once received.
    last: Option<u64>,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct SubscriberOutcome {
    /// Events after the marker (duplicates excluded).
    received: u64,
    /// Commit-to-receive of those, ns.
    latencies: Vec<u64>,
    /// Sequences skipped (gap sizes summed).
    gap_events: u64,
    /// Events at or below the previous sequence.
    duplicates: u64,
    /// Last sequence received.
    last: u64,
    error: Option<String>,
}

/// The part of `WatchEventsResponse` the subscribers read: the event's
/// sequence and commit time. Wire-compatible with the real message (the
/// `event` member of its oneof is field 1); everything else is skipped
/// undecoded, so the benchmark client spends its CPU on the stream, not on
/// building agents it would throw away.
#[derive(Clone, PartialEq, prost::Message)]
struct LiteResponse {
    #[prost(message, optional, tag = "1")]
    event: Option<LiteEvent>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteEvent {
    #[prost(uint64, tag = "1")]
    sequence: u64,
    #[prost(message, optional, tag = "4")]
    transition: Option<LiteTransition>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteTransition {
    #[prost(message, optional, tag = "3")]
    timestamp: Option<prost_types::Timestamp>,
}

async fn open_watch(channel: Channel) -> anyhow::Result<Streaming<LiteResponse>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .context("WatchEvents: channel not ready")?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/agentlifecycle.v1.AgentLifecycleService/WatchEvents",
    );
    let codec = tonic_prost::ProstCodec::<pb::WatchEventsRequest, LiteResponse>::default();
    let request = tonic::Request::new(pb::WatchEventsRequest {
        start_sequence: 0,
        ..Default::default()
    });
    let response = tokio::time::timeout(CALL_TIMEOUT, grpc.server_streaming(request, path, codec))
        .await
        .context("WatchEvents: timed out")?
        .map_err(|status| {
            anyhow::anyhow!("WatchEvents: {:?}: {}", status.code(), status.message())
        })?;
    Ok(response.into_inner())
}

/// Reads one stream until it has the last committed sequence, checking
/// that sequences are contiguous. Every read has a deadline.
async fn subscriber(
    index: usize,
    mut events: Streaming<LiteResponse>,
    mut control: watch::Receiver<Phase>,
    ready: mpsc::UnboundedSender<usize>,
    drain_timeout: Duration,
) -> SubscriberOutcome {
    // Idle streams get a progress message every 10 s (server default).
    const READ_TIMEOUT: Duration = Duration::from_secs(60);
    let mut out = SubscriberOutcome::default();
    let mut last: Option<u64> = None;
    let mut ready_sent = false;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        let phase = *control.borrow_and_update();
        let seen = last.unwrap_or(0);
        if !ready_sent
            && let Some(marker) = phase.marker
            && seen >= marker
        {
            ready_sent = true;
            let _ = ready.send(index);
        }
        if let Some(final_seq) = phase.last {
            if seen >= final_seq {
                break;
            }
            drain_deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain_timeout);
        }
        let deadline = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + READ_TIMEOUT);
        tokio::select! {
            changed = control.changed() => {
                if changed.is_err() {
                    out.error = Some("the benchmark stopped".to_string());
                    break;
                }
            }
            item = tokio::time::timeout_at(deadline, events.next()) => match item {
                Err(_) => {
                    out.error = Some(match drain_deadline {
                        Some(_) => format!("last event not received within {drain_timeout:?}; stuck at sequence {seen}"),
                        None => format!("no message for {READ_TIMEOUT:?} at sequence {seen}"),
                    });
                    break;
                }
                Ok(None) => {
                    out.error = Some(format!("stream ended at sequence {seen}"));
                    break;
                }
                Ok(Some(Err(status))) => {
                    out.error = Some(format!("stream failed at sequence {seen}: {:?}: {}", status.code(), status.message()));
                    break;
                }
                Ok(Some(Ok(message))) => {
                    let Some(event) = message.event else { continue };
                    let now = SystemTime::now();
                    let sequence = event.sequence;
                    match last {
                        Some(previous) if sequence <= previous => {
                            out.duplicates += 1;
                            continue;
                        }
                        Some(previous) if sequence > previous + 1 => {
                            out.gap_events += sequence - previous - 1;
                        }
                        _ => {}
                    }
                    last = Some(sequence);
                    out.last = sequence;
                    let marker = control.borrow().marker;
                    if marker.is_some_and(|m| sequence > m) {
                        out.received += 1;
                        let committed = event.transition.as_ref().and_then(|t| t.timestamp.as_ref());
                        if let Some(ts) = committed {
                            let at = UNIX_EPOCH
                                + Duration::new(u64::try_from(ts.seconds).unwrap_or(0), u32::try_from(ts.nanos).unwrap_or(0));
                            out.latencies.push(nanos(now.duration_since(at).unwrap_or_default()));
                        }
                    }
                }
            }
        }
    }
    out
}

/// What one writer did in one run.
#[derive(Debug, Default)]
struct WriterOutcome {
    commits: u64,
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Transitions at one tick per `period` (missed ticks are made up in a
/// burst) until `end`, one request in flight.
async fn writer(
    mut worker: Worker,
    first_tick: tokio::time::Instant,
    period: Duration,
    end: tokio::time::Instant,
) -> (Worker, WriterOutcome) {
    let mut out = WriterOutcome::default();
    let mut interval = tokio::time::interval_at(first_tick, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut consecutive_errors = 0;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = tokio::time::sleep_until(end) => break,
        }
        let started = tokio::time::Instant::now();
        if started >= end {
            break;
        }
        match worker.transition().await {
            Ok(_) => {
                consecutive_errors = 0;
                out.commits += 1;
                out.latencies.push(nanos(started.elapsed()));
            }
            Err(err) => {
                out.errors += 1;
                if out.first_error.is_none() {
                    out.first_error = Some(format!("{err:#}"));
                }
                consecutive_errors += 1;
                if consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
                    break;
                }
                worker.resync().await;
            }
        }
    }
    (worker, out)
}

/// One watch run's results.
#[derive(Debug)]
struct WatchRun {
    commits_per_sec: f64,
    deliveries_per_sec: f64,
    latency: Latencies,
    missing: u64,
}

async fn bench_watch(server: &str, args: WatchBenchArgs) -> anyhow::Result<()> {
    ensure_positive("subscribers", args.subscribers)?;
    ensure_positive("connections", args.connections)?;
    ensure_positive("writers", args.writers)?;
    ensure_positive("runs", args.runs)?;
    if args.rate == 0 || args.duration.is_zero() {
        bail!("--rate and --duration must be positive");
    }
    let writers = args
        .writers
        .min(usize::try_from(args.rate).unwrap_or(usize::MAX));
    println!(
        "bench watch: server {server}, subscribers {}, connections {}, rate {}/s by {writers} writers, duration {}, runs {}",
        args.subscribers,
        args.connections,
        args.rate,
        secs(args.duration),
        args.runs
    );
    let per_connection = args.subscribers.div_ceil(args.connections);
    if per_connection > 1000 {
        println!(
            "  warning: {per_connection} streams per connection; the server allows 1024 concurrent streams per connection"
        );
    }
    let mut stream_clients = Vec::with_capacity(args.connections.max(1));
    for _ in 0..args.connections.max(1) {
        stream_clients.push(connect(server).await?);
    }
    let mut writer_client = connect_clients(server, 1).await?;
    let ids = create_agents(&writer_client, writers + 1, true, "bench-watch").await?;
    let mut workers: Vec<Worker> = ids
        .into_iter()
        .map(|agent_id| Worker {
            client: writer_client[0].clone(),
            agent_id,
            target: AgentState::Idle,
        })
        .collect();
    let mut marker = workers.pop().context("no marker agent")?;

    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let result = watch_run(
            &args,
            writers,
            &stream_clients,
            &mut writer_client[0],
            &mut workers,
            &mut marker,
        )
        .await?;
        print!("run {run}/{}: ", args.runs);
        println!(
            "{:.1} commits/s, {:.1} deliveries/s, commit-to-receive {}, missing {}",
            result.commits_per_sec,
            result.deliveries_per_sec,
            result.latency.line(),
            result.missing
        );
        runs.push(result);
    }
    let latencies: Vec<Latencies> = runs.iter().map(|r| r.latency).collect();
    println!(
        "median of {} runs: {:.1} commits/s (target {}), {:.1} deliveries/s, commit-to-receive {}, missing (sum) {}",
        args.runs,
        median(runs.iter().map(|r| r.commits_per_sec)),
        args.rate,
        median(runs.iter().map(|r| r.deliveries_per_sec)),
        Latencies::median_of(&latencies).line(),
        runs.iter().map(|r| r.missing).sum::<u64>()
    );
    Ok(())
}

async fn watch_run(
    args: &WatchBenchArgs,
    writers: usize,
    stream_clients: &[Channel],
    writer_client: &mut Client,
    workers: &mut Vec<Worker>,
    marker: &mut Worker,
) -> anyhow::Result<WatchRun> {
    let subscribers = args.subscribers;
    let (control_tx, control_rx) = watch::channel(Phase::default());
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<usize>();

    // Open every stream; the server subscribes before it answers.
    let opening = Instant::now();
    let streams: Vec<Streaming<LiteResponse>> = stream::iter(0..subscribers)
        .map(|i| open_watch(stream_clients[i % stream_clients.len()].clone()))
        .buffered(256)
        .try_collect()
        .await?;
    let open_time = opening.elapsed();
    let handles: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, events)| {
            tokio::spawn(subscriber(
                i,
                events,
                control_rx.clone(),
                ready_tx.clone(),
                args.drain_timeout,
            ))
        })
        .collect();
    drop(ready_tx);
    drop(control_rx);

    // The marker: every subscriber receives it before the writers start.
    let (marker_seq, _) = marker.transition().await.context("marker transition")?;
    control_tx.send_modify(|p| p.marker = Some(marker_seq));
    let ready_deadline = tokio::time::Instant::now() + args.drain_timeout;
    let mut ready = 0;
    while ready < subscribers {
        match tokio::time::timeout_at(ready_deadline, ready_rx.recv()).await {
            Ok(Some(_)) => ready += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if ready < subscribers {
        bail!(
            "only {ready} of {subscribers} subscribers received the marker event {marker_seq} within {:?}",
            args.drain_timeout
        );
    }
    let ready_time = opening.elapsed();

    // Writers at rate/writers each, ticks staggered.
    let period = Duration::from_secs_f64(writers as f64 / args.rate as f64);
    let start = tokio::time::Instant::now();
    let end = start + args.duration;
    let writer_handles: Vec<_> = workers
        .drain(..)
        .enumerate()
        .map(|(i, w)| {
            let offset = period.mul_f64(i as f64 / writers as f64);
            tokio::spawn(writer(w, start + offset, period, end))
        })
        .collect();
    let mut commits = 0;
    let mut writer_errors = 0;
    let mut writer_error = None;
    let mut writer_latencies = Vec::new();
    for handle in writer_handles {
        let (worker, outcome) = handle.await.context("a writer panicked")?;
        workers.push(worker);
        commits += outcome.commits;
        writer_errors += outcome.errors;
        writer_latencies.extend(outcome.latencies);
        if writer_error.is_none() {
            writer_error = outcome.first_error;
        }
    }
    let write_time = start.elapsed();
    let last_seq = head_sequence(writer_client).await?;
    control_tx.send_modify(|p| p.last = Some(last_seq));

    // Subscribers end on their own (each bounded by the drain timeout).
    let join_deadline = tokio::time::Instant::now() + args.drain_timeout + Duration::from_secs(30);
    let mut outcomes = Vec::with_capacity(subscribers);
    for handle in handles {
        let outcome = tokio::time::timeout_at(join_deadline, handle)
            .await
            .map_err(|_| anyhow!("subscribers did not finish within the drain timeout"))?
            .context("a subscriber panicked")?;
        outcomes.push(outcome);
    }
    let total_time = start.elapsed();
    let drain_time = total_time.saturating_sub(write_time);

    let expected_each = last_seq.saturating_sub(marker_seq);
    let received: u64 = outcomes.iter().map(|o| o.received).sum();
    let missing: u64 = outcomes
        .iter()
        .map(|o| expected_each.saturating_sub(o.received))
        .sum();
    let gap_events: u64 = outcomes.iter().map(|o| o.gap_events).sum();
    let duplicates: u64 = outcomes.iter().map(|o| o.duplicates).sum();
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    let first_failure = outcomes.iter().find_map(|o| o.error.clone());
    let mut samples = Vec::with_capacity(usize::try_from(received).unwrap_or(0));
    for outcome in &mut outcomes {
        samples.append(&mut outcome.latencies);
    }
    let latency = Latencies::from_samples(samples);
    let writer_latency = Latencies::from_samples(writer_latencies);

    let commits_per_sec = rate(commits, write_time);
    let deliveries_per_sec = rate(received, total_time);
    let achieved = commits_per_sec / args.rate as f64;
    println!(
        "  streams open in {}, all saw marker {marker_seq} after {}",
        secs(open_time),
        secs(ready_time)
    );
    println!(
        "  writers: {commits} commits in {} = {commits_per_sec:.1}/s of target {}/s ({:.1}%, {}), errors {writer_errors}; TransitionAgent {}",
        secs(write_time),
        args.rate,
        achieved * 100.0,
        if achieved >= 0.99 {
            "achieved"
        } else {
            "NOT achieved"
        },
        writer_latency.line()
    );
    if let Some(err) = writer_error {
        println!("  first writer error: {err}");
    }
    println!(
        "  subscribers: {received} events received of {} expected ({} after the marker x {subscribers}) in {} (drain {}) = {deliveries_per_sec:.1} deliveries/s",
        expected_each * subscribers as u64,
        expected_each,
        secs(total_time),
        secs(drain_time)
    );
    println!(
        "  commit-to-receive {}; missing {missing}, skipped sequences {gap_events}, duplicates {duplicates}, failed streams {}",
        latency.line(),
        failed
    );
    if let Some(first) = first_failure {
        println!("  first stream failure: {first}");
    }
    Ok(WatchRun {
        commits_per_sec,
        deliveries_per_sec,
        latency,
        missing,
    })
}

// ---------------------------------------------------------------------------
// Spawned servers

/// A server this tool started; stopped (SIGTERM, then SIGKILL after
/// [`STOP_GRACE`]) when dropped, whatever the exit path.
struct ServerProcess {
    child: Option<Child>,
    pid: u32,
    url: String,
}

fn send_sigterm(pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -TERM {pid} failed: {status}");
    }
    Ok(())
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim()
        .strip_prefix("listening on ")?
        .trim()
        .parse()
        .ok()
}

impl ServerProcess {
    /// Starts `binary serve --store STORE --listen 127.0.0.1:0 --log warn`
    /// and waits for its `listening on` line.
    async fn spawn(binary: &Path, store: &str, timeout: Duration) -> anyhow::Result<Self> {
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--store",
                store,
                "--listen",
                "127.0.0.1:0",
                "--log",
                "warn",
            ])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take();
        let mut process = ServerProcess {
            pid: child.id(),
            child: Some(child),
            url: String::new(),
        };
        let stdout = stdout.context("the server's stdout is not captured")?;
        let (line_tx, line_rx) = oneshot::channel::<SocketAddr>();
        // Reads until EOF (the server exits), so the pipe never fills.
        std::thread::Builder::new()
            .name("bench-server-stdout".to_string())
            .spawn(move || {
                let mut line_tx = Some(line_tx);
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(addr) = parse_listening(&line)
                        && let Some(tx) = line_tx.take()
                    {
                        let _ = tx.send(addr);
                    }
                }
            })
            .context("cannot start the stdout reader")?;
        let addr = match tokio::time::timeout(timeout, line_rx).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(_)) => {
                let status = process.try_status();
                bail!(
                    "the server (pid {}) exited before listening: {status}",
                    process.pid
                );
            }
            Err(_) => bail!(
                "the server (pid {}) did not listen within {timeout:?}",
                process.pid
            ),
        };
        process.url = format!("http://{addr}");
        Ok(process)
    }

    fn try_status(&mut self) -> String {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => status.to_string(),
            Some(Ok(None)) => "still running".to_string(),
            Some(Err(err)) => err.to_string(),
            None => "already stopped".to_string(),
        }
    }

    /// VmRSS and VmHWM from /proc/PID/status, in bytes.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let path = format!("/proc/{}/status", self.pid);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let rss = proc_status_kib(&text, "VmRSS:").context("no VmRSS")?;
        let hwm = proc_status_kib(&text, "VmHWM:").context("no VmHWM")?;
        Ok((rss * 1024, hwm * 1024))
    }

    /// SIGTERM, then waits for the exit; SIGKILL after [`STOP_GRACE`].
    /// Returns how long the exit took.
    async fn stop(mut self) -> anyhow::Result<(Duration, ExitStatus)> {
        let started = Instant::now();
        let child = self.child.as_mut().context("already stopped")?;
        if child.try_wait()?.is_none() {
            send_sigterm(self.pid)?;
        }
        loop {
            let child = self.child.as_mut().context("already stopped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok((started.elapsed(), status));
            }
            if started.elapsed() >= STOP_GRACE {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                bail!(
                    "the server (pid {}) did not exit within {STOP_GRACE:?} of SIGTERM; killed",
                    self.pid
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        eprintln!("bench: stopping the server (pid {})", self.pid);
        let _ = send_sigterm(self.pid);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                _ => return,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn proc_status_kib(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// A directory this tool created, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn server_binary(binary: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match binary {
        Some(path) => Ok(path),
        None => std::env::current_exe().context("cannot find this executable"),
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

// ---------------------------------------------------------------------------
// recovery

/// `workers` workers flip ONLINE agents ONLINE <-> IDLE until the head
/// reaches `target`; returns the latencies and the number of transitions.
async fn flip_until(
    clients: &[Client],
    agents: Vec<String>,
    head: u64,
    target: u64,
) -> anyhow::Result<(u64, Vec<u64>)> {
    let workers = LOAD_WORKERS.min(agents.len()).max(1);
    let mut groups: Vec<Vec<Worker>> = vec![Vec::new(); workers];
    for (i, agent_id) in agents.into_iter().enumerate() {
        groups[i % workers].push(Worker {
            client: clients[i % clients.len()].clone(),
            agent_id,
            target: AgentState::Idle,
        });
    }
    let seen = Arc::new(AtomicU64::new(head));
    let handles: Vec<_> = groups
        .into_iter()
        .map(|mut group| {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                if group.is_empty() {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                // At most `target` transitions: the loop is bounded even if
                // the head never moves.
                for i in 0..target {
                    if seen.load(Ordering::Relaxed) >= target {
                        break;
                    }
                    let index = usize::try_from(i).unwrap_or(0) % group.len();
                    let started = Instant::now();
                    let (sequence, _) = group[index].transition().await?;
                    latencies.push(nanos(started.elapsed()));
                    seen.fetch_max(sequence, Ordering::Relaxed);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for handle in handles {
        samples.extend(handle.await.context("a worker panicked")??);
    }
    Ok((samples.len() as u64, samples))
}

async fn bench_recovery(args: RecoveryArgs) -> anyhow::Result<()> {
    ensure_positive("agents", args.agents)?;
    ensure_positive("runs", args.runs)?;
    let binary = server_binary(args.binary)?;
    let dir = args
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join("agent-lifecycle-bench"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let db = dir.join("bench.db");
    let store = format!("sqlite://{}", db.display());
    println!(
        "bench recovery: {} events in {}, agents {}, binary {}, runs {}",
        args.events,
        db.display(),
        args.agents,
        binary.display(),
        args.runs
    );

    // Populate unless the file already holds enough.
    let server = ServerProcess::spawn(&binary, &store, args.start_timeout).await?;
    let clients = connect_clients(&server.url, 4).await?;
    let mut client = clients[0].clone();
    let head = head_sequence(&mut client).await?;
    if head >= args.events {
        println!("populate: skipped, the file already holds {head} events");
    } else {
        let started = Instant::now();
        let ids = create_agents(&clients, args.agents, true, "bench-recovery").await?;
        let created = started.elapsed();
        let after_setup = head_sequence(&mut client).await?;
        let (transitions, samples) = flip_until(&clients, ids, after_setup, args.events).await?;
        let elapsed = started.elapsed();
        let head_now = head_sequence(&mut client).await?;
        if head_now < args.events {
            bail!(
                "populating stopped at head {head_now}, below {}",
                args.events
            );
        }
        let flip_time = elapsed.saturating_sub(created);
        println!(
            "populate: {} events ({} before) in {} ({:.1} events/s): {} agents in {}, then {transitions} transitions in {} \
             ({:.1}/s, {LOAD_WORKERS} workers, TransitionAgent {})",
            head_now - head,
            head,
            secs(elapsed),
            rate(head_now - head, elapsed),
            args.agents,
            secs(created),
            secs(flip_time),
            rate(transitions, flip_time),
            Latencies::from_samples(samples).line()
        );
    }
    drop(client);
    drop(clients);
    let (stop_time, status) = server.stop().await?;
    println!(
        "  first server stopped in {} ({status}); bench.db {}, bench.db-wal {}",
        secs(stop_time),
        mib(file_size(&db)),
        mib(file_size(&dir.join("bench.db-wal")))
    );

    let mut listening_times = Vec::new();
    let mut ready_times = Vec::new();
    for run in 1..=args.runs {
        let spawned = Instant::now();
        let server = ServerProcess::spawn(&binary, &store, args.start_timeout).await?;
        let listening = spawned.elapsed();
        let deadline = spawned + args.start_timeout;
        let mut client = Client::new(connect(&server.url).await?);
        let head = loop {
            let head = head_sequence(&mut client).await?;
            if head >= args.events {
                break head;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the restarted server reports head {head}, below {}",
                    args.events
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let ready = spawned.elapsed();
        drop(client);
        let (stop_time, status) = server.stop().await?;
        println!(
            "run {run}/{}: listening after {}, GetLifecycleMetrics head {head} after {}; stopped in {} ({status})",
            args.runs,
            secs(listening),
            secs(ready),
            secs(stop_time)
        );
        listening_times.push(listening.as_secs_f64());
        ready_times.push(ready.as_secs_f64());
    }
    println!(
        "median of {} restarts: listening after {:.3}s, ready after {:.3}s",
        args.runs,
        median(listening_times.into_iter()),
        median(ready_times.into_iter())
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// memory

/// Registers `count` agents with [`LOAD_WORKERS`] workers; latencies.
async fn register_many(clients: &[Client], count: usize) -> anyhow::Result<Vec<u64>> {
    let workers = LOAD_WORKERS.min(count).max(1);
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let mut client = clients[w % clients.len()].clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for i in (w..count).step_by(workers) {
                    let started = Instant::now();
                    call(
                        "RegisterAgent",
                        client.register_agent(pb::RegisterAgentRequest {
                            name: format!("bench-memory-{i}"),
                            triggered_by: TRIGGERED_BY.to_string(),
                            ..Default::default()
                        }),
                    )
                    .await?;
                    latencies.push(nanos(started.elapsed()));
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(count);
    for handle in handles {
        samples.extend(handle.await.context("a worker panicked")??);
    }
    Ok(samples)
}

async fn bench_memory(args: MemoryArgs) -> anyhow::Result<()> {
    ensure_positive("agents", args.agents)?;
    ensure_positive("runs", args.runs)?;
    let binary = server_binary(args.binary)?;
    let parent = args.dir.unwrap_or_else(std::env::temp_dir);
    println!(
        "bench memory: {} agents, store {:?}, binary {}, runs {}",
        args.agents,
        args.store,
        binary.display(),
        args.runs
    );
    let mut per_agent = Vec::new();
    let mut throughputs = Vec::new();
    let mut latencies = Vec::new();
    for run in 1..=args.runs {
        // Declared before the server, so the server stops before the
        // directory goes.
        let mut _dir = None;
        let store = match args.store {
            StoreKind::Memory => "memory".to_string(),
            StoreKind::Sqlite => {
                let path = parent.join(format!(
                    "agent-lifecycle-bench-memory-{}",
                    uuid::Uuid::new_v4()
                ));
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                let store = format!("sqlite://{}", path.join("bench.db").display());
                _dir = Some(TempDir(path));
                store
            }
        };
        let server = ServerProcess::spawn(&binary, &store, args.start_timeout).await?;
        let mut clients = connect_clients(&server.url, 4).await?;
        for client in &mut clients {
            head_sequence(client).await?;
        }
        let (before, _) = server.memory()?;
        let started = Instant::now();
        let samples = register_many(&clients, args.agents).await?;
        let elapsed = started.elapsed();
        let (after, _) = server.memory()?;
        for _ in 0..3 {
            head_sequence(&mut clients[0]).await?;
        }
        let (after_metrics, hwm) = server.memory()?;
        drop(clients);
        let (stop_time, status) = server.stop().await?;
        let bytes = after.saturating_sub(before) as f64 / args.agents as f64;
        let throughput = rate(samples.len() as u64, elapsed);
        let lat = Latencies::from_samples(samples);
        println!(
            "run {run}/{}: {bytes:.0} bytes/agent; VmRSS before {}, after {}, after metrics {}, VmHWM {}; \
             {throughput:.1} registrations/s ({} in {}) {}; stopped in {} ({status})",
            args.runs,
            mib(before),
            mib(after),
            mib(after_metrics),
            mib(hwm),
            args.agents,
            secs(elapsed),
            lat.line(),
            secs(stop_time)
        );
        per_agent.push(bytes);
        throughputs.push(throughput);
        latencies.push(lat);
    }
    println!(
        "median of {} runs: {:.0} bytes/agent, {:.1} registrations/s {}",
        args.runs,
        median(per_agent.into_iter()),
        median(throughputs.into_iter()),
        Latencies::median_of(&latencies).line()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&samples, 0.5), 500);
        assert_eq!(percentile(&samples, 0.99), 990);
        assert_eq!(percentile(&samples, 0.999), 999);
        assert_eq!(percentile(&samples, 1.0), 1000);
        assert_eq!(percentile(&[7], 0.999), 7);
        assert_eq!(percentile(&[], 0.5), 0);
        let lat = Latencies::from_samples(vec![3, 1, 2]);
        assert_eq!((lat.count, lat.p50, lat.max), (3, 2, 3));
    }

    #[test]
    fn medians() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
    }

    #[test]
    fn sequence_check_finds_gaps_duplicates_and_batches() {
        let check = check_sequences(vec![(3, 10), (1, 10), (2, 20), (2, 20), (6, 30)]);
        assert_eq!(
            check,
            SequenceCheck {
                committed: 5,
                gaps: 2,
                duplicates: 1,
                batches: 3
            }
        );
    }

    #[test]
    fn listening_line_and_proc_status() {
        assert_eq!(
            parse_listening("listening on 127.0.0.1:4321"),
            Some("127.0.0.1:4321".parse().unwrap())
        );
        assert_eq!(parse_listening("something else"), None);
        let status = "Name:\tagent-lifecycle\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(proc_status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(proc_status_kib(status, "VmHWM:"), Some(20480));
    }

    #[test]
    fn flips_between_online_and_idle() {
        assert_eq!(flip(AgentState::Online), AgentState::Idle);
        assert_eq!(flip(AgentState::Idle), AgentState::Online);
        assert_eq!(target_from(AgentState::Idle as i32), AgentState::Online);
        assert_eq!(target_from(AgentState::Online as i32), AgentState::Idle);
    }
}
