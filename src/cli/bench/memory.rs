//! `bench memory`: spawns a server and measures its resident memory per
//! registered agent, with the registration throughput on the side.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Args, ValueEnum};

use agent_lifecycle::{api::grpc::pb, app::config::parse_duration};

use super::{
    client::{Client, LOAD_WORKERS, TRIGGERED_BY, call, connect_clients, head_sequence},
    ensure_positive,
    server::{SpawnedServer, TempDir, server_binary},
    stats::{Latencies, median, mib, nanos, rate, secs},
};

/// Where `bench memory` keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum StoreKind {
    /// The in-memory store.
    Memory,
    /// SQLite in a fresh directory (removed afterwards).
    Sqlite,
}

/// `bench memory`.
#[derive(Debug, Args)]
pub(super) struct MemoryArgs {
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

/// Runs `bench memory`.
///
/// # Errors
/// Bad arguments, a server that does not start or stop, `/proc` not
/// readable, or a failed registration.
pub(super) async fn run(args: MemoryArgs) -> anyhow::Result<()> {
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
        let server = SpawnedServer::spawn(&binary, &store, args.start_timeout).await?;
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
