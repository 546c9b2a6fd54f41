//! `LifecycleHandler`: the generated service trait over
//! [`AgentLifecycleService`]. Each method validates and converts the
//! request, calls the service, and converts the result; errors become a
//! `Status` only through `status.rs`.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{
    convert::{self, agent_id_from_pb, change_from_pb},
    pb,
};
use crate::{
    Error,
    domain::{FieldViolation, LifecycleEvent, TransitionPolicy},
    service::{
        AgentFilter, AgentLifecycleService, HistoryQuery, Outcome, Registration, WatchItem,
        WatchRequest, Watcher,
    },
};

/// Default ListAgents page size.
pub const DEFAULT_LIST_PAGE: usize = 100;
/// Largest ListAgents page.
pub const MAX_LIST_PAGE: usize = 1000;

/// Serves `agentlifecycle.v1.AgentLifecycleService`.
#[derive(Clone, Debug)]
pub struct LifecycleHandler {
    service: AgentLifecycleService,
}

impl LifecycleHandler {
    /// A handler over `service`.
    pub fn new(service: AgentLifecycleService) -> Self {
        LifecycleHandler { service }
    }

    fn parts(&self, outcome: Outcome) -> (Option<pb::Agent>, Vec<pb::StateTransition>) {
        (
            Some(convert::agent_to_pb(&outcome.agent, self.service.policy())),
            outcome
                .transitions
                .iter()
                .map(|r| convert::transition_to_pb(r))
                .collect(),
        )
    }
}

fn invalid(v: FieldViolation) -> Status {
    Status::from(Error::InvalidArgument(v))
}

/// The response type of a mutating RPC, built from an outcome.
macro_rules! mutation {
    ($self:ident, $resp:ident, $call:expr) => {{
        let outcome = $call.await.map_err(Status::from)?;
        let (agent, transitions) = $self.parts(outcome);
        Ok(Response::new(pb::$resp { agent, transitions }))
    }};
}

/// A mutating request with only the common fields (agent_id, reason,
/// triggered_by, metadata, expected_version), applied by one service method.
macro_rules! plain_operation {
    ($self:ident, $request:ident, $resp:ident, $method:ident) => {{
        let r = $request.into_inner();
        let (id, change) = parse_change(
            &r.agent_id,
            r.reason,
            r.triggered_by,
            r.metadata,
            r.expected_version,
        )?;
        mutation!($self, $resp, $self.service.$method(id, change))
    }};
}

/// The agent id and the change of a mutating request.
fn parse_change(
    agent_id: &str,
    reason: String,
    triggered_by: String,
    metadata: Option<prost_types::Struct>,
    expected_version: Option<u64>,
) -> Result<(crate::domain::AgentId, crate::service::ChangeRequest), Status> {
    let id = agent_id_from_pb("agent_id", agent_id).map_err(invalid)?;
    let change =
        change_from_pb(reason, triggered_by, metadata, expected_version).map_err(invalid)?;
    Ok((id, change))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_lifecycle_service_server::AgentLifecycleService for LifecycleHandler {
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let r = request.into_inner();
        let agent_id = if r.agent_id.is_empty() {
            None
        } else {
            Some(agent_id_from_pb("agent_id", &r.agent_id).map_err(invalid)?)
        };
        let registration = Registration {
            agent_id,
            name: r.name,
            labels: convert::labels_from_pb(r.labels),
            change: change_from_pb(r.reason, r.triggered_by, r.metadata, None).map_err(invalid)?,
        };
        mutation!(
            self,
            RegisterAgentResponse,
            self.service.register_agent(registration)
        )
    }

    async fn transition_agent(
        &self,
        request: Request<pb::TransitionAgentRequest>,
    ) -> Result<Response<pb::TransitionAgentResponse>, Status> {
        let r = request.into_inner();
        let (id, change) = parse_change(
            &r.agent_id,
            r.reason,
            r.triggered_by,
            r.metadata,
            r.expected_version,
        )?;
        let target = convert::state_from_pb("target_state", r.target_state).map_err(invalid)?;
        mutation!(
            self,
            TransitionAgentResponse,
            self.service.transition(id, target, change)
        )
    }

    async fn deploy_agent(
        &self,
        request: Request<pb::DeployAgentRequest>,
    ) -> Result<Response<pb::DeployAgentResponse>, Status> {
        plain_operation!(self, request, DeployAgentResponse, deploy_agent)
    }

    async fn start_agent(
        &self,
        request: Request<pb::StartAgentRequest>,
    ) -> Result<Response<pb::StartAgentResponse>, Status> {
        plain_operation!(self, request, StartAgentResponse, start_agent)
    }

    async fn stop_agent(
        &self,
        request: Request<pb::StopAgentRequest>,
    ) -> Result<Response<pb::StopAgentResponse>, Status> {
        plain_operation!(self, request, StopAgentResponse, stop_agent)
    }

    async fn assign_task(
        &self,
        request: Request<pb::AssignTaskRequest>,
    ) -> Result<Response<pb::AssignTaskResponse>, Status> {
        let r = request.into_inner();
        let (id, change) = parse_change(
            &r.agent_id,
            r.reason,
            r.triggered_by,
            r.metadata,
            r.expected_version,
        )?;
        let task_id = Some(r.task_id).filter(|t| !t.is_empty());
        mutation!(
            self,
            AssignTaskResponse,
            self.service.assign_task(id, task_id, change)
        )
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let r = request.into_inner();
        let (id, change) = parse_change(
            &r.agent_id,
            r.reason,
            r.triggered_by,
            r.metadata,
            r.expected_version,
        )?;
        let task_id = Some(r.task_id).filter(|t| !t.is_empty());
        mutation!(
            self,
            CompleteTaskResponse,
            self.service.complete_task(id, task_id, change)
        )
    }

    async fn handle_error(
        &self,
        request: Request<pb::HandleErrorRequest>,
    ) -> Result<Response<pb::HandleErrorResponse>, Status> {
        let r = request.into_inner();
        let (id, change) = parse_change(
            &r.agent_id,
            String::new(),
            r.triggered_by,
            r.metadata,
            r.expected_version,
        )?;
        mutation!(
            self,
            HandleErrorResponse,
            self.service.handle_error(id, &r.error_message, change)
        )
    }

    async fn put_in_maintenance(
        &self,
        request: Request<pb::PutInMaintenanceRequest>,
    ) -> Result<Response<pb::PutInMaintenanceResponse>, Status> {
        plain_operation!(self, request, PutInMaintenanceResponse, put_in_maintenance)
    }

    async fn resume_from_maintenance(
        &self,
        request: Request<pb::ResumeFromMaintenanceRequest>,
    ) -> Result<Response<pb::ResumeFromMaintenanceResponse>, Status> {
        plain_operation!(
            self,
            request,
            ResumeFromMaintenanceResponse,
            resume_from_maintenance
        )
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let r = request.into_inner();
        let id = agent_id_from_pb("agent_id", &r.agent_id).map_err(invalid)?;
        let agent = self.service.get_agent(id).map_err(Status::from)?;
        Ok(Response::new(pb::GetAgentResponse {
            agent: Some(convert::agent_to_pb(&agent, self.service.policy())),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let r = request.into_inner();
        let filter = AgentFilter {
            states: convert::states_from_pb("states", &r.states)
                .map_err(invalid)?
                .into_iter()
                .collect(),
            category: convert::category_from_pb(r.category).map_err(invalid)?,
            labels: convert::labels_from_pb(r.labels),
        };
        let after = convert::parse_list_token(&r.page_token).map_err(invalid)?;
        let limit = match r.page_size as usize {
            0 => DEFAULT_LIST_PAGE,
            n => n.min(MAX_LIST_PAGE),
        };
        let (agents, next) = self
            .service
            .list_agents(&filter, after, limit)
            .map_err(Status::from)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .iter()
                .map(|a| convert::agent_to_pb(a, self.service.policy()))
                .collect(),
            next_page_token: next.map(convert::list_token).unwrap_or_default(),
        }))
    }

    async fn get_agent_history(
        &self,
        request: Request<pb::GetAgentHistoryRequest>,
    ) -> Result<Response<pb::GetAgentHistoryResponse>, Status> {
        let r = request.into_inner();
        let id = agent_id_from_pb("agent_id", &r.agent_id).map_err(invalid)?;
        let query = HistoryQuery {
            limit: u64::from(r.limit),
            page_size: r.page_size as usize,
            cursor: convert::parse_history_token(&r.page_token).map_err(invalid)?,
        };
        let page = self
            .service
            .history(id, query)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(pb::GetAgentHistoryResponse {
            transitions: page
                .transitions
                .iter()
                .map(|r| convert::transition_to_pb(r))
                .collect(),
            total_count: page.total_count,
            next_page_token: page.next.map(convert::history_token).unwrap_or_default(),
        }))
    }

    async fn get_lifecycle_metrics(
        &self,
        _request: Request<pb::GetLifecycleMetricsRequest>,
    ) -> Result<Response<pb::GetLifecycleMetricsResponse>, Status> {
        Ok(Response::new(convert::metrics_to_pb(
            &self.service.get_lifecycle_metrics(),
        )))
    }

    async fn get_transition_rules(
        &self,
        _request: Request<pb::GetTransitionRulesRequest>,
    ) -> Result<Response<pb::GetTransitionRulesResponse>, Status> {
        let policy = self.service.policy();
        let rules = crate::domain::AgentState::ALL
            .iter()
            .map(|from| pb::TransitionRule {
                from_state: convert::state_to_pb(*from) as i32,
                allowed_targets: policy
                    .allowed_targets(*from)
                    .iter()
                    .map(|s| convert::state_to_pb(*s) as i32)
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::GetTransitionRulesResponse { rules }))
    }

    type WatchEventsStream = WatchStream;

    /// Served by `fanout::LifecycleServer` in the real server (events
    /// encoded once); this path serves the generated server used alone.
    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let watcher = self.open_watcher(request.into_inner())?;
        let policy = self.service.policy().clone();
        let stream =
            futures_util::stream::unfold((watcher, policy), |(mut watcher, policy)| async move {
                let item = watcher.next().await?;
                let message = item
                    .map(|item| item_to_pb(item, &policy))
                    .map_err(Status::from);
                Some((message, (watcher, policy)))
            });
        Ok(Response::new(stream.boxed()))
    }
}

impl LifecycleHandler {
    /// The active policy.
    pub(crate) fn policy(&self) -> &TransitionPolicy {
        self.service.policy()
    }

    /// Validates a WatchEvents request and opens the watcher.
    pub(crate) fn open_watcher(&self, r: pb::WatchEventsRequest) -> Result<Watcher, Status> {
        let agent_ids = r
            .agent_ids
            .iter()
            .map(|id| agent_id_from_pb("agent_ids", id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let watch = WatchRequest {
            agent_ids,
            states: convert::states_from_pb("states", &r.states).map_err(invalid)?,
            kinds: convert::event_kinds_from_pb(&r.event_types).map_err(invalid)?,
            labels: convert::labels_from_pb(r.labels),
            start_sequence: r.start_sequence,
            include_snapshot: r.include_snapshot,
        };
        self.service.watch(watch).map_err(Status::from)
    }
}

/// The stream message carrying `event`.
pub(crate) fn event_message(
    event: &LifecycleEvent,
    policy: &TransitionPolicy,
) -> pb::WatchEventsResponse {
    pb::WatchEventsResponse {
        kind: Some(pb::watch_events_response::Kind::Event(pb::LifecycleEvent {
            sequence: event.sequence(),
            agent_id: event.record.agent_id.to_string(),
            r#type: convert::kind_to_pb(event.kind()) as i32,
            transition: Some(convert::transition_to_pb(&event.record)),
            agent: Some(convert::agent_to_pb(&event.agent, policy)),
        })),
    }
}

/// The stream message for any watch item.
pub(crate) fn item_to_pb(item: WatchItem, policy: &TransitionPolicy) -> pb::WatchEventsResponse {
    use pb::watch_events_response::Kind;
    let kind = match item {
        WatchItem::Event(event) => return event_message(&event, policy),
        WatchItem::Progress { head_sequence } => Kind::Progress(pb::Progress { head_sequence }),
        WatchItem::SnapshotAgent(agent) => {
            Kind::SnapshotAgent(convert::agent_to_pb(&agent, policy))
        }
        WatchItem::SnapshotComplete {
            head_sequence,
            agent_count,
        } => Kind::SnapshotComplete(pb::SnapshotComplete {
            head_sequence,
            agent_count,
        }),
    };
    pb::WatchEventsResponse { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::agent_lifecycle_service_server::AgentLifecycleService as _;

    /// The generated trait's own WatchEvents path (used when the generated
    /// server is served alone) replays and converts like the fan-out path.
    #[tokio::test]
    async fn generated_watch_path_replays_events() {
        let service = AgentLifecycleService::in_memory().expect("service");
        let handler = LifecycleHandler::new(service.clone());
        let registered = handler
            .register_agent(Request::new(pb::RegisterAgentRequest::default()))
            .await
            .expect("register")
            .into_inner();
        let request = pb::WatchEventsRequest {
            start_sequence: 1,
            ..Default::default()
        };
        let mut stream = handler
            .watch_events(Request::new(request))
            .await
            .expect("watch")
            .into_inner();
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await
            .expect("in time")
            .expect("an item")
            .expect("ok");
        let Some(pb::watch_events_response::Kind::Event(event)) = first.kind else {
            panic!("expected an event");
        };
        assert_eq!(event.sequence, 1);
        assert_eq!(
            event.agent.expect("agent"),
            registered.agent.expect("agent")
        );
        let err = handler
            .get_agent(Request::new(pb::GetAgentRequest {
                agent_id: "x".into(),
            }))
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
