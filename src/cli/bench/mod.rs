//! `agent-lifecycle bench`: measurements of the server (see BENCHMARKS.md).
//!
//! - `transition`, `get`: closed-loop load on a running server (`--server`):
//!   N workers, one request in flight each, spread round-robin over C
//!   connections, until a deadline.
//! - `watch`: S event streams on a running server, writers committing at a
//!   fixed aggregate rate; commit-to-receive latency, completeness, order.
//! - `heartbeat`: spawns the server, a fleet beating at a fixed rate, some
//!   agents going silent; CPU per heartbeat and the monitor's verdict.
//! - `recovery`: spawns the server on a SQLite file of E events and measures
//!   how long a restart takes until it answers with the whole log loaded.
//! - `memory`: spawns the server and measures resident memory per agent.
//! - `ceiling`: the baseline, a bare tonic echo server spawned here under
//!   the load of `transition` (see `ceiling/`).
//!
//! Every measurement is repeated `--runs` times: each run is printed, then the
//! median of the runs. Latency percentiles use the nearest rank over the
//! sorted per-request latencies of all workers of a run. Servers this tool
//! spawns are stopped on every exit path (SIGTERM, SIGKILL after 30 s).
//!
//! This module holds the subcommands and the dispatch; each benchmark has
//! its own file (or folder) with its flags, with `client` (gRPC plumbing),
//! `cpu` (the server's CPU time), `stats` (percentiles, medians,
//! formatting) and `server` (spawned servers) shared between them.

mod ceiling;
mod client;
mod commit;
mod cpu;
mod heartbeat;
mod load;
mod memory;
mod recovery;
mod server;
mod stats;
mod watch;

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};

use self::{
    commit::CommitArgs,
    heartbeat::HeartbeatArgs,
    load::{LoadArgs, LoadOp},
    memory::MemoryArgs,
    recovery::RecoveryArgs,
    watch::WatchBenchArgs,
};

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
    /// ListAgents pages of 100 on the server at --server, each worker
    /// walking the whole fleet page by page.
    List(LoadArgs),
    /// GetAgentHistory (a page of 100) of each worker's agent on the
    /// server at --server.
    History(LoadArgs),
    /// WatchEvents fan-out on the server at --server: commit-to-receive
    /// latency, deliveries/s, no gap, no duplicate.
    Watch(WatchBenchArgs),
    /// Heartbeats of a fleet (servers spawned here) while the health
    /// monitor watches every agent and some go silent: server CPU per
    /// heartbeat, memory per watched agent, and whether exactly the silent
    /// agents went to ERROR in time.
    Heartbeat(HeartbeatArgs),
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

/// Runs a benchmark. Ctrl-C ends it; servers it spawned are stopped.
///
/// # Errors
/// Bad arguments, an unreachable server, a failed setup or a failed run.
pub async fn run(server: &str, args: BenchArgs) -> anyhow::Result<()> {
    let bench = async move {
        match args.command {
            BenchCommand::Transition(load) => load::run(server, LoadOp::Transition, load).await,
            BenchCommand::Get(load) => load::run(server, LoadOp::Get, load).await,
            BenchCommand::List(load) => load::run(server, LoadOp::List, load).await,
            BenchCommand::History(load) => load::run(server, LoadOp::History, load).await,
            BenchCommand::Watch(watch) => watch::run(server, watch).await,
            BenchCommand::Heartbeat(heartbeat) => heartbeat::run(heartbeat).await,
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
