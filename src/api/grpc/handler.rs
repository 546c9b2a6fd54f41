//! `LifecycleHandler`: one method per RPC of
//! `agentlifecycle.v1.AgentLifecycleService`, over [`AgentLifecycleService`].
//!
//! Every method shows its steps: a mutating RPC takes the caller that the
//! [`CallLayer`](super::layer::CallLayer) put into the request's extensions
//! and hands it to the service with the change; every RPC parses its request
//! (a `FieldViolation` becomes INVALID_ARGUMENT), calls the service and
//! converts the outcome. Errors become a `Status` only through `status.rs`:
//! `?` uses its `From` impls. The request and response shapes that mutating
//! RPCs share are in `mutation.rs`.
//!
//! WatchEvents has one implementation, [`LifecycleHandler::watch`], which
//! `fanout.rs` serves with each event encoded once. The generated trait's
//! `watch_events` is never reached (see its doc). Depends on the service,
//! the conversions and the layer's [`caller_of`]; knows nothing of the
//! transport.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures_util::Stream;
use tonic::{Request, Response, Status};

use super::{
    convert::{self, agent_id_from_pb},
    layer::caller_of,
    limits::{Limits, WatchPermit},
    mutation::{MutatingRequest, MutationResponse},
    pb,
    status::not_routed,
};
use crate::{
    automation::health::{Health, HealthSettings, Heartbeat},
    automation::sync::{self, StatusReport},
    domain::{AgentId, AgentState, ExternalSource, FieldViolation},
    service::{
        AgentFilter, AgentLifecycleService, HistoryQuery, Outcome, Registration, WatchItem, Watcher,
    },
};

/// Default ListAgents page size.
const DEFAULT_LIST_PAGE: usize = 100;
/// Largest ListAgents page.
const MAX_LIST_PAGE: usize = 1000;

/// The items of one WatchEvents stream, before encoding: `fanout.rs`
/// encodes them (events once for all streams).
pub type WatchItems = Pin<Box<dyn Stream<Item = Result<WatchItem, Status>> + Send>>;

/// Serves `agentlifecycle.v1.AgentLifecycleService`.
#[derive(Clone, Debug)]
pub struct LifecycleHandler {
    service: AgentLifecycleService,
    /// Heartbeats (and the monitor's bookkeeping), shared with the health
    /// monitor when one runs.
    health: Health,
    /// Transition rates and watch caps (none unless set).
    limits: Arc<Limits>,
}

impl LifecycleHandler {
    /// A handler over `service`, with heartbeat tracking of its own.
    pub fn new(service: AgentLifecycleService) -> Self {
        let health = Health::new(service.clone(), HealthSettings::default());
        Self::with_health(service, health)
    }

    /// A handler over `service` that records heartbeats in `health` (the
    /// one the health monitor watches).
    pub fn with_health(service: AgentLifecycleService, health: Health) -> Self {
        LifecycleHandler {
            service,
            health,
            limits: Arc::default(),
        }
    }

    /// This handler with `limits`.
    pub fn with_limits(mut self, limits: Arc<Limits>) -> Self {
        self.limits = limits;
        self
    }

    /// `agent` on the wire, with its last heartbeat.
    fn agent_with_heartbeat(
        &self,
        agent: &crate::domain::Agent,
        beat: Option<Heartbeat>,
    ) -> pb::Agent {
        let mut wire = convert::agent_to_pb(agent, self.service.policy());
        wire.last_heartbeat = beat.map(|beat| pb::LastHeartbeat {
            received_at: Some(convert::timestamp(beat.at)),
            load: beat.load,
            current_task: beat.current_task.unwrap_or_default(),
        });
        wire
    }

    /// `agents` on the wire, each with its last heartbeat (whichever
    /// process of a shared store received it).
    async fn agents_with_heartbeats(&self, agents: &[Arc<crate::domain::Agent>]) -> Vec<pb::Agent> {
        let ids: Vec<AgentId> = agents.iter().map(|a| a.id).collect();
        let mut beats = self.health.last_heartbeats(&ids).await;
        agents
            .iter()
            .map(|a| self.agent_with_heartbeat(a, beats.remove(&a.id)))
            .collect()
    }

    /// Records one heartbeat message.
    async fn beat(
        &self,
        caller: &crate::domain::Caller,
        request: pb::HeartbeatRequest,
    ) -> Result<(AgentId, Heartbeat), Status> {
        let pb::HeartbeatRequest {
            agent_id,
            load,
            current_task,
        } = request;
        let id = agent_id_from_pb("agent_id", &agent_id)?;
        caller.check_agent(id)?;
        crate::domain::limits::check_text(
            "current_task",
            &current_task,
            crate::domain::limits::MAX_SHORT_TEXT_BYTES,
        )?;
        if load.is_some_and(|l| !l.is_finite()) {
            return Err(FieldViolation::new("load", "must be a finite number").into());
        }
        // On a shared store, what other processes committed first: the
        // heartbeat's effect (completing a start, ending an ERROR) depends
        // on the agent's latest state.
        self.service.sync().await?;
        let task = Some(current_task).filter(|t| !t.is_empty());
        let beat = self.health.heartbeat(id, load, task).await?;
        Ok((id, beat))
    }

    /// The service this handler calls.
    pub fn service(&self) -> &AgentLifecycleService {
        &self.service
    }

    /// The response of a mutating RPC for `outcome`.
    fn reply<R: MutationResponse>(&self, outcome: &Outcome) -> Response<R> {
        Response::new(R::from_outcome(outcome, self.service.policy()))
    }

    /// WatchEvents: validates the request, opens the watcher and returns
    /// its items. The one implementation of the RPC; `fanout.rs` serves it.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a bad filter; OUT_OF_RANGE for a compacted or
    /// future `start_sequence`; UNAVAILABLE while shutting down. The stream
    /// itself ends with OUT_OF_RANGE (events compacted while it caught up)
    /// or UNAVAILABLE (shutdown).
    pub async fn watch(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<WatchItems, Status> {
        let caller = caller_of(&request);
        let permit = self.limits.open_watch(&caller)?;
        let mut watch = convert::watch_request_from_pb(request.into_inner())?;
        if caller.role == crate::domain::Role::Agent {
            // An agent principal watches its own agents only.
            if watch.agent_ids.is_empty() {
                watch.agent_ids = caller.agents.to_vec();
            }
            for id in &watch.agent_ids {
                caller.check_agent(*id)?;
            }
        }
        // On a shared store, events other processes committed are applied
        // first, so a stream resumed here from a sequence another process
        // handed out starts where it should.
        self.service.sync().await?;
        let watcher = self.service.watch(watch).await?;
        Ok(Box::pin(WatchStream {
            state: WatchState::Ready(Box::new(watcher)),
            _permit: permit,
        }))
    }
}

/// One WatchEvents stream's items: the watcher's [`Watcher::try_next`]
/// while items are ready, and a future of [`Watcher::wait`] (then
/// [`Watcher::next`]) only to wait.
/// An event already waiting costs no future, so a stream that keeps up
/// builds one future per wait rather than one per item.
struct WatchStream {
    state: WatchState,
    /// Counts the stream as open until the stream is dropped.
    _permit: WatchPermit,
}

/// The future that waits owns the watcher and hands it back with the item.
type WatchWait =
    Pin<Box<dyn Future<Output = (Box<Watcher>, Option<crate::error::Result<WatchItem>>)> + Send>>;

enum WatchState {
    /// Items may be ready (boxed: a pointer moves in and out of the wait).
    Ready(Box<Watcher>),
    Waiting(WatchWait),
    /// Only between the steps of one poll.
    Taken,
}

impl Stream for WatchStream {
    type Item = Result<WatchItem, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let (watcher, item) = match std::mem::replace(&mut self.state, WatchState::Taken) {
                WatchState::Ready(mut watcher) => match watcher.try_next() {
                    Some(item) => (watcher, item),
                    None => {
                        self.state = WatchState::Waiting(Box::pin(async move {
                            let item = match watcher.wait().await {
                                Some(item) => item,
                                None => watcher.next().await,
                            };
                            (watcher, item)
                        }));
                        continue;
                    }
                },
                WatchState::Waiting(mut wait) => match wait.as_mut().poll(cx) {
                    Poll::Ready(done) => done,
                    Poll::Pending => {
                        self.state = WatchState::Waiting(wait);
                        return Poll::Pending;
                    }
                },
                WatchState::Taken => return Poll::Ready(None),
            };
            self.state = WatchState::Ready(watcher);
            return Poll::Ready(item.map(|item| item.map_err(Status::from)));
        }
    }
}

#[tonic::async_trait]
impl pb::agent_lifecycle_service_server::AgentLifecycleService for LifecycleHandler {
    async fn register_agent(
        &self,
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
            change: convert::change_from_pb(
                reason,
                triggered_by,
                metadata,
                None,
                caller,
                request_id,
            )?,
        };
        let outcome = self.service.register_agent(registration).await?;
        Ok(self.reply(&outcome))
    }

    async fn transition_agent(
        &self,
        request: Request<pb::TransitionAgentRequest>,
    ) -> Result<Response<pb::TransitionAgentResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, target_state) = request.into_inner().into_parts();
        let target = convert::state_from_pb("target_state", target_state)?;
        if target == AgentState::Deleted && !caller.may_delete() {
            return Err(caller.denied("delete agents").into());
        }
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self.service.transition(id, target, change).await?;
        Ok(self.reply(&outcome))
    }

    async fn deploy_agent(
        &self,
        request: Request<pb::DeployAgentRequest>,
    ) -> Result<Response<pb::DeployAgentResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, ()) = request.into_inner().into_parts();
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self.service.deploy_agent(id, change).await?;
        Ok(self.reply(&outcome))
    }

    async fn start_agent(
        &self,
        request: Request<pb::StartAgentRequest>,
    ) -> Result<Response<pb::StartAgentResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, wait_for_heartbeat) = request.into_inner().into_parts();
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self.health.start(id, wait_for_heartbeat, change).await?;
        Ok(self.reply(&outcome))
    }

    async fn stop_agent(
        &self,
        request: Request<pb::StopAgentRequest>,
    ) -> Result<Response<pb::StopAgentResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, ()) = request.into_inner().into_parts();
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self.service.stop_agent(id, change).await?;
        Ok(self.reply(&outcome))
    }

    async fn assign_task(
        &self,
        request: Request<pb::AssignTaskRequest>,
    ) -> Result<Response<pb::AssignTaskResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, task_id) = request.into_inner().into_parts();
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self.service.assign_task(id, task_id, change).await?;
        Ok(self.reply(&outcome))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, task_id) = request.into_inner().into_parts();
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self.service.complete_task(id, task_id, change).await?;
        Ok(self.reply(&outcome))
    }

    async fn handle_error(
        &self,
        request: Request<pb::HandleErrorRequest>,
    ) -> Result<Response<pb::HandleErrorResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, error_message) = request.into_inner().into_parts();
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self
            .service
            .handle_error(id, &error_message, change)
            .await?;
        Ok(self.reply(&outcome))
    }

    async fn put_in_maintenance(
        &self,
        request: Request<pb::PutInMaintenanceRequest>,
    ) -> Result<Response<pb::PutInMaintenanceResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, ()) = request.into_inner().into_parts();
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self.service.put_in_maintenance(id, change).await?;
        Ok(self.reply(&outcome))
    }

    async fn resume_from_maintenance(
        &self,
        request: Request<pb::ResumeFromMaintenanceRequest>,
    ) -> Result<Response<pb::ResumeFromMaintenanceResponse>, Status> {
        let caller = caller_of(&request);
        let (fields, ()) = request.into_inner().into_parts();
        let (id, change) = fields.parse(caller)?;
        self.limits.admit_transition(&change.caller, id)?;
        let outcome = self.service.resume_from_maintenance(id, change).await?;
        Ok(self.reply(&outcome))
    }

    async fn get_agent(
        &self,
        request: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let caller = caller_of(&request);
        let pb::GetAgentRequest { agent_id } = request.into_inner();
        let id = agent_id_from_pb("agent_id", &agent_id)?;
        caller.check_agent(id)?;
        self.service.sync().await?;
        let agent = self.service.get_agent(id)?;
        Ok(Response::new(pb::GetAgentResponse {
            agent: self.agents_with_heartbeats(&[agent]).await.pop(),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let r = request.into_inner();
        let filter = AgentFilter {
            states: convert::states_from_pb("states", &r.states)?
                .into_iter()
                .collect(),
            category: convert::category_from_pb(r.category)?,
            labels: convert::labels_from_pb(r.labels),
        };
        let after = convert::parse_list_token(&r.page_token)?;
        let limit = match r.page_size as usize {
            0 => DEFAULT_LIST_PAGE,
            n => n.min(MAX_LIST_PAGE),
        };
        self.service.sync().await?;
        let (agents, next) = self.service.list_agents(&filter, after, limit)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: self.agents_with_heartbeats(&agents).await,
            next_page_token: next.map(convert::list_token).unwrap_or_default(),
        }))
    }

    async fn get_agent_history(
        &self,
        request: Request<pb::GetAgentHistoryRequest>,
    ) -> Result<Response<pb::GetAgentHistoryResponse>, Status> {
        let caller = caller_of(&request);
        let r = request.into_inner();
        let id = agent_id_from_pb("agent_id", &r.agent_id)?;
        caller.check_agent(id)?;
        let query = HistoryQuery {
            limit: u64::from(r.limit),
            page_size: r.page_size as usize,
            cursor: convert::parse_history_token(&r.page_token)?,
        };
        self.service.sync().await?;
        let page = self.service.history(id, query).await?;
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

    async fn get_agent_analytics(
        &self,
        request: Request<pb::GetAgentAnalyticsRequest>,
    ) -> Result<Response<pb::GetAgentAnalyticsResponse>, Status> {
        let caller = caller_of(&request);
        let pb::GetAgentAnalyticsRequest { agent_id, window } = request.into_inner();
        let id = agent_id_from_pb("agent_id", &agent_id)?;
        caller.check_agent(id)?;
        let window = convert::analytics_window(window)?;
        self.service.sync().await?;
        let (analytics, start, end) =
            crate::automation::analytics::for_agent(&self.service, id, window).await?;
        Ok(Response::new(pb::GetAgentAnalyticsResponse {
            analytics: Some(convert::analytics_to_pb(&analytics)),
            window_start: Some(convert::timestamp(start)),
            window_end: Some(convert::timestamp(end)),
        }))
    }

    async fn get_fleet_analytics(
        &self,
        request: Request<pb::GetFleetAnalyticsRequest>,
    ) -> Result<Response<pb::GetFleetAnalyticsResponse>, Status> {
        let pb::GetFleetAnalyticsRequest {
            window,
            labels,
            buckets,
            top,
        } = request.into_inner();
        let window = convert::analytics_window(window)?;
        let labels = convert::labels_from_pb(labels);
        let buckets = match buckets {
            0 => 12,
            n => (n as usize).min(1000),
        };
        let top = match top {
            0 => 10,
            n => (n as usize).min(1000),
        };
        self.service.sync().await?;
        let fleet =
            crate::automation::analytics::for_fleet(&self.service, window, &labels, buckets, top)
                .await?;
        Ok(Response::new(pb::GetFleetAnalyticsResponse {
            agents: fleet.agents,
            total: Some(convert::analytics_to_pb(&fleet.total)),
            top_by_errors: fleet
                .top_by_errors
                .iter()
                .map(convert::analytics_to_pb)
                .collect(),
            top_by_transitions: fleet
                .top_by_transitions
                .iter()
                .map(convert::analytics_to_pb)
                .collect(),
            distribution: fleet
                .distribution
                .iter()
                .map(|(at, counts)| pb::StateDistribution {
                    at: Some(convert::timestamp(*at)),
                    agents: counts
                        .iter()
                        .map(|(state, n)| (state.as_str().to_string(), *n))
                        .collect(),
                })
                .collect(),
            window_start: Some(convert::timestamp(fleet.start)),
            window_end: Some(convert::timestamp(fleet.end)),
        }))
    }

    async fn list_transitions(
        &self,
        request: Request<pb::ListTransitionsRequest>,
    ) -> Result<Response<pb::ListTransitionsResponse>, Status> {
        let pb::ListTransitionsRequest {
            agent_id,
            principal,
            page_size,
            page_token,
        } = request.into_inner();
        let agent_id = if agent_id.is_empty() {
            None
        } else {
            Some(agent_id_from_pb("agent_id", &agent_id)?)
        };
        if let Some(principal) = &principal {
            crate::domain::limits::check_text(
                "principal",
                principal,
                crate::domain::limits::MAX_SHORT_TEXT_BYTES,
            )?;
        }
        let before = convert::parse_audit_token(&page_token)?.unwrap_or(u64::MAX);
        let max = match page_size as usize {
            0 => DEFAULT_LIST_PAGE,
            n => n.min(MAX_LIST_PAGE),
        };
        // One more than asked tells whether another page follows.
        let mut records = self
            .service
            .audit(crate::store::AuditQuery {
                agent_id,
                principal,
                before,
                max: max + 1,
            })
            .await?;
        let next_page_token = if records.len() > max {
            records.truncate(max);
            records
                .last()
                .map(|r| convert::audit_token(r.sequence))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTransitionsResponse {
            transitions: records
                .iter()
                .map(|r| convert::transition_to_pb(r))
                .collect(),
            next_page_token,
        }))
    }

    async fn get_lifecycle_metrics(
        &self,
        _request: Request<pb::GetLifecycleMetricsRequest>,
    ) -> Result<Response<pb::GetLifecycleMetricsResponse>, Status> {
        self.service.sync().await?;
        let metrics = self.service.get_lifecycle_metrics();
        let mut response = convert::metrics_to_pb(&metrics);
        let [heartbeats, missed, restarts, stuck, sync] = self.service.metrics().automation();
        response.heartbeats = heartbeats;
        response.heartbeats_missed = missed;
        response.restarts = restarts;
        response.stuck_agents = stuck;
        response.sync_transitions = sync;
        response.refused = super::observe::refused_counts(self.service.metrics().registry());
        Ok(Response::new(response))
    }

    async fn get_transition_rules(
        &self,
        _request: Request<pb::GetTransitionRulesRequest>,
    ) -> Result<Response<pb::GetTransitionRulesResponse>, Status> {
        let policy = self.service.policy();
        let rules = AgentState::ALL
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

    async fn sync_external_status(
        &self,
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
        self.limits.admit_transition(&caller, id)?;
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
        };
        let result = sync::sync_external_status(&self.service, id, source, report).await?;
        Ok(Response::new(convert::sync_result_to_pb(
            &result,
            self.service.policy(),
        )))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = caller_of(&request);
        let (id, beat) = self.beat(&caller, request.into_inner()).await?;
        let agent = self.service.get_agent(id)?;
        Ok(Response::new(pb::HeartbeatResponse {
            agent: Some(self.agent_with_heartbeat(&agent, Some(beat))),
        }))
    }

    async fn heartbeat_stream(
        &self,
        request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
    ) -> Result<Response<pb::HeartbeatStreamResponse>, Status> {
        let caller = caller_of(&request);
        let mut stream = request.into_inner();
        let mut heartbeats = 0;
        while let Some(message) = stream.message().await? {
            self.beat(&caller, message).await?;
            heartbeats += 1;
        }
        Ok(Response::new(pb::HeartbeatStreamResponse { heartbeats }))
    }

    type WatchEventsStream =
        Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

    /// Never reached: [`LifecycleServer`](super::LifecycleServer), the only
    /// way this handler is served, answers the WatchEvents path itself with
    /// [`LifecycleHandler::watch`] before the generated server sees it. The
    /// generated signature cannot carry events encoded once, so it is not
    /// a second implementation; it answers UNIMPLEMENTED.
    async fn watch_events(
        &self,
        _request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Err(not_routed(
            "/agentlifecycle.v1.AgentLifecycleService/WatchEvents",
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use pb::agent_lifecycle_service_server::AgentLifecycleService as _;

    use super::*;

    /// Handlers called directly: registration and a deploy convert their
    /// outcomes; WatchEvents replays the registration from sequence 1; bad
    /// input is INVALID_ARGUMENT; the generated `watch_events` answers
    /// UNIMPLEMENTED because `fanout.rs` serves the RPC.
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
