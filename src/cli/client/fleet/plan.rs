//! The convergence plan: from the agents the server has and the fleet
//! file, the steps that bring each agent where the file wants it. Pure: no
//! I/O, no wire types; `diff` prints a plan, `apply` carries it out.
//!
//! Per agent (the file's state; "satisfied" states need nothing):
//!
//! | the agent is | online | deployed | offline | registered |
//! |---|---|---|---|---|
//! | missing | register, deploy, start | register, deploy | register | register |
//! | registered | deploy, start | deploy | - | - |
//! | deployed, offline | start | - | - | - |
//! | online, busy, idle | - | stop | stop | - |
//! | failed | start (deploy, start when the deployment failed) | deploy | deploy | - |
//! | timeout | start | offline | offline | - |
//! | error | start, or offline then start when the policy has no error -> starting | offline | offline | - |
//! | deploying, starting, stopping, updating, scaling | moving: nothing until it settles | | | |
//! | maintenance, suspended | held: left alone | | | - |
//! | terminated | conflict | conflict | - | - |
//! | deleted | conflict | | | |
//!
//! (`offline` as a step is TransitionAgent to OFFLINE.) An agent whose name
//! or labels differ from the file's is a conflict: both are set at
//! registration and the API has no call to change them. The first step of
//! a plan must be allowed by the active policy (the agent's
//! `valid_transitions`), or the agent is a conflict too.
//!
//! Every step carries a request id derived from the agent, the step and
//! the version the agent has before it ([`request_id`]): a retried step is
//! the same request to the server, which answers it with the first
//! outcome, and a step planned again after the agent moved is a new one.

use std::collections::HashMap;

use agent_lifecycle::domain::{AgentState, StateSet, agent::Labels};

use super::file::{Desired, DesiredAgent, Fleet, uuid_of};

/// An agent as the server has it: what the plan needs of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub agent_id: String,
    pub name: String,
    pub labels: Labels,
    pub state: AgentState,
    pub version: u64,
    /// The states the active policy allows from `state`.
    pub valid: StateSet,
    /// For a FAILED agent: the state it failed from (DEPLOYING: its
    /// deployment failed).
    pub failed_from: Option<AgentState>,
}

/// One operation of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// RegisterAgent with the file's id, name and labels.
    Register,
    /// DeployAgent: DEPLOYING, DEPLOYED.
    Deploy,
    /// StartAgent: STARTING, then ONLINE (or STARTING until the agent's
    /// heartbeat or its platform says it runs).
    Start,
    /// StopAgent: STOPPING, OFFLINE.
    Stop,
    /// TransitionAgent to OFFLINE (out of ERROR or TIMEOUT).
    MarkOffline,
}

impl Action {
    /// The name `diff` and `apply` print.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Register => "register",
            Action::Deploy => "deploy",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::MarkOffline => "offline",
        }
    }

    /// The first state the action moves an agent into.
    pub fn entry(self) -> AgentState {
        match self {
            Action::Register => AgentState::Registered,
            Action::Deploy => AgentState::Deploying,
            Action::Start => AgentState::Starting,
            Action::Stop => AgentState::Stopping,
            Action::MarkOffline => AgentState::Offline,
        }
    }

    /// Transitions the action records (a start that waits for the agent
    /// records one; a start is always a plan's last step).
    fn transitions(self) -> u64 {
        match self {
            Action::Register | Action::MarkOffline => 1,
            Action::Deploy | Action::Start | Action::Stop => 2,
        }
    }
}

/// One step of an agent's plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub action: Action,
    /// The agent's version before the step (0: not registered yet); sent
    /// as `expected_version`, so a step planned on a stale read is refused
    /// rather than applied to an agent that moved.
    pub from_version: u64,
    /// The step's idempotency key ([`request_id`]).
    pub request_id: String,
}

/// What one agent needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Where the file wants it.
    InSync,
    /// These steps, in order.
    Change(Vec<Step>),
    /// In the middle of a move (deploying, starting, ...): nothing to do
    /// until it settles.
    Moving,
    /// In maintenance or suspended: left alone until an operator resumes it.
    Held,
    /// The file cannot be applied to it; why.
    Conflict(String),
}

/// One agent of the file, what the server has, and what it needs.
#[derive(Clone, Debug)]
pub struct AgentPlan<'f> {
    pub desired: &'f DesiredAgent,
    pub current: Option<Observed>,
    pub verdict: Verdict,
}

/// The prefix of every hashed request id.
const REQUEST_ID_DOMAIN: &[u8] = b"agent-lifecycle/fleet/request-id/v1\0";

/// The request id of `action` on `agent_id` at version `from_version`: a
/// version-8 UUID from SHA-256 of the three. The same step of the same
/// agent from the same version is the same request, whichever run or
/// machine sends it; versions only grow, so a later step never reuses one.
pub fn request_id(agent_id: &str, action: Action, from_version: u64) -> String {
    uuid_of(&[
        REQUEST_ID_DOMAIN,
        agent_id.as_bytes(),
        b"\0",
        action.as_str().as_bytes(),
        b"\0",
        from_version.to_string().as_bytes(),
    ])
}

/// The plan of every agent of `fleet`, in the file's order; `current`
/// holds the agents the server has, by id.
pub fn plan<'f>(fleet: &'f Fleet, current: &HashMap<String, Observed>) -> Vec<AgentPlan<'f>> {
    fleet
        .agents
        .iter()
        .map(|desired| {
            let current = current.get(&desired.agent_id).cloned();
            AgentPlan {
                verdict: plan_agent(desired, current.as_ref()),
                desired,
                current,
            }
        })
        .collect()
}

/// What `desired` needs, the server having `current` (none: not
/// registered).
pub fn plan_agent(desired: &DesiredAgent, current: Option<&Observed>) -> Verdict {
    let Some(current) = current else {
        let actions: &[Action] = match desired.state {
            Desired::Online => &[Action::Register, Action::Deploy, Action::Start],
            Desired::Deployed => &[Action::Register, Action::Deploy],
            Desired::Offline | Desired::Registered => &[Action::Register],
        };
        return Verdict::Change(steps(&desired.agent_id, 0, actions));
    };
    if let Some(conflict) = registration_conflict(desired, current) {
        return Verdict::Conflict(conflict);
    }
    if current.state != AgentState::Deleted && desired.state.satisfied_by().contains(current.state)
    {
        return Verdict::InSync;
    }
    let actions = match actions(desired.state, current) {
        Ok(actions) => actions,
        Err(verdict) => return verdict,
    };
    if let Some(first) = actions.first()
        && !current.valid.contains(first.entry())
    {
        return Verdict::Conflict(format!(
            "the active policy allows no move from {} to {} (to {})",
            current.state,
            first.entry(),
            first.as_str()
        ));
    }
    Verdict::Change(steps(&desired.agent_id, current.version, &actions))
}

/// The actions that take `current` (not where it should be) to `desired`,
/// or why there are none.
fn actions(desired: Desired, current: &Observed) -> Result<Vec<Action>, Verdict> {
    use Action::*;
    let online = desired == Desired::Online;
    Ok(match current.state {
        AgentState::Deploying
        | AgentState::Starting
        | AgentState::Stopping
        | AgentState::Updating
        | AgentState::Scaling => return Err(Verdict::Moving),
        AgentState::Maintenance | AgentState::Suspended => return Err(Verdict::Held),
        AgentState::Deleted => {
            return Err(Verdict::Conflict(
                "deleted: its id cannot be registered again (remove it from the file, or give it another name)"
                    .to_string(),
            ));
        }
        AgentState::Terminated => {
            return Err(Verdict::Conflict(
                "terminated: it can only be deleted (remove it from the file, or give it another name)"
                    .to_string(),
            ));
        }
        AgentState::Registered if online => vec![Deploy, Start],
        AgentState::Registered => vec![Deploy],
        AgentState::Deployed | AgentState::Offline => vec![Start],
        AgentState::Online | AgentState::Busy | AgentState::Idle => vec![Stop],
        AgentState::Failed if online && current.failed_from == Some(AgentState::Deploying) => {
            vec![Deploy, Start]
        }
        AgentState::Failed if online => vec![Start],
        AgentState::Failed => vec![Deploy],
        AgentState::Timeout if online => vec![Start],
        AgentState::Error if online && current.valid.contains(AgentState::Starting) => {
            vec![Start]
        }
        AgentState::Error if online => vec![MarkOffline, Start],
        AgentState::Timeout | AgentState::Error => vec![MarkOffline],
    })
}

/// The steps of `actions` from `version` on.
fn steps(agent_id: &str, mut version: u64, actions: &[Action]) -> Vec<Step> {
    actions
        .iter()
        .map(|&action| {
            let step = Step {
                action,
                from_version: version,
                request_id: request_id(agent_id, action, version),
            };
            version += action.transitions();
            step
        })
        .collect()
}

/// Why the registered agent is not the file's: its name or labels differ
/// (both are set at registration and cannot change).
fn registration_conflict(desired: &DesiredAgent, current: &Observed) -> Option<String> {
    if current.name != desired.name {
        return Some(format!(
            "registered with the name {:?}; names and labels are set at registration and cannot change",
            current.name
        ));
    }
    if current.labels == desired.labels {
        return None;
    }
    let mut changes = Vec::new();
    for (key, value) in &desired.labels {
        match current.labels.get(key) {
            None => changes.push(format!("+{key}={value}")),
            Some(now) if now != value => changes.push(format!("{key}={now} -> {value}")),
            Some(_) => {}
        }
    }
    for (key, value) in &current.labels {
        if !desired.labels.contains_key(key) {
            changes.push(format!("-{key}={value}"));
        }
    }
    Some(format!(
        "labels differ ({}); labels are set at registration and cannot change",
        changes.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_lifecycle::domain::transition::default_targets;

    fn desired(state: Desired) -> DesiredAgent {
        DesiredAgent {
            name: "a".to_string(),
            agent_id: "00000000-0000-8000-8000-000000000001".to_string(),
            labels: [("team".to_string(), "ml".to_string())].into(),
            state,
        }
    }

    /// The agent in `state` at version 7, under the default policy.
    fn observed(state: AgentState, failed_from: Option<AgentState>) -> Observed {
        Observed {
            agent_id: "00000000-0000-8000-8000-000000000001".to_string(),
            name: "a".to_string(),
            labels: [("team".to_string(), "ml".to_string())].into(),
            state,
            version: 7,
            valid: default_targets(state).iter().copied().collect(),
            failed_from,
        }
    }

    fn actions_of(verdict: &Verdict) -> Vec<&'static str> {
        match verdict {
            Verdict::Change(steps) => steps.iter().map(|s| s.action.as_str()).collect(),
            other => panic!("not a change: {other:?}"),
        }
    }

    /// The state `action` leaves an agent in when all goes well.
    fn after(action: Action) -> AgentState {
        match action {
            Action::Register => AgentState::Registered,
            Action::Deploy => AgentState::Deployed,
            Action::Start => AgentState::Online,
            Action::Stop | Action::MarkOffline => AgentState::Offline,
        }
    }

    /// Every state and every desired state: a change's steps are each
    /// allowed by the default policy from where the previous one left the
    /// agent, they end where the file wants it, and each step expects the
    /// version the previous ones lead to.
    #[test]
    fn every_change_is_allowed_and_ends_where_the_file_wants_it() {
        let wanted = [
            Desired::Online,
            Desired::Deployed,
            Desired::Offline,
            Desired::Registered,
        ];
        for want in wanted {
            let mut starts: Vec<Option<Observed>> = vec![None];
            for state in AgentState::ALL {
                starts.push(Some(observed(state, None)));
            }
            starts.push(Some(observed(
                AgentState::Failed,
                Some(AgentState::Deploying),
            )));
            for start in starts {
                let verdict = plan_agent(&desired(want), start.as_ref());
                let Verdict::Change(steps) = &verdict else {
                    continue;
                };
                let mut state = start.as_ref().map(|o| o.state);
                let mut version = start.as_ref().map_or(0, |o| o.version);
                for step in steps {
                    if let Some(from) = state {
                        assert!(
                            default_targets(from).contains(&step.action.entry()),
                            "{want:?} from {start:?}: {:?} not allowed from {from}",
                            step.action
                        );
                    }
                    assert_eq!(step.from_version, version, "{want:?} from {start:?}");
                    assert_eq!(
                        step.request_id,
                        request_id(&desired(want).agent_id, step.action, version)
                    );
                    version += step.action.transitions();
                    state = Some(after(step.action));
                }
                let end = state.expect("a change ends somewhere");
                assert!(
                    want.satisfied_by().contains(end),
                    "{want:?} from {start:?} ends in {end}"
                );
            }
        }
    }

    #[test]
    fn the_plan_follows_the_table() {
        use AgentState::*;
        let cases: &[(Desired, Option<AgentState>, Vec<&str>)] = &[
            (Desired::Online, None, vec!["register", "deploy", "start"]),
            (Desired::Deployed, None, vec!["register", "deploy"]),
            (Desired::Offline, None, vec!["register"]),
            (Desired::Registered, None, vec!["register"]),
            (Desired::Online, Some(Registered), vec!["deploy", "start"]),
            (Desired::Online, Some(Offline), vec!["start"]),
            (Desired::Online, Some(Timeout), vec!["start"]),
            (Desired::Online, Some(Failed), vec!["start"]),
            (Desired::Online, Some(Error), vec!["offline", "start"]),
            (Desired::Offline, Some(Busy), vec!["stop"]),
            (Desired::Offline, Some(Error), vec!["offline"]),
            (Desired::Deployed, Some(Registered), vec!["deploy"]),
            (Desired::Deployed, Some(Failed), vec!["deploy"]),
        ];
        for (want, state, expected) in cases {
            let current = state.map(|s| observed(s, None));
            let verdict = plan_agent(&desired(*want), current.as_ref());
            assert_eq!(&actions_of(&verdict), expected, "{want:?} from {state:?}");
        }
        let failed_deploy = observed(Failed, Some(Deploying));
        assert_eq!(
            actions_of(&plan_agent(&desired(Desired::Online), Some(&failed_deploy))),
            vec!["deploy", "start"]
        );
        // A policy that lets ERROR start again: one step.
        let mut error = observed(Error, None);
        error.valid.insert(Starting);
        assert_eq!(
            actions_of(&plan_agent(&desired(Desired::Online), Some(&error))),
            vec!["start"]
        );
        for (want, state, verdict) in [
            (Desired::Online, Online, Verdict::InSync),
            (Desired::Online, Busy, Verdict::InSync),
            (Desired::Offline, Registered, Verdict::InSync),
            (Desired::Deployed, Offline, Verdict::InSync),
            (Desired::Registered, Error, Verdict::InSync),
            (Desired::Online, Starting, Verdict::Moving),
            (Desired::Offline, Stopping, Verdict::Moving),
            (Desired::Online, Maintenance, Verdict::Held),
            (Desired::Offline, Suspended, Verdict::Held),
        ] {
            let current = observed(state, None);
            assert_eq!(
                plan_agent(&desired(want), Some(&current)),
                verdict,
                "{want:?} from {state}"
            );
        }
    }

    #[test]
    fn what_cannot_be_applied_is_a_conflict() {
        let conflict =
            |want: Desired, current: &Observed| match plan_agent(&desired(want), Some(current)) {
                Verdict::Conflict(why) => why,
                other => panic!("{want:?} from {current:?}: {other:?}"),
            };
        let mut relabelled = observed(AgentState::Online, None);
        relabelled.labels = [
            ("team".to_string(), "ops".to_string()),
            ("old".to_string(), "x".to_string()),
        ]
        .into();
        assert_eq!(
            conflict(Desired::Online, &relabelled),
            "labels differ (team=ops -> ml, -old=x); labels are set at registration and cannot change"
        );
        let mut renamed = observed(AgentState::Online, None);
        renamed.name = "b".to_string();
        assert!(conflict(Desired::Online, &renamed).starts_with("registered with the name \"b\""));
        for want in [Desired::Online, Desired::Registered] {
            assert!(conflict(want, &observed(AgentState::Deleted, None)).starts_with("deleted"));
        }
        assert!(
            conflict(Desired::Online, &observed(AgentState::Terminated, None))
                .starts_with("terminated")
        );
        // A policy without the first step's move.
        let mut offline = observed(AgentState::Offline, None);
        offline.valid = StateSet::EMPTY;
        assert_eq!(
            conflict(Desired::Online, &offline),
            "the active policy allows no move from offline to starting (to start)"
        );
    }

    #[test]
    fn request_ids_depend_on_the_agent_the_step_and_the_version() {
        let id = request_id("a", Action::Start, 3);
        assert_eq!(id, request_id("a", Action::Start, 3));
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        for other in [
            request_id("b", Action::Start, 3),
            request_id("a", Action::Stop, 3),
            request_id("a", Action::Start, 4),
        ] {
            assert_ne!(id, other);
        }
    }
}
