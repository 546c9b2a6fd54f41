//! Hostile input, against the real server binary.
//!
//! Every RPC of `agentlifecycle.v1.AgentLifecycleService` gets random bytes,
//! mutated and malformed protobuf (flipped, truncated and inserted bytes,
//! unknown fields, wrong wire types, overlong varints, lengths past the end,
//! invalid UTF-8, nested groups), broken gRPC framing, messages over the
//! 1 MiB limit, deeply nested metadata, thousands of labels, unknown enum
//! numbers, extreme page sizes, forged page tokens and agent ids that are
//! not UUIDs; WatchEvents gets floods of streams opened and dropped. Through
//! all of it the server:
//!
//! - never panics and never exits;
//! - answers every call with a gRPC status: the documented code for a
//!   request it can read (INVALID_ARGUMENT with ErrorInfo and a BadRequest
//!   naming the field, OUT_OF_RANGE for a message over 1 MiB, ...), and
//!   INTERNAL only for bytes that are not a protobuf message of the
//!   request's type (gRPC's code for a message that cannot be parsed);
//!   never UNKNOWN, never UNAVAILABLE;
//! - answers a successful call with a message of the method's response
//!   type, and accepts nothing that clients then cannot read back;
//! - keeps its resident memory bounded across floods of watch streams and
//!   keeps delivering events to new watchers;
//! - leaves the agents of well-behaved clients exactly as they were, and
//!   keeps serving them.
//!
//! The random cases come from a fixed seed, printed by the test that uses
//! them; `HOSTILE_SEED=<n>` replays another.

use crate::common;

#[macro_use]
mod checks;
mod fields;
mod flood;
mod framing;
mod fuzz;
mod nesting;
mod paging;

use checks::*;
use fuzz::mib;

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    time::Instant,
};

use agent_lifecycle::{
    api::grpc::pb::{self, AgentState as S},
    domain::limits::MAX_METADATA_DEPTH,
};
use bytes::Bytes;
use common::{
    Client, STEP, next_event, online,
    process::ServerProcess,
    raw::{self, RawClient, Rng, Wire, is_decode_error, wire},
    register,
};
use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The largest request message the server reads (src/config.rs).
const MAX_REQUEST_BYTES: usize = agent_lifecycle::api::grpc::MAX_REQUEST_BYTES;

/// The seed of the random cases unless `HOSTILE_SEED` is set.
const DEFAULT_SEED: u64 = 0x5eed_a11f_ec7c_1e00;

/// Random cases per method.
const CASES_PER_METHOD: usize = 300;

/// How much the server's resident memory may grow over an attack: room
/// for what the allocator keeps (about 15 MiB above the first watch flood
/// round, however many rounds follow), and about what the 500 streams of
/// a single flood round hold once their snapshots and replays are queued
/// (streams that stayed open would add some 30 MiB every round).
const MEMORY_GROWTH_BOUND: u64 = 32 << 20;

/// Codes a client can get for some input: success or a documented client
/// error. INTERNAL is accepted separately, only as the decoder's answer.
const CLIENT_CODES: [Code; 7] = [
    Code::Ok,
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
];

fn start_server() -> ServerProcess {
    ServerProcess::start(&["--log", "warn", "--store", "memory"])
}

/// `future`, failing the test when it takes longer than [`STEP`].
async fn timed<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP:?}"))
}

fn seed() -> u64 {
    std::env::var("HOSTILE_SEED")
        .ok()
        .map(|s| {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            }
            .expect("HOSTILE_SEED is a number")
        })
        .unwrap_or(DEFAULT_SEED)
}

// ---------------------------------------------------------------------------
// Well-behaved clients

const BYSTANDER: (&str, &str) = ("role", "bystander");

/// Agents of a well-behaved client, and what the server said about them
/// before the attack.
struct Bystanders {
    agents: Vec<(pb::Agent, pb::GetAgentHistoryResponse)>,
}

async fn get_agent(client: &mut Client, agent_id: &str) -> pb::Agent {
    timed(
        "GetAgent",
        client.get_agent(pb::GetAgentRequest {
            agent_id: agent_id.to_string(),
            ..Default::default()
        }),
    )
    .await
    .expect("GetAgent")
    .into_inner()
    .agent
    .expect("agent")
}

async fn history(client: &mut Client, agent_id: &str) -> pb::GetAgentHistoryResponse {
    timed(
        "GetAgentHistory",
        client.get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: agent_id.to_string(),
            ..Default::default()
        }),
    )
    .await
    .expect("GetAgentHistory")
    .into_inner()
}

/// Every agent carrying `label`, page by page.
async fn list_ids(client: &mut Client, label: (&str, &str)) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut token = String::new();
    loop {
        let page = timed(
            "ListAgents",
            client.list_agents(pb::ListAgentsRequest {
                labels: HashMap::from([(label.0.to_string(), label.1.to_string())]),
                page_token: token,
                ..Default::default()
            }),
        )
        .await
        .expect("ListAgents")
        .into_inner();
        for agent in page.agents {
            assert!(ids.insert(agent.agent_id), "an agent listed twice");
        }
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

impl Bystanders {
    /// Agents in REGISTERED, DEPLOYED, ONLINE, MAINTENANCE and BUSY.
    async fn create(client: &mut Client) -> Self {
        let registered = register(client, &[BYSTANDER]).await.agent_id;
        let deployed = register(client, &[BYSTANDER]).await.agent_id;
        timed(
            "DeployAgent",
            client.deploy_agent(pb::DeployAgentRequest {
                agent_id: deployed.clone(),
                ..Default::default()
            }),
        )
        .await
        .expect("deploy");
        let running = online(client, &[BYSTANDER]).await.agent_id;
        let maintained = online(client, &[BYSTANDER]).await.agent_id;
        timed(
            "PutInMaintenance",
            client.put_in_maintenance(pb::PutInMaintenanceRequest {
                agent_id: maintained.clone(),
                reason: "kernel patch".into(),
                metadata: Some(small_metadata()),
                ..Default::default()
            }),
        )
        .await
        .expect("maintenance");
        let busy = online(client, &[BYSTANDER]).await.agent_id;
        timed(
            "AssignTask",
            client.assign_task(pb::AssignTaskRequest {
                agent_id: busy.clone(),
                task_id: "t-1".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("assign");
        let mut agents = Vec::new();
        for id in [registered, deployed, running, maintained, busy] {
            agents.push((get_agent(client, &id).await, history(client, &id).await));
        }
        let states: Vec<i32> = agents.iter().map(|(a, _)| a.state).collect();
        let expected = [
            S::Registered,
            S::Deployed,
            S::Online,
            S::Maintenance,
            S::Busy,
        ];
        assert_eq!(states, expected.map(|s| s as i32));
        Bystanders { agents }
    }

    /// Each agent reads back exactly as before (state, version, labels,
    /// timestamps, last transition) with the same history, and the label
    /// listing finds exactly them.
    async fn assert_unchanged(&self, client: &mut Client) {
        for (before, history_before) in &self.agents {
            let now = get_agent(client, &before.agent_id).await;
            assert_eq!(&now, before, "a well-behaved agent changed");
            let history_now = history(client, &before.agent_id).await;
            assert_eq!(
                &history_now, history_before,
                "a well-behaved agent's history changed"
            );
        }
        let expected: BTreeSet<String> = self
            .agents
            .iter()
            .map(|(a, _)| a.agent_id.clone())
            .collect();
        assert_eq!(list_ids(client, BYSTANDER).await, expected);
    }
}

/// A well-behaved client can still register an agent and move it.
async fn assert_serves_well_behaved_client(client: &mut Client) {
    let agent = register(client, &[("role", "late-comer")]).await;
    assert_eq!(agent.state, S::Registered as i32);
    let moved = timed(
        "TransitionAgent",
        common::transition(client, &agent.agent_id, S::Deploying),
    )
    .await
    .expect("a well-behaved transition");
    let agent = moved.agent.expect("agent");
    assert_eq!((agent.state, agent.version), (S::Deploying as i32, 2));
}

/// The end of every attack: the server runs, has not panicked, the
/// well-behaved agents are unchanged and well-behaved calls are served.
async fn assert_survived(server: &mut ServerProcess, bystanders: &Bystanders) {
    server.assert_running();
    let mut client = server.client().await;
    bystanders.assert_unchanged(&mut client).await;
    assert_serves_well_behaved_client(&mut client).await;
    server.assert_running();
}

// ---------------------------------------------------------------------------
// Requests

fn small_metadata() -> Struct {
    let value = |kind| Value { kind: Some(kind) };
    Struct {
        fields: [
            (
                "ticket".to_string(),
                value(Kind::StringValue("OPS-1".into())),
            ),
            ("attempt".to_string(), value(Kind::NumberValue(2.0))),
            (
                "tags".to_string(),
                value(Kind::ListValue(ListValue {
                    values: vec![value(Kind::BoolValue(true)), value(Kind::NullValue(0))],
                })),
            ),
        ]
        .into(),
    }
}

fn fuzz_labels() -> HashMap<String, String> {
    HashMap::from([("team".to_string(), "fuzz".to_string())])
}

fn enc(message: impl Message) -> Vec<u8> {
    message.encode_to_vec()
}

/// Well-formed requests of `method` about the agent `id`, to mutate.
fn samples(method: &str, id: &str) -> Vec<Vec<u8>> {
    let id = id.to_string();
    let meta = Some(small_metadata());
    macro_rules! change {
        ($request:ident { $($field:ident: $value:expr),* }) => {
            vec![
                enc(pb::$request {
                    agent_id: id.clone(),
                    $($field: $value,)*
                    ..Default::default()
                }),
                enc(pb::$request {
                    agent_id: id.clone(),
                    reason: "fuzz".into(),
                    triggered_by: "fuzzer".into(),
                    metadata: meta.clone(),
                    expected_version: Some(7),
                    request_id: "fuzz-request".into(),
                    $($field: $value,)*
                }),
            ]
        };
    }
    match method {
        "RegisterAgent" => vec![
            enc(pb::RegisterAgentRequest {
                agent_id: id,
                name: "fuzz".into(),
                ..Default::default()
            }),
            enc(pb::RegisterAgentRequest {
                name: "fuzz".into(),
                labels: fuzz_labels(),
                reason: "fuzz".into(),
                triggered_by: "fuzzer".into(),
                metadata: meta,
                ..Default::default()
            }),
        ],
        "TransitionAgent" => [S::Maintenance, S::Online, S::Error, S::Busy]
            .iter()
            .map(|s| {
                enc(pb::TransitionAgentRequest {
                    agent_id: id.clone(),
                    target_state: *s as i32,
                    reason: "fuzz".into(),
                    metadata: meta.clone(),
                    expected_version: (*s == S::Busy).then_some(4),
                    ..Default::default()
                })
            })
            .collect(),
        "DeployAgent" => change!(DeployAgentRequest {}),
        "StartAgent" => change!(StartAgentRequest {
            wait_for_heartbeat: Some(false)
        }),
        "StopAgent" => change!(StopAgentRequest {}),
        "AssignTask" => change!(AssignTaskRequest {
            task_id: "t-9".into()
        }),
        "CompleteTask" => change!(CompleteTaskRequest {
            task_id: "t-9".into()
        }),
        "HandleError" => vec![enc(pb::HandleErrorRequest {
            agent_id: id,
            error_message: "out of memory".into(),
            triggered_by: "fuzzer".into(),
            metadata: meta,
            expected_version: Some(3),
            request_id: "fuzz-error".into(),
        })],
        "PutInMaintenance" => change!(PutInMaintenanceRequest {}),
        "ResumeFromMaintenance" => change!(ResumeFromMaintenanceRequest {}),
        "GetAgent" => vec![enc(pb::GetAgentRequest {
            agent_id: id,
            ..Default::default()
        })],
        "ListAgents" => vec![
            enc(pb::ListAgentsRequest {
                states: vec![S::Online as i32, S::Busy as i32],
                category: pb::AgentCategory::Operational as i32,
                labels: fuzz_labels(),
                page_size: 5,
                page_token: String::new(),
                as_of: None,
            }),
            enc(pb::ListAgentsRequest {
                page_size: 2,
                ..Default::default()
            }),
        ],
        "GetAgentHistory" => vec![enc(pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            limit: 3,
            page_size: 2,
            page_token: String::new(),
        })],
        "GetAgentAnalytics" => vec![enc(pb::GetAgentAnalyticsRequest {
            agent_id: id.clone(),
            window: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
        })],
        "GetFleetAnalytics" => vec![enc(pb::GetFleetAnalyticsRequest {
            window: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            buckets: 4,
            top: 3,
            ..Default::default()
        })],
        "ListTransitions" => vec![
            enc(pb::ListTransitionsRequest {
                agent_id: id,
                page_size: 2,
                ..Default::default()
            }),
            enc(pb::ListTransitionsRequest {
                principal: Some("someone".into()),
                ..Default::default()
            }),
        ],
        "GetLifecycleMetrics" => vec![enc(pb::GetLifecycleMetricsRequest::default())],
        "GetTransitionRules" => vec![enc(pb::GetTransitionRulesRequest {})],
        "SyncExternalStatus" => [
            ("docker", "running"),
            ("kubernetes", "CrashLoopBackOff"),
            ("hf_space", "PAUSED"),
        ]
        .iter()
        .map(|(source, status)| {
            enc(pb::SyncExternalStatusRequest {
                agent_id: id.clone(),
                source: source.to_string(),
                status: status.to_string(),
                metadata: meta.clone(),
            })
        })
        .collect(),
        "Heartbeat" | "HeartbeatStream" => vec![enc(pb::HeartbeatRequest {
            agent_id: id,
            load: Some(0.5),
            current_task: "t-9".into(),
        })],
        "WatchEvents" => vec![
            enc(pb::WatchEventsRequest {
                agent_ids: vec![id],
                states: vec![S::Online as i32],
                event_types: vec![pb::EventType::Transitioned as i32],
                labels: fuzz_labels(),
                start_sequence: 1,
                include_snapshot: false,
            }),
            enc(pb::WatchEventsRequest {
                include_snapshot: true,
                ..Default::default()
            }),
        ],
        other => panic!("no sample requests for the RPC {other}: add them"),
    }
}

/// Whether `bytes` are a response message of `method`: why not.
fn is_response(method: &str, bytes: &[u8]) -> Result<(), String> {
    fn is<T: Message + Default>(bytes: &[u8]) -> Result<(), String> {
        T::decode(bytes).map(drop).map_err(|e| e.to_string())
    }
    match method {
        "RegisterAgent" => is::<pb::RegisterAgentResponse>(bytes),
        "TransitionAgent" => is::<pb::TransitionAgentResponse>(bytes),
        "DeployAgent" => is::<pb::DeployAgentResponse>(bytes),
        "StartAgent" => is::<pb::StartAgentResponse>(bytes),
        "StopAgent" => is::<pb::StopAgentResponse>(bytes),
        "AssignTask" => is::<pb::AssignTaskResponse>(bytes),
        "CompleteTask" => is::<pb::CompleteTaskResponse>(bytes),
        "HandleError" => is::<pb::HandleErrorResponse>(bytes),
        "PutInMaintenance" => is::<pb::PutInMaintenanceResponse>(bytes),
        "ResumeFromMaintenance" => is::<pb::ResumeFromMaintenanceResponse>(bytes),
        "GetAgent" => is::<pb::GetAgentResponse>(bytes),
        "ListAgents" => is::<pb::ListAgentsResponse>(bytes),
        "GetAgentHistory" => is::<pb::GetAgentHistoryResponse>(bytes),
        "ListTransitions" => is::<pb::ListTransitionsResponse>(bytes),
        "GetAgentAnalytics" => is::<pb::GetAgentAnalyticsResponse>(bytes),
        "GetFleetAnalytics" => is::<pb::GetFleetAnalyticsResponse>(bytes),
        "GetLifecycleMetrics" => is::<pb::GetLifecycleMetricsResponse>(bytes),
        "GetTransitionRules" => is::<pb::GetTransitionRulesResponse>(bytes),
        "SyncExternalStatus" => is::<pb::SyncExternalStatusResponse>(bytes),
        "Heartbeat" => is::<pb::HeartbeatResponse>(bytes),
        "HeartbeatStream" => is::<pb::HeartbeatStreamResponse>(bytes),
        "WatchEvents" => is::<pb::WatchEventsResponse>(bytes),
        other => panic!("no response type for the RPC {other}: add it"),
    }
}

// ---------------------------------------------------------------------------
// The service as the descriptor describes it

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Unary,
    ClientStreaming,
    ServerStreaming,
}

/// One RPC, from the server's own descriptor set.
#[derive(Clone, Debug)]
struct Method {
    name: String,
    shape: Shape,
    /// Field numbers of the request message.
    fields: Vec<i32>,
    /// A string field of the request (plain or repeated), if any.
    string_field: Option<u32>,
    /// The request message type.
    input: prost_types::DescriptorProto,
}

/// Every RPC of the lifecycle service, in proto order.
fn methods() -> Vec<Method> {
    use prost_types::field_descriptor_proto::Type;
    let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET)
        .expect("the server's descriptor set");
    let file = set
        .file
        .iter()
        .find(|f| f.package() == "agentlifecycle.v1")
        .expect("the agentlifecycle.v1 file");
    let service = file
        .service
        .iter()
        .find(|s| s.name() == "AgentLifecycleService")
        .expect("the service");
    let methods: Vec<Method> = service
        .method
        .iter()
        .map(|m| {
            let input = m.input_type().rsplit('.').next().expect("type name");
            let message = file
                .message_type
                .iter()
                .find(|t| t.name() == input)
                .unwrap_or_else(|| panic!("request type {input}"));
            let shape = match (m.client_streaming(), m.server_streaming()) {
                (false, false) => Shape::Unary,
                (true, false) => Shape::ClientStreaming,
                (false, true) => Shape::ServerStreaming,
                (true, true) => panic!("{} is bidirectional: not covered", m.name()),
            };
            Method {
                name: m.name().to_string(),
                shape,
                fields: message.field.iter().map(|f| f.number()).collect(),
                string_field: message
                    .field
                    .iter()
                    .find(|f| f.r#type() == Type::String)
                    .map(|f| f.number() as u32),
                input: message.clone(),
            }
        })
        .collect();
    assert!(methods.len() >= 19, "the service has every RPC");
    methods
}
