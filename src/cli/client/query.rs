//! The read commands: `get`, `list`, `history`, `audit`, `analytics`,
//! `metrics` and `rules`, with their flags. Each pages through its RPC with
//! the per-call deadline and prints text, JSON or YAML; none changes
//! anything.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use agent_lifecycle::{
    api::grpc::pb,
    domain::{AgentCategory, AgentState},
};

use super::{
    Format, Session, agent_json, agent_line, output, parse_category, parse_pair, parse_state,
    status_error, transition_json, transition_line, wire_category, wire_state,
};
use crate::cli::output::{agent_text, audit_line};

/// What every change may carry.
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
    /// The agents as they were at a point of the event log (see `get
    /// --as-of`).
    #[arg(long, value_parser = parse_as_of)]
    pub as_of: Option<pb::AsOf>,
}

/// `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Agent id (UUID).
    pub agent_id: String,
    /// The agent as it was at a point of the event log: a sequence
    /// (`1042`), an RFC 3339 UTC time (`2026-12-06T03:12:00Z`) or a time
    /// ago (`15m ago`, `-2h`).
    #[arg(long, value_parser = parse_as_of)]
    pub as_of: Option<pb::AsOf>,
}

/// `metrics`.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// The counts as they were at a point of the event log (see `get
    /// --as-of`).
    #[arg(long, value_parser = parse_as_of)]
    pub as_of: Option<pb::AsOf>,
}

/// A point of the event log: a sequence, an RFC 3339 UTC time, or a time
/// ago (`15m ago`, `-15m`).
pub fn parse_as_of(text: &str) -> Result<pb::AsOf, String> {
    use pb::as_of::Point;
    let text = text.trim();
    if let Ok(sequence) = text.parse::<u64>() {
        return Ok(pb::AsOf {
            point: Some(Point::Sequence(sequence)),
        });
    }
    let ago = text
        .strip_suffix("ago")
        .map(str::trim)
        .or_else(|| text.strip_prefix('-'));
    let at = match ago {
        Some(duration) => {
            let duration = agent_lifecycle::app::config::parse_duration(duration)?;
            std::time::SystemTime::now()
                .checked_sub(duration)
                .ok_or_else(|| format!("{text:?} is before 1970"))?
        }
        None => agent_lifecycle::domain::parse_rfc3339(text).ok_or_else(|| {
            format!(
                "{text:?} is not a sequence, an RFC 3339 UTC time (2026-12-06T03:12:00Z) or a time ago (15m ago)"
            )
        })?,
    };
    Ok(pb::AsOf {
        point: Some(Point::Time(prost_types::Timestamp::from(at))),
    })
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

/// `get`: GetAgent.
pub(super) async fn get(s: &mut Session, a: GetArgs) -> anyhow::Result<()> {
    let request = s.request(pb::GetAgentRequest {
        agent_id: a.agent_id,
        as_of: a.as_of,
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
pub(super) async fn list(s: &mut Session, a: ListArgs) -> anyhow::Result<()> {
    let mut token = String::new();
    let mut all = Vec::new();
    let mut printed_header = false;
    let mut as_of = a.as_of;
    loop {
        let request = s.request(pb::ListAgentsRequest {
            states: a.states.iter().map(|s| wire_state(*s)).collect(),
            category: a.category.map_or(0, wire_category),
            labels: a.labels.iter().cloned().collect::<HashMap<_, _>>(),
            page_size: a.page_size,
            page_token: token,
            as_of,
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
        // Every page at the point the first one resolved.
        if as_of.is_some() {
            as_of = Some(pb::AsOf {
                point: Some(pb::as_of::Point::Sequence(page.as_of_sequence)),
            });
        }
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
pub(super) async fn history(s: &mut Session, a: HistoryArgs) -> anyhow::Result<()> {
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
    print_transitions(s.format, &all, transition_line);
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
pub(super) async fn analytics(s: &mut Session, a: AnalyticsArgs) -> anyhow::Result<()> {
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
    print_fleet(s.format, fleet);
    Ok(())
}

/// The fleet's analytics: its totals, the agents with the most errors and
/// transitions, and the state distribution over the window.
fn print_fleet(format: Format, fleet: pb::GetFleetAnalyticsResponse) {
    let total = fleet.total.unwrap_or_default();
    match format {
        Format::Json | Format::Yaml => output::emit(
            format,
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
}

/// `audit`: ListTransitions, newest first, page after page up to the
/// limit.
pub(super) async fn audit(s: &mut Session, a: AuditArgs) -> anyhow::Result<()> {
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
    print_transitions(s.format, &all, audit_line);
    Ok(())
}

/// `metrics`: GetLifecycleMetrics.
pub(super) async fn metrics(s: &mut Session, a: MetricsArgs) -> anyhow::Result<()> {
    let request = s.request(pb::GetLifecycleMetricsRequest { as_of: a.as_of });
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
pub(super) async fn rules(s: &mut Session) -> anyhow::Result<()> {
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

/// Transitions as one document (`{"transitions": [...]}`) for machines, or
/// one `line` each for people.
fn print_transitions(
    format: Format,
    all: &[pb::StateTransition],
    line: fn(&pb::StateTransition) -> String,
) {
    match format {
        Format::Json | Format::Yaml => output::emit(
            format,
            &json!({ "transitions": all.iter().map(transition_json).collect::<Vec<_>>() }),
        ),
        Format::Text => {
            for t in all {
                println!("{}", line(t));
            }
        }
    }
}
