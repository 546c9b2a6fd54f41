//! External status sync: an agent follows the status its platform reports
//! (a Hugging Face Space's stage, a Kubernetes pod, a Docker container).
//!
//! The status maps to a lifecycle state ([`ExternalSource::target`]); the
//! agent walks the active policy's path to it
//! ([`TransitionPolicy::path_to`](crate::domain::TransitionPolicy::path_to)),
//! one recorded transition per step, each with `triggered_by` naming the
//! source (`hf_sync`, `k8s_sync`, `docker_sync`). An unknown status, or a
//! state the policy cannot reach, changes nothing and says so.
//!
//! Like every automation, this drives the service through its public API,
//! as a client would: each step is a compare-and-set on the agent's
//! version, and a step that loses to a concurrent change recomputes the
//! path from the agent's new state.

use std::sync::Arc;

use crate::{
    AgentLifecycleService,
    domain::{
        Agent, AgentId, AgentState, Caller, ExternalSource, Metadata, TransitionError,
        TransitionRecord, external::satisfied_by, limits,
    },
    error::{Error, Result},
    service::ChangeRequest,
};

/// How often a sync starts over after losing a step to a concurrent change.
const ATTEMPTS: usize = 4;

/// What a sync did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The agent moved to the status's state.
    Applied,
    /// The agent was already there (or in a state the status accepts).
    AlreadyInState,
    /// The source's table does not know the status; nothing changed.
    UnknownStatus,
    /// The active policy has no path from the agent's state to the
    /// status's; nothing changed.
    Unreachable,
}

/// The result of one sync.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncResult {
    /// What happened.
    pub outcome: SyncOutcome,
    /// The state the status maps to (`None` for an unknown status).
    pub target: Option<AgentState>,
    /// The agent afterwards.
    pub agent: Arc<Agent>,
    /// The transitions recorded, in order.
    pub transitions: Vec<Arc<TransitionRecord>>,
    /// A sentence for people: what was done or why nothing was.
    pub message: String,
}

/// One status report to apply.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusReport {
    /// The status text as the platform reports it (matched
    /// case-insensitively).
    pub status: String,
    /// Recorded with every transition, next to `source` and `status`.
    pub metadata: Metadata,
    /// Who reports it.
    pub caller: Caller,
    /// The `triggered_by` recorded; the source's (`docker_sync`) when
    /// `None`. A platform driver names itself (`docker-driver`).
    pub triggered_by: Option<String>,
    /// The reason recorded; `"{source} status {status}"` when `None`.
    pub reason: Option<String>,
}

/// Applies `report` from `source` to agent `id`.
///
/// # Errors
/// [`Error::AgentNotFound`], oversized input, a veto, or a store failure.
/// An unknown status or an unreachable state is not an error: see
/// [`SyncOutcome`].
pub async fn sync_external_status(
    service: &AgentLifecycleService,
    id: AgentId,
    source: ExternalSource,
    report: StatusReport,
) -> Result<SyncResult> {
    limits::check_text("status", &report.status, limits::MAX_SHORT_TEXT_BYTES)?;
    limits::check_metadata("metadata", &report.metadata)?;
    service.catch_up_with_store().await?;
    let Some(target) = source.target(&report.status) else {
        return Ok(SyncResult {
            outcome: SyncOutcome::UnknownStatus,
            target: None,
            agent: service.get_agent(id)?,
            transitions: Vec::new(),
            message: format!(
                "{source} status {:?} is not one this source maps; nothing changed",
                report.status
            ),
        });
    };
    let mut metadata = report.metadata;
    metadata.insert("source".into(), source.as_str().into());
    metadata.insert("status".into(), report.status.clone().into());
    let change = ChangeRequest {
        reason: report
            .reason
            .unwrap_or_else(|| format!("{source} status {}", report.status)),
        triggered_by: report
            .triggered_by
            .unwrap_or_else(|| source.trigger().to_string()),
        metadata,
        expected_version: None,
        caller: report.caller,
        request_id: None,
    };
    let sync = StatusSync {
        service,
        id,
        source,
        target,
        status: &report.status,
        change,
    };
    let mut transitions = Vec::new();
    let mut based_on = 0;
    for _ in 0..ATTEMPTS {
        let agent = service.get_agent(id)?;
        based_on = agent.version;
        if let Some(result) = sync.attempt(agent, &mut transitions).await? {
            return Ok(result);
        }
    }
    // The agent kept changing under the sync: the caller may report again.
    Err(Error::Transition(TransitionError::VersionMismatch {
        agent_id: id,
        expected: based_on,
        actual: service.get_agent(id)?.version,
    }))
}

/// One status report being applied: what every attempt shares.
struct StatusSync<'a> {
    service: &'a AgentLifecycleService,
    id: AgentId,
    source: ExternalSource,
    target: AgentState,
    status: &'a str,
    /// The change each transition records (its expected version set per
    /// step).
    change: ChangeRequest,
}

impl StatusSync<'_> {
    /// One try from `agent` as read: settled when the agent is (or has
    /// become) where the status says or cannot get there; `None` when
    /// another writer moved the agent meanwhile.
    async fn attempt(
        &self,
        agent: Arc<Agent>,
        transitions: &mut Vec<Arc<TransitionRecord>>,
    ) -> Result<Option<SyncResult>> {
        let (source, target, status) = (self.source, self.target, self.status);
        if agent.state == target || satisfied_by(source, target, agent.state) {
            let outcome = if transitions.is_empty() {
                SyncOutcome::AlreadyInState
            } else {
                SyncOutcome::Applied
            };
            let message = format!(
                "{source} status {status} means {target}; agent is {}",
                agent.state
            );
            return Ok(Some(self.result(outcome, agent, transitions, message)));
        }
        let Some(path) = self.service.policy().path_to(agent.state, target) else {
            let message = format!(
                "{source} status {status} means {target}, which the policy does not reach from {}; nothing changed",
                agent.state
            );
            return Ok(Some(self.result(
                SyncOutcome::Unreachable,
                agent,
                transitions,
                message,
            )));
        };
        if !walk(
            self.service,
            self.id,
            &path,
            agent.version,
            &self.change,
            transitions,
        )
        .await?
        {
            return Ok(None);
        }
        self.service.metrics().sync_transitions(transitions.len());
        let agent = self.service.get_agent(self.id)?;
        let message = format!(
            "{source} status {status} means {target}: {} transition(s) recorded",
            transitions.len()
        );
        Ok(Some(self.result(
            SyncOutcome::Applied,
            agent,
            transitions,
            message,
        )))
    }

    fn result(
        &self,
        outcome: SyncOutcome,
        agent: Arc<Agent>,
        transitions: &mut Vec<Arc<TransitionRecord>>,
        message: String,
    ) -> SyncResult {
        SyncResult {
            outcome,
            target: Some(self.target),
            agent,
            transitions: std::mem::take(transitions),
            message,
        }
    }
}

/// Moves agent `id` along `path`, each step expecting the version the one
/// before left, adding the records to `transitions`. `Ok(false)` when
/// another writer changed the agent in between (the caller reads it again
/// and plans anew).
async fn walk(
    service: &AgentLifecycleService,
    id: AgentId,
    path: &[AgentState],
    mut version: u64,
    change: &ChangeRequest,
    transitions: &mut Vec<Arc<TransitionRecord>>,
) -> Result<bool> {
    for &step in path {
        let change = ChangeRequest {
            expected_version: Some(version),
            ..change.clone()
        };
        match service.transition(id, step, change).await {
            Ok(outcome) => {
                version = outcome.agent.version;
                transitions.extend(outcome.transitions);
            }
            Err(Error::Transition(TransitionError::VersionMismatch { .. })) => return Ok(false),
            Err(err) => return Err(err),
        }
    }
    Ok(true)
}
