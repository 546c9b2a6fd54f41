//! gRPC plumbing shared by the benchmarks: connections, unary calls with the
//! tool's deadline, agent setup, and the [`Worker`] that flips one agent
//! between ONLINE and IDLE.

use std::{future::Future, time::Duration};

use anyhow::{Context, anyhow, bail};
use futures_util::{StreamExt, TryStreamExt, stream};
use tonic::{Response, Status, transport::Channel};

use agent_lifecycle::api::grpc::pb::{self, AgentState};

pub(super) use crate::cli::connect::Client;

/// Deadline of every unary call the tool makes.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests in flight while creating agents.
pub(super) const SETUP_CONCURRENCY: usize = 64;
/// Workers that populate the event log (`recovery`) or register (`memory`).
pub(super) const LOAD_WORKERS: usize = 64;
/// A worker gives up after this many failed requests in a row.
pub(super) const MAX_CONSECUTIVE_ERRORS: u64 = 100;
/// Recorded as `triggered_by` on every change the tool makes.
pub(super) const TRIGGERED_BY: &str = "bench";

/// One connection: `tcp_nodelay`, its own HTTP/2 connection.
pub(super) async fn connect(url: &str) -> anyhow::Result<Channel> {
    crate::cli::connect::endpoint(url)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// `count` independent connections, as clients.
pub(super) async fn connect_clients(url: &str, count: usize) -> anyhow::Result<Vec<Client>> {
    Ok(connect_channels(url, count)
        .await?
        .into_iter()
        .map(crate::cli::connect::client)
        .collect())
}

/// Connections opened at once.
const CONNECT_CONCURRENCY: usize = 64;

/// `count` independent connections, [`CONNECT_CONCURRENCY`] opened at once.
pub(super) async fn connect_channels(url: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    // `--server` may list several servers (comma-separated: processes on one
    // PostgreSQL database); connection i goes to server i mod n.
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        anyhow::bail!("--server names no server");
    }
    stream::iter(0..count)
        .map(|i| connect(urls[i % urls.len()]))
        .buffered(CONNECT_CONCURRENCY)
        .try_collect()
        .await
}

/// A unary call with the tool's deadline; the reply message or an error
/// naming the call and the status.
pub(super) async fn call<T>(
    what: &str,
    future: impl Future<Output = Result<Response<T>, Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(anyhow!("{what}: {:?}: {}", status.code(), status.message())),
        Err(_) => Err(anyhow!("{what}: no answer within {CALL_TIMEOUT:?}")),
    }
}

pub(super) async fn head_sequence(client: &mut Client) -> anyhow::Result<u64> {
    let metrics = call(
        "GetLifecycleMetrics",
        client.get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default()),
    )
    .await?;
    Ok(metrics.head_sequence)
}

/// Registers an agent; deploys and starts it (ONLINE) when `start`.
async fn create_agent(mut client: Client, name: String, start: bool) -> anyhow::Result<String> {
    let registered = call(
        "RegisterAgent",
        client.register_agent(pb::RegisterAgentRequest {
            name,
            triggered_by: TRIGGERED_BY.to_string(),
            ..Default::default()
        }),
    )
    .await?;
    let id = registered
        .agent
        .context("RegisterAgent returned no agent")?
        .agent_id;
    if start {
        call(
            "DeployAgent",
            client.deploy_agent(pb::DeployAgentRequest {
                agent_id: id.clone(),
                triggered_by: TRIGGERED_BY.to_string(),
                ..Default::default()
            }),
        )
        .await?;
        call(
            "StartAgent",
            client.start_agent(pb::StartAgentRequest {
                agent_id: id.clone(),
                triggered_by: TRIGGERED_BY.to_string(),
                ..Default::default()
            }),
        )
        .await?;
    }
    Ok(id)
}

/// `count` agents (ONLINE when `start`), created over `clients` round-robin
/// with [`SETUP_CONCURRENCY`] requests in flight; ids in creation order.
pub(super) async fn create_agents(
    clients: &[Client],
    count: usize,
    start: bool,
    prefix: &str,
) -> anyhow::Result<Vec<String>> {
    if clients.is_empty() {
        bail!("no connection to create agents on");
    }
    stream::iter(0..count)
        .map(|i| {
            create_agent(
                clients[i % clients.len()].clone(),
                format!("{prefix}-{i}"),
                start,
            )
        })
        .buffered(SETUP_CONCURRENCY)
        .try_collect()
        .await
}

pub(super) fn flip(state: AgentState) -> AgentState {
    if state == AgentState::Online {
        AgentState::Idle
    } else {
        AgentState::Online
    }
}

/// The target that moves an agent in `state` between ONLINE and IDLE.
pub(super) fn target_from(state: i32) -> AgentState {
    if state == AgentState::Online as i32 {
        AgentState::Idle
    } else {
        AgentState::Online
    }
}

fn timestamp_nanos(ts: &prost_types::Timestamp) -> i128 {
    i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos)
}

/// The part of a mutation's response the load reads: each transition's
/// sequence and commit time. Wire-compatible with `TransitionAgentResponse`
/// (`transitions` is field 2); the agent and every other field are skipped
/// undecoded, so that the client, which shares the machine's cores with
/// the server, spends as little CPU per call as it can.
#[derive(Clone, PartialEq, prost::Message)]
struct LiteMutationResponse {
    #[prost(message, repeated, tag = "2")]
    transitions: Vec<LiteStep>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LiteStep {
    #[prost(message, optional, tag = "3")]
    timestamp: Option<prost_types::Timestamp>,
    #[prost(uint64, tag = "7")]
    sequence: u64,
}

/// A ListAgents page with only its next page token decoded.
#[derive(Clone, PartialEq, prost::Message)]
struct LitePage {
    #[prost(string, tag = "2")]
    next_page_token: String,
}

/// Agents per ListAgents page, and transitions per GetAgentHistory page,
/// of the `list` and `history` loads.
pub(super) const PAGE_SIZE: u32 = 100;

/// GetAgentResponse with every field skipped undecoded.
#[derive(Clone, PartialEq, prost::Message)]
struct SkippedResponse {}

const TRANSITION_PATH: &str = "/agentlifecycle.v1.AgentLifecycleService/TransitionAgent";
const GET_PATH: &str = "/agentlifecycle.v1.AgentLifecycleService/GetAgent";
const LIST_PATH: &str = "/agentlifecycle.v1.AgentLifecycleService/ListAgents";
const HISTORY_PATH: &str = "/agentlifecycle.v1.AgentLifecycleService/GetAgentHistory";

/// A unary call whose reply is decoded as `R`, with the tool's deadline
/// and this process's token.
async fn lite_call<Q, R>(channel: &Channel, path: &'static str, message: Q) -> anyhow::Result<R>
where
    Q: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    let mut request = tonic::Request::new(message);
    crate::cli::connect::authorize(&mut request);
    let answer = tokio::time::timeout(CALL_TIMEOUT, async {
        grpc.ready()
            .await
            .map_err(|err| Status::unavailable(err.to_string()))?;
        grpc.unary(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::<Q, R>::default(),
        )
        .await
    })
    .await;
    let method = path.rsplit('/').next().unwrap_or(path);
    match answer {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(anyhow!(
            "{method}: {:?}: {}",
            status.code(),
            status.message()
        )),
        Err(_) => Err(anyhow!("{method}: no answer within {CALL_TIMEOUT:?}")),
    }
}

/// A worker's agent and where it goes next.
#[derive(Clone, Debug)]
pub(super) struct Worker {
    pub(super) client: Client,
    /// The connection under `client`, for the load's own calls.
    pub(super) channel: Channel,
    pub(super) agent_id: String,
    pub(super) target: AgentState,
    /// Where this worker's walk through ListAgents pages stands.
    page_token: String,
}

impl Worker {
    /// A worker flipping `agent_id` over `channel`, first to IDLE.
    pub(super) fn new(channel: Channel, agent_id: String) -> Worker {
        Worker {
            client: crate::cli::connect::client(channel.clone()),
            channel,
            agent_id,
            target: AgentState::Idle,
            page_token: String::new(),
        }
    }

    /// One TransitionAgent to `target` with `reason`; on success the next
    /// target flips. Returns the committed (sequence, commit time in ns
    /// since the epoch).
    pub(super) async fn transition_because(
        &mut self,
        reason: String,
    ) -> anyhow::Result<(u64, i128)> {
        let response: LiteMutationResponse = lite_call(
            &self.channel,
            TRANSITION_PATH,
            pb::TransitionAgentRequest {
                agent_id: self.agent_id.clone(),
                target_state: self.target as i32,
                reason,
                triggered_by: TRIGGERED_BY.to_string(),
                ..Default::default()
            },
        )
        .await?;
        self.target = flip(self.target);
        let transition = response
            .transitions
            .first()
            .context("TransitionAgent returned no transition")?;
        let at = transition
            .timestamp
            .as_ref()
            .map(timestamp_nanos)
            .unwrap_or(0);
        Ok((transition.sequence, at))
    }

    /// One TransitionAgent to `target` (see [`Worker::transition_because`]).
    pub(super) async fn transition(&mut self) -> anyhow::Result<(u64, i128)> {
        self.transition_because(String::new()).await
    }

    /// One GetAgent of the worker's agent, the reply skipped undecoded.
    pub(super) async fn get(&self) -> anyhow::Result<()> {
        let _: SkippedResponse = lite_call(
            &self.channel,
            GET_PATH,
            pb::GetAgentRequest {
                agent_id: self.agent_id.clone(),
                ..Default::default()
            },
        )
        .await?;
        Ok(())
    }

    /// The next ListAgents page of this worker's walk through the fleet
    /// (from the first again after the last), the agents skipped undecoded.
    pub(super) async fn list(&mut self) -> anyhow::Result<()> {
        let page: LitePage = lite_call(
            &self.channel,
            LIST_PATH,
            pb::ListAgentsRequest {
                page_size: PAGE_SIZE,
                page_token: std::mem::take(&mut self.page_token),
                ..Default::default()
            },
        )
        .await?;
        self.page_token = page.next_page_token;
        Ok(())
    }

    /// The first GetAgentHistory page of the worker's agent, skipped
    /// undecoded.
    pub(super) async fn history(&self) -> anyhow::Result<()> {
        let _: SkippedResponse = lite_call(
            &self.channel,
            HISTORY_PATH,
            pb::GetAgentHistoryRequest {
                agent_id: self.agent_id.clone(),
                page_size: PAGE_SIZE,
                ..Default::default()
            },
        )
        .await?;
        Ok(())
    }

    /// After a failure: learn the agent's state so the next target is valid.
    pub(super) async fn resync(&mut self) {
        let request = pb::GetAgentRequest {
            agent_id: self.agent_id.clone(),
            ..Default::default()
        };
        if let Ok(response) = call("GetAgent", self.client.get_agent(request)).await
            && let Some(agent) = response.agent
        {
            self.target = target_from(agent.state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flips_between_online_and_idle() {
        assert_eq!(flip(AgentState::Online), AgentState::Idle);
        assert_eq!(flip(AgentState::Idle), AgentState::Online);
        assert_eq!(target_from(AgentState::Idle as i32), AgentState::Online);
        assert_eq!(target_from(AgentState::Online as i32), AgentState::Idle);
    }
}
