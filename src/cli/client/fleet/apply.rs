//! `apply`: carries out the plan, one agent after another, one step at a
//! time, then (`--wait`) waits for the fleet.
//!
//! A file with a conflict applies nothing. Otherwise each agent's steps
//! run in order; after each, the agent the server answers with is planned
//! again, so a step that ends somewhere unplanned (a start that stays in
//! STARTING until the platform says the agent runs) is followed from where
//! it is. A step carries its request id and the version it expects:
//! - a call that fails on the way (UNAVAILABLE, a deadline, a rate limit)
//!   is sent again as is, and the server answers a step it already made
//!   with that outcome instead of making it twice;
//! - a step refused because the agent moved (ABORTED) or was registered
//!   meanwhile (ALREADY_EXISTS) is planned again from a fresh read;
//! - any other refusal is reported, and the other agents go on.

use std::time::Duration;

use serde_json::{Value, json};
use tonic::{Code, Status};

use agent_lifecycle::api::grpc::pb;

use super::{
    ApplyArgs, Exit, Format, Session, differs, exit, fetch, fetch_all, file::Desired,
    file::DesiredAgent, load, observed, plan, plan::Action, plan::Observed, plan::Step,
    plan::Verdict, print_plan, status_error,
};
use crate::cli::client::{
    agent_json, agent_line, transition_json, transition_line,
    wait::{Target, wait_for},
};

/// Steps one agent may take in one run: more than any plan has, so that
/// an agent others keep moving cannot keep `apply` busy for ever.
const MAX_STEPS_PER_AGENT: usize = 8;

/// Delays before sending a step again after a failure on the way.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// What a step did: the agent after it and its transitions.
struct Done {
    agent: Option<pb::Agent>,
    transitions: Vec<pb::StateTransition>,
}

/// A failure of a step that is worth sending again as it is.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
    )
}

/// Sends one step once: the step's request with the fields every step
/// sets (id, reason, who, request id) and its own.
async fn send(
    s: &mut Session,
    desired: &DesiredAgent,
    step: &Step,
    by: &str,
) -> Result<Done, Status> {
    let reason = format!("fleet apply: want {}", desired.state.as_str());
    let expected = Some(step.from_version);
    macro_rules! call {
        ($rpc:ident, $request:ident { $($field:ident: $value:expr),* $(,)? }) => {{
            // The update leaves the rest (metadata, a start's
            // wait_for_heartbeat: as the server's settings say) unset.
            #[allow(clippy::needless_update)]
            let request = s.request(pb::$request {
                agent_id: desired.agent_id.clone(),
                reason,
                triggered_by: by.to_string(),
                request_id: step.request_id.clone(),
                $($field: $value,)*
                ..Default::default()
            });
            let response = s.client.$rpc(request).await?.into_inner();
            Ok(Done {
                agent: response.agent,
                transitions: response.transitions,
            })
        }};
    }
    match step.action {
        Action::Register => call!(
            register_agent,
            RegisterAgentRequest {
                name: desired.name.clone(),
                labels: desired.labels.clone().into_iter().collect(),
            }
        ),
        Action::Deploy => call!(
            deploy_agent,
            DeployAgentRequest {
                expected_version: expected
            }
        ),
        Action::Start => call!(
            start_agent,
            StartAgentRequest {
                expected_version: expected
            }
        ),
        Action::Stop => call!(
            stop_agent,
            StopAgentRequest {
                expected_version: expected
            }
        ),
        Action::MarkOffline => call!(
            transition_agent,
            TransitionAgentRequest {
                target_state: pb::AgentState::Offline as i32,
                expected_version: expected,
            }
        ),
    }
}

/// Sends one step, again after a failure on the way (the same request:
/// the server makes it at most once).
async fn send_with_retries(
    s: &mut Session,
    desired: &DesiredAgent,
    step: &Step,
    by: &str,
) -> Result<Done, Status> {
    let mut delays = RETRY_DELAYS.iter();
    loop {
        match send(s, desired, step, by).await {
            Err(status) if transient(&status) => match delays.next() {
                Some(delay) => tokio::time::sleep(*delay).await,
                None => return Err(status),
            },
            other => return other,
        }
    }
}

/// What `apply` did, for the output.
struct Report {
    format: Format,
    /// The width of the name column.
    width: usize,
    /// The steps made, as JSON (for `-o json`).
    steps: Vec<Value>,
    /// Agents whose steps the server refused: `NAME: why`.
    refused: Vec<String>,
}

impl Report {
    /// Notes (and, for people, prints) a step made.
    fn step(&mut self, desired: &DesiredAgent, step: &Step, done: &Done) {
        if self.format == Format::Text {
            let (name, width) = (&desired.name, self.width);
            let action = step.action.as_str();
            if done.transitions.is_empty() {
                println!("{name:<width$}  {action:<8}  no change");
            }
            for t in &done.transitions {
                println!("{name:<width$}  {action:<8}  {}", transition_line(t));
            }
        }
        self.steps.push(json!({
            "name": desired.name,
            "agent_id": desired.agent_id,
            "action": step.action.as_str(),
            "request_id": step.request_id,
            "transitions": done.transitions.iter().map(transition_json).collect::<Vec<_>>(),
            "agent": done.agent.as_ref().map(agent_json),
        }));
    }
}

/// Takes one agent where the file wants it, from `current`: the agent as
/// it is at the end (`Err` holds why a step was refused).
///
/// # Errors
/// The outer error: the server cannot be reached or refuses the call
/// itself (authentication, permission), which ends the whole apply.
async fn converge(
    s: &mut Session,
    desired: &DesiredAgent,
    mut current: Option<Observed>,
    by: &str,
    report: &mut Report,
) -> anyhow::Result<Result<Option<Observed>, String>> {
    let mut refetched_for: Option<String> = None;
    for _ in 0..MAX_STEPS_PER_AGENT {
        let Verdict::Change(steps) = plan::plan_agent(desired, current.as_ref()) else {
            return Ok(Ok(current));
        };
        let Some(step) = steps.first() else {
            return Ok(Ok(current));
        };
        let refused = |status: &Status| {
            format!(
                "{}: {} refused: {:?}: {}",
                desired.name,
                step.action.as_str(),
                status.code(),
                status.message()
            )
        };
        match send_with_retries(s, desired, step, by).await {
            Ok(done) => {
                report.step(desired, step, &done);
                current = match done.agent.as_ref().and_then(observed) {
                    Some(agent) => Some(agent),
                    None => fetch(s, &desired.agent_id).await?,
                };
            }
            // The agent moved, or was registered, since it was read: plan
            // again from where it is, unless that is the same step again.
            Err(status) if matches!(status.code(), Code::Aborted | Code::AlreadyExists) => {
                if refetched_for.as_deref() == Some(step.request_id.as_str()) {
                    return Ok(Err(refused(&status)));
                }
                refetched_for = Some(step.request_id.clone());
                current = fetch(s, &desired.agent_id).await?;
            }
            Err(status)
                if matches!(
                    status.code(),
                    Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument
                ) =>
            {
                return Ok(Err(refused(&status)));
            }
            Err(status) => return Err(status_error(status)),
        }
    }
    Ok(Err(format!(
        "{}: not where the file wants it after {MAX_STEPS_PER_AGENT} steps (others keep moving it?)",
        desired.name
    )))
}

/// `apply`: the plan of `-f FILE` carried out; with `--wait`, then waits
/// for every agent whose state the file sets.
pub async fn apply(s: &mut Session, a: ApplyArgs) -> anyhow::Result<()> {
    let fleet = load(&a.file)?;
    let current = fetch_all(s, &fleet).await?;
    let plans = plan::plan(&fleet, &current);
    let conflicts: Vec<String> = plans
        .iter()
        .filter_map(|p| match &p.verdict {
            Verdict::Conflict(why) => Some(format!("{}: {why}", p.desired.name)),
            _ => None,
        })
        .collect();
    if !conflicts.is_empty() {
        print_plan(s.format, &plans);
        return Err(Exit {
            code: exit::CHANGES,
            message: format!("nothing applied: {}", conflicts.join("; ")),
        }
        .into());
    }
    let mut report = Report {
        format: s.format,
        width: fleet.agents.iter().map(|a| a.name.len()).max().unwrap_or(0),
        steps: Vec::new(),
        refused: Vec::new(),
    };
    let mut targets = Vec::new();
    for plan in &plans {
        let current = if differs(plan) {
            match converge(
                s,
                plan.desired,
                plan.current.clone(),
                &a.triggered_by,
                &mut report,
            )
            .await?
            {
                Ok(current) => current,
                Err(why) => {
                    report.refused.push(why);
                    continue;
                }
            }
        } else {
            plan.current.clone()
        };
        let held = plan::plan_agent(plan.desired, current.as_ref()) == Verdict::Held;
        if plan.desired.state != Desired::Registered && !held {
            targets.push(Target {
                agent_id: plan.desired.agent_id.clone(),
                name: plan.desired.name.clone(),
                states: plan.desired.state.satisfied_by(),
            });
        }
    }
    let result = finish(s, &a, &plans, &mut report, targets).await;
    if s.format != Format::Text {
        crate::cli::output::emit(
            s.format,
            &json!({
                "steps": report.steps,
                "refused": report.refused,
                // Only --wait knows.
                "converged": a.wait.then_some(result.is_ok()),
            }),
        );
    }
    result
}

/// After the steps: refusals fail the apply; `--wait` waits for the
/// targets.
///
/// # Errors
/// [`exit::CHANGES`] for refused steps, and as [`wait_for`].
async fn finish(
    s: &mut Session,
    a: &ApplyArgs,
    plans: &[plan::AgentPlan<'_>],
    report: &mut Report,
    targets: Vec<Target>,
) -> anyhow::Result<()> {
    let text = s.format == Format::Text;
    if !report.refused.is_empty() {
        return Err(Exit {
            code: exit::CHANGES,
            message: format!("not applied: {}", report.refused.join("; ")),
        }
        .into());
    }
    if text {
        let held: Vec<&str> = plans
            .iter()
            .filter(|p| p.verdict == Verdict::Held)
            .map(|p| p.desired.name.as_str())
            .collect();
        if !held.is_empty() {
            println!("held in maintenance, left alone: {}", held.join(", "));
        }
        if report.steps.is_empty() {
            println!("in sync: nothing to apply ({} agents)", plans.len());
        } else {
            println!("applied {} steps", report.steps.len());
        }
    }
    if !a.wait {
        return Ok(());
    }
    let mut print = |agent: &pb::Agent| {
        if text {
            println!("reached  {}", agent_line(agent));
        }
    };
    let limit = s.wait_limit;
    let count = targets.len();
    wait_for(s, targets, limit, &mut print).await?;
    if text {
        println!("converged: {count} agents where the file wants them");
    }
    Ok(())
}
