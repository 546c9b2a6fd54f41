//! The RPCs that change an agent: RegisterAgent, TransitionAgent (DELETED
//! included), DeployAgent, StartAgent, StopAgent, AssignTask, CompleteTask,
//! HandleError, PutInMaintenance, ResumeFromMaintenance and
//! SyncExternalStatus.
//!
//! Each takes the caller the layer established, parses the request (the
//! fields every mutating request shares through `mutation.rs`), admits the
//! change under the agent's transition rate, calls the service and answers
//! with the agent and the transitions applied. Knows nothing of the
//! transport.

use std::future::Future;

use tonic::{Request, Response, Status};

use super::LifecycleHandler;
use crate::{
    api::grpc::{
        convert::{self, agent_id_from_pb},
        layer::caller_of,
        mutation::{MutatingRequest, MutationResponse},
        pb,
    },
    automation::sync::{self, StatusReport},
    domain::{AgentId, AgentState, ExternalSource, FieldViolation},
    service::{ChangeRequest, Outcome, Registration},
};

/// The steps of a mutating RPC with nothing of its own before the change:
/// the caller, the shared fields parsed, the agent's transition rate
/// admitted, then `act` with the agent, the request's own fields and the
/// change, and its outcome as the response.
async fn apply<Req, Resp, Act, Done>(
    handler: &LifecycleHandler,
    request: Request<Req>,
    act: Act,
) -> Result<Response<Resp>, Status>
where
    Req: MutatingRequest,
    Resp: MutationResponse,
    Act: FnOnce(AgentId, Req::Rest, ChangeRequest) -> Done,
    Done: Future<Output = crate::error::Result<Outcome>>,
{
    let caller = caller_of(&request);
    let (fields, rest) = request.into_inner().into_parts();
    let (id, change) = fields.parse(caller)?;
    handler.limits.admit_transition(&change.caller, id)?;
    let outcome = act(id, rest, change).await?;
    Ok(handler.reply(&outcome))
}

/// RegisterAgent: its `agent_id` is optional (empty: the service makes
/// one) and it has no `expected_version`.
pub(super) async fn register_agent(
    handler: &LifecycleHandler,
    request: Request<pb::RegisterAgentRequest>,
) -> Result<Response<pb::RegisterAgentResponse>, Status> {
    let caller = caller_of(&request);
    let pb::RegisterAgentRequest {
        agent_id,
        name,
        labels,
        reason,
        triggered_by,
        metadata,
        request_id,
    } = request.into_inner();
    let agent_id = if agent_id.is_empty() {
        None
    } else {
        Some(agent_id_from_pb("agent_id", &agent_id)?)
    };
    let registration = Registration {
        agent_id,
        name,
        labels: convert::labels_from_pb(labels),
        change: convert::change_from_pb(reason, triggered_by, metadata, None, caller, request_id)?,
    };
    let outcome = handler.service.register_agent(registration).await?;
    Ok(handler.reply(&outcome))
}

/// TransitionAgent: to DELETED only for callers who may delete.
pub(super) async fn transition_agent(
    handler: &LifecycleHandler,
    request: Request<pb::TransitionAgentRequest>,
) -> Result<Response<pb::TransitionAgentResponse>, Status> {
    let caller = caller_of(&request);
    let (fields, target_state) = request.into_inner().into_parts();
    let target = convert::state_from_pb("target_state", target_state)?;
    if target == AgentState::Deleted && !caller.may_delete() {
        return Err(caller.denied("delete agents").into());
    }
    let (id, change) = fields.parse(caller)?;
    handler.limits.admit_transition(&change.caller, id)?;
    let outcome = handler.service.transition(id, target, change).await?;
    Ok(handler.reply(&outcome))
}

pub(super) async fn deploy_agent(
    handler: &LifecycleHandler,
    request: Request<pb::DeployAgentRequest>,
) -> Result<Response<pb::DeployAgentResponse>, Status> {
    apply(handler, request, |id, (), change| {
        handler.service.deploy_agent(id, change)
    })
    .await
}

/// StartAgent: the heartbeat monitor decides whether the start waits for
/// the agent's first heartbeat.
pub(super) async fn start_agent(
    handler: &LifecycleHandler,
    request: Request<pb::StartAgentRequest>,
) -> Result<Response<pb::StartAgentResponse>, Status> {
    apply(handler, request, |id, wait_for_heartbeat, change| {
        handler.monitor.start(id, wait_for_heartbeat, change)
    })
    .await
}

pub(super) async fn stop_agent(
    handler: &LifecycleHandler,
    request: Request<pb::StopAgentRequest>,
) -> Result<Response<pb::StopAgentResponse>, Status> {
    apply(handler, request, |id, (), change| {
        handler.service.stop_agent(id, change)
    })
    .await
}

pub(super) async fn assign_task(
    handler: &LifecycleHandler,
    request: Request<pb::AssignTaskRequest>,
) -> Result<Response<pb::AssignTaskResponse>, Status> {
    apply(handler, request, |id, task_id, change| {
        handler.service.assign_task(id, task_id, change)
    })
    .await
}

pub(super) async fn complete_task(
    handler: &LifecycleHandler,
    request: Request<pb::CompleteTaskRequest>,
) -> Result<Response<pb::CompleteTaskResponse>, Status> {
    apply(handler, request, |id, task_id, change| {
        handler.service.complete_task(id, task_id, change)
    })
    .await
}

pub(super) async fn handle_error(
    handler: &LifecycleHandler,
    request: Request<pb::HandleErrorRequest>,
) -> Result<Response<pb::HandleErrorResponse>, Status> {
    apply(handler, request, |id, error_message, change| async move {
        handler
            .service
            .handle_error(id, &error_message, change)
            .await
    })
    .await
}

pub(super) async fn put_in_maintenance(
    handler: &LifecycleHandler,
    request: Request<pb::PutInMaintenanceRequest>,
) -> Result<Response<pb::PutInMaintenanceResponse>, Status> {
    apply(handler, request, |id, (), change| {
        handler.service.put_in_maintenance(id, change)
    })
    .await
}

pub(super) async fn resume_from_maintenance(
    handler: &LifecycleHandler,
    request: Request<pb::ResumeFromMaintenanceRequest>,
) -> Result<Response<pb::ResumeFromMaintenanceResponse>, Status> {
    apply(handler, request, |id, (), change| {
        handler.service.resume_from_maintenance(id, change)
    })
    .await
}

/// SyncExternalStatus: a platform's status mapped to a path of transitions
/// (`automation::sync`).
pub(super) async fn sync_external_status(
    handler: &LifecycleHandler,
    request: Request<pb::SyncExternalStatusRequest>,
) -> Result<Response<pb::SyncExternalStatusResponse>, Status> {
    let caller = caller_of(&request);
    let pb::SyncExternalStatusRequest {
        agent_id,
        source,
        status,
        metadata,
    } = request.into_inner();
    let id = agent_id_from_pb("agent_id", &agent_id)?;
    caller.check_agent(id)?;
    handler.limits.admit_transition(&caller, id)?;
    let source = source
        .parse::<ExternalSource>()
        .map_err(|e| FieldViolation::new("source", e))?;
    if status.trim().is_empty() {
        return Err(FieldViolation::new("status", "must not be empty").into());
    }
    let report = StatusReport {
        status,
        metadata: convert::metadata_from_pb("metadata", metadata)?,
        caller,
        ..StatusReport::default()
    };
    let result = sync::sync_external_status(&handler.service, id, source, report).await?;
    Ok(Response::new(convert::sync_result_to_pb(
        &result,
        handler.service.policy(),
    )))
}
