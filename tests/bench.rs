//! The benchmark tool's baseline, `bench ceiling`, works end to end: it
//! spawns its own echo server, loads it, reports throughput, latency and
//! the server's CPU time per call, and stops the server. Nothing is timed
//! here; BENCHMARKS.md holds the figures.

use std::process::Command;

#[test]
fn the_ceiling_benchmark_reports_its_baseline() {
    let output = Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"))
        .args([
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
        ])
        .output()
        .expect("run the benchmark");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
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
