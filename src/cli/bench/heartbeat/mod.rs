//! `bench heartbeat`: the load a fleet puts on the server most often. Spawns
//! the server (one process, or several on one PostgreSQL database) with the
//! health monitor watching every agent, sets up `--agents` ONLINE agents and
//! has each beat every agents / rate seconds (`beats.rs`). After one full
//! interval, `--silent` agents spread over the fleet stop beating; the run
//! then lasts `heartbeat_timeout` + one check interval + a margin, and an
//! event stream checks that exactly those agents went to ERROR, each within
//! that bound of its last beat (`verdict.rs`). Reports the servers' CPU per
//! heartbeat over that window (the monitor's passes included), resident
//! memory per watched agent, and, with `--baseline`, the CPU per call of the
//! bare echo under the same open-loop schedule and connections.

mod beats;
mod verdict;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};

use agent_lifecycle::app::config::parse_duration;

use self::beats::{Counts, Driven, Finished, Schedule, Sink};
use super::{
    ceiling::EchoBaseline,
    client::{Client, connect_channels, create_agents},
    cpu::{ServerCpu, per_op},
    ensure_positive,
    server::{SpawnedServer, TempDir, server_binary},
    stats::{median, mib, secs},
};

/// The health monitor's pass interval (`HealthSettings::check_interval`).
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Added to the detection bound before a run ends, so that a late ERROR is
/// seen (and reported late) rather than missed.
const MARGIN: Duration = Duration::from_secs(3);
/// Longest the streams and calls get to finish after a run.
const FINISH_LIMIT: Duration = Duration::from_secs(30);

/// How the agents send their heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum Mode {
    /// One HeartbeatStream per agent, kept open.
    Stream,
    /// A unary Heartbeat call per beat.
    Unary,
}

/// `bench heartbeat`.
#[derive(Debug, Args)]
pub(super) struct HeartbeatArgs {
    /// Agents, all ONLINE and beating.
    #[arg(long, default_value_t = 100_000)]
    agents: usize,
    /// Heartbeats per second over the whole fleet.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Agents that stop beating after the first interval.
    #[arg(long, default_value_t = 1_000)]
    silent: usize,
    /// HTTP/2 connections the agents share (agent i on connection i mod C;
    /// connection i to process i mod P).
    #[arg(long, default_value_t = 1_000)]
    connections: usize,
    /// Streams or unary calls.
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// `memory`, `sqlite` (a fresh directory per run) or a `postgres://`
    /// URL of a server where a fresh database is made for each run.
    #[arg(long, default_value = "memory")]
    store: String,
    /// Server processes on the store (more than one needs PostgreSQL).
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// The servers' heartbeat_timeout; default 1.5 heartbeat intervals.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// After each run, the bare echo under the same schedule.
    #[arg(long)]
    baseline: bool,
    /// Server binary; default: this executable.
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Parent of the temporary directories; default: $TMPDIR.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Longest a server may take to start.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    start_timeout: Duration,
    /// Repetitions, each on fresh servers and a fresh store.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

impl HeartbeatArgs {
    /// Each agent's heartbeat period.
    fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.agents as f64 / self.rate)
    }

    fn timeout(&self) -> Duration {
        self.timeout.unwrap_or_else(|| self.interval().mul_f64(1.5))
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure_positive("agents", self.agents)?;
        ensure_positive("connections", self.connections)?;
        ensure_positive("processes", self.processes)?;
        ensure_positive("runs", self.runs)?;
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate must be a positive number");
        }
        if self.silent >= self.agents {
            bail!("--silent must be fewer than --agents");
        }
        if self.processes > 1 && !self.store.starts_with("postgres") {
            bail!("--processes above 1 needs a postgres:// --store");
        }
        if self.timeout() <= self.interval() {
            bail!(
                "--timeout must exceed the heartbeat interval ({})",
                secs(self.interval())
            );
        }
        Ok(())
    }
}

/// One run's figures.
struct RunFigures {
    us_per_beat: Option<f64>,
    echo_us: Option<f64>,
    bytes_per_watched: f64,
    holds: bool,
}

/// Runs `bench heartbeat`.
///
/// # Errors
/// Bad arguments, a server that does not start, a failed setup.
pub(super) async fn run(args: HeartbeatArgs) -> anyhow::Result<()> {
    args.check()?;
    let binary = server_binary(args.binary.clone())?;
    println!(
        "bench heartbeat: {} agents x 1 beat / {} ({:.0}/s), {:?} over {} connections, {} silent, heartbeat_timeout {}, store {}, {} process(es), runs {}",
        args.agents,
        secs(args.interval()),
        args.rate,
        args.mode,
        args.connections,
        args.silent,
        secs(args.timeout()),
        redact(&args.store),
        args.processes,
        args.runs
    );
    let echo = if args.baseline {
        Some(EchoBaseline::start(args.connections, None).await?)
    } else {
        None
    };
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let mut figures = run_once(&args, &binary, run).await?;
        if let Some(echo) = &echo {
            figures.echo_us = echo_cpu(echo, &args).await?;
            println!(
                "  echo under the same schedule: {}  ->  ratio {}",
                super::cpu::show(figures.echo_us, "call"),
                ratio(figures.us_per_beat, figures.echo_us)
            );
        }
        runs.push(figures);
    }
    let held = runs.iter().filter(|r| r.holds).count();
    println!(
        "median of {} runs: server CPU {} us/heartbeat{}; {:.0} bytes per watched agent; the monitor's verdict held in {held} of {} runs",
        args.runs,
        show_median(runs.iter().filter_map(|r| r.us_per_beat)),
        if echo.is_some() {
            format!(
                ", echo {} us/call, ratio {}",
                show_median(runs.iter().filter_map(|r| r.echo_us)),
                show_median(
                    runs.iter()
                        .filter_map(|r| Some(r.us_per_beat? / r.echo_us?))
                )
            )
        } else {
            String::new()
        },
        median(runs.iter().map(|r| r.bytes_per_watched)),
        args.runs
    );
    Ok(())
}

fn show_median(values: impl Iterator<Item = f64>) -> String {
    let values: Vec<f64> = values.collect();
    if values.is_empty() {
        "n/a".to_string()
    } else {
        format!("{:.2}", median(values.into_iter()))
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".to_string(),
    }
}

/// A store URL without its password.
fn redact(store: &str) -> String {
    match (store.find("://"), store.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://...@{}", &store[..scheme], &store[at + 1..])
        }
        _ => store.to_string(),
    }
}

/// Fresh servers on a fresh store, with the health settings of the run.
struct Servers {
    // Declared before `_dir`: the servers stop before the directory goes.
    processes: Vec<SpawnedServer>,
    _dir: TempDir,
}

impl Servers {
    async fn start(
        args: &HeartbeatArgs,
        binary: &std::path::Path,
        run: usize,
    ) -> anyhow::Result<Servers> {
        let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = TempDir(parent.join(format!(
            "agent-lifecycle-bench-heartbeat-{}",
            uuid::Uuid::new_v4()
        )));
        std::fs::create_dir_all(&dir.0)
            .with_context(|| format!("cannot create {}", dir.0.display()))?;
        let config = dir.0.join("health.toml");
        // No restarts within the run: an agent moved to ERROR stays there.
        let text = format!(
            "[health]\nheartbeat_interval = \"{}ms\"\nheartbeat_timeout = \"{}ms\"\ngrace = \"0s\"\nrestart_delay = \"1h\"\n",
            args.interval().as_millis(),
            args.timeout().as_millis()
        );
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let store = match args.store.as_str() {
            "memory" => "memory".to_string(),
            "sqlite" => format!("sqlite://{}", dir.0.join("bench.db").display()),
            url if url.starts_with("postgres") => {
                let url = url.to_string();
                let name = format!("bench_heartbeat_{}_{run}", std::process::id());
                tokio::task::spawn_blocking(move || {
                    agent_lifecycle::store::PostgresStore::create_database(&url, &name)
                })
                .await
                .context("creating the database")??
            }
            other => bail!("--store {other}: use memory, sqlite or a postgres:// URL"),
        };
        let extra = vec!["--config".to_string(), config.display().to_string()];
        let mut processes = Vec::with_capacity(args.processes);
        for _ in 0..args.processes {
            processes
                .push(SpawnedServer::spawn_with(binary, &store, &extra, args.start_timeout).await?);
        }
        Ok(Servers {
            processes,
            _dir: dir,
        })
    }

    fn urls(&self) -> String {
        let urls: Vec<&str> = self.processes.iter().map(|p| p.url.as_str()).collect();
        urls.join(",")
    }

    fn cpu(&self) -> ServerCpu {
        ServerCpu::find(
            "",
            &self
                .processes
                .iter()
                .map(SpawnedServer::pid)
                .collect::<Vec<_>>(),
        )
    }

    /// Resident memory of all the processes.
    fn resident(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for process in &self.processes {
            total += process.memory()?.0;
        }
        Ok(total)
    }

    async fn stop(self) -> anyhow::Result<()> {
        for process in self.processes {
            process.stop().await?;
        }
        Ok(())
    }
}

/// When a run (or an echo run) starts, when its measured window begins
/// (the silence), and when it ends.
struct Window {
    start: Instant,
    from: Instant,
    end: Instant,
}

impl Window {
    /// A window that opens `warmup` after the start and lasts long enough
    /// for a silent agent's ERROR and a margin.
    fn new(args: &HeartbeatArgs, warmup: Duration) -> Window {
        let start = Instant::now() + Duration::from_millis(100);
        let from = start + warmup;
        let bound = args.timeout() + CHECK_INTERVAL;
        Window {
            start,
            from,
            end: from + args.interval().max(bound) + MARGIN,
        }
    }

    fn schedule(&self, args: &HeartbeatArgs, silent: Arc<Vec<bool>>) -> Schedule {
        Schedule {
            start: self.start,
            rate: args.rate,
            agents: args.agents,
            silence_at: self.from,
            end: self.end,
            silent,
        }
    }

    /// `cpu` sampled when the window opens, by a task of its own.
    fn sample_at_open(&self, cpu: ServerCpu) -> tokio::task::JoinHandle<Option<Duration>> {
        let from = self.from;
        tokio::spawn(async move {
            tokio::time::sleep_until(from.into()).await;
            cpu.sample()
        })
    }
}

/// Resident memory of the servers at three points of a run.
struct Memory {
    empty: u64,
    registered: u64,
    watched: u64,
}

/// One run on fresh servers.
async fn run_once(
    args: &HeartbeatArgs,
    binary: &std::path::Path,
    run: usize,
) -> anyhow::Result<RunFigures> {
    let servers = Servers::start(args, binary, run).await?;
    let channels = connect_channels(&servers.urls(), args.connections).await?;
    let clients: Vec<Client> = channels
        .iter()
        .cloned()
        .map(crate::cli::connect::client)
        .collect();
    let empty = servers.resident()?;
    let setup = Instant::now();
    let ids = create_agents(&clients, args.agents, true, "bench-heartbeat").await?;
    println!(
        "run {run}/{}: setup {} ({} agents)",
        args.runs,
        secs(setup.elapsed()),
        ids.len()
    );
    let registered = servers.resident()?;
    let silent = Arc::new(spread(args.agents, args.silent));
    let mut sink = match args.mode {
        Mode::Stream => Sink::streams(&clients, ids.clone()),
        Mode::Unary => Sink::unary(clients.clone(), ids.clone()),
    };
    // Two whole intervals and a second: every agent has beaten and is
    // watched, and the streams' opening is over, before the silence.
    let window = Window::new(args, args.interval() * 2 + Duration::from_secs(1));
    let watcher = verdict::watch(clients[0].clone(), window.end + Duration::from_secs(1)).await?;
    let sampled = window.sample_at_open(servers.cpu());
    let counts = Arc::new(Counts::default());
    let driven = window
        .schedule(args, Arc::clone(&silent))
        .drive(&mut sink, &counts)
        .await;
    let ended = std::time::SystemTime::now();
    let cpu_after = servers.cpu().sample();
    let memory = Memory {
        empty,
        registered,
        watched: servers.resident()?,
    };
    let cpu_before = sampled.await.context("the CPU sampler panicked")?;
    let finished = sink.finish(FINISH_LIMIT).await;
    let seen = watcher.await.context("the event watcher panicked")??;
    let received = verdict::received(&clients[0], &ids, &silent).await?;
    let bound = args.timeout() + CHECK_INTERVAL;
    let verdict = verdict::judge(
        &seen,
        ended,
        &ids,
        &silent,
        &received,
        args.timeout(),
        bound,
    );
    let sent = verdict::judge(
        &seen,
        ended,
        &ids,
        &silent,
        &driven.last_beats,
        args.timeout(),
        bound,
    );
    let us_per_beat = per_op(cpu_before, cpu_after, driven.in_window);
    let window = window.end.saturating_duration_since(window.from);
    print_run(
        args,
        window,
        &driven,
        &counts,
        &finished,
        us_per_beat,
        &memory,
    );
    println!(
        "  monitor: {}{}",
        verdict.line(),
        if verdict.holds() { "" } else { "  -> NOT MET" }
    );
    println!(
        "  counted from the agents' sending instead: {}",
        sent.line()
    );
    drop(clients);
    drop(channels);
    servers.stop().await?;
    Ok(RunFigures {
        us_per_beat,
        echo_us: None,
        bytes_per_watched: memory.watched.saturating_sub(memory.registered) as f64
            / args.agents as f64,
        holds: verdict.holds(),
    })
}

/// A run's load, CPU and memory.
fn print_run(
    args: &HeartbeatArgs,
    window: Duration,
    driven: &Driven,
    counts: &Counts,
    finished: &Finished,
    us_per_beat: Option<f64>,
    memory: &Memory,
) {
    println!(
        "  {} beats in the {} window ({:.0}/s), dropped {}, unary answered {} failed {}, streams failed {}{}, schedule late by up to {}; {}",
        driven.in_window,
        secs(window),
        driven.in_window as f64 / window.as_secs_f64(),
        driven.dropped,
        counts.answered(),
        counts.failed(),
        finished.failed,
        finished
            .first_error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default(),
        secs(driven.max_late),
        super::cpu::show(us_per_beat, "heartbeat"),
    );
    let per_agent = |bytes: u64| bytes as f64 / args.agents as f64;
    println!(
        "  memory: VmRSS empty {}, with the agents {} ({:.0} B/agent), beating and watched {} ({:.0} B per watched agent)",
        mib(memory.empty),
        mib(memory.registered),
        per_agent(memory.registered.saturating_sub(memory.empty)),
        mib(memory.watched),
        per_agent(memory.watched.saturating_sub(memory.registered))
    );
    if let Mode::Stream = args.mode {
        println!(
            "  the servers counted {} heartbeats on the streams ({} still open at the limit)",
            finished.server_counted, finished.unfinished
        );
    }
}

/// `silent` of `agents` agents, spread evenly over the fleet.
fn spread(agents: usize, silent: usize) -> Vec<bool> {
    let mut marks = vec![false; agents];
    if silent > 0 {
        for k in 0..silent {
            marks[k * agents / silent] = true;
        }
    }
    marks
}

/// The echo's CPU per call under the run's schedule (no silence), over a
/// window as long as the run's.
async fn echo_cpu(echo: &EchoBaseline, args: &HeartbeatArgs) -> anyhow::Result<Option<f64>> {
    let window = Window::new(args, Duration::from_secs(2));
    let sampled = window.sample_at_open(ServerCpu::of(echo.pid()));
    let counts = Arc::new(Counts::default());
    let mut sink = Sink::echo(echo.channels());
    let driven = window
        .schedule(args, Arc::new(vec![false; args.agents]))
        .drive(&mut sink, &counts)
        .await;
    let after = ServerCpu::of(echo.pid()).sample();
    let before = sampled.await.context("the CPU sampler panicked")?;
    sink.finish(FINISH_LIMIT).await;
    if counts.failed() > 0 {
        println!("  echo: {} calls failed", counts.failed());
    }
    Ok(per_op(before, after, driven.in_window))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silent_agents_are_spread_and_counted() {
        let marks = spread(10, 3);
        assert_eq!(marks.iter().filter(|m| **m).count(), 3);
        assert!(marks[0] && marks[3] && marks[6]);
        assert!(spread(5, 0).iter().all(|m| !m));
    }

    #[test]
    fn passwords_are_left_out_of_reports() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://...@h:5432/db"
        );
        assert_eq!(redact("memory"), "memory");
    }
}
