//! What transition hooks see and what they may answer.
//!
//! The hooks themselves (sync closures and async functions) live in the
//! service layer; this module only defines their payload and outcome.

use std::time::SystemTime;

use super::{agent::AgentId, agent::Metadata, state::AgentState};

/// When a hook runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HookPhase {
    /// Before the commit; may veto.
    PreTransition,
    /// After the commit and the publication of the event; only observes.
    PostTransition,
}

impl HookPhase {
    /// The seed's event names: `pre_transition`, `post_transition`.
    pub fn as_str(self) -> &'static str {
        match self {
            HookPhase::PreTransition => "pre_transition",
            HookPhase::PostTransition => "post_transition",
        }
    }
}

/// The payload handed to a hook (the seed's `data`).
#[derive(Clone, Debug, PartialEq)]
pub struct TransitionContext {
    /// The phase this call is for.
    pub phase: HookPhase,
    /// The agent.
    pub agent_id: AgentId,
    /// `None` for registration.
    pub from_state: Option<AgentState>,
    /// The target state.
    pub to_state: AgentState,
    /// The caller's reason.
    pub reason: String,
    /// The caller's `triggered_by`.
    pub triggered_by: String,
    /// The caller's metadata.
    pub metadata: Metadata,
    /// Set in post-transition: the committed sequence.
    pub sequence: Option<u64>,
    /// Set in post-transition: the agent's new version.
    pub version: Option<u64>,
    /// Set in post-transition: the commit time.
    pub timestamp: Option<SystemTime>,
}

/// A hook's answer other than success.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    /// Refuse the transition (only honoured before the commit).
    #[error("vetoed: {0}")]
    Veto(String),
    /// The hook failed; logged and counted, never stops a transition.
    #[error("hook failed: {0}")]
    Failed(String),
}
