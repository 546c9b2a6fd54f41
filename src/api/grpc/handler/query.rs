//! The RPCs that read: GetAgent, ListAgents, GetAgentHistory,
//! ListTransitions (the audit trail), GetLifecycleMetrics,
//! GetTransitionRules, GetAgentAnalytics and GetFleetAnalytics.
//!
//! Each parses its request, brings a shared store's events in first where
//! the answer depends on them (`sync`), asks the service and converts the
//! answer; agents go out with their last heartbeat. Knows nothing of the
//! transport.

use tonic::{Request, Response, Status};

use super::LifecycleHandler;
use crate::{
    api::grpc::{
        convert::{self, agent_id_from_pb},
        layer::caller_of,
        observe, pb,
    },
    domain::AgentState,
    service::{AgentFilter, HistoryQuery},
};

/// Default ListAgents page size.
const DEFAULT_LIST_PAGE: usize = 100;
/// Largest ListAgents page.
const MAX_LIST_PAGE: usize = 1000;

pub(super) async fn get_agent(
    handler: &LifecycleHandler,
    request: Request<pb::GetAgentRequest>,
) -> Result<Response<pb::GetAgentResponse>, Status> {
    let caller = caller_of(&request);
    let pb::GetAgentRequest { agent_id, as_of } = request.into_inner();
    let id = agent_id_from_pb("agent_id", &agent_id)?;
    let as_of = convert::as_of_from_pb("as_of", as_of).map_err(crate::Error::from)?;
    caller.check_agent(id)?;
    handler.service.catch_up_with_store().await?;
    if let Some(point) = as_of {
        let service = &handler.service;
        let sequence = service.resolve_as_of(point).await?;
        let agent = service.agent_as_of(id, sequence).await?;
        return Ok(Response::new(pb::GetAgentResponse {
            agent: Some(convert::agent_at_to_pb(&agent, service.policy())),
            as_of_sequence: sequence,
        }));
    }
    let agent = handler.service.get_agent(id)?;
    Ok(Response::new(pb::GetAgentResponse {
        agent: handler.agents_with_heartbeats(&[agent]).await.pop(),
        as_of_sequence: 0,
    }))
}

pub(super) async fn list_agents(
    handler: &LifecycleHandler,
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
    let as_of = convert::as_of_from_pb("as_of", r.as_of).map_err(crate::Error::from)?;
    let limit = match r.page_size as usize {
        0 => DEFAULT_LIST_PAGE,
        n => n.min(MAX_LIST_PAGE),
    };
    handler.service.catch_up_with_store().await?;
    if let Some(point) = as_of {
        let service = &handler.service;
        let sequence = service.resolve_as_of(point).await?;
        let (agents, next) = service
            .list_agents_as_of(&filter, after, limit, sequence)
            .await?;
        return Ok(Response::new(pb::ListAgentsResponse {
            agents: agents
                .iter()
                .map(|a| convert::agent_at_to_pb(a, service.policy()))
                .collect(),
            next_page_token: next.map(convert::list_token).unwrap_or_default(),
            as_of_sequence: sequence,
        }));
    }
    let (agents, next) = handler.service.list_agents(&filter, after, limit)?;
    Ok(Response::new(pb::ListAgentsResponse {
        agents: handler.agents_with_heartbeats(&agents).await,
        next_page_token: next.map(convert::list_token).unwrap_or_default(),
        as_of_sequence: 0,
    }))
}

pub(super) async fn get_agent_history(
    handler: &LifecycleHandler,
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
    handler.service.catch_up_with_store().await?;
    let page = handler.service.history(id, query).await?;
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

pub(super) async fn get_agent_analytics(
    handler: &LifecycleHandler,
    request: Request<pb::GetAgentAnalyticsRequest>,
) -> Result<Response<pb::GetAgentAnalyticsResponse>, Status> {
    let caller = caller_of(&request);
    let pb::GetAgentAnalyticsRequest { agent_id, window } = request.into_inner();
    let id = agent_id_from_pb("agent_id", &agent_id)?;
    caller.check_agent(id)?;
    let window = convert::analytics_window(window)?;
    handler.service.catch_up_with_store().await?;
    let (analytics, start, end) =
        crate::automation::analytics::for_agent(&handler.service, id, window).await?;
    Ok(Response::new(pb::GetAgentAnalyticsResponse {
        analytics: Some(convert::analytics_to_pb(&analytics)),
        window_start: Some(convert::timestamp(start)),
        window_end: Some(convert::timestamp(end)),
    }))
}

pub(super) async fn get_fleet_analytics(
    handler: &LifecycleHandler,
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
    handler.service.catch_up_with_store().await?;
    let fleet =
        crate::automation::analytics::for_fleet(&handler.service, window, &labels, buckets, top)
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

pub(super) async fn list_transitions(
    handler: &LifecycleHandler,
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
    let mut records = handler
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

pub(super) async fn get_lifecycle_metrics(
    handler: &LifecycleHandler,
    request: Request<pb::GetLifecycleMetricsRequest>,
) -> Result<Response<pb::GetLifecycleMetricsResponse>, Status> {
    let as_of =
        convert::as_of_from_pb("as_of", request.into_inner().as_of).map_err(crate::Error::from)?;
    handler.service.catch_up_with_store().await?;
    if let Some(point) = as_of {
        let sequence = handler.service.resolve_as_of(point).await?;
        let metrics = handler.service.lifecycle_metrics_as_of(sequence).await?;
        let mut response = convert::metrics_to_pb(&metrics);
        response.as_of_sequence = sequence;
        return Ok(Response::new(response));
    }
    let metrics = handler.service.get_lifecycle_metrics();
    let mut response = convert::metrics_to_pb(&metrics);
    let [heartbeats, missed, restarts, stuck, sync] = handler.service.metrics().automation();
    response.heartbeats = heartbeats;
    response.heartbeats_missed = missed;
    response.restarts = restarts;
    response.stuck_agents = stuck;
    response.sync_transitions = sync;
    response.refused = observe::refused_counts(handler.service.metrics().registry());
    Ok(Response::new(response))
}

pub(super) async fn get_transition_rules(
    handler: &LifecycleHandler,
    _request: Request<pb::GetTransitionRulesRequest>,
) -> Result<Response<pb::GetTransitionRulesResponse>, Status> {
    let policy = handler.service.policy();
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
