//! The shape every mutating RPC shares, as two traits: a request carries
//! `agent_id`, `reason`, `triggered_by`, `metadata` and `expected_version`
//! next to its own fields ([`MutatingRequest`]); a response is the agent
//! after the change plus the transitions applied ([`MutationResponse`]).
//!
//! The impls are written once, by `mutating_request!` and
//! `mutation_response!`, one line per message. Each destructures or builds
//! its message completely, so a field added to the proto fails to compile
//! here until someone decides where it goes.
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

/// Implements [`MutatingRequest`] for one request message: `{ own fields }`
/// names the fields only it has, `-> Rest = value` what `into_parts` returns
/// for them; `without reason` marks a request with no `reason` field.
///
/// The message is destructured completely (no `..`), so a field added to the
/// proto fails to compile here until someone decides where it goes.
macro_rules! mutating_request {
    ($(#[$doc:meta])* $request:path { $($own:ident),* } -> $rest:ty = $value:expr) => {
        mutating_request!(@impl $(#[$doc])* $request { $($own,)* reason, } reason, $rest, $value);
    };
    ($(#[$doc:meta])* $request:path { $($own:ident),* } without reason -> $rest:ty = $value:expr) => {
        mutating_request!(@impl $(#[$doc])* $request { $($own,)* } String::new(), $rest, $value);
    };
    (@impl $(#[$doc:meta])* $request:path { $($field:ident,)* } $reason:expr, $rest:ty, $value:expr) => {
        impl MutatingRequest for $request {
            $(#[$doc])*
            type Rest = $rest;

            fn into_parts(self) -> (ChangeFields, $rest) {
                let $request {
                    agent_id,
                    triggered_by,
                    metadata,
                    expected_version,
                    request_id,
                    $($field,)*
                } = self;
                let fields = ChangeFields {
                    agent_id,
                    reason: $reason,
                    triggered_by,
                    metadata,
                    expected_version,
                    request_id,
                };
                (fields, $value)
            }
        }
    };
}

mutating_request!(
    /// `target_state`, as its wire number.
    pb::TransitionAgentRequest { target_state } -> i32 = target_state
);
mutating_request!(pb::DeployAgentRequest {} -> () = ());
mutating_request!(
    /// `wait_for_heartbeat`.
    pb::StartAgentRequest { wait_for_heartbeat } -> Option<bool> = wait_for_heartbeat
);
mutating_request!(pb::StopAgentRequest {} -> () = ());
mutating_request!(
    /// `task_id`; `None` when empty.
    pb::AssignTaskRequest { task_id } -> Option<String> = Some(task_id).filter(|t| !t.is_empty())
);
mutating_request!(
    /// `task_id`; `None` when empty.
    pb::CompleteTaskRequest { task_id } -> Option<String> = Some(task_id).filter(|t| !t.is_empty())
);
mutating_request!(
    /// `error_message`. The request has no `reason`: the service builds it
    /// from the message.
    pb::HandleErrorRequest { error_message } without reason -> String = error_message
);
mutating_request!(pb::PutInMaintenanceRequest {} -> () = ());
mutating_request!(pb::ResumeFromMaintenanceRequest {} -> () = ());

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

/// Implements [`MutationResponse`] for response messages that are exactly
/// `agent` and `transitions` (the struct literal has no `..`, so a field
/// added to one of them fails to compile here).
macro_rules! mutation_response {
    ($($response:path),* $(,)?) => {$(
        impl MutationResponse for $response {
            fn from_parts(agent: pb::Agent, transitions: Vec<pb::StateTransition>) -> Self {
                $response {
                    agent: Some(agent),
                    transitions,
                }
            }
        }
    )*};
}

mutation_response!(
    pb::RegisterAgentResponse,
    pb::TransitionAgentResponse,
    pb::DeployAgentResponse,
    pb::StartAgentResponse,
    pb::StopAgentResponse,
    pb::AssignTaskResponse,
    pb::CompleteTaskResponse,
    pb::HandleErrorResponse,
    pb::PutInMaintenanceResponse,
    pb::ResumeFromMaintenanceResponse,
);

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
