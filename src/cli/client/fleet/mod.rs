//! `diff` and `apply`: a declarative fleet file (`file`) against the
//! agents the server has.
//!
//! Both read the file, read each of its agents from the server (GetAgent),
//! and make the plan (`plan`, a pure function). `diff` prints it and exits
//! 1 when anything would change; `apply` carries it out step by step
//! (`apply`) and, with `--wait`, waits for every agent to get where the
//! file wants it (the `wait` command's [`super::wait::wait_for`]). Agents
//! the server has that the file does not name are left alone.

mod apply;
mod file;
mod plan;

use std::collections::HashMap;

use clap::Args;
use serde_json::{Value, json};
use tonic::Code;

use agent_lifecycle::{
    api::grpc::{convert::state_from_pb, pb},
    domain::AgentState,
};

use self::plan::{AgentPlan, Observed, Verdict};
use super::{Exit, Format, Session, exit, output, status_error};

pub use self::apply::apply;

/// `diff --help`, after the flags.
pub const DIFF_AFTER_HELP: &str = "\
The file (TOML; see docs/cli.md):
  fleet = \"prod\"                    # optional: part of every derived agent id
  [[agent]]
  name = \"summarizer\"               # the agent's id is derived from it
  state = \"online\"                  # online | offline | deployed | registered
  labels = { team = \"ml\", \"docker.container\" = \"summarizer-1\" }

Exit codes:
  0  the fleet is as the file says (nothing to apply)
  1  apply would change something, or cannot (a conflict)
  2  a bad file or flag, or the server cannot be reached";

/// `apply --help`, after the flags.
pub const APPLY_AFTER_HELP: &str = "\
Registers, deploys, starts and stops the file's agents until each is where
the file wants it; agents the file does not name are left alone. Every step
carries a request id derived from the agent, the step and the agent's
version, so a retry or a rerun never makes a change twice, and a rerun of a
converged fleet changes nothing.

Exit codes:
  0  applied (with --wait: every agent got there)
  1  a conflict (nothing applied) or a refused step
  2  a bad file or flag, or the server cannot be reached
  3  --wait: an agent went to an error state (error, failed, timeout)
  4  --wait: --timeout (default 30s) passed first";

/// `diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The fleet file (TOML); `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: String,
}

/// `apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The fleet file (TOML); `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: String,
    /// Then wait until every agent is where the file wants it (or fails,
    /// or --timeout passes).
    #[arg(long)]
    pub wait: bool,
    /// Who, recorded as `triggered_by` of every change.
    #[arg(long = "by", default_value = "fleet-apply")]
    pub triggered_by: String,
}

/// The file at `path`, parsed and checked.
///
/// # Errors
/// As [`file::load`].
fn load(path: &str) -> anyhow::Result<file::Fleet> {
    file::load(path).map_err(anyhow::Error::msg)
}

/// What the plan needs of a wire agent; none for an agent in a state this
/// client does not know.
fn observed(agent: &pb::Agent) -> Option<Observed> {
    let state = state_from_pb("state", agent.state).ok()?;
    let failed_from = match (state, &agent.last_transition) {
        (AgentState::Failed, Some(last)) => state_from_pb("from_state", last.from_state).ok(),
        _ => None,
    };
    Some(Observed {
        agent_id: agent.agent_id.clone(),
        name: agent.name.clone(),
        labels: agent
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        state,
        version: agent.version,
        valid: agent
            .valid_transitions
            .iter()
            .filter_map(|s| state_from_pb("valid_transitions", *s).ok())
            .collect(),
        failed_from,
    })
}

/// The agent with `agent_id` as the server has it; none when it has none.
///
/// # Errors
/// Any other failure of GetAgent.
async fn fetch(s: &mut Session, agent_id: &str) -> anyhow::Result<Option<Observed>> {
    let request = s.request(pb::GetAgentRequest {
        agent_id: agent_id.to_string(),
        ..Default::default()
    });
    match s.client.get_agent(request).await {
        Ok(response) => Ok(response.into_inner().agent.as_ref().and_then(observed)),
        Err(status) if status.code() == Code::NotFound => Ok(None),
        Err(status) => Err(status_error(status)),
    }
}

/// Every agent of the file that the server has, by id.
///
/// # Errors
/// As [`fetch`].
async fn fetch_all(
    s: &mut Session,
    fleet: &file::Fleet,
) -> anyhow::Result<HashMap<String, Observed>> {
    let mut current = HashMap::new();
    for agent in &fleet.agents {
        if let Some(found) = fetch(s, &agent.agent_id).await? {
            current.insert(agent.agent_id.clone(), found);
        }
    }
    Ok(current)
}

/// Whether `apply` would change (or refuse) anything for this agent.
fn differs(plan: &AgentPlan<'_>) -> bool {
    matches!(plan.verdict, Verdict::Change(_) | Verdict::Conflict(_))
}

/// The PLAN column of one agent.
fn plan_text(plan: &AgentPlan<'_>) -> String {
    let state = plan.current.as_ref().map_or("", |c| c.state.as_str());
    match &plan.verdict {
        Verdict::InSync => "in sync".to_string(),
        Verdict::Change(steps) => steps
            .iter()
            .map(|s| s.action.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        Verdict::Moving => format!("moving ({state}): nothing until it settles"),
        Verdict::Held => format!("held ({state}): left alone"),
        Verdict::Conflict(why) => format!("conflict: {why}"),
    }
}

/// JSON of one agent's plan.
fn plan_json(plan: &AgentPlan<'_>) -> Value {
    let (kind, steps, conflict) = match &plan.verdict {
        Verdict::InSync => ("in_sync", Vec::new(), None),
        Verdict::Change(steps) => (
            "change",
            steps
                .iter()
                .map(|s| {
                    json!({
                        "action": s.action.as_str(),
                        "from_version": s.from_version,
                        "request_id": s.request_id,
                    })
                })
                .collect(),
            None,
        ),
        Verdict::Moving => ("moving", Vec::new(), None),
        Verdict::Held => ("held", Vec::new(), None),
        Verdict::Conflict(why) => ("conflict", Vec::new(), Some(why.clone())),
    };
    json!({
        "name": plan.desired.name,
        "agent_id": plan.desired.agent_id,
        "state": plan.current.as_ref().map(|c| c.state.as_str()),
        "version": plan.current.as_ref().map(|c| c.version),
        "want": plan.desired.state.as_str(),
        "plan": kind,
        "steps": steps,
        "conflict": conflict,
    })
}

/// Prints the plan: a table for people (one row per agent, then a
/// summary), or one document.
fn print_plan(format: Format, plans: &[AgentPlan<'_>]) {
    let changes = plans.iter().filter(|p| differs(p)).count();
    if format != Format::Text {
        output::emit(
            format,
            &json!({
                "in_sync": changes == 0,
                "agents": plans.iter().map(plan_json).collect::<Vec<_>>(),
            }),
        );
        return;
    }
    let width = plans
        .iter()
        .map(|p| p.desired.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    println!(
        "{:<width$}  {:<36}  {:<11}  {:<10}  PLAN",
        "NAME", "AGENT ID", "STATE", "WANT"
    );
    for plan in plans {
        let state = plan
            .current
            .as_ref()
            .map_or("-".to_string(), |c| c.state.to_string());
        println!(
            "{:<width$}  {:<36}  {:<11}  {:<10}  {}",
            plan.desired.name,
            plan.desired.agent_id,
            state,
            plan.desired.state.as_str(),
            plan_text(plan)
        );
    }
    if changes == 0 {
        println!("in sync: {} agents", plans.len());
    } else {
        println!("{changes} of {} agents to change", plans.len());
    }
}

/// `diff`: the plan of `-f FILE`; exit 1 when it is not empty.
pub(super) async fn diff(s: &mut Session, a: DiffArgs) -> anyhow::Result<()> {
    let fleet = load(&a.file)?;
    let current = fetch_all(s, &fleet).await?;
    let plans = plan::plan(&fleet, &current);
    print_plan(s.format, &plans);
    if plans.iter().any(differs) {
        return Err(Exit {
            code: exit::CHANGES,
            message: String::new(),
        }
        .into());
    }
    Ok(())
}
