//! Placeholder replaced by the benchmark tool.
use clap::Args;

/// Benchmark arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {}

/// Runs a benchmark.
pub async fn run(_server: &str, _args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
