//! The terminal client: one subcommand per RPC.
//!
//! [`run`] connects and dispatches. The change commands (`transition`,
//! `deploy`, `start`, ...) share one path in `mutate`: a request built
//! from the flags every change takes plus the command's own, one RPC, and
//! the transitions it made printed. The reads are in `query`, the streams
//! (`watch`, `top`) in `watch`, the pipeline commands in `wait` and
//! `fleet` (`diff`, `apply`). Every unary call has the per-call deadline.
//! Prints to stdout, never logs; a failed call becomes an error naming the
//! status code and message. Depends on the wire types (`pb`) and the
//! library's conversions, never on the service itself.

mod fleet;
mod mutate;
mod query;
mod wait;
mod watch;

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tonic::Request;

use agent_lifecycle::{
    api::grpc::pb,
    domain::{AgentCategory, AgentState},
};

pub use self::{
    fleet::{APPLY_AFTER_HELP, ApplyArgs, DIFF_AFTER_HELP, DiffArgs},
    mutate::{ErrorArgs, OpArgs, RegisterArgs, StartArgs, TaskArgs, TransitionArgs},
    query::{AnalyticsArgs, AuditArgs, GetArgs, HistoryArgs, ListArgs, MetricsArgs},
    wait::{WAIT_AFTER_HELP, WaitArgs},
    watch::{TopArgs, WatchArgs},
};
use super::{
    Command, Exit, Format,
    connect::Client,
    exit,
    output::{self, agent_json, agent_line, transition_json, transition_line},
};

/// Deadline of each unary call when `--timeout` does not say.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `wait` and `apply --wait` wait when `--timeout` does not say
/// (`kubectl wait`'s default).
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected client, the per-call deadline and the output format.
struct Session {
    client: Client,
    format: Format,
    /// Deadline of every unary call (not of `watch`).
    timeout: Duration,
    /// The whole wait of `wait` and `apply --wait`.
    wait_limit: Duration,
}

impl Session {
    /// `message` with the per-call deadline.
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    /// Prints what a change did: its transitions and the agent it left.
    fn print_change(&self, agent: Option<pb::Agent>, transitions: Vec<pb::StateTransition>) {
        match self.format {
            Format::Json | Format::Yaml => output::emit(
                self.format,
                &serde_json::json!({
                    "agent": agent.as_ref().map(agent_json),
                    "transitions": transitions.iter().map(transition_json).collect::<Vec<_>>(),
                }),
            ),
            Format::Text => {
                for t in &transitions {
                    println!("{}", transition_line(t));
                }
                if transitions.is_empty() {
                    println!("no change");
                }
                if let Some(agent) = &agent {
                    println!("{}", agent_line(agent));
                }
            }
        }
    }
}

/// Runs one client command.
///
/// # Errors
/// Connection failures and error statuses.
pub async fn run(
    server: &str,
    format: Format,
    timeout: Option<Duration>,
    command: Command,
) -> anyhow::Result<()> {
    let pipeline = matches!(
        command,
        Command::Wait(_) | Command::Diff(_) | Command::Apply(_)
    );
    // In `wait` and `apply`, `--timeout` is the wait's, not each call's.
    let waits = matches!(command, Command::Wait(_) | Command::Apply(_));
    let session = connect(server).await.map(|client| Session {
        client,
        format,
        timeout: match timeout {
            Some(timeout) if !waits => timeout,
            _ => DEFAULT_CALL_TIMEOUT,
        },
        wait_limit: timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT),
    });
    let result = match session {
        Ok(mut session) => dispatch(&mut session, command).await,
        Err(err) => Err(err),
    };
    // A pipeline command's failures without a code of their own mean it
    // could not run: a bad file, an unreachable server, a refused call.
    result.map_err(|err| match err.downcast::<Exit>() {
        Ok(exit) => exit.into(),
        Err(err) if pipeline => Exit {
            code: exit::USAGE,
            message: format!("{err:#}"),
        }
        .into(),
        Err(err) => err,
    })
}

/// Runs `command` on a connected session.
async fn dispatch(s: &mut Session, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Register(a) => mutate::register(s, a).await,
        Command::Get(a) => query::get(s, a).await,
        Command::List(a) => query::list(s, a).await,
        Command::History(a) => query::history(s, a).await,
        Command::Audit(a) => query::audit(s, a).await,
        Command::Analytics(a) => query::analytics(s, a).await,
        Command::Metrics(a) => query::metrics(s, a).await,
        Command::Rules => query::rules(s).await,
        Command::Top(a) => watch::top(s, a).await,
        Command::Watch(a) => watch::watch(s, a).await,
        Command::Wait(a) => wait::wait(s, a).await,
        Command::Diff(a) => fleet::diff(s, a).await,
        Command::Apply(a) => fleet::apply(s, a).await,
        change @ (Command::Transition(_)
        | Command::Deploy(_)
        | Command::Start(_)
        | Command::Stop(_)
        | Command::Assign(_)
        | Command::Complete(_)
        | Command::Error(_)
        | Command::Maintenance(_)
        | Command::Resume(_)) => mutate::change(s, change).await,
        Command::Serve(_) | Command::Bench(_) | Command::Token(_) => bail!("not a client command"),
    }
}

async fn connect(server: &str) -> anyhow::Result<Client> {
    let channel = super::connect::endpoint(server)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {server}"))?;
    Ok(super::connect::client(channel))
}

/// A failed call as the error the binary prints: the code, then the
/// server's message.
fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", status.code(), status.message())
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn parse_state(text: &str) -> Result<AgentState, String> {
    text.parse::<AgentState>().map_err(|e| e.to_string())
}

fn parse_category(text: &str) -> Result<AgentCategory, String> {
    text.parse::<AgentCategory>()
}

fn parse_event_type(text: &str) -> Result<pb::EventType, String> {
    match text.to_ascii_lowercase().as_str() {
        "registered" => Ok(pb::EventType::Registered),
        "transitioned" => Ok(pb::EventType::Transitioned),
        _ => Err(format!(
            "unknown event type {text:?} (registered, transitioned)"
        )),
    }
}

fn wire_state(state: AgentState) -> i32 {
    agent_lifecycle::api::grpc::convert::state_to_pb(state) as i32
}

fn wire_category(category: AgentCategory) -> i32 {
    let category = match category {
        AgentCategory::Operational => pb::AgentCategory::Operational,
        AgentCategory::Available => pb::AgentCategory::Available,
        AgentCategory::Error => pb::AgentCategory::Error,
        AgentCategory::Maintenance => pb::AgentCategory::Maintenance,
    };
    category as i32
}
