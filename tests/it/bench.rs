//! The benchmark tool's baseline, `bench ceiling`, works end to end: it
//! spawns its own echo server, loads it, reports throughput, latency and
//! the server's CPU time per call, and stops the server. Nothing is timed
//! here; BENCHMARKS.md holds the figures.

use std::process::Command;

use crate::common::process::lib as child;

#[test]
fn the_ceiling_benchmark_reports_its_baseline() {
    let args = [
        "bench",
        "ceiling",
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
        "--runs",
        "1",
        "--concurrency",
        "4",
        "--connections",
        "2",
    ];
    let stdout = run_tool(&args.map(std::ffi::OsStr::new));
    let run = stdout
        .lines()
        .find(|l| l.starts_with("run 1/1:"))
        .unwrap_or_else(|| panic!("a run line in {stdout}"));
    let echoes: f64 = run
        .split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a rate in {run}"));
    assert!(echoes > 0.0, "{run}");
    assert!(run.contains("errors 0") && run.contains("us/call"), "{run}");
    assert!(stdout.lines().any(|l| l.starts_with("median:")), "{stdout}");
}

/// `bench ceiling --durable-baseline DIR` also loads the durable echo (each
/// call a row of a bare SQLite file, fsynced before the reply) after every
/// echo run, reports its ratio to the echo, and leaves DIR as it found it.
#[test]
fn the_ceiling_benchmark_reports_the_durable_echo() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let args = [
        std::ffi::OsStr::new("bench"),
        "ceiling".as_ref(),
        "--durable-baseline".as_ref(),
        dir.path().as_os_str(),
        "--duration".as_ref(),
        "300ms".as_ref(),
        "--warmup".as_ref(),
        "100ms".as_ref(),
        "--runs".as_ref(),
        "1".as_ref(),
        "--concurrency".as_ref(),
        "4".as_ref(),
        "--connections".as_ref(),
        "2".as_ref(),
    ];
    let stdout = run_tool(&args);
    let durable = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("durable echo just after:"))
        .unwrap_or_else(|| panic!("a durable echo line in {stdout}"));
    assert!(durable.contains("errors 0"), "{durable}");
    let ratio: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("median ratio of the durable echo to the echo: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("a median durable ratio in {stdout}"));
    assert!(ratio > 0.0, "{stdout}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read the directory")
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// Runs the tool with `args` and returns its standard output, failing with
/// everything it printed otherwise.
fn run_tool(args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
        .args(args)
        .output()
        .expect("run the benchmark");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Runs the tool against a server of its own (memory store) and returns
/// its standard output, failing with everything it printed otherwise.
fn bench_against_a_server(args: &[&str]) -> String {
    let bin = env!("CARGO_BIN_EXE_agent-lifecycle");
    let command = child::ServerCommand::new(bin).args(["--store", "memory", "--log", "warn"]);
    let server = child::ServerProcess::start(&command, std::time::Duration::from_secs(30))
        .expect("server starts");
    let url = server.url();
    let mut all = vec![std::ffi::OsStr::new("--server"), std::ffi::OsStr::new(&url)];
    all.extend(args.iter().map(std::ffi::OsStr::new));
    run_tool(&all)
}

/// `bench transition --baseline --durable-baseline` measures the echo and
/// the durable echo before each run and reports the ratios, reads the
/// server's CPU time from /proc of the process it finds listening on the
/// --server port, and removes the durable echo's files.
#[test]
fn transition_runs_beside_the_echo_baseline_with_server_cpu() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let durable = dir.path().to_str().expect("a UTF-8 temporary path");
    let stdout = bench_against_a_server(&[
        "bench",
        "transition",
        "--baseline",
        "--durable-baseline",
        durable,
        "--concurrency",
        "4",
        "--connections",
        "2",
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
        "--runs",
        "1",
    ]);
    assert!(stdout.contains("server CPU from /proc of PID"), "{stdout}");
    let run = stdout
        .lines()
        .find(|l| l.starts_with("run 1/1:"))
        .unwrap_or_else(|| panic!("a run line in {stdout}"));
    assert!(run.contains("us/op") && run.contains("errors 0"), "{run}");
    assert!(stdout.contains("baseline echo just before"), "{stdout}");
    let ratio: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("median ratio to the echo baseline: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a median ratio in {stdout}"));
    assert!(ratio > 0.0, "{stdout}");
    assert!(stdout.contains("durable echo just before"), "{stdout}");
    assert!(
        stdout.contains("median ratio to the durable echo: "),
        "{stdout}"
    );
    let left = std::fs::read_dir(dir.path())
        .expect("read the directory")
        .count();
    assert_eq!(left, 0, "the durable echo's files are removed");
}

/// `bench watch --baseline`: one connection per subscriber by default,
/// every event delivered to every stream, and the same load on the bare
/// fan-out with every message delivered, reported as ratios.
#[test]
fn watch_runs_beside_the_bare_fan_out() {
    let stdout = bench_against_a_server(&[
        "bench",
        "watch",
        "--baseline",
        "--subscribers",
        "3",
        "--writers",
        "2",
        "--rate",
        "200",
        "--duration",
        "300ms",
        "--runs",
        "1",
    ]);
    assert!(stdout.contains("connections 3"), "{stdout}");
    let subscribers: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("subscribers:"))
        .collect();
    assert_eq!(subscribers.len(), 2, "{stdout}");
    for line in subscribers {
        assert!(
            line.contains("missing 0, skipped sequences 0, duplicates 0, failed streams 0"),
            "{line}"
        );
    }
    assert!(stdout.contains("bare fan-out ("), "{stdout}");
    assert!(
        stdout.contains("median ratios to the bare fan-out: deliveries/s"),
        "{stdout}"
    );
}

/// `bench commit` drives the SQLite store in its own process beside plain
/// INSERTs of the same rows, reports both per transition and their ratio
/// for every run, and removes its files.
#[test]
fn commit_runs_beside_bare_sqlite_inserts() {
    let parent = tempfile::tempdir().expect("temp dir");
    let args = [
        "bench",
        "commit",
        "--transitions",
        "2000",
        "--runs",
        "2",
        "--dir",
    ];
    let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    all.push(parent.path().as_os_str());
    let stdout = run_tool(&all);
    let runs: Vec<&str> = stdout.lines().filter(|l| l.starts_with("run ")).collect();
    assert_eq!(runs.len(), 2, "{stdout}");
    for run in runs {
        let figures: Vec<f64> = run
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        // store us, bare us, ratio
        assert_eq!(figures.len(), 3, "{run}");
        assert!(figures.iter().all(|f| *f > 0.0), "{run}");
        assert!((figures[0] / figures[1] - figures[2]).abs() < 0.02, "{run}");
    }
    assert!(stdout.contains("median of 2 runs: store"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(parent.path())
        .expect("read the parent")
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// `bench heartbeat` on a small fleet: the servers it spawns see every
/// silent agent go to ERROR within heartbeat_timeout + 1 s and no other
/// agent move, in both modes; the servers count every beat sent on the
/// streams; the echo runs under the same schedule.
#[test]
fn heartbeat_sees_exactly_the_silent_agents_go_to_error() {
    for mode in ["stream", "unary"] {
        let stdout = run_tool(
            &[
                "bench",
                "heartbeat",
                "--agents",
                "300",
                "--rate",
                "300",
                "--silent",
                "10",
                "--connections",
                "10",
                "--mode",
                mode,
                "--runs",
                "1",
                "--baseline",
            ]
            .map(std::ffi::OsStr::new),
        );
        let monitor = stdout
            .lines()
            .find(|l| l.starts_with("  monitor: "))
            .unwrap_or_else(|| panic!("a monitor line in {stdout}"));
        assert!(
            monitor.contains("10 silent agents to ERROR")
                && monitor.contains(
                    "missed 0, late 0, early 0, healthy agents touched 0, other events 0"
                )
                && !monitor.contains("NOT MET"),
            "{stdout}"
        );
        assert!(stdout.contains("held in 1 of 1 runs"), "{stdout}");
        assert!(stdout.contains("us/heartbeat"), "{stdout}");
        assert!(stdout.contains("echo under the same schedule"), "{stdout}");
        if mode == "stream" {
            assert!(stdout.contains("(0 still open at the limit)"), "{stdout}");
        }
    }
}

/// `bench list` walks the fleet's pages and `bench history` reads each
/// worker's history, both without errors.
#[test]
fn list_and_history_read_without_errors() {
    for op in ["list", "history"] {
        let stdout = bench_against_a_server(&[
            "bench",
            op,
            "--concurrency",
            "4",
            "--connections",
            "2",
            "--duration",
            "300ms",
            "--warmup",
            "100ms",
            "--runs",
            "1",
        ]);
        let run = stdout
            .lines()
            .find(|l| l.starts_with("run 1/1:"))
            .unwrap_or_else(|| panic!("a run line in {stdout}"));
        assert!(run.contains("errors 0"), "{run}");
    }
}
