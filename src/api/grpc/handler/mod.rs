//! `LifecycleHandler`: the RPCs of `agentlifecycle.v1.AgentLifecycleService`
//! over [`AgentLifecycleService`], a file per kind:
//!
//! - `mutate`: the RPCs that change an agent (RegisterAgent,
//!   TransitionAgent, DeployAgent, StartAgent, StopAgent, ...,
//!   SyncExternalStatus).
//! - `query`: the RPCs that read (GetAgent, ListAgents, GetAgentHistory,
//!   ListTransitions, metrics, transition rules, analytics).
//! - `watch`: WatchEvents end to end, and [`LifecycleServer`], the service
//!   as served, with each event encoded once.
//! - `heartbeat`: Heartbeat and HeartbeatStream, and agents on the wire
//!   with their last heartbeat.
//!
//! Every RPC shows its steps: a mutating RPC takes the caller that the
//! [`CallLayer`](super::layer::CallLayer) put into the request's extensions
//! and hands it to the service with the change; every RPC parses its request
//! (a `FieldViolation` becomes INVALID_ARGUMENT), calls the service and
//! converts the outcome. Errors become a `Status` only through `status.rs`:
//! `?` uses its `From` impls. The request and response shapes that mutating
//! RPCs share are in `mutation.rs`.
//!
//! The generated trait's impl here is the table of RPCs: each method names
//! the function that answers it. Depends on the service, the automation it
//! drives (heartbeats, sync, analytics), the conversions and the layer's
//! caller; of the transport, only `watch` knows tonic's serving plumbing.

use std::sync::Arc;

use tonic::{Request, Response, Status};

pub use self::watch::LifecycleServer;
use super::{mutation::MutationResponse, pb, rate_limit::Limits};
use crate::{
    automation::health::{HealthSettings, HeartbeatMonitor},
    service::{AgentLifecycleService, Outcome},
};

mod heartbeat;
mod mutate;
mod query;
mod watch;

/// Serves `agentlifecycle.v1.AgentLifecycleService`.
#[derive(Clone, Debug)]
pub struct LifecycleHandler {
    service: AgentLifecycleService,
    /// Heartbeats (and the monitor's bookkeeping), shared with the running
    /// heartbeat monitor when there is one.
    monitor: HeartbeatMonitor,
    /// Transition rates and watch caps (none unless set).
    limits: Arc<Limits>,
}

impl LifecycleHandler {
    /// A handler over `service`, with heartbeat tracking of its own.
    pub fn new(service: AgentLifecycleService) -> Self {
        let monitor = HeartbeatMonitor::new(service.clone(), HealthSettings::default());
        Self::with_heartbeat_monitor(service, monitor)
    }

    /// A handler over `service` that records heartbeats in `monitor` (the
    /// one that watches them).
    pub fn with_heartbeat_monitor(
        service: AgentLifecycleService,
        monitor: HeartbeatMonitor,
    ) -> Self {
        LifecycleHandler {
            service,
            monitor,
            limits: Arc::default(),
        }
    }

    /// This handler with `limits`.
    pub fn with_limits(mut self, limits: Arc<Limits>) -> Self {
        self.limits = limits;
        self
    }

    /// The service this handler calls.
    pub fn service(&self) -> &AgentLifecycleService {
        &self.service
    }

    /// The response of a mutating RPC for `outcome`.
    fn reply<R: MutationResponse>(&self, outcome: &Outcome) -> Response<R> {
        Response::new(R::from_outcome(outcome, self.service.policy()))
    }
}

#[tonic::async_trait]
impl pb::agent_lifecycle_service_server::AgentLifecycleService for LifecycleHandler {
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        mutate::register_agent(self, request).await
    }

    async fn transition_agent(
        &self,
        request: Request<pb::TransitionAgentRequest>,
    ) -> Result<Response<pb::TransitionAgentResponse>, Status> {
        mutate::transition_agent(self, request).await
    }

    async fn deploy_agent(
        &self,
        request: Request<pb::DeployAgentRequest>,
    ) -> Result<Response<pb::DeployAgentResponse>, Status> {
        mutate::deploy_agent(self, request).await
    }

    async fn start_agent(
        &self,
        request: Request<pb::StartAgentRequest>,
    ) -> Result<Response<pb::StartAgentResponse>, Status> {
        mutate::start_agent(self, request).await
    }

    async fn stop_agent(
        &self,
        request: Request<pb::StopAgentRequest>,
    ) -> Result<Response<pb::StopAgentResponse>, Status> {
        mutate::stop_agent(self, request).await
    }

    async fn assign_task(
        &self,
        request: Request<pb::AssignTaskRequest>,
    ) -> Result<Response<pb::AssignTaskResponse>, Status> {
        mutate::assign_task(self, request).await
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        mutate::complete_task(self, request).await
    }

    async fn handle_error(
        &self,
        request: Request<pb::HandleErrorRequest>,
    ) -> Result<Response<pb::HandleErrorResponse>, Status> {
        mutate::handle_error(self, request).await
    }

    async fn put_in_maintenance(
        &self,
        request: Request<pb::PutInMaintenanceRequest>,
    ) -> Result<Response<pb::PutInMaintenanceResponse>, Status> {
        mutate::put_in_maintenance(self, request).await
    }

    async fn resume_from_maintenance(
        &self,
        request: Request<pb::ResumeFromMaintenanceRequest>,
    ) -> Result<Response<pb::ResumeFromMaintenanceResponse>, Status> {
        mutate::resume_from_maintenance(self, request).await
    }

    async fn sync_external_status(
        &self,
        request: Request<pb::SyncExternalStatusRequest>,
    ) -> Result<Response<pb::SyncExternalStatusResponse>, Status> {
        mutate::sync_external_status(self, request).await
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        query::get_agent(self, request).await
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        query::list_agents(self, request).await
    }

    async fn get_agent_history(
        &self,
        request: Request<pb::GetAgentHistoryRequest>,
    ) -> Result<Response<pb::GetAgentHistoryResponse>, Status> {
        query::get_agent_history(self, request).await
    }

    async fn list_transitions(
        &self,
        request: Request<pb::ListTransitionsRequest>,
    ) -> Result<Response<pb::ListTransitionsResponse>, Status> {
        query::list_transitions(self, request).await
    }

    async fn get_lifecycle_metrics(
        &self,
        request: Request<pb::GetLifecycleMetricsRequest>,
    ) -> Result<Response<pb::GetLifecycleMetricsResponse>, Status> {
        query::get_lifecycle_metrics(self, request).await
    }

    async fn get_transition_rules(
        &self,
        request: Request<pb::GetTransitionRulesRequest>,
    ) -> Result<Response<pb::GetTransitionRulesResponse>, Status> {
        query::get_transition_rules(self, request).await
    }

    async fn get_agent_analytics(
        &self,
        request: Request<pb::GetAgentAnalyticsRequest>,
    ) -> Result<Response<pb::GetAgentAnalyticsResponse>, Status> {
        query::get_agent_analytics(self, request).await
    }

    async fn get_fleet_analytics(
        &self,
        request: Request<pb::GetFleetAnalyticsRequest>,
    ) -> Result<Response<pb::GetFleetAnalyticsResponse>, Status> {
        query::get_fleet_analytics(self, request).await
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        heartbeat::heartbeat(self, request).await
    }

    async fn heartbeat_stream(
        &self,
        request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<pb::HeartbeatStreamResponse>, Status> {
        heartbeat::heartbeat_stream(self, request).await
    }

    type WatchEventsStream = watch::GeneratedWatchStream;

    /// Never reached: see `watch::watch_events`.
    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        watch::watch_events(request).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use pb::agent_lifecycle_service_server::AgentLifecycleService as _;

    use super::*;
    use crate::{api::grpc::convert, service::WatchItem};

    /// Handlers called directly: registration and a deploy convert their
    /// outcomes; WatchEvents replays the registration from sequence 1; bad
    /// input is INVALID_ARGUMENT; the generated `watch_events` answers
    /// UNIMPLEMENTED because [`LifecycleServer`](super::LifecycleServer)
    /// serves the RPC.
    #[tokio::test]
    async fn handlers_convert_and_watch_replays() {
        let service = AgentLifecycleService::in_memory().expect("service");
        let handler = LifecycleHandler::new(service.clone());
        let registered = handler
            .register_agent(Request::new(pb::RegisterAgentRequest::default()))
            .await
            .expect("register")
            .into_inner();
        let agent = registered.agent.expect("agent");
        assert_eq!(registered.transitions.len(), 1);
        let deployed = handler
            .deploy_agent(Request::new(pb::DeployAgentRequest {
                agent_id: agent.agent_id.clone(),
                ..Default::default()
            }))
            .await
            .expect("deploy")
            .into_inner();
        assert_eq!(deployed.transitions.len(), 2);
        assert_eq!(deployed.agent.expect("agent").version, 3);

        let request = pb::WatchEventsRequest {
            start_sequence: 1,
            ..Default::default()
        };
        let mut items = handler.watch(Request::new(request)).await.expect("watch");
        let first = tokio::time::timeout(Duration::from_secs(10), items.next())
            .await
            .expect("in time")
            .expect("an item")
            .expect("ok");
        let WatchItem::Event(event) = first else {
            panic!("expected an event, got {first:?}");
        };
        assert_eq!(event.sequence(), 1);
        assert_eq!(convert::agent_to_pb(&event.agent, service.policy()), agent);

        let err = handler
            .get_agent(Request::new(pb::GetAgentRequest {
                agent_id: "x".into(),
                ..Default::default()
            }))
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = handler
            .transition_agent(Request::new(pb::TransitionAgentRequest {
                agent_id: agent.agent_id.clone(),
                ..Default::default()
            }))
            .await
            .expect_err("no target");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("target_state"), "{}", err.message());
        let err = handler
            .watch_events(Request::new(pb::WatchEventsRequest::default()))
            .await
            .err()
            .expect("not routed here");
        assert_eq!(err.code(), tonic::Code::Unimplemented);
    }
}
