//! `bench recovery`: spawns the server on a SQLite file of E events
//! (populating it first if it holds fewer) and measures how long a restart
//! takes until it listens and until it answers with the whole log loaded.

use std::{
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use tonic::transport::Channel;

use agent_lifecycle::app::config::parse_duration;

use super::{
    client::{
        Client, LOAD_WORKERS, Worker, connect, connect_channels, create_agents, head_sequence,
    },
    ensure_positive,
    server::{SpawnedServer, file_size, server_binary},
    stats::{Latencies, median, mib, nanos, rate, secs},
};

/// `bench recovery`.
#[derive(Debug, Args)]
pub(super) struct RecoveryArgs {
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
    /// Populate straight through the SQLite store in this process (batches
    /// of 1,000, no server, no network): the agents are registered IDLE
    /// and flipped IDLE <-> ONLINE round-robin. Far faster than over gRPC,
    /// for files of millions of agents and events.
    #[arg(long)]
    direct: bool,
}

/// Transitions per commit of `--direct`.
const DIRECT_BATCH: usize = 1_000;

/// Fills the file at `db` to `events` events straight through the store
/// (see `--direct`), unless it already holds them.
///
/// # Errors
/// The store cannot be opened, or a commit failed.
fn populate_direct(db: &Path, agents: usize, events: u64) -> anyhow::Result<()> {
    use agent_lifecycle::store::{SqliteStore, Store};
    let store = SqliteStore::open(db).context("opening the store")?;
    let head = store.head().context("reading the head")?;
    if head >= events {
        println!("populate: skipped, the file already holds {head} events");
        return Ok(());
    }
    let started = Instant::now();
    let mut tracked = super::commit::register_agents(&store, agents)?;
    let registered = started.elapsed();
    let remaining = events.saturating_sub(store.head()?);
    let mut next = 0;
    let mut batch_id = agents as u64;
    super::commit::timed(
        &mut tracked,
        &mut next,
        DIRECT_BATCH,
        usize::try_from(remaining).unwrap_or(usize::MAX),
        |changes| {
            batch_id += 1;
            super::commit::store_commit(&store, batch_id, changes)
        },
    )?;
    let head_now = store.head()?;
    drop(store);
    println!(
        "populate (direct): {} events ({head} before) in {}: {agents} agents in {}, then {} transitions",
        head_now - head,
        secs(started.elapsed()),
        secs(registered),
        remaining
    );
    Ok(())
}

/// `workers` workers flip ONLINE agents ONLINE <-> IDLE until the head
/// reaches `target`; returns the latencies and the number of transitions.
async fn flip_until(
    channels: &[Channel],
    agents: Vec<String>,
    head: u64,
    target: u64,
) -> anyhow::Result<(u64, Vec<u64>)> {
    let workers = LOAD_WORKERS.min(agents.len()).max(1);
    let mut groups: Vec<Vec<Worker>> = vec![Vec::new(); workers];
    for (i, agent_id) in agents.into_iter().enumerate() {
        groups[i % workers].push(Worker::new(channels[i % channels.len()].clone(), agent_id));
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

/// Runs `bench recovery`.
///
/// # Errors
/// Bad arguments, a server that does not start, stop or load the log, or a
/// failed request.
pub(super) async fn run(args: RecoveryArgs) -> anyhow::Result<()> {
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
    if args.direct {
        let (db, agents, events) = (db.clone(), args.agents, args.events);
        tokio::task::spawn_blocking(move || populate_direct(&db, agents, events))
            .await
            .context("populating panicked")??;
    } else {
        let server = SpawnedServer::spawn(&binary, &store, args.start_timeout).await?;
        populate(&server.url, args.agents, args.events).await?;
        let (stop_time, status) = server.stop().await?;
        println!("  first server stopped in {} ({status})", secs(stop_time));
    }
    println!(
        "  bench.db {}, bench.db-wal {}",
        mib(file_size(&db)),
        mib(file_size(&dir.join("bench.db-wal")))
    );

    let mut listening_times = Vec::new();
    let mut ready_times = Vec::new();
    for run in 1..=args.runs {
        let r = restart(&binary, &store, args.events, args.start_timeout).await?;
        println!(
            "run {run}/{}: listening after {}, GetLifecycleMetrics head {} after {}; VmRSS {} ({:.0} B per agent); stopped in {} ({})",
            args.runs,
            secs(r.listening),
            r.head,
            secs(r.ready),
            mib(r.resident),
            r.resident as f64 / args.agents as f64,
            secs(r.stop_time),
            r.status
        );
        listening_times.push(r.listening.as_secs_f64());
        ready_times.push(r.ready.as_secs_f64());
    }
    println!(
        "median of {} restarts: listening after {:.3}s, ready after {:.3}s",
        args.runs,
        median(listening_times.into_iter()),
        median(ready_times.into_iter())
    );
    Ok(())
}

/// Fills the log of the server at `url` to `events` events, with `agents`
/// new agents flipped ONLINE <-> IDLE, unless it already holds them; the
/// connections are closed when it returns.
///
/// # Errors
/// A failed request, or the head stopping short of `events`.
async fn populate(url: &str, agents: usize, events: u64) -> anyhow::Result<()> {
    let channels = connect_channels(url, 4).await?;
    let clients: Vec<Client> = channels
        .iter()
        .cloned()
        .map(crate::cli::connect::client)
        .collect();
    let mut client = clients[0].clone();
    let head = head_sequence(&mut client).await?;
    if head >= events {
        println!("populate: skipped, the file already holds {head} events");
        return Ok(());
    }
    let started = Instant::now();
    let ids = create_agents(&clients, agents, true, "bench-recovery").await?;
    let created = started.elapsed();
    let after_setup = head_sequence(&mut client).await?;
    let (transitions, samples) = flip_until(&channels, ids, after_setup, events).await?;
    let elapsed = started.elapsed();
    let head_now = head_sequence(&mut client).await?;
    if head_now < events {
        bail!("populating stopped at head {head_now}, below {events}");
    }
    let flip_time = elapsed.saturating_sub(created);
    println!(
        "populate: {} events ({} before) in {} ({:.1} events/s): {} agents in {}, then {transitions} transitions in {} \
         ({:.1}/s, {LOAD_WORKERS} workers, TransitionAgent {})",
        head_now - head,
        head,
        secs(elapsed),
        rate(head_now - head, elapsed),
        agents,
        secs(created),
        secs(flip_time),
        rate(transitions, flip_time),
        Latencies::from_samples(samples).line()
    );
    Ok(())
}

/// One restart's figures.
struct Restart {
    /// From the spawn until the server listened.
    listening: Duration,
    /// From the spawn until it reported the whole log.
    ready: Duration,
    head: u64,
    /// VmRSS once ready.
    resident: u64,
    stop_time: Duration,
    status: ExitStatus,
}

/// Spawns the server on `store`, asks for the head until it reaches
/// `events`, and stops it.
///
/// # Errors
/// The server does not start, does not reach `events` within
/// `start_timeout`, or does not stop.
async fn restart(
    binary: &Path,
    store: &str,
    events: u64,
    start_timeout: Duration,
) -> anyhow::Result<Restart> {
    let spawned = Instant::now();
    let server = SpawnedServer::spawn(binary, store, start_timeout).await?;
    let listening = spawned.elapsed();
    let deadline = spawned + start_timeout;
    let mut client = crate::cli::connect::client(connect(&server.url).await?);
    let head = loop {
        let head = head_sequence(&mut client).await?;
        if head >= events {
            break head;
        }
        if Instant::now() >= deadline {
            bail!("the restarted server reports head {head}, below {events}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let ready = spawned.elapsed();
    let (resident, _) = server.memory()?;
    drop(client);
    let (stop_time, status) = server.stop().await?;
    Ok(Restart {
        listening,
        ready,
        head,
        resident,
        stop_time,
        status,
    })
}
