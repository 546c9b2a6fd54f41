//! `bench transition` and `bench get`: closed-loop load on a running server.
//! N workers, one request in flight each, spread round-robin over C
//! connections, until a deadline; transitions also check that the committed
//! sequences are contiguous and count group commits.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;

use agent_lifecycle::app::config::parse_duration;

use super::{
    ceiling::{EchoBaseline, EchoFigures, EchoKind},
    client::{
        Client, MAX_CONSECUTIVE_ERRORS, Worker, connect_channels, create_agents, head_sequence,
    },
    cpu::{self, ServerCpu, ServerCpuArgs},
    ensure_positive,
    stats::{Latencies, median, nanos, rate, secs},
};

/// `bench transition` and `bench get`.
#[derive(Debug, Args)]
pub(super) struct LoadArgs {
    /// Workers, one request in flight each, one agent each.
    #[arg(long, default_value_t = 64)]
    pub(super) concurrency: usize,
    /// gRPC connections (HTTP/2) the workers are spread over.
    #[arg(long, default_value_t = 4)]
    pub(super) connections: usize,
    /// Measured time per run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(super) duration: Duration,
    /// Unmeasured load before each run's measurement.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub(super) warmup: Duration,
    /// Repetitions; every run is reported, then the median.
    #[arg(long, default_value_t = 3)]
    pub(super) runs: usize,
    /// Before each run, the same load on a bare tonic echo server (spawned
    /// here, as `bench ceiling`); each run is reported as a ratio to it,
    /// then the median ratio. Ignored by `bench ceiling` itself.
    #[arg(long)]
    pub(super) baseline: bool,
    /// Before each run, also the same load on the durable echo, a bare
    /// tonic echo that answers each call after inserting its payload as a
    /// row of a bare SQLite file in a directory under DIR (WAL,
    /// `synchronous = FULL`), every call waiting in one transaction and one
    /// fsync: the ceiling of a store that makes each change durable before
    /// its answer, on DIR's disk. Each run is also reported as a ratio to
    /// it. Put DIR on the disk of the store under test.
    #[arg(long, value_name = "DIR")]
    pub(super) durable_baseline: Option<PathBuf>,
    #[command(flatten)]
    pub(super) cpu: ServerCpuArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LoadOp {
    Transition,
    Get,
    /// ListAgents pages, each worker walking the whole fleet.
    List,
    /// GetAgentHistory of the worker's agent.
    History,
}

impl LoadOp {
    fn unit(self) -> &'static str {
        match self {
            LoadOp::Transition => "transitions/s",
            LoadOp::Get => "gets/s",
            LoadOp::List => "pages/s",
            LoadOp::History => "histories/s",
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
            LoadOp::Get => worker.get().await.map(|()| None),
            LoadOp::List => worker.list().await.map(|()| None),
            LoadOp::History => worker.history().await.map(|()| None),
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

/// Runs `bench transition` or `bench get`.
///
/// # Errors
/// Bad arguments, an unreachable server, a failed setup or a panicked worker.
pub(super) async fn run(server: &str, op: LoadOp, args: LoadArgs) -> anyhow::Result<()> {
    ensure_positive("concurrency", args.concurrency)?;
    ensure_positive("connections", args.connections)?;
    ensure_positive("runs", args.runs)?;
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    let name = match op {
        LoadOp::Transition => "transition",
        LoadOp::Get => "get",
        LoadOp::List => "list",
        LoadOp::History => "history",
    };
    println!(
        "bench {name}: server {server}, concurrency {}, connections {}, duration {}, warmup {}, runs {}",
        args.concurrency,
        args.connections,
        secs(args.duration),
        secs(args.warmup),
        args.runs
    );
    let server_cpu = ServerCpu::find(server, &args.cpu.server_pid);
    println!("  {}", server_cpu.describe());
    let echo = start_baseline(&args).await?;
    let (mut client, mut workers) = start_workers(server, &args, name).await?;

    let mut throughputs = Vec::new();
    let mut latencies = Vec::new();
    let mut cpu_per_op = Vec::new();
    let mut to_echo = Ratios::new("echo baseline", "baseline echo", "echo");
    let mut to_durable = Ratios::new("durable echo", "durable echo", "durable echo");
    for run in 1..=args.runs {
        let (baseline, durable) = measure_baselines(echo.as_ref(), &args).await?;
        let measured = measure(op, &mut workers, &mut client, &server_cpu, &args).await?;
        let figures = RunFigures::of(measured);
        println!(
            "run {run}/{}: {:.1} {} ({} in {})  {}  {}  errors {}",
            args.runs,
            figures.throughput,
            op.unit(),
            figures.count,
            secs(figures.elapsed),
            figures.latency.line(),
            cpu::show(figures.us_per_op, "op"),
            figures.errors
        );
        if let Some(us) = figures.us_per_op {
            cpu_per_op.push(us);
        }
        if let Some(echo) = &baseline {
            to_echo.run(figures.throughput, figures.us_per_op, echo);
        }
        if let Some(echo) = &durable {
            to_durable.run(figures.throughput, figures.us_per_op, echo);
        }
        if op == LoadOp::Transition {
            print_sequences(check_sequences(figures.commits), figures.head_advance);
        }
        if let Some(err) = figures.first_error {
            println!("  first error: {err}");
        }
        throughputs.push(figures.throughput);
        latencies.push(figures.latency);
    }
    let cpu_median = (!cpu_per_op.is_empty()).then(|| median(cpu_per_op.into_iter()));
    println!(
        "median of {} runs: {:.1} {}  {}  {}",
        args.runs,
        median(throughputs.into_iter()),
        op.unit(),
        Latencies::median_of(&latencies).line(),
        cpu::show(cpu_median, "op")
    );
    to_echo.print_median();
    to_durable.print_median();
    Ok(())
}

/// The echo server of `--baseline` and `--durable-baseline`, when either
/// is asked for.
///
/// # Errors
/// The echo server does not start.
async fn start_baseline(args: &LoadArgs) -> anyhow::Result<Option<EchoBaseline>> {
    if !args.baseline && args.durable_baseline.is_none() {
        return Ok(None);
    }
    println!(
        "  baseline: a bare tonic echo (100-byte payload) under the same load before each run"
    );
    if let Some(dir) = &args.durable_baseline {
        println!(
            "  and the durable echo: each call a row of a bare SQLite file under {}, one fsync per batch",
            dir.display()
        );
    }
    Ok(Some(
        EchoBaseline::start(args.connections, args.durable_baseline.as_deref()).await?,
    ))
}

/// The connections, and a worker per `--concurrency` with an agent of
/// its own, registered, deployed and started; a client for the head
/// sequence.
///
/// # Errors
/// The server cannot be reached, or an agent cannot be set up.
async fn start_workers(
    server: &str,
    args: &LoadArgs,
    name: &str,
) -> anyhow::Result<(Client, Vec<Worker>)> {
    let channels = connect_channels(server, args.connections).await?;
    let clients: Vec<_> = channels
        .iter()
        .cloned()
        .map(crate::cli::connect::client)
        .collect();
    let setup = Instant::now();
    let ids = create_agents(&clients, args.concurrency, true, &format!("bench-{name}")).await?;
    println!(
        "setup: {} agents registered, deployed, started in {}",
        ids.len(),
        secs(setup.elapsed())
    );
    let workers: Vec<Worker> = ids
        .into_iter()
        .enumerate()
        .map(|(i, agent_id)| Worker::new(channels[i % channels.len()].clone(), agent_id))
        .collect();
    let client = clients.into_iter().next().context("no connection")?;
    Ok((client, workers))
}

/// The echo, then the durable echo, under the run's load, when the
/// server serves them.
///
/// # Errors
/// As [`EchoBaseline::measure`].
async fn measure_baselines(
    echo: Option<&EchoBaseline>,
    args: &LoadArgs,
) -> anyhow::Result<(Option<EchoFigures>, Option<EchoFigures>)> {
    let Some(echo) = echo else {
        return Ok((None, None));
    };
    let plain = echo
        .measure(
            EchoKind::Plain,
            args.concurrency,
            args.warmup,
            args.duration,
        )
        .await?;
    let durable = if echo.durable() {
        Some(
            echo.measure(
                EchoKind::Durable,
                args.concurrency,
                args.warmup,
                args.duration,
            )
            .await?,
        )
    } else {
        None
    };
    Ok((Some(plain), durable))
}

/// What one run measured, before it is summed.
struct Measured {
    /// From the end of the warm-up until the last worker finished.
    elapsed: Duration,
    cpu_before: Option<Duration>,
    cpu_after: Option<Duration>,
    /// How far the head sequence moved over the run.
    head_advance: u64,
    outcomes: Vec<WorkerOutcome>,
}

/// One run: the workers' load for the warm-up, then measured for the
/// duration, with the server's CPU read over the measured part; the
/// workers go back into `workers`.
///
/// # Errors
/// The head sequence cannot be read, or a worker panicked.
async fn measure(
    op: LoadOp,
    workers: &mut Vec<Worker>,
    client: &mut Client,
    server_cpu: &ServerCpu,
    args: &LoadArgs,
) -> anyhow::Result<Measured> {
    let head_before = head_sequence(client).await?;
    let warm_end = Instant::now() + args.warmup;
    let end = warm_end + args.duration;
    let handles: Vec<_> = workers
        .drain(..)
        .map(|w| tokio::spawn(load_worker(op, w, warm_end, end)))
        .collect();
    tokio::time::sleep_until(warm_end.into()).await;
    let cpu_before = server_cpu.sample();
    let mut outcomes = Vec::with_capacity(handles.len());
    for handle in handles {
        let (worker, outcome) = handle.await.context("a worker panicked")?;
        workers.push(worker);
        outcomes.push(outcome);
    }
    let elapsed = Instant::now().saturating_duration_since(warm_end);
    let cpu_after = server_cpu.sample();
    let head_after = head_sequence(client).await?;
    Ok(Measured {
        elapsed,
        cpu_before,
        cpu_after,
        head_advance: head_after.saturating_sub(head_before),
        outcomes,
    })
}

/// One run's figures, summed over its workers.
struct RunFigures {
    elapsed: Duration,
    /// Measured successful requests.
    count: u64,
    throughput: f64,
    latency: Latencies,
    us_per_op: Option<f64>,
    errors: u64,
    first_error: Option<String>,
    /// Every commit of the run, warm-up included.
    commits: Vec<(u64, i128)>,
    head_advance: u64,
}

impl RunFigures {
    fn of(measured: Measured) -> RunFigures {
        let outcomes = measured.outcomes;
        let errors: u64 = outcomes.iter().map(|o| o.errors).sum();
        let first_error = outcomes.iter().find_map(|o| o.first_error.clone());
        let mut samples = Vec::with_capacity(outcomes.iter().map(|o| o.latencies.len()).sum());
        let mut commits = Vec::new();
        for outcome in outcomes {
            samples.extend(outcome.latencies);
            commits.extend(outcome.commits);
        }
        let count = samples.len() as u64;
        RunFigures {
            elapsed: measured.elapsed,
            count,
            throughput: rate(count, measured.elapsed),
            latency: Latencies::from_samples(samples),
            us_per_op: cpu::per_op(measured.cpu_before, measured.cpu_after, count),
            errors,
            first_error,
            commits,
            head_advance: measured.head_advance,
        }
    }
}

/// The sequences' line of a `bench transition` run.
fn print_sequences(check: SequenceCheck, head_advance: u64) {
    let batch = if check.batches == 0 {
        0.0
    } else {
        check.committed as f64 / check.batches as f64
    };
    println!(
        "  sequences: {} committed (warm-up included), head +{head_advance}, gaps {}, duplicates {}; \
         {} group commits, {batch:.1} transitions per commit",
        check.committed, check.gaps, check.duplicates, check.batches
    );
}

/// The runs' ratios to one baseline measured just before each: throughput
/// and server CPU per op.
struct Ratios {
    /// In the median line: "median ratio to the {what}".
    what: &'static str,
    /// In each run's line: "{label} just before".
    label: &'static str,
    /// In the CPU ratio: "the {name}'s".
    name: &'static str,
    throughput: Vec<f64>,
    cpu: Vec<f64>,
}

impl Ratios {
    fn new(what: &'static str, label: &'static str, name: &'static str) -> Self {
        Ratios {
            what,
            label,
            name,
            throughput: Vec::new(),
            cpu: Vec::new(),
        }
    }

    /// Records and prints one run beside `echo`.
    fn run(&mut self, throughput: f64, us_per_op: Option<f64>, echo: &EchoFigures) {
        let ratio = throughput / echo.per_second.max(f64::MIN_POSITIVE);
        let cpu_ratio = us_per_op.map(|us| us / echo.cpu_us.max(f64::MIN_POSITIVE));
        self.throughput.push(ratio);
        self.cpu.extend(cpu_ratio);
        println!(
            "  {} just before: {}  ->  ratio {ratio:.2}{}",
            self.label,
            echo.line(),
            cpu_ratio
                .map(|r| format!(", CPU per op {r:.2}x the {}'s", self.name))
                .unwrap_or_default()
        );
    }

    /// The medians, when there were runs.
    fn print_median(&self) {
        if self.throughput.is_empty() {
            return;
        }
        let each: Vec<String> = self.throughput.iter().map(|r| format!("{r:.2}")).collect();
        let cpu = if self.cpu.is_empty() {
            String::new()
        } else {
            format!(
                "; server CPU per op {:.2}x the {}'s",
                median(self.cpu.iter().copied()),
                self.name
            )
        };
        println!(
            "median ratio to the {}: {:.2} (runs: {}){cpu}",
            self.what,
            median(self.throughput.iter().copied()),
            each.join(", "),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
