//! The shape every mutating RPC shares, as two traits: a request carries
//! `agent_id`, `reason`, `triggered_by`, `metadata` and `expected_version`
//! next to its own fields ([`MutatingRequest`]); a response is the agent
//! after the change plus the transitions applied ([`MutationResponse`]).
//!
//! Each impl destructures its message completely, so a field added to the
//! proto fails to compile here until someone decides where it goes.
//! RegisterAgent is not a [`MutatingRequest`]: its `agent_id` is optional and
//! it has no `expected_version`. Depends on the generated `pb` types, the
//! conversions and the service's request types only.

use prost_types::Struct;

use super::{
    convert::{agent_id_from_pb, agent_to_pb, change_from_pb, transition_to_pb},
    pb,
};
use crate::{
    domain::{AgentId, Caller, TransitionPolicy},
    service::{ChangeRequest, Outcome},
};

/// The fields a mutating request shares with every other one, as sent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeFields {
    /// The agent to change (UUID text).
    pub agent_id: String,
    /// Why; empty takes the operation's default.
    pub reason: String,
    /// Who; empty takes `system`.
    pub triggered_by: String,
    /// Recorded with every transition of the change.
    pub metadata: Option<Struct>,
    /// Compare-and-set on the agent's version.
    pub expected_version: Option<u64>,
    /// Idempotency key; empty for none.
    pub request_id: String,
}

impl ChangeFields {
    /// The agent id and the service's change request, made by `caller`.
    ///
    /// # Errors
    /// A missing or malformed `agent_id`, metadata JSON cannot hold, or an
    /// agent principal asking about another agent.
    pub fn parse(self, caller: Caller) -> Result<(AgentId, ChangeRequest), crate::Error> {
        let id = agent_id_from_pb("agent_id", &self.agent_id)?;
        caller.check_agent(id)?;
        let change = change_from_pb(
            self.reason,
            self.triggered_by,
            self.metadata,
            self.expected_version,
            caller,
            self.request_id,
        )?;
        Ok((id, change))
    }
}

/// A mutating request: the shared [`ChangeFields`] plus its own fields.
pub trait MutatingRequest {
    /// The fields only this request has (`()` when it has none).
    type Rest;

    /// Splits the request into the shared fields and its own.
    fn into_parts(self) -> (ChangeFields, Self::Rest);
}

impl MutatingRequest for pb::TransitionAgentRequest {
    /// `target_state`, as its wire number.
    type Rest = i32;

    fn into_parts(self) -> (ChangeFields, i32) {
        let pb::TransitionAgentRequest {
            agent_id,
            target_state,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, target_state)
    }
}

impl MutatingRequest for pb::DeployAgentRequest {
    type Rest = ();

    fn into_parts(self) -> (ChangeFields, ()) {
        let pb::DeployAgentRequest {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, ())
    }
}

impl MutatingRequest for pb::StartAgentRequest {
    /// `wait_for_heartbeat`.
    type Rest = Option<bool>;

    fn into_parts(self) -> (ChangeFields, Option<bool>) {
        let pb::StartAgentRequest {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            wait_for_heartbeat,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, wait_for_heartbeat)
    }
}

impl MutatingRequest for pb::StopAgentRequest {
    type Rest = ();

    fn into_parts(self) -> (ChangeFields, ()) {
        let pb::StopAgentRequest {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, ())
    }
}

impl MutatingRequest for pb::AssignTaskRequest {
    /// `task_id`; `None` when empty.
    type Rest = Option<String>;

    fn into_parts(self) -> (ChangeFields, Option<String>) {
        let pb::AssignTaskRequest {
            agent_id,
            task_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, Some(task_id).filter(|t| !t.is_empty()))
    }
}

impl MutatingRequest for pb::CompleteTaskRequest {
    /// `task_id`; `None` when empty.
    type Rest = Option<String>;

    fn into_parts(self) -> (ChangeFields, Option<String>) {
        let pb::CompleteTaskRequest {
            agent_id,
            task_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, Some(task_id).filter(|t| !t.is_empty()))
    }
}

impl MutatingRequest for pb::HandleErrorRequest {
    /// `error_message`. The request has no `reason`: the service builds it
    /// from the message.
    type Rest = String;

    fn into_parts(self) -> (ChangeFields, String) {
        let pb::HandleErrorRequest {
            agent_id,
            error_message,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason: String::new(),
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, error_message)
    }
}

impl MutatingRequest for pb::PutInMaintenanceRequest {
    type Rest = ();

    fn into_parts(self) -> (ChangeFields, ()) {
        let pb::PutInMaintenanceRequest {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, ())
    }
}

impl MutatingRequest for pb::ResumeFromMaintenanceRequest {
    type Rest = ();

    fn into_parts(self) -> (ChangeFields, ()) {
        let pb::ResumeFromMaintenanceRequest {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        } = self;
        let fields = ChangeFields {
            agent_id,
            reason,
            triggered_by,
            metadata,
            expected_version,
            request_id,
        };
        (fields, ())
    }
}

/// The response of a mutating RPC: `agent` and `transitions`.
pub trait MutationResponse: Sized {
    /// The response carrying `agent` and `transitions` (in the order applied).
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self;

    /// The response for `outcome`. The agent's `valid_transitions` come
    /// from `policy`, the one the service applied.
    fn from_outcome(outcome: &Outcome, policy: &TransitionPolicy) -> Self {
        Self::from_parts(
            agent_to_pb(&outcome.agent, policy),
            outcome
                .transitions
                .iter()
                .map(|record| transition_to_pb(record))
                .collect(),
        )
    }
}

impl MutationResponse for pb::RegisterAgentResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::RegisterAgentResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::TransitionAgentResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::TransitionAgentResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::DeployAgentResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::DeployAgentResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::StartAgentResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::StartAgentResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::StopAgentResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::StopAgentResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::AssignTaskResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::AssignTaskResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::CompleteTaskResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::CompleteTaskResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::HandleErrorResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::HandleErrorResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::PutInMaintenanceResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::PutInMaintenanceResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

impl MutationResponse for pb::ResumeFromMaintenanceResponse {
    fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
        pb::ResumeFromMaintenanceResponse {
            agent: Some(agent),
            transitions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_fields_are_split_off_and_the_caller_is_kept() {
        let id = AgentId::generate();
        let request = pb::AssignTaskRequest {
            agent_id: id.to_string(),
            task_id: "t-1".into(),
            reason: "work".into(),
            triggered_by: "scheduler".into(),
            metadata: None,
            expected_version: Some(4),
            request_id: "r-1".into(),
        };
        let (fields, task_id) = request.into_parts();
        assert_eq!(task_id.as_deref(), Some("t-1"));
        let (parsed, change) = fields.parse(Caller::principal("alice")).expect("valid");
        assert_eq!(parsed, id);
        assert_eq!(change.reason, "work");
        assert_eq!(change.triggered_by, "scheduler");
        assert_eq!(change.expected_version, Some(4));
        assert_eq!(change.request_id.as_deref(), Some("r-1"));
        assert_eq!(change.caller, Caller::principal("alice"));

        let (fields, message) = pb::HandleErrorRequest {
            agent_id: "not-a-uuid".into(),
            error_message: "boom".into(),
            ..Default::default()
        }
        .into_parts();
        assert_eq!(message, "boom");
        assert!(fields.reason.is_empty());
        let err = fields.parse(Caller::anonymous()).expect_err("bad id");
        assert!(
            matches!(&err, crate::Error::InvalidArgument(v) if v.field == "agent_id"),
            "{err}"
        );
    }
}
