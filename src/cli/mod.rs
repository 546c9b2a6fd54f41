//! Command-line interface: `serve`, the terminal client and `bench`.
//!
//! Client commands print results to stdout (text for people, `-o json` for
//! machines: one JSON document, or one line per event for `watch`); errors
//! print the server's status message and exit non-zero.

mod bench;
mod client;
mod connect;
mod output;
#[allow(dead_code)] // the test suite shares this file and uses all of it
mod process;
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
    /// How to reach the server (TLS, token).
    #[command(flatten)]
    pub connect: connect::ConnectArgs,
    /// Per-call deadline of client commands (default 10s; not `watch`).
    /// For `wait` and `apply --wait`: how long to wait in all (default
    /// 30s; 0: look once, do not wait).
    #[arg(long, global = true, value_parser = agent_lifecycle::app::config::parse_duration)]
    pub timeout: Option<Duration>,
    #[command(subcommand)]
    pub command: Command,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text for people (tables where there are rows).
    #[value(name = "table", alias = "text")]
    Text,
    /// JSON for machines (one document; one line per event for `watch`).
    Json,
    /// YAML (one document; one per event for `watch`).
    Yaml,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<agent_lifecycle::app::config::Config>),
    /// Register an agent (idempotent while it is REGISTERED).
    Register(client::RegisterArgs),
    /// Show one agent.
    Get(client::GetArgs),
    /// List agents.
    List(client::ListArgs),
    /// Show an agent's transitions, oldest first.
    History(client::HistoryArgs),
    /// State analytics over a window: of one agent (--agent) or the fleet.
    Analytics(client::AnalyticsArgs),
    /// The audit trail: who moved which agent, newest first (by agent
    /// and/or principal).
    Audit(client::AuditArgs),
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
    Metrics(client::MetricsArgs),
    /// The active transition policy.
    Rules,
    /// A live view of the fleet: agents per state and recent events.
    Top(client::TopArgs),
    /// Stream events, one line each, as they happen.
    Watch(client::WatchArgs),
    /// Wait until agents reach a state (`--for state=online`) or category
    /// (`--for category=operational`).
    #[command(after_help = client::WAIT_AFTER_HELP)]
    Wait(client::WaitArgs),
    /// Show what `apply -f FILE` would change to make the fleet match the
    /// file.
    #[command(after_help = client::DIFF_AFTER_HELP)]
    Diff(client::DiffArgs),
    /// Register, deploy, start and stop agents until the fleet matches
    /// the file (idempotent).
    #[command(after_help = client::APPLY_AFTER_HELP)]
    Apply(client::ApplyArgs),
    /// Measure a running server (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
    /// Bearer tokens for `[auth]` principals.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// A failure with an exit code of its own: the pipeline commands (`wait`,
/// `diff`, `apply`) exit with these so that a script can tell a timeout
/// from an agent that failed (see docs/cli.md). Every other failure exits
/// 1.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The process's exit code, one of [`exit`]'s.
    pub code: u8,
    /// Printed to stderr as `error: MESSAGE`; nothing when empty.
    pub message: String,
}

/// The exit codes of `wait`, `diff` and `apply`.
pub mod exit {
    /// `diff`: the fleet differs from the file; `apply`: a conflict or a
    /// refused change (nothing more could be applied).
    pub const CHANGES: u8 = 1;
    /// The command could not run: a bad flag, `--for` or fleet file, an
    /// unknown agent, a server that cannot be reached or refuses the call.
    pub const USAGE: u8 = 2;
    /// An agent is in, or entered, an error state (error, failed,
    /// timeout) that was not what it was waited for.
    pub const AGENT_FAILED: u8 = 3;
    /// The wait's `--timeout` passed first.
    pub const TIMED_OUT: u8 = 4;
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a new random token; print it (once: the server keeps only its
    /// hash) and the configuration lines of its principal.
    Create(TokenArgs),
}

/// `token create`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    /// The principal's name, recorded with its transitions.
    #[arg(long)]
    pub name: String,
    /// admin, operator, agent or viewer.
    #[arg(long)]
    pub role: agent_lifecycle::domain::Role,
    /// For the agent role: an agent it acts for (repeatable).
    #[arg(long = "agent")]
    pub agents: Vec<String>,
}

/// `token create`: the token on the first line, then the principal's
/// configuration (or one JSON document with `-o json`).
fn create_token(args: TokenArgs, format: Format) -> anyhow::Result<()> {
    use agent_lifecycle::{api::auth, app::config::AuthSection, app::config::PrincipalSection};
    let token = auth::new_token().map_err(|e| anyhow::anyhow!(e))?;
    let hash = auth::hex(&auth::sha256(&token));
    let section = AuthSection {
        principal: vec![PrincipalSection {
            name: args.name.clone(),
            role: args.role.to_string(),
            token_sha256: Some(hash.clone()),
            cert_subject: None,
            agents: args.agents.clone(),
        }],
    };
    // The same checks as the server's at start-up.
    section.principals().map_err(|e| anyhow::anyhow!(e))?;
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let mut config = format!(
        "[[auth.principal]]\nname = {}\nrole = {}\ntoken_sha256 = {}\n",
        quote(&args.name),
        quote(args.role.as_str()),
        quote(&hash)
    );
    if !args.agents.is_empty() {
        let list: Vec<String> = args.agents.iter().map(|a| quote(a)).collect();
        config.push_str(&format!("agents = [{}]\n", list.join(", ")));
    }
    match format {
        Format::Json | Format::Yaml => output::emit(
            format,
            &serde_json::json!({
                "name": args.name,
                "role": args.role.as_str(),
                "token": token,
                "token_sha256": hash,
                "config": config,
            }),
        ),
        Format::Text => {
            println!("{token}");
            println!(
                "# Give the token above to {:?}; it is not shown again.",
                args.name
            );
            println!("# Add this to the server's configuration file:");
            print!("{config}");
        }
    }
    Ok(())
}

/// Runs the command.
///
/// # Errors
/// Whatever the command reports; the binary prints it and exits 1.
pub async fn run(args: Args) -> anyhow::Result<()> {
    connect::install(&args.connect)?;
    match args.command {
        Command::Serve(serve) => serve::run(*serve).await,
        Command::Bench(bench) => bench::run(&args.server, bench).await,
        Command::Token(TokenCommand::Create(token)) => create_token(token, args.output),
        command => client::run(&args.server, args.output, args.timeout, command).await,
    }
}
