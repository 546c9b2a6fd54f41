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
//! - `ceiling`: the baseline, a bare tonic echo server spawned here under
//!   the load of `transition` (see `ceiling.rs`).
//!
//! Every measurement is repeated `--runs` times: each run is printed, then the
//! median of the runs. Latency percentiles use the nearest rank over the
//! sorted per-request latencies of all workers of a run. Servers this tool
//! spawns are stopped on every exit path (SIGTERM, SIGKILL after 30 s).
//!
//! This module holds the arguments and the dispatch; each benchmark has its
//! own file, with `client` (gRPC plumbing), `stats` (percentiles, medians,
//! formatting) and `server` (spawned servers) shared between them.

mod ceiling;
mod client;
mod commit;
mod cpu;
mod load;
mod memory;
mod recovery;
mod server;
mod stats;
mod watch;

use std::{path::PathBuf, time::Duration};

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};

use agent_lifecycle::app::config::parse_duration;

use self::load::LoadOp;

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
    /// CPU per transition of the SQLite store's commit, in this process (no
    /// network, no service), beside plain INSERTs of the same rows.
    Commit(CommitArgs),
    /// The baseline: a bare tonic echo server (spawned here, the same
    /// HTTP/2 settings) under the load of `bench transition`, with a
    /// 100-byte payload; throughput, latency, server CPU per call.
    Ceiling(LoadArgs),
    /// The echo server `ceiling` spawns (prints `listening on ADDR`).
    #[command(hide = true)]
    EchoServer {
        /// Also serve the durable echo, on a SQLite file in this directory.
        #[arg(long, value_name = "DIR")]
        durable: Option<PathBuf>,
    },
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
    /// Before each run, the same load on a bare tonic echo server (spawned
    /// here, as `bench ceiling`); each run is reported as a ratio to it,
    /// then the median ratio. Ignored by `bench ceiling` itself.
    #[arg(long)]
    baseline: bool,
    /// Before each run, also the same load on the durable echo, a bare
    /// tonic echo that answers each call after inserting its payload as a
    /// row of a bare SQLite file in a directory under DIR (WAL,
    /// `synchronous = FULL`), every call waiting in one transaction and one
    /// fsync: the ceiling of a store that makes each change durable before
    /// its answer, on DIR's disk. Each run is also reported as a ratio to
    /// it. Put DIR on the disk of the store under test.
    #[arg(long, value_name = "DIR")]
    durable_baseline: Option<PathBuf>,
    #[command(flatten)]
    cpu: ServerCpuArgs,
}

/// Whose CPU time a benchmark of a running server reads: the flag
/// `transition`, `get`, `ceiling` and `watch` share.
#[derive(Debug, Args)]
struct ServerCpuArgs {
    /// Server processes whose CPU time is read, comma-separated; default:
    /// the process listening on each --server port on this machine.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
}

/// `bench watch`.
#[derive(Debug, Args)]
struct WatchBenchArgs {
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

/// `bench commit`.
#[derive(Debug, Args)]
struct CommitArgs {
    /// Agents the transitions go round-robin over.
    #[arg(long, default_value_t = 64)]
    agents: usize,
    /// Transitions per commit (a group commit's batch).
    #[arg(long, default_value_t = 18)]
    batch: usize,
    /// Transitions per run (a fifth of it warms up first, unmeasured).
    #[arg(long, default_value_t = 100_000)]
    transitions: usize,
    /// Repetitions, each after its baseline; every run is reported, then
    /// the median.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Parent of the temporary directory of both files; default: $TMPDIR.
    /// On a tmpfs (`/dev/shm`) the fsyncs cost nothing and only the CPU of
    /// the write path is left.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Runs a benchmark. Ctrl-C ends it; servers it spawned are stopped.
///
/// # Errors
/// Bad arguments, an unreachable server, a failed setup or a failed run.
pub async fn run(server: &str, args: BenchArgs) -> anyhow::Result<()> {
    let bench = async move {
        match args.command {
            BenchCommand::Transition(load) => load::run(server, LoadOp::Transition, load).await,
            BenchCommand::Get(load) => load::run(server, LoadOp::Get, load).await,
            BenchCommand::Watch(watch) => watch::run(server, watch).await,
            BenchCommand::Recovery(recovery) => recovery::run(recovery).await,
            BenchCommand::Memory(memory) => memory::run(memory).await,
            BenchCommand::Commit(commit) => {
                tokio::task::spawn_blocking(move || commit::run(commit))
                    .await
                    .map_err(|e| anyhow::anyhow!("bench commit panicked: {e}"))?
            }
            BenchCommand::Ceiling(load) => ceiling::run(load).await,
            BenchCommand::EchoServer { durable } => ceiling::serve(durable).await,
        }
    };
    // Dropping the benchmark future on Ctrl-C drops its server guards.
    tokio::select! {
        result = bench => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
    }
}

/// Fails unless `--NAME` is at least 1.
fn ensure_positive(name: &str, value: usize) -> anyhow::Result<()> {
    if value == 0 {
        bail!("--{name} must be at least 1");
    }
    Ok(())
}
