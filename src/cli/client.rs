//! The terminal client: one subcommand per RPC.
//!
//! [`run`] connects and dispatches; each subcommand is one function that
//! builds the request, calls with the per-call deadline (not `watch`) and
//! prints the answer through `output`. Prints to stdout, never logs; a
//! failed call becomes an error naming the status code and message.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use prost_types::Struct;
use serde_json::json;
use tonic::Request;

use agent_lifecycle::{
    api::grpc::pb::{self, watch_events_response::Kind},
    domain::{AgentCategory, AgentState},
};

use super::{
    Command, Format,
    output::{
        self, agent_json, agent_line, agent_text, audit_line, transition_json, transition_line,
    },
};

use super::connect::Client;

/// An agent id.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// Agent id (UUID).
    pub agent_id: String,
}

/// What every change may carry.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// Why (recorded in the history).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who (recorded in the history); the server defaults to `system`.
    #[arg(long = "by", default_value = "")]
    pub triggered_by: String,
    /// Metadata entry KEY=VALUE (string value); repeatable.
    #[arg(long = "meta", value_parser = parse_pair)]
    pub meta: Vec<(String, String)>,
    /// Metadata as a JSON object (merged under --meta).
    #[arg(long = "metadata")]
    pub metadata_json: Option<String>,
    /// Apply only if the agent is at this version.
    #[arg(long)]
    pub expected_version: Option<u64>,
    /// Idempotency key: running the same command again with the same id
    /// returns the first answer without a second change.
    #[arg(long, default_value = "")]
    pub request_id: String,
}

/// `register`.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Agent id (UUID); default: the server generates one.
    #[arg(long = "id")]
    pub agent_id: Option<String>,
    /// Display name.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Label KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Print only the agent's id (for scripts).
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only agents in this state; repeatable.
    #[arg(long = "state", value_parser = parse_state)]
    pub states: Vec<AgentState>,
    /// operational, available, error or maintenance.
    #[arg(long, value_parser = parse_category)]
    pub category: Option<AgentCategory>,
    /// Only agents with label KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Agents per request.
    #[arg(long, default_value_t = 500)]
    pub page_size: u32,
}

/// `history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Agent id.
    pub agent_id: String,
    /// Only the newest N transitions.
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
}

/// `analytics`.
#[derive(Debug, Args)]
pub struct AnalyticsArgs {
    /// One agent (default: the fleet).
    #[arg(long = "agent")]
    pub agent_id: Option<String>,
    /// The window, ending now.
    #[arg(long, default_value = "24h", value_parser = agent_lifecycle::app::config::parse_duration)]
    pub window: Duration,
    /// Fleet: only agents with label KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Fleet: points of the state distribution.
    #[arg(long, default_value_t = 6)]
    pub buckets: u32,
}

/// `audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this agent's transitions.
    #[arg(long = "agent")]
    pub agent_id: Option<String>,
    /// Only the transitions this principal made.
    #[arg(long)]
    pub principal: Option<String>,
    /// At most this many, newest first.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// `transition`.
#[derive(Debug, Args)]
pub struct TransitionArgs {
    /// Agent id.
    pub agent_id: String,
    /// Target state (e.g. online).
    #[arg(value_parser = parse_state)]
    pub target: AgentState,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `deploy`, `start`, `stop`, `maintenance`, `resume`.
#[derive(Debug, Args)]
pub struct OpArgs {
    /// Agent id.
    pub agent_id: String,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `assign`, `complete`.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// Agent id.
    pub agent_id: String,
    /// Task id, recorded in the metadata.
    #[arg(long = "task", default_value = "")]
    pub task_id: String,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `error`.
#[derive(Debug, Args)]
pub struct ErrorArgs {
    /// Agent id.
    pub agent_id: String,
    /// What went wrong.
    pub message: String,
    #[command(flatten)]
    pub change: ChangeArgs,
}

/// `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this agent; repeatable.
    #[arg(long = "agent")]
    pub agent_ids: Vec<String>,
    /// Only events into this state; repeatable.
    #[arg(long = "state", value_parser = parse_state)]
    pub states: Vec<AgentState>,
    /// Only `registered` or `transitioned` events; repeatable.
    #[arg(long = "type", value_parser = parse_event_type)]
    pub types: Vec<pb::EventType>,
    /// Only agents with label KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Replay from this sequence, then follow.
    #[arg(long = "from", default_value_t = 0)]
    pub start_sequence: u64,
    /// Print the matching agents first, then follow.
    #[arg(long)]
    pub snapshot: bool,
    /// Also print progress messages.
    #[arg(long)]
    pub progress: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

/// `top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only agents with label KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Recent events shown.
    #[arg(long, default_value_t = 15)]
    pub events: usize,
    /// Time between screens.
    #[arg(long, default_value = "1s", value_parser = agent_lifecycle::app::config::parse_duration)]
    pub interval: Duration,
    /// Print this many screens (without clearing the terminal), then stop;
    /// default: until interrupted.
    #[arg(long)]
    pub iterations: Option<u64>,
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

fn metadata(change: &ChangeArgs) -> anyhow::Result<Option<Struct>> {
    let mut map = match &change.metadata_json {
        Some(text) => match serde_json::from_str::<serde_json::Value>(text)
            .context("--metadata is not JSON")?
        {
            serde_json::Value::Object(map) => map,
            _ => bail!("--metadata must be a JSON object"),
        },
        None => serde_json::Map::new(),
    };
    for (k, v) in &change.meta {
        map.insert(k.clone(), json!(v));
    }
    Ok(agent_lifecycle::api::grpc::convert::metadata_to_pb(&map))
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

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow!("{:?}: {}", status.code(), status.message())
}

async fn connect(server: &str) -> anyhow::Result<Client> {
    let channel = super::connect::endpoint(server)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {server}"))?;
    Ok(super::connect::client(channel))
}

/// A connected client, the per-call deadline and the output format.
struct Session {
    client: Client,
    format: Format,
    /// Deadline of every unary call (not of `watch`).
    timeout: Duration,
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
                &json!({
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

/// The fields of the change requests that carry nothing else (deploy,
/// start, stop, maintenance, resume).
struct PlainChange {
    agent_id: String,
    reason: String,
    triggered_by: String,
    metadata: Option<Struct>,
    expected_version: Option<u64>,
    request_id: String,
}

impl PlainChange {
    fn from_args(a: OpArgs) -> anyhow::Result<Self> {
        let metadata = metadata(&a.change)?;
        Ok(PlainChange {
            agent_id: a.agent_id,
            reason: a.change.reason,
            triggered_by: a.change.triggered_by,
            metadata,
            expected_version: a.change.expected_version,
            request_id: a.change.request_id,
        })
    }
}

/// Runs one client command.
///
/// # Errors
/// Connection failures and error statuses.
pub async fn run(
    server: &str,
    format: Format,
    timeout: Duration,
    command: Command,
) -> anyhow::Result<()> {
    let mut session = Session {
        client: connect(server).await?,
        format,
        timeout,
    };
    let s = &mut session;
    match command {
        Command::Register(a) => register(s, a).await,
        Command::Get(a) => get(s, a).await,
        Command::List(a) => list(s, a).await,
        Command::History(a) => history(s, a).await,
        Command::Audit(a) => audit(s, a).await,
        Command::Top(a) => top(s, a).await,
        Command::Analytics(a) => analytics(s, a).await,
        Command::Transition(a) => transition(s, a).await,
        Command::Deploy(a) => deploy(s, a).await,
        Command::Start(a) => start(s, a).await,
        Command::Stop(a) => stop(s, a).await,
        Command::Assign(a) => assign(s, a).await,
        Command::Complete(a) => complete(s, a).await,
        Command::Error(a) => error(s, a).await,
        Command::Maintenance(a) => maintenance(s, a).await,
        Command::Resume(a) => resume(s, a).await,
        Command::Metrics => metrics(s).await,
        Command::Rules => rules(s).await,
        Command::Watch(a) => watch(s, a).await,
        Command::Serve(_) | Command::Bench(_) | Command::Token(_) => bail!("not a client command"),
    }
}

/// `register`: RegisterAgent.
async fn register(s: &mut Session, a: RegisterArgs) -> anyhow::Result<()> {
    let metadata = metadata(&a.change)?;
    let request = s.request(pb::RegisterAgentRequest {
        agent_id: a.agent_id.unwrap_or_default(),
        name: a.name,
        labels: a.labels.into_iter().collect(),
        reason: a.change.reason,
        triggered_by: a.change.triggered_by,
        metadata,
        request_id: a.change.request_id,
    });
    let response = s
        .client
        .register_agent(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let id = response
        .agent
        .as_ref()
        .map(|agent| agent.agent_id.clone())
        .unwrap_or_default();
    if a.quiet {
        println!("{id}");
        return Ok(());
    }
    // The new agent's id first: the one thing the next command needs.
    if s.format == Format::Text {
        println!("{id}");
    }
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `get`: GetAgent.
async fn get(s: &mut Session, a: IdArgs) -> anyhow::Result<()> {
    let request = s.request(pb::GetAgentRequest {
        agent_id: a.agent_id,
    });
    let agent = s
        .client
        .get_agent(request)
        .await
        .map_err(status_error)?
        .into_inner()
        .agent
        .context("the server sent no agent")?;
    match s.format {
        Format::Json | Format::Yaml => output::emit(s.format, &agent_json(&agent)),
        Format::Text => println!("{}", agent_text(&agent)),
    }
    Ok(())
}

/// `list`: ListAgents, every page. Text prints each page as it arrives;
/// JSON prints one document at the end.
async fn list(s: &mut Session, a: ListArgs) -> anyhow::Result<()> {
    let mut token = String::new();
    let mut all = Vec::new();
    let mut printed_header = false;
    loop {
        let request = s.request(pb::ListAgentsRequest {
            states: a.states.iter().map(|s| wire_state(*s)).collect(),
            category: a.category.map_or(0, wire_category),
            labels: a.labels.iter().cloned().collect::<HashMap<_, _>>(),
            page_size: a.page_size,
            page_token: token,
        });
        let page = s
            .client
            .list_agents(request)
            .await
            .map_err(status_error)?
            .into_inner();
        if s.format == Format::Text {
            if !printed_header && !page.agents.is_empty() {
                println!("{}", output::agent_header());
                printed_header = true;
            }
            for agent in &page.agents {
                println!("{}", agent_line(agent));
            }
        } else {
            all.extend(page.agents);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if s.format != Format::Text {
        output::emit(
            s.format,
            &json!({ "agents": all.iter().map(agent_json).collect::<Vec<_>>() }),
        );
    } else if !printed_header {
        println!("no agents");
    }
    Ok(())
}

/// `history`: GetAgentHistory, every page, oldest first.
async fn history(s: &mut Session, a: HistoryArgs) -> anyhow::Result<()> {
    let mut token = String::new();
    let mut all = Vec::new();
    loop {
        let request = s.request(pb::GetAgentHistoryRequest {
            agent_id: a.agent_id.clone(),
            limit: a.limit,
            page_size: 0,
            page_token: token,
        });
        let page = s
            .client
            .get_agent_history(request)
            .await
            .map_err(status_error)?
            .into_inner();
        all.extend(page.transitions);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    match s.format {
        Format::Json | Format::Yaml => output::emit(
            s.format,
            &json!({ "transitions": all.iter().map(transition_json).collect::<Vec<_>>() }),
        ),
        Format::Text => {
            for t in &all {
                println!("{}", transition_line(t));
            }
        }
    }
    Ok(())
}

fn analytics_json(a: &pb::Analytics) -> serde_json::Value {
    let seconds: BTreeMap<_, _> = a.seconds_in_state.iter().collect();
    json!({
        "agent_id": a.agent_id,
        "seconds_in_state": seconds,
        "observed_seconds": a.observed_seconds,
        "transitions": a.transitions,
        "error_entries": a.error_entries,
        "recoveries": a.recoveries,
        "mean_time_to_recovery_seconds": a.mean_time_to_recovery_seconds,
        "availability": a.availability,
        "last_error": a.last_error.as_ref().map(transition_json),
    })
}

fn print_analytics(a: &pb::Analytics) {
    println!("availability:  {:.1}%", a.availability * 100.0);
    println!("transitions:   {}", a.transitions);
    println!("error entries: {}", a.error_entries);
    println!(
        "recoveries:    {} (mean time to recovery {:.0}s)",
        a.recoveries, a.mean_time_to_recovery_seconds
    );
    let mut seconds: Vec<_> = a.seconds_in_state.iter().collect();
    seconds.sort_by(|x, y| y.1.total_cmp(x.1));
    for (state, s) in seconds {
        let share = if a.observed_seconds > 0.0 {
            s / a.observed_seconds * 100.0
        } else {
            0.0
        };
        println!("  {state:<12} {s:>10.1}s  {share:5.1}%");
    }
    if let Some(last) = &a.last_error {
        println!("last error:    {}", transition_line(last));
    }
}

/// `analytics`: GetAgentAnalytics or GetFleetAnalytics.
async fn analytics(s: &mut Session, a: AnalyticsArgs) -> anyhow::Result<()> {
    let window = Some(prost_types::Duration {
        seconds: i64::try_from(a.window.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    });
    if let Some(agent_id) = a.agent_id {
        let request = s.request(pb::GetAgentAnalyticsRequest { agent_id, window });
        let response = s
            .client
            .get_agent_analytics(request)
            .await
            .map_err(status_error)?
            .into_inner();
        let figures = response.analytics.unwrap_or_default();
        match s.format {
            Format::Json | Format::Yaml => output::emit(s.format, &analytics_json(&figures)),
            Format::Text => print_analytics(&figures),
        }
        return Ok(());
    }
    let request = s.request(pb::GetFleetAnalyticsRequest {
        window,
        labels: a.labels.into_iter().collect(),
        buckets: a.buckets,
        top: 5,
    });
    let fleet = s
        .client
        .get_fleet_analytics(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let total = fleet.total.unwrap_or_default();
    match s.format {
        Format::Json | Format::Yaml => output::emit(
            s.format,
            &json!({
                "agents": fleet.agents,
                "total": analytics_json(&total),
                "top_by_errors": fleet.top_by_errors.iter().map(analytics_json).collect::<Vec<_>>(),
                "top_by_transitions": fleet.top_by_transitions.iter().map(analytics_json).collect::<Vec<_>>(),
                "distribution": fleet.distribution.iter().map(|d| json!({
                    "at": output::time_text(d.at.as_ref()),
                    "agents": d.agents.iter().collect::<BTreeMap<_, _>>(),
                })).collect::<Vec<_>>(),
            }),
        ),
        Format::Text => {
            println!("agents:        {}", fleet.agents);
            print_analytics(&total);
            for (title, list) in [
                ("most errors", &fleet.top_by_errors),
                ("most transitions", &fleet.top_by_transitions),
            ] {
                if !list.is_empty() {
                    println!("{title}:");
                    for agent in list {
                        println!(
                            "  {}  {} errors, {} transitions",
                            agent.agent_id, agent.error_entries, agent.transitions
                        );
                    }
                }
            }
            for point in &fleet.distribution {
                let counts: BTreeMap<_, _> = point.agents.iter().collect();
                let text: Vec<String> = counts.iter().map(|(s, n)| format!("{s}={n}")).collect();
                println!(
                    "  {}  {}",
                    output::time_text(point.at.as_ref()),
                    text.join(" ")
                );
            }
        }
    }
    Ok(())
}

/// `audit`: ListTransitions, newest first, page after page up to the
/// limit.
async fn audit(s: &mut Session, a: AuditArgs) -> anyhow::Result<()> {
    let mut token = String::new();
    let mut all = Vec::new();
    while all.len() < a.limit {
        let request = s.request(pb::ListTransitionsRequest {
            agent_id: a.agent_id.clone().unwrap_or_default(),
            principal: a.principal.clone(),
            page_size: u32::try_from(a.limit - all.len()).unwrap_or(u32::MAX),
            page_token: token,
        });
        let page = s
            .client
            .list_transitions(request)
            .await
            .map_err(status_error)?
            .into_inner();
        all.extend(page.transitions);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    all.truncate(a.limit);
    match s.format {
        Format::Json | Format::Yaml => output::emit(
            s.format,
            &json!({ "transitions": all.iter().map(transition_json).collect::<Vec<_>>() }),
        ),
        Format::Text => {
            for t in &all {
                println!("{}", audit_line(t));
            }
        }
    }
    Ok(())
}

/// `transition`: TransitionAgent.
async fn transition(s: &mut Session, a: TransitionArgs) -> anyhow::Result<()> {
    let metadata = metadata(&a.change)?;
    let request = s.request(pb::TransitionAgentRequest {
        agent_id: a.agent_id,
        target_state: wire_state(a.target),
        reason: a.change.reason,
        triggered_by: a.change.triggered_by,
        metadata,
        expected_version: a.change.expected_version,
        request_id: a.change.request_id,
    });
    let response = s
        .client
        .transition_agent(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `deploy`: DeployAgent.
async fn deploy(s: &mut Session, a: OpArgs) -> anyhow::Result<()> {
    let c = PlainChange::from_args(a)?;
    let request = s.request(pb::DeployAgentRequest {
        agent_id: c.agent_id,
        reason: c.reason,
        triggered_by: c.triggered_by,
        metadata: c.metadata,
        expected_version: c.expected_version,
        request_id: c.request_id,
    });
    let response = s
        .client
        .deploy_agent(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub op: OpArgs,
    /// Stay in STARTING until the agent's first heartbeat (`true`), or go
    /// on to ONLINE at once (`false`); unset: as the server's health
    /// settings say.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub wait_for_heartbeat: Option<bool>,
}

/// `start`: StartAgent.
async fn start(s: &mut Session, a: StartArgs) -> anyhow::Result<()> {
    let wait_for_heartbeat = a.wait_for_heartbeat;
    let c = PlainChange::from_args(a.op)?;
    let request = s.request(pb::StartAgentRequest {
        agent_id: c.agent_id,
        reason: c.reason,
        triggered_by: c.triggered_by,
        metadata: c.metadata,
        expected_version: c.expected_version,
        request_id: c.request_id,
        wait_for_heartbeat,
    });
    let response = s
        .client
        .start_agent(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `stop`: StopAgent.
async fn stop(s: &mut Session, a: OpArgs) -> anyhow::Result<()> {
    let c = PlainChange::from_args(a)?;
    let request = s.request(pb::StopAgentRequest {
        agent_id: c.agent_id,
        reason: c.reason,
        triggered_by: c.triggered_by,
        metadata: c.metadata,
        expected_version: c.expected_version,
        request_id: c.request_id,
    });
    let response = s
        .client
        .stop_agent(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `assign`: AssignTask.
async fn assign(s: &mut Session, a: TaskArgs) -> anyhow::Result<()> {
    let metadata = metadata(&a.change)?;
    let request = s.request(pb::AssignTaskRequest {
        agent_id: a.agent_id,
        task_id: a.task_id,
        reason: a.change.reason,
        triggered_by: a.change.triggered_by,
        metadata,
        expected_version: a.change.expected_version,
        request_id: a.change.request_id,
    });
    let response = s
        .client
        .assign_task(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `complete`: CompleteTask.
async fn complete(s: &mut Session, a: TaskArgs) -> anyhow::Result<()> {
    let metadata = metadata(&a.change)?;
    let request = s.request(pb::CompleteTaskRequest {
        agent_id: a.agent_id,
        task_id: a.task_id,
        reason: a.change.reason,
        triggered_by: a.change.triggered_by,
        metadata,
        expected_version: a.change.expected_version,
        request_id: a.change.request_id,
    });
    let response = s
        .client
        .complete_task(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `error`: HandleError (the message is the reason; `--reason` is unused).
async fn error(s: &mut Session, a: ErrorArgs) -> anyhow::Result<()> {
    let metadata = metadata(&a.change)?;
    let request = s.request(pb::HandleErrorRequest {
        agent_id: a.agent_id,
        error_message: a.message,
        triggered_by: a.change.triggered_by,
        metadata,
        expected_version: a.change.expected_version,
        request_id: a.change.request_id,
    });
    let response = s
        .client
        .handle_error(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `maintenance`: PutInMaintenance.
async fn maintenance(s: &mut Session, a: OpArgs) -> anyhow::Result<()> {
    let c = PlainChange::from_args(a)?;
    let request = s.request(pb::PutInMaintenanceRequest {
        agent_id: c.agent_id,
        reason: c.reason,
        triggered_by: c.triggered_by,
        metadata: c.metadata,
        expected_version: c.expected_version,
        request_id: c.request_id,
    });
    let response = s
        .client
        .put_in_maintenance(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `resume`: ResumeFromMaintenance.
async fn resume(s: &mut Session, a: OpArgs) -> anyhow::Result<()> {
    let c = PlainChange::from_args(a)?;
    let request = s.request(pb::ResumeFromMaintenanceRequest {
        agent_id: c.agent_id,
        reason: c.reason,
        triggered_by: c.triggered_by,
        metadata: c.metadata,
        expected_version: c.expected_version,
        request_id: c.request_id,
    });
    let response = s
        .client
        .resume_from_maintenance(request)
        .await
        .map_err(status_error)?
        .into_inner();
    s.print_change(response.agent, response.transitions);
    Ok(())
}

/// `metrics`: GetLifecycleMetrics.
async fn metrics(s: &mut Session) -> anyhow::Result<()> {
    let request = s.request(pb::GetLifecycleMetricsRequest {});
    let m = s
        .client
        .get_lifecycle_metrics(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let distribution: BTreeMap<_, _> = m.state_distribution.iter().collect();
    match s.format {
        Format::Json | Format::Yaml => output::emit(
            s.format,
            &json!({
                "total_agents": m.total_agents,
                "operational_agents": m.operational_agents,
                "available_agents": m.available_agents,
                "error_agents": m.error_agents,
                "maintenance_agents": m.maintenance_agents,
                "state_distribution": distribution,
                "head_sequence": m.head_sequence,
            }),
        ),
        Format::Text => {
            println!("total:       {}", m.total_agents);
            println!("operational: {}", m.operational_agents);
            println!("available:   {}", m.available_agents);
            println!("error:       {}", m.error_agents);
            println!("maintenance: {}", m.maintenance_agents);
            println!("head:        {}", m.head_sequence);
            for (state, count) in distribution {
                println!("  {state:<12} {count}");
            }
        }
    }
    Ok(())
}

/// `rules`: GetTransitionRules.
async fn rules(s: &mut Session) -> anyhow::Result<()> {
    let request = s.request(pb::GetTransitionRulesRequest {});
    let rules = s
        .client
        .get_transition_rules(request)
        .await
        .map_err(status_error)?
        .into_inner()
        .rules;
    match s.format {
        Format::Json | Format::Yaml => {
            let map: serde_json::Map<String, serde_json::Value> = rules
                .iter()
                .map(|r| {
                    (
                        output::state_name(r.from_state),
                        json!(
                            r.allowed_targets
                                .iter()
                                .map(|s| output::state_name(*s))
                                .collect::<Vec<_>>()
                        ),
                    )
                })
                .collect();
            output::emit(s.format, &serde_json::Value::Object(map));
        }
        Format::Text => {
            for r in &rules {
                let targets: Vec<_> = r
                    .allowed_targets
                    .iter()
                    .map(|s| output::state_name(*s))
                    .collect();
                println!(
                    "{:<12} -> {}",
                    output::state_name(r.from_state),
                    targets.join(", ")
                );
            }
        }
    }
    Ok(())
}

/// `watch`: WatchEvents, one line per message, until the stream ends or
/// `--count` events were printed. No deadline.
async fn watch(s: &mut Session, a: WatchArgs) -> anyhow::Result<()> {
    let request = pb::WatchEventsRequest {
        agent_ids: a.agent_ids,
        states: a.states.iter().map(|s| wire_state(*s)).collect(),
        event_types: a.types.iter().map(|t| *t as i32).collect(),
        labels: a.labels.into_iter().collect(),
        start_sequence: a.start_sequence,
        include_snapshot: a.snapshot,
    };
    let mut stream = s
        .client
        .watch_events(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut seen = 0u64;
    while let Some(message) = stream.message().await.map_err(status_error)? {
        let Some(kind) = message.kind else { continue };
        if print_watch_message(s.format, kind, a.progress) {
            seen += 1;
        }
        if a.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}

/// `top`: a live view of the fleet, from a WatchEvents snapshot and the
/// events after it: agents per state and the most recent events, redrawn
/// every `interval`.
async fn top(s: &mut Session, a: TopArgs) -> anyhow::Result<()> {
    let request = pb::WatchEventsRequest {
        labels: a.labels.into_iter().collect(),
        include_snapshot: true,
        ..Default::default()
    };
    let mut stream = s
        .client
        .watch_events(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut states: HashMap<String, i32> = HashMap::new();
    let mut recent: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut head = 0u64;
    let mut ready = false;
    let mut screens = 0u64;
    let mut ticks = tokio::time::interval(a.interval.max(Duration::from_millis(100)));
    let interactive =
        a.iterations.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        tokio::select! {
            message = stream.message() => {
                let Some(message) = message.map_err(status_error)? else {
                    return Ok(());
                };
                match message.kind {
                    Some(Kind::SnapshotAgent(agent)) => {
                        states.insert(agent.agent_id.clone(), agent.state);
                    }
                    Some(Kind::SnapshotComplete(c)) => {
                        head = c.head_sequence;
                        ready = true;
                    }
                    Some(Kind::Event(e)) => {
                        head = e.sequence;
                        if let Some(agent) = &e.agent {
                            states.insert(agent.agent_id.clone(), agent.state);
                        }
                        if let Some(t) = &e.transition {
                            recent.push_front(format!("{}  {}", e.agent_id, transition_line(t)));
                            recent.truncate(a.events);
                        }
                    }
                    Some(Kind::Progress(p)) => head = head.max(p.head_sequence),
                    None => {}
                }
            }
            _ = ticks.tick(), if ready => {
                let mut counts: BTreeMap<String, u64> = BTreeMap::new();
                for state in states.values() {
                    *counts.entry(output::state_name(*state)).or_default() += 1;
                }
                match s.format {
                    Format::Text => {
                        if interactive {
                            // Clear the screen and go home.
                            print!("\x1b[2J\x1b[H");
                        }
                        println!("agents: {}   head: #{head}", states.len());
                        for (state, n) in &counts {
                            println!("  {state:<12} {n}");
                        }
                        println!("recent events:");
                        for line in &recent {
                            println!("  {line}");
                        }
                    }
                    Format::Json | Format::Yaml => output::emit(
                        s.format,
                        &json!({
                            "agents": states.len(),
                            "head_sequence": head,
                            "states": counts,
                            "recent_events": recent.iter().collect::<Vec<_>>(),
                        }),
                    ),
                }
                screens += 1;
                if a.iterations.is_some_and(|n| screens >= n) {
                    return Ok(());
                }
            }
        }
    }
}

/// Prints one WatchEvents message (progress only when `progress`); true
/// for an event, which is what `--count` counts.
fn print_watch_message(format: Format, kind: Kind, progress: bool) -> bool {
    match (kind, format) {
        (Kind::Event(e), Format::Json | Format::Yaml) => {
            output::emit(
                format,
                &json!({
                    "type": "event",
                    "sequence": e.sequence,
                    "agent_id": e.agent_id,
                    "event_type": output::event_type_name(e.r#type),
                    "transition": e.transition.as_ref().map(transition_json),
                    "agent": e.agent.as_ref().map(agent_json),
                }),
            );
            true
        }
        (Kind::Event(e), Format::Text) => {
            let line = e
                .transition
                .as_ref()
                .map(transition_line)
                .unwrap_or_default();
            println!("{}  {}", e.agent_id, line);
            true
        }
        (Kind::Progress(p), Format::Json | Format::Yaml) if progress => {
            output::emit(
                format,
                &json!({"type": "progress", "head_sequence": p.head_sequence}),
            );
            false
        }
        (Kind::Progress(p), Format::Text) if progress => {
            println!("progress head={}", p.head_sequence);
            false
        }
        (Kind::Progress(_), _) => false,
        (Kind::SnapshotAgent(agent), Format::Json | Format::Yaml) => {
            output::emit(
                format,
                &json!({"type": "snapshot_agent", "agent": agent_json(&agent)}),
            );
            false
        }
        (Kind::SnapshotAgent(agent), Format::Text) => {
            println!("snapshot {}", agent_line(&agent));
            false
        }
        (Kind::SnapshotComplete(c), Format::Json | Format::Yaml) => {
            output::emit(
                format,
                &json!({"type": "snapshot_complete", "head_sequence": c.head_sequence, "agent_count": c.agent_count}),
            );
            false
        }
        (Kind::SnapshotComplete(c), Format::Text) => {
            println!(
                "snapshot complete: {} agents at sequence {}",
                c.agent_count, c.head_sequence
            );
            false
        }
    }
}
