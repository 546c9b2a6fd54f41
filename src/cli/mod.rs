//! Command-line interface: `serve`, the terminal client and `bench`.
//!
//! Client commands print results to stdout (text for people, `-o json` for
//! machines: one JSON document, or one line per event for `watch`); errors
//! print the server's status message and exit non-zero.

mod bench;
mod client;
mod output;
mod serve;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "agent-lifecycle",
    version,
    about = "Lifecycle control plane for AI agents"
)]
pub struct Args {
    /// Server address for client commands. `bench transition` and `bench get`
    /// also take several, comma-separated (processes sharing one PostgreSQL
    /// database): connection i goes to server i mod n.
    #[arg(
        long,
        global = true,
        env = "AGENT_LIFECYCLE_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// Output format of client commands.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Per-call deadline of client commands (not `watch`).
    #[arg(long, global = true, default_value = "10s", value_parser = agent_lifecycle::config::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text for people.
    Text,
    /// JSON for machines.
    Json,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(serve::ServeArgs),
    /// Register an agent (idempotent while it is REGISTERED).
    Register(client::RegisterArgs),
    /// Show one agent.
    Get(client::IdArgs),
    /// List agents.
    List(client::ListArgs),
    /// Show an agent's transitions, oldest first.
    History(client::HistoryArgs),
    /// Move an agent to a state.
    Transition(client::TransitionArgs),
    /// DEPLOYING then DEPLOYED.
    Deploy(client::OpArgs),
    /// STARTING then ONLINE (or STARTING until the first heartbeat).
    Start(client::StartArgs),
    /// STOPPING then OFFLINE.
    Stop(client::OpArgs),
    /// ONLINE or IDLE -> BUSY.
    Assign(client::TaskArgs),
    /// BUSY -> IDLE.
    Complete(client::TaskArgs),
    /// -> ERROR with a message.
    Error(client::ErrorArgs),
    /// -> MAINTENANCE.
    Maintenance(client::OpArgs),
    /// MAINTENANCE -> ONLINE.
    Resume(client::OpArgs),
    /// Fleet-wide counts.
    Metrics,
    /// The active transition policy.
    Rules,
    /// Stream events, one line each, as they happen.
    Watch(client::WatchArgs),
    /// Measure a running server (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
}

/// Runs the command.
///
/// # Errors
/// Whatever the command reports; the binary prints it and exits 1.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Serve(serve) => serve::run(serve).await,
        Command::Bench(bench) => bench::run(&args.server, bench).await,
        command => client::run(&args.server, args.output, args.timeout, command).await,
    }
}
