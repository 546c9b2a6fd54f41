//! The domain's errors: why a transition or a call was refused.

use super::{agent::AgentId, caller::Role, state::AgentState};

/// A transition the domain refuses. Nothing is recorded for any of these.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// The policy has no edge `from -> to`.
    #[error("agent {agent_id}: cannot transition from {from} to {to} (allowed: {})", list(.allowed))]
    NotAllowed {
        /// The agent.
        agent_id: AgentId,
        /// Its current state.
        from: AgentState,
        /// The refused target.
        to: AgentState,
        /// What the policy allows from `from`.
        allowed: Vec<AgentState>,
    },
    /// The caller's `expected_version` is not the agent's version.
    #[error("agent {agent_id}: expected version {expected} but found version {actual}")]
    VersionMismatch {
        /// The agent.
        agent_id: AgentId,
        /// What the caller expected.
        expected: u64,
        /// What the agent has.
        actual: u64,
    },
    /// The operation needs the agent in one of `required` (AssignTask needs
    /// ONLINE or IDLE, CompleteTask BUSY, ResumeFromMaintenance MAINTENANCE).
    #[error("agent {agent_id}: {operation} needs state {} but the agent is {state}", list(.required))]
    RequiresState {
        /// The agent.
        agent_id: AgentId,
        /// The operation (`assign_task`, ...).
        operation: &'static str,
        /// Its current state.
        state: AgentState,
        /// States the operation accepts.
        required: Vec<AgentState>,
    },
    /// A pre-transition hook vetoed the change.
    #[error("agent {agent_id}: transition from {} to {to} vetoed: {reason}", .from.map_or("nothing (registration)", AgentState::as_str))]
    Vetoed {
        /// The agent.
        agent_id: AgentId,
        /// Its current state; `None` for a registration.
        from: Option<AgentState>,
        /// The refused target.
        to: AgentState,
        /// The hook's reason.
        reason: String,
    },
}

/// A caller whose role does not allow the call (or not for this agent).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: {principal} ({role}) may not {action}")]
pub struct PermissionDenied {
    /// Who asked.
    pub principal: String,
    /// Its role.
    pub role: Role,
    /// What it may not do, e.g. "act for agent X" or "delete agents".
    pub action: String,
}

pub(crate) fn list(states: &[AgentState]) -> String {
    if states.is_empty() {
        return "none".to_string();
    }
    states
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
