//! The plan of a change: what a request will do, validated once.
//!
//! A transition's plan is built while the caller holds the agent's writer
//! lock, so the agent cannot move between the validation and the commit:
//! the caller's expected version, the operation's required states and every
//! step against the policy are checked here and nowhere else. A plan carries
//! that lock to the commit thread, which releases it once the change is in
//! the table. A refusal is logged (the audit trail of refusals) and plans
//! nothing.
//!
//! Pure: no I/O, no hooks, no commit; must not depend on the log or the
//! store.

use std::sync::Arc;

use tokio::sync::OwnedMutexGuard;
use tracing::warn;

use crate::{
    domain::{
        Agent, AgentId, AgentState, HookPhase, RequestTag, TransitionContext, TransitionError,
        TransitionPolicy,
    },
    error::Result,
    service::{ChangeRequest, log::Proposal, log::Step},
    store::AgentIdentity,
};

/// An operation with a fixed path, its required states and default reasons.
#[derive(Clone, Copy, Debug)]
pub(super) struct Operation {
    pub name: &'static str,
    /// States the agent must be in (empty: whatever the policy allows).
    pub requires: &'static [AgentState],
    /// Targets, in order, each with its default reason.
    pub path: &'static [(AgentState, &'static str)],
}

/// A transition to the caller's target: no required state, no fixed path.
pub(super) const TRANSITION: Operation = Operation {
    name: "transition",
    requires: &[],
    path: &[],
};
pub(super) const DEPLOY: Operation = Operation {
    name: "deploy_agent",
    requires: &[],
    path: &[
        (AgentState::Deploying, "deployment started"),
        (AgentState::Deployed, "deployment completed"),
    ],
};
pub(super) const START: Operation = Operation {
    name: "start_agent",
    requires: &[],
    path: &[
        (AgentState::Starting, "agent starting"),
        (AgentState::Online, "agent started"),
    ],
};
pub(super) const STOP: Operation = Operation {
    name: "stop_agent",
    requires: &[],
    path: &[
        (AgentState::Stopping, "agent stopping"),
        (AgentState::Offline, "agent stopped"),
    ],
};
pub(super) const ASSIGN: Operation = Operation {
    name: "assign_task",
    requires: &[AgentState::Online, AgentState::Idle],
    path: &[(AgentState::Busy, "task assigned")],
};
pub(super) const COMPLETE: Operation = Operation {
    name: "complete_task",
    requires: &[AgentState::Busy],
    path: &[(AgentState::Idle, "task completed")],
};
pub(super) const HANDLE_ERROR: Operation = Operation {
    name: "handle_error",
    requires: &[],
    path: &[(AgentState::Error, "error")],
};
pub(super) const MAINTENANCE: Operation = Operation {
    name: "put_in_maintenance",
    requires: &[],
    path: &[(AgentState::Maintenance, "maintenance")],
};
pub(super) const RESUME: Operation = Operation {
    name: "resume_from_maintenance",
    requires: &[AgentState::Maintenance],
    path: &[(AgentState::Online, "resumed from maintenance")],
};

/// A validated change, ready for hooks and the commit thread.
#[derive(Debug)]
pub(super) struct Plan {
    pub agent_id: AgentId,
    /// The agent as validated; `None` for a registration.
    pub prior: Option<Arc<Agent>>,
    /// Name and labels, for a registration.
    pub identity: Option<AgentIdentity>,
    pub steps: Vec<Step>,
    /// The agent's writer lock, for a transition.
    pub guard: Option<OwnedMutexGuard<()>>,
}

impl Plan {
    /// The registration of `agent_id` with `identity`: one step into
    /// REGISTERED. The caller checked that the table has no such agent.
    pub(super) fn registration(
        agent_id: AgentId,
        identity: AgentIdentity,
        change: ChangeRequest,
        request: Option<Arc<RequestTag>>,
    ) -> Plan {
        Plan {
            agent_id,
            prior: None,
            identity: Some(identity),
            steps: vec![Step {
                to: AgentState::Registered,
                reason: defaulted(change.reason, "agent registered"),
                triggered_by: defaulted(change.triggered_by, "system"),
                principal: change.caller.principal_name().to_string(),
                request,
                metadata: change.metadata,
            }],
            guard: None,
        }
    }

    /// The transition of `agent` along `path` for `op`, validated under the
    /// agent's writer lock `guard` (which the plan keeps).
    ///
    /// # Errors
    /// [`TransitionError::VersionMismatch`], [`TransitionError::RequiresState`]
    /// or [`TransitionError::NotAllowed`]; the refusal is logged and the
    /// lock released.
    pub(super) fn transition(
        policy: &TransitionPolicy,
        agent: Arc<Agent>,
        op: Operation,
        path: &[(AgentState, &'static str)],
        change: &ChangeRequest,
        request: &Option<Arc<RequestTag>>,
        guard: OwnedMutexGuard<()>,
    ) -> Result<Plan> {
        if let Err(err) = validate(policy, &agent, op, path, change.expected_version) {
            // The audit trail of refusals: who tried what on which agent.
            let to = path.last().map(|(to, _)| *to);
            warn!(
                principal = %change.caller,
                triggered_by = %change.triggered_by,
                agent_id = %agent.id,
                from = %agent.state,
                to = to.map(AgentState::as_str).unwrap_or(""),
                reason = %change.reason,
                refusal = %err,
                "refused: transition not allowed"
            );
            return Err(err);
        }
        Ok(Plan {
            agent_id: agent.id,
            prior: Some(agent),
            identity: None,
            steps: steps(path, change, request),
            guard: Some(guard),
        })
    }

    /// The hook context of each step, before the commit.
    pub(super) fn pre_contexts(&self) -> impl Iterator<Item = TransitionContext> + '_ {
        let mut from = self.prior.as_ref().map(|a| a.state);
        self.steps.iter().map(move |step| {
            let ctx = TransitionContext {
                phase: HookPhase::PreTransition,
                agent_id: self.agent_id,
                from_state: from,
                to_state: step.to,
                reason: step.reason.clone(),
                triggered_by: step.triggered_by.clone(),
                metadata: step.metadata.clone(),
                sequence: None,
                version: None,
                timestamp: None,
            };
            from = Some(step.to);
            ctx
        })
    }

    /// What the commit thread needs of the plan.
    pub(super) fn into_proposal(self) -> Proposal {
        Proposal {
            agent_id: self.agent_id,
            prior: self.prior,
            identity: self.identity,
            steps: self.steps,
            guard: self.guard,
        }
    }
}

/// The steps of `path`, each with the caller's reason (or the step's
/// default), `triggered_by` (default `system`), principal, request tag and
/// metadata.
fn steps(
    path: &[(AgentState, &'static str)],
    change: &ChangeRequest,
    request: &Option<Arc<RequestTag>>,
) -> Vec<Step> {
    let triggered_by = if change.triggered_by.is_empty() {
        "system"
    } else {
        change.triggered_by.as_str()
    };
    path.iter()
        .map(|(to, default_reason)| Step {
            to: *to,
            reason: if change.reason.is_empty() {
                (*default_reason).to_string()
            } else {
                change.reason.clone()
            },
            triggered_by: triggered_by.to_string(),
            principal: change.caller.principal_name().to_string(),
            request: request.clone(),
            metadata: change.metadata.clone(),
        })
        .collect()
}

/// The one validation of a transition: the caller's expected version, the
/// operation's required states, and every step against the policy.
fn validate(
    policy: &TransitionPolicy,
    agent: &Agent,
    op: Operation,
    path: &[(AgentState, &'static str)],
    expected_version: Option<u64>,
) -> Result<()> {
    if let Some(expected) = expected_version
        && expected != agent.version
    {
        return Err(TransitionError::VersionMismatch {
            agent_id: agent.id,
            expected,
            actual: agent.version,
        }
        .into());
    }
    if !op.requires.is_empty() && !op.requires.contains(&agent.state) {
        return Err(TransitionError::RequiresState {
            agent_id: agent.id,
            operation: op.name,
            state: agent.state,
            required: op.requires.to_vec(),
        }
        .into());
    }
    let mut from = agent.state;
    for (to, _) in path {
        if !policy.allows(from, *to) {
            return Err(TransitionError::NotAllowed {
                agent_id: agent.id,
                from,
                to: *to,
                allowed: policy.allowed_targets(from).to_vec(),
            }
            .into());
        }
        from = *to;
    }
    Ok(())
}

fn defaulted(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_string()
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::{domain::TransitionRecord, error::Error};

    fn registered_agent() -> Arc<Agent> {
        let id = AgentId::generate();
        let record = Arc::new(TransitionRecord {
            agent_id: id,
            from: None,
            to: AgentState::Registered,
            at: UNIX_EPOCH,
            reason: "agent registered".into(),
            triggered_by: "system".into(),
            principal: String::new(),
            request: None,
            metadata: Default::default(),
            sequence: 1,
            version: 1,
        });
        Arc::new(Agent::registered(
            id,
            Arc::from("a"),
            Arc::default(),
            record,
        ))
    }

    fn writer_lock() -> (Arc<tokio::sync::Mutex<()>>, OwnedMutexGuard<()>) {
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let guard = Arc::clone(&lock).try_lock_owned().expect("unlocked");
        (lock, guard)
    }

    /// Refusals of each kind (a target the policy does not allow, a required
    /// state, a stale expected version) plan nothing and release the
    /// agent's writer lock.
    #[test]
    fn a_refused_transition_plans_nothing_and_releases_the_lock() {
        let policy = TransitionPolicy::default();
        let agent = registered_agent();
        let stale = ChangeRequest {
            expected_version: Some(7),
            ..ChangeRequest::default()
        };
        type Case<'a> = (
            Operation,
            &'a [(AgentState, &'static str)],
            &'a ChangeRequest,
        );
        let cases: [Case<'_>; 3] = [
            (
                TRANSITION,
                &[(AgentState::Online, "")],
                &ChangeRequest::default(),
            ),
            (ASSIGN, ASSIGN.path, &ChangeRequest::default()),
            (DEPLOY, DEPLOY.path, &stale),
        ];
        for (op, path, change) in cases {
            let (lock, guard) = writer_lock();
            let refused =
                Plan::transition(&policy, Arc::clone(&agent), op, path, change, &None, guard);
            match (op.name, refused) {
                (
                    "transition",
                    Err(Error::Transition(TransitionError::NotAllowed { from, to, .. })),
                ) => {
                    assert_eq!((from, to), (AgentState::Registered, AgentState::Online));
                }
                (
                    "assign_task",
                    Err(Error::Transition(TransitionError::RequiresState { state, .. })),
                ) => {
                    assert_eq!(state, AgentState::Registered);
                }
                (
                    "deploy_agent",
                    Err(Error::Transition(TransitionError::VersionMismatch {
                        expected,
                        actual,
                        ..
                    })),
                ) => {
                    assert_eq!((expected, actual), (7, 1));
                }
                (name, other) => panic!("{name}: unexpected {other:?}"),
            }
            assert!(lock.try_lock().is_ok(), "{}: lock released", op.name);
        }
    }

    /// A valid path plans one step per target, with the step's default
    /// reason and `system` when the caller said nothing, keeps the writer
    /// lock, and gives each pre-hook the state the step leaves.
    #[test]
    fn a_valid_path_plans_every_step_with_its_defaults() {
        let agent = registered_agent();
        let (lock, guard) = writer_lock();
        let plan = Plan::transition(
            &TransitionPolicy::default(),
            Arc::clone(&agent),
            DEPLOY,
            DEPLOY.path,
            &ChangeRequest::default(),
            &None,
            guard,
        )
        .expect("REGISTERED -> DEPLOYING -> DEPLOYED is allowed");

        let steps: Vec<(AgentState, &str, &str)> = plan
            .steps
            .iter()
            .map(|s| (s.to, s.reason.as_str(), s.triggered_by.as_str()))
            .collect();
        assert_eq!(
            steps,
            vec![
                (AgentState::Deploying, "deployment started", "system"),
                (AgentState::Deployed, "deployment completed", "system"),
            ]
        );
        let edges: Vec<_> = plan
            .pre_contexts()
            .map(|ctx| (ctx.from_state, ctx.to_state))
            .collect();
        assert_eq!(
            edges,
            vec![
                (Some(AgentState::Registered), AgentState::Deploying),
                (Some(AgentState::Deploying), AgentState::Deployed),
            ]
        );
        assert!(lock.try_lock().is_err(), "the plan keeps the writer lock");
        let proposal = plan.into_proposal();
        assert_eq!(proposal.prior.map(|a| a.version), Some(1));
        drop(proposal.guard);
        assert!(lock.try_lock().is_ok());
    }

    /// The caller's reason and `triggered_by` replace the defaults, and a
    /// registration has no prior agent and one step into REGISTERED.
    #[test]
    fn the_callers_words_replace_the_defaults() {
        let change = ChangeRequest {
            reason: "rollout 42".into(),
            triggered_by: "deployer".into(),
            ..ChangeRequest::default()
        };
        let (_lock, guard) = writer_lock();
        let plan = Plan::transition(
            &TransitionPolicy::default(),
            registered_agent(),
            DEPLOY,
            DEPLOY.path,
            &change,
            &None,
            guard,
        )
        .expect("allowed");
        assert!(
            plan.steps
                .iter()
                .all(|s| s.reason == "rollout 42" && s.triggered_by == "deployer")
        );

        let identity = AgentIdentity {
            name: Arc::from("b"),
            labels: Arc::default(),
        };
        let id = AgentId::generate();
        let plan = Plan::registration(id, identity, ChangeRequest::default(), None);
        assert!(plan.prior.is_none() && plan.guard.is_none());
        let steps: Vec<_> = plan
            .steps
            .iter()
            .map(|s| (s.to, s.reason.as_str(), s.triggered_by.as_str()))
            .collect();
        assert_eq!(
            steps,
            vec![(AgentState::Registered, "agent registered", "system")]
        );
    }
}
