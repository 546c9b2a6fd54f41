//! Heartbeat and HeartbeatStream, and agents on the wire with their last
//! heartbeat (which the query RPCs use too).
//!
//! A heartbeat is parsed and checked here and recorded by the
//! [`HeartbeatMonitor`](crate::automation::health::HeartbeatMonitor), which
//! completes a start waiting for it or ends an ERROR after missed beats.
//! Knows nothing of the transport.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::LifecycleHandler;
use crate::{
    api::grpc::{
        convert::{self, agent_id_from_pb},
        layer::caller_of,
        pb,
    },
    domain::{Agent, AgentId, Caller, FieldViolation, Heartbeat, limits},
};

impl LifecycleHandler {
    /// `agent` on the wire, with its last heartbeat.
    pub(super) fn agent_with_heartbeat(&self, agent: &Agent, beat: Option<Heartbeat>) -> pb::Agent {
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
    pub(super) async fn agents_with_heartbeats(&self, agents: &[Arc<Agent>]) -> Vec<pb::Agent> {
        let ids: Vec<AgentId> = agents.iter().map(|a| a.id).collect();
        let mut beats = self.monitor.last_heartbeats(&ids).await;
        agents
            .iter()
            .map(|a| self.agent_with_heartbeat(a, beats.remove(&a.id)))
            .collect()
    }

    /// Records one heartbeat message; `answered` when the sender waits
    /// for the answer (a unary call), else the catch-up with a shared
    /// store may wait for the next paced head read.
    async fn beat(
        &self,
        caller: &Caller,
        request: pb::HeartbeatRequest,
        answered: bool,
    ) -> Result<(AgentId, Heartbeat), Status> {
        let pb::HeartbeatRequest {
            agent_id,
            load,
            current_task,
        } = request;
        let id = agent_id_from_pb("agent_id", &agent_id)?;
        caller.check_agent(id)?;
        limits::check_text("current_task", &current_task, limits::MAX_SHORT_TEXT_BYTES)?;
        if load.is_some_and(|l| !l.is_finite()) {
            return Err(FieldViolation::new("load", "must be a finite number").into());
        }
        // On a shared store, what other processes committed first: the
        // heartbeat's effect (completing a start, ending an ERROR) depends
        // on the agent's latest state.
        match answered {
            true => self.service.catch_up_with_store().await?,
            false => self.service.catch_up_with_store_paced().await?,
        }
        let task = Some(current_task).filter(|t| !t.is_empty());
        let beat = self.monitor.heartbeat(id, load, task).await?;
        Ok((id, beat))
    }
}

pub(super) async fn heartbeat(
    handler: &LifecycleHandler,
    request: Request<pb::HeartbeatRequest>,
) -> Result<Response<pb::HeartbeatResponse>, Status> {
    let caller = caller_of(&request);
    let (id, beat) = handler.beat(&caller, request.into_inner(), true).await?;
    let agent = handler.service.get_agent(id)?;
    Ok(Response::new(pb::HeartbeatResponse {
        agent: Some(handler.agent_with_heartbeat(&agent, Some(beat))),
    }))
}

pub(super) async fn heartbeat_stream(
    handler: &LifecycleHandler,
    request: Request<tonic::Streaming<pb::HeartbeatRequest>>,
) -> Result<Response<pb::HeartbeatStreamResponse>, Status> {
    let caller = caller_of(&request);
    let mut stream = request.into_inner();
    let mut heartbeats = 0;
    while let Some(message) = stream.message().await? {
        handler.beat(&caller, message, false).await?;
        heartbeats += 1;
    }
    Ok(Response::new(pb::HeartbeatStreamResponse { heartbeats }))
}
