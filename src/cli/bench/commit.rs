//! `bench commit`: the SQLite store's write path in this process, without
//! the network, the service or the commit thread. Batches of transitions go
//! straight through `Store::commit`; the figure is the CPU time of this
//! thread per transition, which moves far less between runs than a
//! throughput over the network does.
//!
//! The baseline, in the same run: the same batches as plain INSERTs of the
//! event rows (the store's columns and values, one prepared statement, one
//! transaction per batch) into a bare SQLite file with the store's pragmas.
//! What the store does beyond that (the version check, the per-agent and
//! per-principal indexes, the agents' rows, the head) is the ratio.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::UNIX_EPOCH,
};

use anyhow::Context;
use clap::Args;
use rusqlite::{Connection, params};

use agent_lifecycle::{
    domain::{AgentId, AgentState, Metadata, SystemClock, TransitionRecord},
    store::{AgentChange, AgentIdentity, BatchId, ChangeOutcome, SqliteStore, Store},
};

use super::{ensure_positive, server::TempDir, stats::median};

/// `bench commit`.
#[derive(Debug, Args)]
pub(super) struct CommitArgs {
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

/// One agent as the benchmark tracks it.
#[derive(Clone)]
pub(super) struct Tracked {
    id: AgentId,
    version: u64,
    online: bool,
}

/// CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    text.split_whitespace()
        .next()
        .and_then(|ns| ns.parse().ok())
        .context("unexpected /proc/thread-self/schedstat")
}

/// A record as a TransitionAgent call makes it (sequence and time are the
/// store's to set).
fn record(agent: &Tracked, to: AgentState, from: Option<AgentState>) -> TransitionRecord {
    TransitionRecord {
        agent_id: agent.id,
        from,
        to,
        at: UNIX_EPOCH,
        reason: "bench".into(),
        triggered_by: "bench-commit".into(),
        principal: String::new(),
        request: None,
        metadata: Metadata::new(),
        sequence: 0,
        version: agent.version + 1,
    }
}

/// The next batch: `size` agents, round-robin from `next`, each flipped
/// ONLINE <-> IDLE.
fn batch(agents: &[Tracked], next: &mut usize, size: usize) -> Vec<AgentChange> {
    (0..size)
        .map(|_| {
            let agent = &agents[*next % agents.len()];
            *next += 1;
            let (from, to) = if agent.online {
                (AgentState::Online, AgentState::Idle)
            } else {
                (AgentState::Idle, AgentState::Online)
            };
            AgentChange {
                agent_id: agent.id,
                prior_version: agent.version,
                identity: None,
                records: vec![Arc::new(record(agent, to, Some(from)))],
            }
        })
        .collect()
}

/// Commits `transitions` transitions in batches with `commit`, then moves
/// each agent of a batch on (a change commits or the run fails); the CPU
/// time of the batches, in ns (building them and counting included, the
/// same for the store and the baseline).
pub(super) fn timed(
    agents: &mut [Tracked],
    next: &mut usize,
    batch_size: usize,
    transitions: usize,
    mut commit: impl FnMut(&mut [AgentChange]) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let started = thread_cpu_ns()?;
    let mut done = 0;
    while done < transitions {
        let first = *next;
        let mut changes = batch(agents, next, batch_size.min(transitions - done));
        commit(&mut changes)?;
        for k in 0..changes.len() {
            let agent = &mut agents[(first + k) % agents.len()];
            agent.version += 1;
            agent.online = !agent.online;
        }
        done += changes.len();
    }
    Ok(thread_cpu_ns()? - started)
}

/// One batch through the store; every change must commit.
pub(super) fn store_commit(
    store: &SqliteStore,
    id: u64,
    changes: &mut [AgentChange],
) -> anyhow::Result<()> {
    let outcomes = store
        .commit(BatchId(id), changes, &SystemClock)
        .context("a commit failed")?;
    match outcomes.iter().find(|o| **o != ChangeOutcome::Committed) {
        Some(refused) => anyhow::bail!("a change was refused: {refused:?}"),
        None => Ok(()),
    }
}

/// The baseline's batch: its rows as plain INSERTs in one transaction.
fn bare_commit(
    conn: &mut Connection,
    sequence: &mut i64,
    changes: &[AgentChange],
) -> anyhow::Result<()> {
    let tx = conn.transaction().context("bare: begin")?;
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO events (sequence, agent_id, version, from_state, to_state, at,
                 reason, triggered_by, metadata, principal, request)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )
            .context("bare: prepare")?;
        for record in changes.iter().flat_map(|c| &c.records) {
            *sequence += 1;
            insert
                .execute(params![
                    *sequence,
                    record.agent_id.as_bytes(),
                    record.version as i64,
                    record.from.map(AgentState::as_str),
                    record.to.as_str(),
                    *sequence,
                    record.reason,
                    record.triggered_by,
                    "",
                    record.principal,
                    "",
                ])
                .context("bare: insert")?;
        }
    }
    tx.commit().context("bare: commit")
}

/// The bare file: the store's pragmas and its events table.
fn bare_open(path: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).context("bare: open")?;
    conn.execute_batch(agent_lifecycle::store::SQLITE_PRAGMAS)
        .context("bare: pragmas")?;
    conn.execute_batch(
        "CREATE TABLE events (
             sequence INTEGER PRIMARY KEY, agent_id BLOB NOT NULL, version INTEGER NOT NULL,
             from_state TEXT, to_state TEXT NOT NULL, at INTEGER NOT NULL, reason TEXT NOT NULL,
             triggered_by TEXT NOT NULL, metadata TEXT NOT NULL, principal TEXT NOT NULL,
             request TEXT NOT NULL);",
    )
    .context("bare: schema")?;
    Ok(conn)
}

/// Agents registered per commit by [`register_agents`].
const REGISTER_BATCH: usize = 1_000;

/// `count` agents registered in the store, [`REGISTER_BATCH`] per commit,
/// at version 1 (IDLE).
///
/// # Errors
/// A failed commit.
pub(super) fn register_agents(store: &SqliteStore, count: usize) -> anyhow::Result<Vec<Tracked>> {
    let mut agents = Vec::with_capacity(count);
    let mut batch = 0;
    while agents.len() < count {
        let first = agents.len();
        let size = REGISTER_BATCH.min(count - first);
        let tracked: Vec<Tracked> = (0..size)
            .map(|_| Tracked {
                id: AgentId::generate(),
                version: 0,
                online: false,
            })
            .collect();
        let mut changes: Vec<AgentChange> = tracked
            .iter()
            .enumerate()
            .map(|(k, agent)| {
                let mut registration = record(agent, AgentState::Idle, None);
                registration.reason = format!("bench agent {}", first + k);
                AgentChange {
                    agent_id: agent.id,
                    prior_version: 0,
                    identity: Some(AgentIdentity {
                        name: Arc::from(format!("bench-commit-{}", first + k)),
                        labels: Arc::default(),
                    }),
                    records: vec![Arc::new(registration)],
                }
            })
            .collect();
        batch += 1;
        store_commit(store, batch, &mut changes).context("registering the agents")?;
        agents.extend(tracked.into_iter().map(|mut agent| {
            agent.version = 1;
            agent
        }));
    }
    Ok(agents)
}

/// Runs `bench commit`.
///
/// # Errors
/// Bad arguments, a directory that cannot be written, or a failed commit.
pub(super) fn run(args: CommitArgs) -> anyhow::Result<()> {
    ensure_positive("agents", args.agents)?;
    ensure_positive("batch", args.batch)?;
    ensure_positive("transitions", args.transitions)?;
    ensure_positive("runs", args.runs)?;
    if args.batch > args.agents {
        anyhow::bail!("--batch must be at most --agents: a batch changes each agent once");
    }
    let parent = args.dir.unwrap_or_else(std::env::temp_dir);
    let dir = TempDir(parent.join(format!(
        "agent-lifecycle-bench-commit-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    println!(
        "bench commit: SQLite store in {}, {} agents, batches of {}, {} transitions per run, runs {}",
        dir.0.display(),
        args.agents,
        args.batch,
        args.transitions,
        args.runs
    );
    println!(
        "  baseline: the same rows as plain INSERTs into a bare SQLite file, one transaction per batch, before each run"
    );
    let store = SqliteStore::open(dir.0.join("store.db")).context("opening the store")?;
    let mut conn = bare_open(&dir.0.join("bare.db"))?;
    let mut agents = register_agents(&store, args.agents)?;
    // The baseline writes the same rows on its own copy of the agents.
    let mut bare_agents = agents.clone();
    let (mut next, mut bare_next, mut sequence) = (0, 0, 0);
    // Batch ids after the registrations'.
    let mut batch_id = args.agents as u64;
    let mut store_batches = |agents: &mut [Tracked], next: &mut usize, transitions| {
        timed(agents, next, args.batch, transitions, |changes| {
            batch_id += 1;
            store_commit(&store, batch_id, changes)
        })
    };
    let mut bare_batches = |agents: &mut [Tracked], next: &mut usize, transitions| {
        timed(agents, next, args.batch, transitions, |changes| {
            bare_commit(&mut conn, &mut sequence, changes)
        })
    };
    // Warm-up: both files past their first pages and the store past its
    // first index groups.
    let warmup = args.transitions / 5;
    store_batches(&mut agents, &mut next, warmup)?;
    bare_batches(&mut bare_agents, &mut bare_next, warmup)?;
    let per_transition = |ns: u64| ns as f64 / 1e3 / args.transitions as f64;
    let (mut store_us, mut bare_us, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let bare = per_transition(bare_batches(
            &mut bare_agents,
            &mut bare_next,
            args.transitions,
        )?);
        let ours = per_transition(store_batches(&mut agents, &mut next, args.transitions)?);
        println!(
            "run {run}/{}: store {ours:.2} us CPU per transition; bare inserts just before {bare:.2} us  ->  ratio {:.2}",
            args.runs,
            ours / bare
        );
        store_us.push(ours);
        bare_us.push(bare);
        ratios.push(ours / bare);
    }
    println!(
        "median of {} runs: store {:.2} us CPU per transition, bare inserts {:.2} us, ratio {:.2}",
        args.runs,
        median(store_us.into_iter()),
        median(bare_us.into_iter()),
        median(ratios.into_iter())
    );
    Ok(())
}
