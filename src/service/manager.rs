//! A handle on one agent: the seed's `AgentLifecycleManager`.

use std::sync::Arc;

use super::{AgentLifecycleService, ChangeRequest, HistoryQuery, Hook, StateInfo};
use crate::{
    domain::{Agent, AgentId, AgentState, HookPhase, Metadata, TransitionRecord},
    error::Result,
};

/// One agent's lifecycle, as the seed's manager exposed it. Reads see the
/// latest committed version; writes go through the service (same locking,
/// same commit path).
#[derive(Clone, Debug)]
pub struct AgentLifecycleManager {
    service: AgentLifecycleService,
    id: AgentId,
}

impl AgentLifecycleManager {
    pub(crate) fn new(service: AgentLifecycleService, id: AgentId) -> Self {
        AgentLifecycleManager { service, id }
    }

    /// The agent's id.
    pub fn agent_id(&self) -> AgentId {
        self.id
    }

    /// The latest committed version of the agent.
    pub fn agent(&self) -> Arc<Agent> {
        self.service
            .shared()
            .agent(self.id)
            .expect("a manager exists only for a registered agent, and agents are never removed")
    }

    /// The current state.
    pub fn current_state(&self) -> AgentState {
        self.agent().state
    }

    /// Whether the policy allows moving to `target` now.
    pub fn can_transition_to(&self, target: AgentState) -> bool {
        self.service.policy().allows(self.current_state(), target)
    }

    /// States the policy allows from the current state.
    pub fn get_valid_transitions(&self) -> Vec<AgentState> {
        self.service
            .policy()
            .allowed_targets(self.current_state())
            .to_vec()
    }

    /// Moves the agent to `target`; returns the recorded transition.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`]; a refused transition
    /// records nothing.
    pub async fn transition_to(
        &self,
        target: AgentState,
        reason: &str,
        triggered_by: &str,
        metadata: Metadata,
    ) -> Result<Arc<TransitionRecord>> {
        let change = ChangeRequest {
            reason: reason.to_string(),
            triggered_by: triggered_by.to_string(),
            metadata,
            expected_version: None,
            caller: crate::domain::Caller::anonymous(),
            request_id: None,
        };
        let outcome = self.service.transition(self.id, target, change).await?;
        Ok(outcome
            .transitions
            .into_iter()
            .next_back()
            .expect("a committed transition records exactly one step"))
    }

    /// The retained history, oldest first; with `limit`, only the newest
    /// `limit` transitions.
    ///
    /// # Errors
    /// A store failure.
    pub async fn get_state_history(
        &self,
        limit: Option<u64>,
    ) -> Result<Vec<Arc<TransitionRecord>>> {
        let mut query = HistoryQuery {
            limit: limit.unwrap_or(0),
            ..HistoryQuery::default()
        };
        let mut all = Vec::new();
        loop {
            let page = self.service.history(self.id, query).await?;
            all.extend(page.transitions);
            match page.next {
                Some(cursor) => query.cursor = Some(cursor),
                None => return Ok(all),
            }
        }
    }

    /// State, version, valid transitions and the category flags.
    pub fn get_current_state_info(&self) -> StateInfo {
        self.service.state_info(self.agent())
    }

    /// ONLINE, BUSY or IDLE.
    pub fn is_operational(&self) -> bool {
        self.current_state().is_operational()
    }

    /// ONLINE or IDLE.
    pub fn is_available_for_tasks(&self) -> bool {
        self.current_state().is_available_for_tasks()
    }

    /// ERROR, FAILED or TIMEOUT.
    pub fn is_in_error_state(&self) -> bool {
        self.current_state().is_error()
    }

    /// MAINTENANCE, SUSPENDED or UPDATING.
    pub fn is_in_maintenance(&self) -> bool {
        self.current_state().is_maintenance()
    }

    /// Registers a hook for this agent's transitions. It runs before the
    /// service-wide hooks of the same phase.
    pub fn on_event(&self, phase: HookPhase, hook: Hook) {
        self.service.on_agent_event(self.id, phase, hook);
    }
}
