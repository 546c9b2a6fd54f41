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

mod common;

use std::{
    collections::{BTreeSet, HashMap},
    future::Future,
    time::Instant,
};

use agent_lifecycle::{
    domain::limits::MAX_METADATA_DEPTH,
    api::grpc::pb::{self, AgentState as S},
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
        "GetAgent" => vec![enc(pb::GetAgentRequest { agent_id: id })],
        "ListAgents" => vec![
            enc(pb::ListAgentsRequest {
                states: vec![S::Online as i32, S::Busy as i32],
                category: pb::AgentCategory::Operational as i32,
                labels: fuzz_labels(),
                page_size: 5,
                page_token: String::new(),
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
        "GetLifecycleMetrics" => vec![enc(pb::GetLifecycleMetricsRequest {})],
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

// ---------------------------------------------------------------------------
// Random and mutated request bytes

/// What the server must answer to a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Any answer a client can get for some input: a client code or the
    /// decoder's INTERNAL.
    AnyStatus,
    /// The bytes are a valid request message: anything but a decode error.
    Decodes,
    /// The bytes are not a valid request message: the decoder's INTERNAL.
    DecodeError,
}

struct Case {
    kind: &'static str,
    body: Vec<u8>,
    expect: Expect,
}

/// Text for a string field: the target's id, other ids, words the server
/// knows, random and long text.
fn random_text(rng: &mut Rng, target: &str) -> String {
    const WORDS: [&str; 12] = [
        "docker",
        "kubernetes",
        "hf_space",
        "running",
        "CrashLoopBackOff",
        "PAUSED",
        "exited",
        "agents.v1.00000000000000000000000000000000",
        "history.v1.0.5",
        "00000000-0000-0000-0000-000000000000",
        "\u{1f980}\u{e9}\u{0}",
        " ",
    ];
    match rng.below(8) {
        0 | 1 => target.to_string(),
        2 => String::new(),
        3 => rng.pick(&WORDS).to_string(),
        4 => {
            let b = rng.bytes(16);
            let h = raw::hex(&b, 16);
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        }
        5 => {
            let len = 256 + rng.below(4000);
            "x".repeat(len)
        }
        _ => {
            let len = rng.below(300);
            (0..len)
                .map(|_| char::from(b' ' + (rng.below(95) as u8)))
                .collect()
        }
    }
}

/// A varint: small numbers, enum edges, and the extremes of every width.
fn random_varint(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0..=2 => rng.below(20) as u64,
        3 => *rng.pick(&[
            i32::MAX as u64,
            u32::MAX as u64,
            1 << 31,
            1 << 32,
            i64::MAX as u64,
            u64::MAX,
        ]),
        // A negative int32, as protobuf encodes it: ten bytes.
        4 => (-(1 + rng.below(1000) as i64)) as u64,
        _ => rng.next_u64() >> rng.below(64),
    }
}

/// Metadata up to `depth` levels deep, with every kind of value.
fn random_struct(rng: &mut Rng, depth: usize) -> Struct {
    let mut fields = std::collections::BTreeMap::new();
    for i in 0..rng.below(5) {
        let kind = match rng.below(if depth == 0 { 5 } else { 7 }) {
            0 => Kind::NullValue(rng.below(3) as i32),
            1 => Kind::BoolValue(rng.chance(50)),
            2 => {
                let bits = f64::from_bits(rng.next_u64());
                Kind::NumberValue(*rng.pick(&[0.5, -1.0, f64::MAX, f64::NAN, f64::INFINITY, bits]))
            }
            3 | 4 => Kind::StringValue(random_text(rng, "")),
            5 => Kind::StructValue(random_struct(rng, depth - 1)),
            _ => Kind::ListValue(ListValue {
                values: random_struct(rng, depth - 1).fields.into_values().collect(),
            }),
        };
        fields.insert(format!("k{i}"), Value { kind: Some(kind) });
    }
    Struct { fields }
}

/// A well-formed request message with random values in random fields,
/// built from the request type's descriptor.
fn random_request(rng: &mut Rng, method: &Method, target: &str) -> Vec<u8> {
    use prost_types::field_descriptor_proto::{Label, Type};
    let mut out = Wire::new();
    for field in &method.input.field {
        if rng.chance(30) {
            continue;
        }
        let number = field.number() as u32;
        let repeats = match field.label() {
            Label::Repeated => rng.below(4),
            _ => 1,
        };
        for _ in 0..repeats {
            out = match field.r#type() {
                Type::String => out.bytes(number, random_text(rng, target).as_bytes()),
                Type::Bool | Type::Enum | Type::Uint32 | Type::Uint64 | Type::Int32 => {
                    out.uint(number, random_varint(rng))
                }
                Type::Double => {
                    let value = *rng.pick(&[0.5, f64::NAN, f64::NEG_INFINITY, -0.0, f64::MAX]);
                    out.key(number, wire::FIXED64).raw(&value.to_le_bytes())
                }
                Type::Message if field.type_name() == ".google.protobuf.Struct" => {
                    out.bytes(number, &random_struct(rng, 3).encode_to_vec())
                }
                Type::Message if field.type_name() == ".google.protobuf.Duration" => {
                    // Seconds and nanos, valid or not (negative, huge).
                    let duration = Wire::new()
                        .uint(1, random_varint(rng))
                        .uint(2, random_varint(rng));
                    out.bytes(number, &duration.0)
                }
                Type::Message if field.type_name().ends_with("Entry") => {
                    let key = random_text(rng, "");
                    let value = random_text(rng, "");
                    let entry = Wire::new()
                        .bytes(1, key.as_bytes())
                        .bytes(2, value.as_bytes());
                    out.bytes(number, &entry.0)
                }
                other => panic!(
                    "{}.{}: no random values of type {other:?} ({})",
                    method.input.name(),
                    field.name(),
                    field.type_name()
                ),
            };
        }
    }
    out.0
}

/// Byte sequences that are not UTF-8.
fn invalid_utf8(rng: &mut Rng) -> Vec<u8> {
    let fixed: [&[u8]; 6] = [
        b"\xff",
        b"\xc0\x80",
        b"\xed\xa0\x80",
        b"agent\x80",
        b"\xf4\x90\x80\x80",
        b"\xe2\x82",
    ];
    if rng.chance(70) {
        return rng.pick(&fixed).to_vec();
    }
    loop {
        let len = 1 + rng.below(64);
        let bytes = rng.bytes(len);
        if std::str::from_utf8(&bytes).is_err() {
            return bytes;
        }
    }
}

/// A field number the request message does not have.
fn unknown_field(rng: &mut Rng, method: &Method) -> u32 {
    loop {
        let field = match rng.below(3) {
            0 => 16 + rng.below(100) as u32,
            1 => 1000 + rng.below(100_000) as u32,
            _ => (1 << 29) - 1 - rng.below(10) as u32,
        };
        if !method.fields.contains(&(field as i32)) {
            return field;
        }
    }
}

/// One case for `method`: a random well-formed request, random bytes, or
/// a well-formed request (one of `samples`, about `target`) mutated.
fn case(rng: &mut Rng, method: &Method, samples: &[Vec<u8>], target: &str) -> Case {
    let sample = rng.pick(samples).clone();
    let with = |tail: Wire| {
        let mut body = sample.clone();
        body.extend_from_slice(&tail.0);
        body
    };
    match rng.below(20) {
        16..=19 => Case {
            kind: "random well-formed request",
            body: random_request(rng, method, target),
            expect: Expect::Decodes,
        },
        0 | 1 => {
            let len = if rng.chance(50) {
                rng.below(64)
            } else {
                rng.below(4097)
            };
            Case {
                kind: "random bytes",
                body: rng.bytes(len),
                expect: Expect::AnyStatus,
            }
        }
        2 => {
            let mut body = sample;
            for _ in 0..1 + rng.below(8) {
                if body.is_empty() {
                    body.push(rng.byte());
                }
                let at = rng.below(body.len());
                body[at] ^= 1 << rng.below(8);
            }
            Case {
                kind: "flipped bits",
                body,
                expect: Expect::AnyStatus,
            }
        }
        3 => {
            let mut body = sample;
            body.truncate(rng.below(body.len() + 1));
            Case {
                kind: "truncated",
                body,
                expect: Expect::AnyStatus,
            }
        }
        4 => {
            let mut body = sample;
            let at = rng.below(body.len() + 1);
            let len = 1 + rng.below(16);
            let inserted = rng.bytes(len);
            body.splice(at..at, inserted);
            Case {
                kind: "inserted bytes",
                body,
                expect: Expect::AnyStatus,
            }
        }
        5 => {
            let field = unknown_field(rng, method);
            let tail = match rng.below(4) {
                0 => Wire::new().uint(field, rng.next_u64()),
                // -1 as a 10-byte varint.
                1 => Wire::new().uint(field, u64::MAX),
                2 => Wire::new().key(field, wire::FIXED64).raw(&rng.bytes(8)),
                _ => {
                    let len = rng.below(300);
                    Wire::new().bytes(field, &rng.bytes(len))
                }
            };
            Case {
                kind: "unknown field",
                body: with(tail),
                expect: Expect::Decodes,
            }
        }
        6 => {
            // Field 1 as fixed32: every request's field 1 is a string, a
            // repeated string or a repeated enum.
            let has_field_1 = method.fields.contains(&1);
            Case {
                kind: "field 1 with the wrong wire type",
                body: with(Wire::new().key(1, wire::FIXED32).raw(&rng.bytes(4))),
                expect: if has_field_1 {
                    Expect::DecodeError
                } else {
                    Expect::Decodes
                },
            }
        }
        7 => Case {
            kind: "11-byte varint as a key",
            body: with(Wire::new().raw(&[0xff; 10]).raw(&[0x01])),
            expect: Expect::DecodeError,
        },
        8 => {
            let field = 1 + rng.below(8) as u32;
            let declared = 100 + rng.below(1_000_000) as u64;
            let present = rng.below(50);
            let tail = Wire::new()
                .key(field, wire::LEN)
                .varint(declared)
                .raw(&rng.bytes(present));
            Case {
                kind: "length past the end",
                body: with(tail),
                expect: Expect::DecodeError,
            }
        }
        9 => {
            let bad = invalid_utf8(rng);
            match method.string_field {
                Some(field) => Case {
                    kind: "invalid UTF-8 in a string field",
                    body: with(Wire::new().bytes(field, &bad)),
                    expect: Expect::DecodeError,
                },
                None => Case {
                    kind: "invalid UTF-8 in an unknown field",
                    body: with(Wire::new().bytes(unknown_field(rng, method), &bad)),
                    expect: Expect::Decodes,
                },
            }
        }
        10 => {
            let wire_type = 6 + rng.below(2) as u8;
            Case {
                kind: "invalid wire type",
                body: with(
                    Wire::new()
                        .key(1 + rng.below(20) as u32, wire_type)
                        .varint(1),
                ),
                expect: Expect::DecodeError,
            }
        }
        11 => Case {
            kind: "field number 0",
            body: with(Wire::new().key(0, wire::VARINT).varint(1)),
            expect: Expect::DecodeError,
        },
        12 => {
            let other = rng.pick(samples).clone();
            Case {
                kind: "two requests concatenated",
                body: with(Wire::new().raw(&other)),
                expect: Expect::Decodes,
            }
        }
        13 => {
            let field = unknown_field(rng, method);
            let mut tail = Wire::new();
            for i in 0..2000 {
                tail = tail.uint(field, i);
            }
            Case {
                kind: "2000 unknown fields",
                body: with(tail),
                expect: Expect::Decodes,
            }
        }
        14 => {
            // Unknown groups nested past the decoder's recursion limit.
            let field = unknown_field(rng, method);
            let depth = 200 + rng.below(2000);
            let mut tail = Wire::new();
            for _ in 0..depth {
                tail = tail.key(field, wire::START_GROUP);
            }
            for _ in 0..depth {
                tail = tail.key(field, 4);
            }
            Case {
                kind: "unknown groups nested 200+ deep",
                body: with(tail),
                expect: Expect::DecodeError,
            }
        }
        _ => Case {
            kind: "length near 2^64",
            body: with(
                Wire::new()
                    .key(unknown_field(rng, method), wire::LEN)
                    .varint(u64::MAX - rng.below(1000) as u64),
            ),
            expect: Expect::DecodeError,
        },
    }
}

/// Sends `body` as `method`'s request message (for a client-streaming
/// method, `copies` times): the response message, `None` for an open
/// server stream (dropped unread), or the status.
async fn send_raw(
    raw: &mut RawClient,
    method: &Method,
    body: Bytes,
    copies: usize,
) -> Result<Option<Bytes>, Status> {
    let name = method.name.as_str();
    let call = async {
        match method.shape {
            Shape::Unary => raw.unary(name, body).await.map(Some),
            Shape::ClientStreaming => raw
                .client_streaming(name, vec![body; copies])
                .await
                .map(Some),
            Shape::ServerStreaming => raw.server_streaming(name, body).await.map(|_| None),
        }
    };
    timed(name, call).await
}

/// Why the answer to `case` is wrong, if it is.
fn judge(method: &Method, case: &Case, answer: &Result<Option<Bytes>, Status>) -> Option<String> {
    match answer {
        Ok(response) => {
            if let Some(bytes) = response
                && let Err(why) = is_response(&method.name, bytes)
            {
                return Some(format!(
                    "OK with bytes that are not a {} response ({why}): {}",
                    method.name,
                    raw::hex(bytes, 64)
                ));
            }
            (case.expect == Expect::DecodeError)
                .then(|| "OK for bytes that are not a valid request message".to_string())
        }
        Err(status) if is_decode_error(status) => (case.expect == Expect::Decodes).then(|| {
            format!(
                "a valid request message refused as undecodable: {}",
                status.message()
            )
        }),
        Err(status) if case.expect == Expect::DecodeError => Some(format!(
            "expected the decoder's INTERNAL, got {:?}: {}",
            status.code(),
            status.message()
        )),
        Err(status) if CLIENT_CODES.contains(&status.code()) => None,
        Err(status) => Some(format!(
            "answered {:?}: {}",
            status.code(),
            status.message()
        )),
    }
}

/// Every RPC, fed a few hundred random and mutated request messages: each
/// gets a proper status (never UNKNOWN, UNAVAILABLE or a broken stream),
/// INTERNAL only from the decoder and exactly for bytes that are not a
/// request message, and successes carry a response message.
#[tokio::test]
async fn random_and_mutated_bytes_to_every_method() {
    let seed = seed();
    println!("seed {seed:#x} (HOSTILE_SEED={seed:#x} replays it)");
    let mut server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let target = online(&mut client, &[("team", "fuzz")]).await.agent_id;
    let mut raw = RawClient::new(common::channel(&server.url()).await);

    let before = server.resident_memory();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut tally: HashMap<(String, Code), usize> = HashMap::new();
    for method in methods() {
        let samples = samples(&method.name, &target);
        let mut rng = Rng::new(seed ^ fnv(&method.name));
        for index in 0..CASES_PER_METHOD {
            let case = case(&mut rng, &method, &samples, &target);
            let copies = 1 + rng.below(3);
            let answer = send_raw(&mut raw, &method, case.body.clone().into(), copies).await;
            let code = answer.as_ref().map_or_else(Status::code, |_| Code::Ok);
            *tally.entry((method.name.clone(), code)).or_default() += 1;
            if let Some(why) = judge(&method, &case, &answer) {
                failures.push(format!(
                    "{} case {index} ({}, {:?}): {why}\n  request bytes: {}",
                    method.name,
                    case.kind,
                    case.expect,
                    raw::hex(&case.body, 128)
                ));
            }
        }
        server.assert_running();
    }
    let mut codes: Vec<_> = tally
        .into_iter()
        .map(|((method, code), n)| format!("{method} {code:?} {n}"))
        .collect();
    codes.sort();
    println!("answers per method and code: {codes:?}");
    let after = server.resident_memory();
    println!(
        "random cases took {:?}; resident memory {:.1} MiB before, {:.1} MiB after",
        started.elapsed(),
        mib(before),
        mib(after)
    );
    assert!(
        failures.is_empty(),
        "{} wrong answers (seed {seed:#x}):\n{}{}",
        failures.len(),
        failures.join("\n"),
        server.log()
    );
    assert!(
        after <= before + MEMORY_GROWTH_BOUND,
        "resident memory grew from {:.1} MiB to {:.1} MiB{}",
        mib(before),
        mib(after),
        server.log()
    );
    assert_survived(&mut server, &bystanders).await;
}

/// Bytes in MiB, for messages.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// FNV-1a, to give each method its own stream of cases.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------
// Broken gRPC framing

/// What a broken framing case must get.
#[derive(Clone, Copy, Debug)]
enum Framed {
    /// This code, with a message starting with this text.
    Status(Code, &'static str),
    /// The answer to the well-formed message alone.
    AsOneMessage,
}

/// Request bodies whose gRPC framing is broken, sent to every RPC: each
/// gets the status tonic's framing rules call for (OUT_OF_RANGE for a
/// message declared over 1 MiB, before any of it is read; UNIMPLEMENTED for
/// an unsupported compression; INTERNAL for a protocol violation), and the
/// server keeps serving.
#[tokio::test]
async fn broken_grpc_framing_gets_a_status() {
    let mut server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let channel = common::channel(&server.url()).await;
    // Field 1 is a string (or packed enums) in every request with fields.
    let message = Wire::new().bytes(1, b"not-a-uuid").0;
    let len = message.len() as u32;
    let one = raw::frame(0, len, &message);
    let over = MAX_REQUEST_BYTES as u32 + 1;
    let eof = Framed::Status(Code::Internal, "Unexpected EOF decoding stream");
    let protocol = Framed::Status(Code::Internal, "protocol error");
    let too_large = Framed::Status(Code::OutOfRange, "Error, decoded message length too large");
    let unsupported = Framed::Status(Code::Unimplemented, "Content is compressed with");
    type Headers = &'static [(&'static str, &'static str)];
    let cases: Vec<(&str, Headers, Bytes, Framed)> = vec![
        (
            "no message",
            &[],
            Bytes::new(),
            Framed::Status(Code::Internal, "Missing request message"),
        ),
        (
            "3 bytes of a header",
            &[],
            Bytes::from_static(&[0, 0, 0]),
            eof,
        ),
        (
            "a header declaring 4 GiB",
            &[],
            raw::frame(0, u32::MAX, &[]),
            too_large,
        ),
        (
            "a header declaring 1 MiB + 1",
            &[],
            raw::frame(0, over, b"abc"),
            too_large,
        ),
        (
            "100 bytes declared, 10 sent",
            &[],
            raw::frame(0, 100, &[0; 10]),
            eof,
        ),
        (
            "compression flag 7",
            &[],
            raw::frame(7, len, &message),
            protocol,
        ),
        (
            "compressed without grpc-encoding",
            &[],
            raw::frame(1, len, &message),
            protocol,
        ),
        (
            "gzip flag, not gzip",
            &[("grpc-encoding", "gzip")],
            raw::frame(1, len, &message),
            unsupported,
        ),
        (
            "unknown grpc-encoding",
            &[("grpc-encoding", "snappy-xyz")],
            raw::frame(1, len, &message),
            unsupported,
        ),
        (
            "two messages",
            &[],
            [one.clone(), one.clone()].concat().into(),
            Framed::AsOneMessage,
        ),
        (
            "a message, then 2 bytes",
            &[],
            [&one[..], &[9, 9]].concat().into(),
            eof,
        ),
    ];
    let mut failures = Vec::new();
    for method in methods() {
        let alone = raw::http_call(&channel, &method.name, &[], one.clone(), STEP)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", method.name));
        for (kind, headers, body, expect) in &cases {
            let expect = match (method.shape, *kind) {
                // A client stream may end after its last message...
                (Shape::ClientStreaming, "no message") => Framed::Status(Code::Ok, ""),
                // ...and is answered at its first bad message, before the
                // broken frame after it is read.
                (Shape::ClientStreaming, "a message, then 2 bytes") => Framed::AsOneMessage,
                // A method whose field 1 is not a string (a Duration, in the
                // analytics requests) cannot decode the message itself, and
                // says so before it sees the bytes after it.
                (_, "a message, then 2 bytes") if is_decode_error(&alone) => Framed::AsOneMessage,
                _ => *expect,
            };
            let (code, prefix) = match expect {
                Framed::Status(code, prefix) => (code, prefix),
                Framed::AsOneMessage => (alone.code(), ""),
            };
            match raw::http_call(&channel, &method.name, headers, body.clone(), STEP).await {
                Ok(status) if status.code() == code && status.message().starts_with(prefix) => {}
                Ok(status) => failures.push(format!(
                    "{} / {kind}: expected {code:?} \"{prefix}...\", got {:?} {:?}",
                    method.name,
                    status.code(),
                    status.message()
                )),
                Err(e) => failures.push(format!("{} / {kind}: no status: {e}", method.name)),
            }
        }
        server.assert_running();
    }
    assert!(
        failures.is_empty(),
        "{}{}",
        failures.join("\n"),
        server.log()
    );
    assert_survived(&mut server, &bystanders).await;
}

// ---------------------------------------------------------------------------
// Hostile typed requests

/// Collects what is wrong with the answers, so that one run shows all.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    /// INVALID_ARGUMENT, with ErrorInfo (reason INVALID_ARGUMENT, domain
    /// agentlifecycle.v1, metadata `field`) and a BadRequest naming `field`.
    fn invalid<T>(&mut self, what: &str, result: Result<T, Status>, field: &str) {
        let status = match result {
            Ok(_) => {
                return self
                    .0
                    .push(format!("{what}: OK, expected INVALID_ARGUMENT ({field})"));
            }
            Err(status) => status,
        };
        if status.code() != Code::InvalidArgument {
            return self.0.push(format!(
                "{what}: {:?} {:?}, expected INVALID_ARGUMENT ({field})",
                status.code(),
                truncated(status.message())
            ));
        }
        let info = status.get_details_error_info();
        let info_field = info.as_ref().and_then(|i| i.metadata.get("field"));
        let reason = info
            .as_ref()
            .map(|i| (i.reason.as_str(), i.domain.as_str()));
        let violations: Vec<String> = status
            .get_details_bad_request()
            .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
            .unwrap_or_default();
        if reason != Some(("INVALID_ARGUMENT", "agentlifecycle.v1"))
            || info_field.map(String::as_str) != Some(field)
            || violations != [field]
        {
            self.0.push(format!(
                "{what}: INVALID_ARGUMENT without the details naming {field}: ErrorInfo {info:?}, BadRequest fields {violations:?}"
            ));
        }
    }

    /// Exactly `code` (OK included).
    fn code<T>(&mut self, what: &str, result: Result<T, Status>, code: Code) -> Option<T> {
        match result {
            Ok(value) if code == Code::Ok => return Some(value),
            Ok(_) => self.0.push(format!("{what}: OK, expected {code:?}")),
            Err(status) if status.code() == code => {}
            Err(status) => self.0.push(format!(
                "{what}: {:?} {:?}, expected {code:?}",
                status.code(),
                truncated(status.message())
            )),
        }
        None
    }

    fn check(&mut self, what: &str, ok: bool, detail: impl std::fmt::Display) {
        if !ok {
            self.0.push(format!("{what}: {detail}"));
        }
    }

    fn assert_none(&self, server: &ServerProcess) {
        assert!(
            self.0.is_empty(),
            "{} wrong answers:\n{}{}",
            self.0.len(),
            self.0.join("\n"),
            server.log()
        );
    }
}

/// `text`, or its start and end when it is long.
fn truncated(text: &str) -> String {
    const KEEP: usize = 60;
    if text.len() <= 2 * KEEP + 20 {
        return text.to_string();
    }
    let mut head = KEEP;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - KEEP;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}...({} bytes)...{}",
        &text[..head],
        text.len(),
        &text[tail..]
    )
}

/// An RPC call without its response.
type Call = futures_util::future::BoxFuture<'static, Result<(), Status>>;

/// `rpc!(client.method(request))`: the call on a clone of the client, as a
/// [`Call`].
macro_rules! rpc {
    ($client:ident . $rpc:ident ( $request:expr )) => {{
        let mut client = $client.clone();
        let request = $request;
        Box::pin(async move { client.$rpc(request).await.map(drop) }) as Call
    }};
}

/// Runs each call; each must be INVALID_ARGUMENT naming its field.
async fn expect_invalid(checks: &mut Checks, calls: Vec<(String, Call, &str)>) {
    for (what, call, field) in calls {
        let answer = timed(&what, call).await;
        checks.invalid(&what, answer, field);
    }
}

/// `method` (an RPC whose request has `agent_id`) with `agent_id` and
/// otherwise valid fields.
fn call_with_agent_id(client: &Client, method: &str, agent_id: &str) -> Call {
    let agent_id = agent_id.to_string();
    match method {
        "RegisterAgent" => rpc!(client.register_agent(pb::RegisterAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "TransitionAgent" => rpc!(client.transition_agent(pb::TransitionAgentRequest {
            agent_id,
            target_state: S::Maintenance as i32,
            ..Default::default()
        })),
        "DeployAgent" => rpc!(client.deploy_agent(pb::DeployAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "StartAgent" => rpc!(client.start_agent(pb::StartAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "StopAgent" => rpc!(client.stop_agent(pb::StopAgentRequest {
            agent_id,
            ..Default::default()
        })),
        "AssignTask" => rpc!(client.assign_task(pb::AssignTaskRequest {
            agent_id,
            ..Default::default()
        })),
        "CompleteTask" => rpc!(client.complete_task(pb::CompleteTaskRequest {
            agent_id,
            ..Default::default()
        })),
        "HandleError" => rpc!(client.handle_error(pb::HandleErrorRequest {
            agent_id,
            error_message: "boom".into(),
            ..Default::default()
        })),
        "PutInMaintenance" => rpc!(client.put_in_maintenance(pb::PutInMaintenanceRequest {
            agent_id,
            ..Default::default()
        })),
        "ResumeFromMaintenance" => rpc!(client.resume_from_maintenance(
            pb::ResumeFromMaintenanceRequest {
                agent_id,
                ..Default::default()
            }
        )),
        "GetAgent" => rpc!(client.get_agent(pb::GetAgentRequest { agent_id })),
        "GetAgentHistory" => rpc!(client.get_agent_history(pb::GetAgentHistoryRequest {
            agent_id,
            ..Default::default()
        })),
        "ListTransitions" => rpc!(client.list_transitions(pb::ListTransitionsRequest {
            agent_id,
            ..Default::default()
        })),
        "GetAgentAnalytics" => rpc!(client.get_agent_analytics(pb::GetAgentAnalyticsRequest {
            agent_id,
            window: None,
        })),
        "SyncExternalStatus" => rpc!(client.sync_external_status(pb::SyncExternalStatusRequest {
            agent_id,
            source: "docker".into(),
            status: "running".into(),
            metadata: None,
        })),
        "Heartbeat" => rpc!(client.heartbeat(pb::HeartbeatRequest {
            agent_id,
            ..Default::default()
        })),
        "HeartbeatStream" => {
            rpc!(
                client.heartbeat_stream(tokio_stream::iter(vec![pb::HeartbeatRequest {
                    agent_id,
                    ..Default::default()
                }]))
            )
        }
        other => panic!("{other} takes an agent_id: add it here"),
    }
}

/// `n` labels `k0=v0`, `k1=v1`, ...
fn labels(n: usize) -> HashMap<String, String> {
    (0..n).map(|i| (format!("k{i}"), format!("v{i}"))).collect()
}

/// `n` fresh agent ids.
fn many_ids(n: usize) -> Vec<String> {
    (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect()
}

/// Metadata whose JSON is over the 16 KiB limit.
fn oversized_metadata() -> Struct {
    Struct {
        fields: (0..2000)
            .map(|i| {
                let value = Value {
                    kind: Some(Kind::StringValue(format!("value-{i}"))),
                };
                (format!("key-{i}"), value)
            })
            .collect(),
    }
}

/// A server with well-behaved agents, and an ONLINE agent to aim at.
async fn hostile_setup() -> (ServerProcess, Client, Bystanders, pb::Agent) {
    let server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let target = online(&mut client, &[("team", "target")]).await;
    (server, client, bystanders, target)
}

/// The end of a hostile test: every answer was right, the target agent is
/// unchanged by the refused requests, and the server survived.
async fn hostile_teardown(
    mut server: ServerProcess,
    client: &mut Client,
    bystanders: &Bystanders,
    target: &pb::Agent,
    mut checks: Checks,
) {
    server.assert_running();
    let now = get_agent(client, &target.agent_id).await;
    checks.check(
        "the target agent",
        &now == target,
        "changed by refused requests",
    );
    checks.assert_none(&server);
    assert_survived(&mut server, bystanders).await;
}

/// Messages over 1 MiB (on the generated server's path, the WatchEvents
/// path and in a client stream) get OUT_OF_RANGE; fields over their
/// limits, thousands of labels and non-finite numbers get INVALID_ARGUMENT
/// naming the field; 64 labels are accepted.
#[tokio::test]
async fn oversized_messages_and_fields_are_refused() {
    let (server, mut client, bystanders, target) = hostile_setup().await;
    let id = target.agent_id.clone();
    let mut checks = Checks::default();

    let huge = "r".repeat(MAX_REQUEST_BYTES);
    let over_limit = vec![
        (
            "RegisterAgent with a 1 MiB name",
            rpc!(client.register_agent(pb::RegisterAgentRequest {
                name: huge.clone(),
                ..Default::default()
            })),
        ),
        (
            "TransitionAgent with a 1 MiB reason",
            rpc!(client.transition_agent(pb::TransitionAgentRequest {
                agent_id: id.clone(),
                target_state: S::Maintenance as i32,
                reason: huge.clone(),
                ..Default::default()
            })),
        ),
        (
            "WatchEvents of 30000 agents (1.1 MB)",
            rpc!(client.watch_events(pb::WatchEventsRequest {
                agent_ids: many_ids(30_000),
                ..Default::default()
            })),
        ),
        (
            "HeartbeatStream with a 1 MiB message",
            rpc!(
                client.heartbeat_stream(tokio_stream::iter(vec![pb::HeartbeatRequest {
                    agent_id: id.clone(),
                    current_task: huge.clone(),
                    ..Default::default()
                }]))
            ),
        ),
    ];
    for (what, call) in over_limit {
        let answer = timed(what, call).await;
        checks.code(what, answer, Code::OutOfRange);
    }

    let almost = "r".repeat(MAX_REQUEST_BYTES - 1024);
    let mut calls: Vec<(String, Call, &str)> = vec![
        (
            "TransitionAgent with a 1023 KiB reason".into(),
            rpc!(client.transition_agent(pb::TransitionAgentRequest {
                agent_id: id.clone(),
                target_state: S::Maintenance as i32,
                reason: almost.clone(),
                ..Default::default()
            })),
            "reason",
        ),
        (
            "HandleError with a 1023 KiB message".into(),
            rpc!(client.handle_error(pb::HandleErrorRequest {
                agent_id: id.clone(),
                error_message: almost.clone(),
                ..Default::default()
            })),
            "error_message",
        ),
        (
            "HandleError with a 1018-byte message".into(),
            rpc!(client.handle_error(pb::HandleErrorRequest {
                agent_id: id.clone(),
                error_message: "e".repeat(1018),
                ..Default::default()
            })),
            "error_message",
        ),
        (
            "StopAgent with a 257-byte triggered_by".into(),
            rpc!(client.stop_agent(pb::StopAgentRequest {
                agent_id: id.clone(),
                triggered_by: "t".repeat(257),
                ..Default::default()
            })),
            "triggered_by",
        ),
        (
            "AssignTask with a 257-byte task_id".into(),
            rpc!(client.assign_task(pb::AssignTaskRequest {
                agent_id: id.clone(),
                task_id: "t".repeat(257),
                ..Default::default()
            })),
            "task_id",
        ),
        (
            "RegisterAgent with a 257-byte name".into(),
            rpc!(client.register_agent(pb::RegisterAgentRequest {
                name: "n".repeat(257),
                ..Default::default()
            })),
            "name",
        ),
        (
            "PutInMaintenance with 2000 metadata keys".into(),
            rpc!(client.put_in_maintenance(pb::PutInMaintenanceRequest {
                agent_id: id.clone(),
                metadata: Some(oversized_metadata()),
                ..Default::default()
            })),
            "metadata",
        ),
        (
            "PutInMaintenance with NaN in metadata".into(),
            rpc!(
                client.put_in_maintenance(pb::PutInMaintenanceRequest {
                    agent_id: id.clone(),
                    metadata: Some(Struct {
                        fields: [(
                            "x".to_string(),
                            Value {
                                kind: Some(Kind::NumberValue(f64::NAN)),
                            }
                        )]
                        .into(),
                    }),
                    ..Default::default()
                })
            ),
            "metadata",
        ),
        (
            "SyncExternalStatus with 2000 metadata keys".into(),
            rpc!(client.sync_external_status(pb::SyncExternalStatusRequest {
                agent_id: id.clone(),
                source: "docker".into(),
                status: "running".into(),
                metadata: Some(oversized_metadata()),
            })),
            "metadata",
        ),
        (
            "Heartbeat with a 100 KB current_task".into(),
            rpc!(client.heartbeat(pb::HeartbeatRequest {
                agent_id: id.clone(),
                current_task: "t".repeat(100_000),
                ..Default::default()
            })),
            "current_task",
        ),
    ];
    for load in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let call = rpc!(client.heartbeat(pb::HeartbeatRequest {
            agent_id: id.clone(),
            load: Some(load),
            ..Default::default()
        }));
        calls.push((format!("Heartbeat with load {load}"), call, "load"));
    }
    let long_source = "s".repeat(100_000);
    let long_status = "s".repeat(100_000);
    for (source, status, field) in [
        ("", "running", "source"),
        ("aws", "running", "source"),
        (long_source.as_str(), "running", "source"),
        ("docker", "", "status"),
        ("docker", "   ", "status"),
        ("docker", long_status.as_str(), "status"),
    ] {
        let call = rpc!(client.sync_external_status(pb::SyncExternalStatusRequest {
            agent_id: id.clone(),
            source: source.into(),
            status: status.into(),
            metadata: None,
        }));
        let what = format!(
            "SyncExternalStatus {:?} {:?}",
            truncated(source),
            truncated(status)
        );
        calls.push((what, call, field));
    }
    let bad_labels = [
        ("5000 labels", labels(5000)),
        ("65 labels", labels(65)),
        ("an empty key", HashMap::from([(String::new(), "v".into())])),
        (
            "a 129-byte key",
            HashMap::from([("k".repeat(129), "v".into())]),
        ),
        (
            "a 100 KB key",
            HashMap::from([("k".repeat(100_000), "v".into())]),
        ),
        (
            "a 257-byte value",
            HashMap::from([("k".into(), "v".repeat(257))]),
        ),
    ];
    for (what, labels) in bad_labels {
        let register = rpc!(client.register_agent(pb::RegisterAgentRequest {
            labels: labels.clone(),
            ..Default::default()
        }));
        calls.push((format!("RegisterAgent with {what}"), register, "labels"));
        let list = rpc!(client.list_agents(pb::ListAgentsRequest {
            labels: labels.clone(),
            ..Default::default()
        }));
        calls.push((format!("ListAgents filtering on {what}"), list, "labels"));
        let watch = rpc!(client.watch_events(pb::WatchEventsRequest {
            labels,
            ..Default::default()
        }));
        calls.push((format!("WatchEvents filtering on {what}"), watch, "labels"));
    }
    expect_invalid(&mut checks, calls).await;

    let answer = timed(
        "RegisterAgent with 64 labels",
        client.register_agent(pb::RegisterAgentRequest {
            labels: labels(64),
            ..Default::default()
        }),
    )
    .await;
    if let Some(response) = checks.code("RegisterAgent with 64 labels", answer, Code::Ok) {
        let agent = response.into_inner().agent.expect("agent");
        checks.check(
            "RegisterAgent with 64 labels",
            agent.labels == labels(64),
            "other labels",
        );
    }
    hostile_teardown(server, &mut client, &bystanders, &target, checks).await;
}

/// Unknown and UNSPECIFIED enum numbers, ids that are not UUIDs (for every
/// RPC that takes one, and in watch filters), too many watched ids and
/// contradictory watch options get INVALID_ARGUMENT naming the field;
/// well-formed unknown ids get NOT_FOUND; a start sequence past the head
/// gets OUT_OF_RANGE.
#[tokio::test]
async fn unknown_enums_and_malformed_ids_are_invalid_arguments() {
    let (server, mut client, bystanders, target) = hostile_setup().await;
    let id = target.agent_id.clone();
    let mut checks = Checks::default();
    let mut calls: Vec<(String, Call, &str)> = Vec::new();

    for number in [0, 19, 99, -1, i32::MAX, i32::MIN] {
        let call = rpc!(client.transition_agent(pb::TransitionAgentRequest {
            agent_id: id.clone(),
            target_state: number,
            ..Default::default()
        }));
        calls.push((
            format!("TransitionAgent to state {number}"),
            call,
            "target_state",
        ));
        let call = rpc!(client.list_agents(pb::ListAgentsRequest {
            states: vec![S::Online as i32, number],
            ..Default::default()
        }));
        calls.push((
            format!("ListAgents in states [5, {number}]"),
            call,
            "states",
        ));
        let call = rpc!(client.watch_events(pb::WatchEventsRequest {
            states: vec![number],
            ..Default::default()
        }));
        calls.push((format!("WatchEvents of states [{number}]"), call, "states"));
    }
    for number in [5, 99, -1, i32::MAX, i32::MIN] {
        let call = rpc!(client.list_agents(pb::ListAgentsRequest {
            category: number,
            ..Default::default()
        }));
        calls.push((format!("ListAgents in category {number}"), call, "category"));
    }
    for number in [0, 3, -1, i32::MAX] {
        let call = rpc!(client.watch_events(pb::WatchEventsRequest {
            event_types: vec![number],
            ..Default::default()
        }));
        calls.push((
            format!("WatchEvents of event types [{number}]"),
            call,
            "event_types",
        ));
    }

    let not_ids = [
        "not-a-uuid".to_string(),
        "../../../etc/passwd".into(),
        "' OR '1'='1".into(),
        "6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2d1".into(),
        "6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2d11x".into(),
        "6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2dzz".into(),
        "\u{0}".into(),
        "\u{1f980}\u{1f980}".into(),
        "a".repeat(300),
        "a".repeat(5_000),
        "a".repeat(100_000),
    ];
    let takes_id: Vec<Method> = methods()
        .into_iter()
        .filter(|m| m.input.field.iter().any(|f| f.name() == "agent_id"))
        .collect();
    for method in &takes_id {
        for not_id in not_ids.iter().map(String::as_str).chain(["", "   "]) {
            // An empty id means "any" (a new id, every agent's trail).
            if matches!(method.name.as_str(), "RegisterAgent" | "ListTransitions")
                && not_id.is_empty()
            {
                continue;
            }
            let what = format!("{} with agent_id {:?}", method.name, truncated(not_id));
            calls.push((
                what,
                call_with_agent_id(&client, &method.name, not_id),
                "agent_id",
            ));
        }
    }
    for not_id in &not_ids {
        let call = rpc!(client.watch_events(pb::WatchEventsRequest {
            agent_ids: vec![id.clone(), not_id.clone()],
            ..Default::default()
        }));
        calls.push((
            format!("WatchEvents of agent {:?}", truncated(not_id)),
            call,
            "agent_ids",
        ));
    }
    let call = rpc!(client.watch_events(pb::WatchEventsRequest {
        agent_ids: many_ids(1001),
        ..Default::default()
    }));
    calls.push(("WatchEvents of 1001 agents".into(), call, "agent_ids"));
    let call = rpc!(client.watch_events(pb::WatchEventsRequest {
        include_snapshot: true,
        start_sequence: 1,
        ..Default::default()
    }));
    calls.push((
        "WatchEvents with a snapshot and a start sequence".into(),
        call,
        "include_snapshot",
    ));
    expect_invalid(&mut checks, calls).await;

    for method in &takes_id {
        let unknown = uuid::Uuid::new_v4().to_string();
        let answer = timed(
            &method.name,
            call_with_agent_id(&client, &method.name, &unknown),
        )
        .await;
        let expected = match method.name.as_str() {
            "RegisterAgent" | "ListTransitions" => Code::Ok,
            _ => Code::NotFound,
        };
        checks.code(
            &format!("{} with an unknown id", method.name),
            answer,
            expected,
        );
    }
    let answer = timed(
        "WatchEvents from 2^64-1",
        rpc!(client.watch_events(pb::WatchEventsRequest {
            start_sequence: u64::MAX,
            ..Default::default()
        })),
    )
    .await;
    checks.code("WatchEvents from sequence 2^64-1", answer, Code::OutOfRange);
    hostile_teardown(server, &mut client, &bystanders, &target, checks).await;
}

/// Page sizes over the maximum (and -1, ten bytes on the wire, read as
/// 2^32-1 in a uint32) are clamped, so one page holds every agent of a
/// small fleet; page size 1 walks it without repeats; page tokens the
/// server did not issue get INVALID_ARGUMENT naming `page_token`;
/// well-formed tokens of positions that do not exist give empty pages.
#[tokio::test]
async fn extreme_page_sizes_and_forged_page_tokens() {
    let (server, mut client, bystanders, target) = hostile_setup().await;
    let id = target.agent_id.clone();
    let mut checks = Checks::default();
    let mut raw = RawClient::new(common::channel(&server.url()).await);
    let all = list_all_ids(&mut client).await;
    let count = target.history_count as usize;

    for page_size in [u32::MAX, 1001, 1 << 31] {
        let what = format!("ListAgents page_size {page_size}");
        let request = pb::ListAgentsRequest {
            page_size,
            ..Default::default()
        };
        let answer = timed(&what, client.list_agents(request)).await;
        if let Some(page) = checks.code(&what, answer, Code::Ok) {
            let page = page.into_inner();
            let ids: BTreeSet<String> = page.agents.into_iter().map(|a| a.agent_id).collect();
            let complete = ids == all && page.next_page_token.is_empty();
            checks.check(&what, complete, "not every agent on one page");
        }
    }
    let minus_one = Wire::new().uint(4, u64::MAX).into_bytes();
    match timed(
        "ListAgents page_size -1",
        raw.unary("ListAgents", minus_one),
    )
    .await
    {
        Ok(bytes) => {
            let page = pb::ListAgentsResponse::decode(bytes).expect("a ListAgents response");
            let n = page.agents.len();
            checks.check(
                "ListAgents page_size -1",
                n == all.len(),
                format!("{n} agents"),
            );
        }
        Err(status) => checks
            .0
            .push(format!("ListAgents page_size -1: {status:?}")),
    }
    let mut paged = BTreeSet::new();
    let mut token = String::new();
    for _ in 0..=all.len() {
        let request = pb::ListAgentsRequest {
            page_size: 1,
            page_token: token.clone(),
            ..Default::default()
        };
        let answer = timed("ListAgents page_size 1", client.list_agents(request)).await;
        let Some(page) = checks.code("ListAgents page_size 1", answer, Code::Ok) else {
            break;
        };
        let page = page.into_inner();
        let n = page.agents.len();
        checks.check("ListAgents page_size 1", n <= 1, format!("{n} agents"));
        for agent in page.agents {
            checks.check(
                "ListAgents page_size 1",
                paged.insert(agent.agent_id),
                "listed twice",
            );
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    checks.check(
        "ListAgents page by page",
        paged == all,
        "another set of agents",
    );

    for (limit, page_size) in [(u32::MAX, u32::MAX), (0, u32::MAX), (u32::MAX, 0)] {
        let what = format!("GetAgentHistory limit {limit} page_size {page_size}");
        let request = pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            limit,
            page_size,
            page_token: String::new(),
        };
        let answer = timed(&what, client.get_agent_history(request)).await;
        if let Some(page) = checks.code(&what, answer, Code::Ok) {
            let page = page.into_inner();
            let n = page.transitions.len();
            let complete = n == count && page.next_page_token.is_empty();
            checks.check(&what, complete, format!("{n} transitions"));
        }
    }
    let minus_one = Wire::new()
        .bytes(1, id.as_bytes())
        .uint(2, u64::MAX)
        .uint(3, u64::MAX)
        .into_bytes();
    let what = "GetAgentHistory limit and page_size -1";
    match timed(what, raw.unary("GetAgentHistory", minus_one)).await {
        Ok(bytes) => {
            let page = pb::GetAgentHistoryResponse::decode(bytes).expect("a history response");
            let n = page.transitions.len();
            checks.check(what, n == count, format!("{n} transitions"));
        }
        Err(status) => checks.0.push(format!("{what}: {status:?}")),
    }

    let mut calls: Vec<(String, Call, &str)> = Vec::new();
    let list_tokens = [
        "garbage".to_string(),
        "agents.v1.".into(),
        format!("agents.v1.{}", "z".repeat(32)),
        format!("agents.v1.{}", "0".repeat(31)),
        format!("agents.v1.{}", "0".repeat(33)),
        format!("agents.v1.-{}", "0".repeat(31)),
        "history.v1.0.1".into(),
        "a".repeat(100_000),
    ];
    for token in list_tokens {
        let what = format!("ListAgents with token {:?}", truncated(&token));
        let call = rpc!(client.list_agents(pb::ListAgentsRequest {
            page_token: token,
            ..Default::default()
        }));
        calls.push((what, call, "page_token"));
    }
    let history_tokens = [
        "garbage".to_string(),
        "history.v1.".into(),
        "history.v1.1".into(),
        "history.v1.2.1".into(),
        "history.v1.zz.1".into(),
        "history.v1.1.2.3".into(),
        "history.v1.10000000000000000.1".into(),
        format!("agents.v1.{}", "0".repeat(32)),
        "h".repeat(100_000),
    ];
    for token in history_tokens {
        let what = format!("GetAgentHistory with token {:?}", truncated(&token));
        let call = rpc!(client.get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            page_token: token,
            ..Default::default()
        }));
        calls.push((what, call, "page_token"));
    }
    expect_invalid(&mut checks, calls).await;

    let what = "ListAgents after the largest id";
    let request = pb::ListAgentsRequest {
        page_token: format!("agents.v1.{}", "f".repeat(32)),
        ..Default::default()
    };
    let answer = timed(what, client.list_agents(request)).await;
    if let Some(page) = checks.code(what, answer, Code::Ok) {
        let page = page.into_inner();
        let empty = page.agents.is_empty() && page.next_page_token.is_empty();
        checks.check(what, empty, "not an empty last page");
    }
    for token in [
        "history.v1.0.ffffffffffffffff",
        "history.v1.ffffffffffffffff.ffffffffffffffff",
    ] {
        let what = format!("GetAgentHistory with token {token}");
        let request = pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            page_token: token.into(),
            ..Default::default()
        };
        let answer = timed(&what, client.get_agent_history(request)).await;
        if let Some(page) = checks.code(&what, answer, Code::Ok) {
            let n = page.into_inner().transitions.len();
            checks.check(&what, n <= count, format!("{n} transitions"));
        }
    }
    hostile_teardown(server, &mut client, &bystanders, &target, checks).await;
}

/// Every agent, page by page.
async fn list_all_ids(client: &mut Client) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut token = String::new();
    loop {
        let page = timed(
            "ListAgents",
            client.list_agents(pb::ListAgentsRequest {
                page_token: token,
                ..Default::default()
            }),
        )
        .await
        .expect("ListAgents")
        .into_inner();
        ids.extend(page.agents.into_iter().map(|a| a.agent_id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

// ---------------------------------------------------------------------------
// Deeply nested metadata

/// Metadata nested `depth` levels: `{"a": {"a": ... {}}}`, or lists in
/// lists under one key.
fn nested_metadata(depth: usize, lists: bool) -> Struct {
    if lists {
        let mut value = Value {
            kind: Some(Kind::ListValue(ListValue::default())),
        };
        for _ in 1..depth {
            value = Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: vec![value],
                })),
            };
        }
        return Struct {
            fields: [("a".to_string(), value)].into(),
        };
    }
    let mut inner = Struct::default();
    for _ in 0..depth {
        let value = Value {
            kind: Some(Kind::StructValue(inner)),
        };
        inner = Struct {
            fields: [("a".to_string(), value)].into(),
        };
    }
    inner
}

/// Metadata nested from 1 to 1000 levels: up to the allowed depth accepted
/// and then readable by every client through GetAgent, GetAgentHistory,
/// ListAgents and WatchEvents; deeper, refused (INVALID_ARGUMENT naming
/// `metadata`, or the decoder's INTERNAL past its recursion limit), never
/// stored; a watcher open meanwhile keeps receiving events.
#[tokio::test]
async fn deeply_nested_metadata_is_refused_or_stays_readable() {
    let mut server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let mut watcher = common::watch(&mut client, pb::WatchEventsRequest::default()).await;
    let mut raw = RawClient::new(common::channel(&server.url()).await);
    let mut checks = Checks::default();
    let probe = ("probe", "deep");
    let mut accepted = 0;
    for lists in [false, true] {
        for depth in [
            1, 8, 15, 16, 24, 30, 31, 32, 33, 34, 40, 48, 64, 100, 200, 1000,
        ] {
            // Levels as the limit counts them: the metadata object is 1.
            let levels = depth + 1;
            let what = format!(
                "RegisterAgent with metadata {depth} {} deep",
                if lists { "lists" } else { "objects" }
            );
            let agent_id = uuid::Uuid::new_v4().to_string();
            let request = pb::RegisterAgentRequest {
                agent_id: agent_id.clone(),
                labels: HashMap::from([(probe.0.to_string(), probe.1.to_string())]),
                metadata: Some(nested_metadata(depth, lists)),
                ..Default::default()
            };
            let answer = timed(
                &what,
                raw.unary("RegisterAgent", request.encode_to_vec().into()),
            )
            .await;
            let bytes = match answer {
                Ok(bytes) => bytes,
                // Past the protobuf decoder's recursion limit (about 33
                // levels of Struct, 64 of lists) the request itself cannot
                // be decoded: INTERNAL, as gRPC specifies for a request that
                // does not parse. Short of it, the server's own depth cap
                // answers INVALID_ARGUMENT naming the field.
                Err(status)
                    if levels > MAX_METADATA_DEPTH
                        && status.code() == Code::Internal
                        && status.message().contains("recursion limit reached") =>
                {
                    continue;
                }
                Err(status) => {
                    checks.invalid(&what, Err::<(), _>(status), "metadata");
                    continue;
                }
            };
            if levels > MAX_METADATA_DEPTH {
                checks.0.push(format!(
                    "{what}: accepted, deeper than the {MAX_METADATA_DEPTH} levels allowed"
                ));
            }
            accepted += 1;
            if let Err(e) = pb::RegisterAgentResponse::decode(bytes) {
                checks.0.push(format!(
                    "{what}: accepted, but its response cannot be decoded: {}",
                    truncated(&e.to_string())
                ));
            }
            let result = timed(
                "GetAgent",
                client.get_agent(pb::GetAgentRequest {
                    agent_id: agent_id.clone(),
                }),
            )
            .await;
            checks.code(&format!("{what}: GetAgent"), result, Code::Ok);
            let result = timed(
                "GetAgentHistory",
                client.get_agent_history(pb::GetAgentHistoryRequest {
                    agent_id: agent_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
            checks.code(&format!("{what}: GetAgentHistory"), result, Code::Ok);
            let result = timed(
                "WatchEvents",
                client.watch_events(pb::WatchEventsRequest {
                    agent_ids: vec![agent_id.clone()],
                    start_sequence: 1,
                    ..Default::default()
                }),
            )
            .await;
            if let Some(stream) = checks.code(&format!("{what}: WatchEvents"), result, Code::Ok) {
                let mut stream = stream.into_inner();
                let first = timed("the replayed registration", stream.message()).await;
                checks.code(
                    &format!("{what}: its replayed registration event"),
                    first,
                    Code::Ok,
                );
            }
        }
    }
    assert_eq!(accepted, 6, "depths 1, 8 and 15, as objects and as lists");
    let result = timed(
        "ListAgents",
        client.list_agents(pb::ListAgentsRequest {
            labels: HashMap::from([(probe.0.to_string(), probe.1.to_string())]),
            ..Default::default()
        }),
    )
    .await;
    checks.code("ListAgents of the accepted agents", result, Code::Ok);

    // The watcher that was open all along receives the next event.
    let after = register(&mut client, &[("role", "after-deep")])
        .await
        .agent_id;
    loop {
        match timed("the open watcher", watcher.message()).await {
            Ok(Some(pb::WatchEventsResponse {
                kind: Some(pb::watch_events_response::Kind::Event(event)),
            })) if event.agent_id == after => break,
            Ok(Some(_)) => continue,
            Ok(None) => {
                checks
                    .0
                    .push("the watcher open during the attack: its stream ended".into());
                break;
            }
            Err(status) => {
                checks.0.push(format!(
                    "the watcher open during the attack: its stream failed: {:?} {}",
                    status.code(),
                    truncated(status.message())
                ));
                break;
            }
        }
    }
    checks.assert_none(&server);
    assert_survived(&mut server, &bystanders).await;
}

// ---------------------------------------------------------------------------
// Watch floods

/// Connections per flood round, and watch streams opened on each.
const FLOOD_CONNECTIONS: usize = 5;
const FLOOD_STREAMS: usize = 100;
/// Rounds after the first (which warms the allocator up).
const FLOOD_ROUNDS: usize = 10;
/// Agents that snapshots carry.
const FLEET: usize = 300;

/// Live, snapshot, full replay and filtered snapshot streams, in turn.
fn flood_request(i: usize) -> pb::WatchEventsRequest {
    match i % 4 {
        0 => pb::WatchEventsRequest::default(),
        1 => pb::WatchEventsRequest {
            include_snapshot: true,
            ..Default::default()
        },
        2 => pb::WatchEventsRequest {
            start_sequence: 1,
            ..Default::default()
        },
        _ => pb::WatchEventsRequest {
            labels: HashMap::from([("team".to_string(), "fleet".to_string())]),
            include_snapshot: true,
            ..Default::default()
        },
    }
}

/// One round: opens FLOOD_STREAMS watch streams on each of
/// FLOOD_CONNECTIONS connections and reads none of them; a well-behaved
/// client (on its own connection) is served meanwhile; then the streams of
/// all connections but one are dropped (reset) and the last connection is
/// cut with its streams open. Returns the server's resident memory while
/// the streams were open.
async fn flood_round(server: &ServerProcess, client: &mut Client, bystander: &str) -> u64 {
    let mut channels = Vec::new();
    for _ in 1..FLOOD_CONNECTIONS {
        channels.push(common::channel(&server.url()).await);
    }
    let (cuttable, cut) = raw::cuttable_channel(&server.url()).await;
    channels.push(cuttable);
    let opens = channels.iter().enumerate().flat_map(|(c, channel)| {
        (0..FLOOD_STREAMS).map(move |i| {
            let mut client = Client::new(channel.clone());
            async move {
                client
                    .watch_events(flood_request(c * FLOOD_STREAMS + i))
                    .await
            }
        })
    });
    let opened = timed("opening the flood", futures_util::future::join_all(opens)).await;
    let mut streams = Vec::with_capacity(opened.len());
    for result in opened {
        streams.push(
            result
                .expect("a watch stream of the flood opens")
                .into_inner(),
        );
    }
    get_agent(client, bystander).await;
    let open = server.resident_memory();

    let on_cut = streams.split_off((FLOOD_CONNECTIONS - 1) * FLOOD_STREAMS);
    drop(streams);
    cut.cut();
    drop(on_cut);
    channels.pop();
    // A call on each connection after its resets.
    for channel in &channels {
        let mut client = Client::new(channel.clone());
        timed(
            "after the resets",
            client.get_lifecycle_metrics(pb::GetLifecycleMetricsRequest {}),
        )
        .await
        .expect("GetLifecycleMetrics after the resets");
    }
    open
}

/// Rounds of 500 WatchEvents streams, opened and dropped unread or cut
/// with their connection: every stream opens, well-behaved calls are
/// served meanwhile, the server's resident memory after the last round is
/// within MEMORY_GROWTH_BOUND of after the first, and a new watcher still
/// receives a new event.
#[tokio::test]
async fn watch_floods_leave_memory_bounded_and_watchers_served() {
    let mut server = start_server();
    let mut client = server.client().await;
    let bystanders = Bystanders::create(&mut client).await;
    let bystander = bystanders.agents[2].0.agent_id.clone();
    for i in 0..FLEET {
        let n = i.to_string();
        register(&mut client, &[("team", "fleet"), ("n", &n)]).await;
    }
    let started = Instant::now();
    let warm = flood_round(&server, &mut client, &bystander).await;
    let before = server.resident_memory();
    let mut peak = warm;
    for _ in 0..FLOOD_ROUNDS {
        peak = peak.max(flood_round(&server, &mut client, &bystander).await);
        server.assert_running();
    }

    // A new watcher receives a new event.
    let mut watcher = common::watch(&mut client, pb::WatchEventsRequest::default()).await;
    let fresh = register(&mut client, &[("role", "after-flood")]).await;
    let event = next_event(&mut watcher).await;
    assert_eq!(
        (event.agent_id.as_str(), event.r#type),
        (fresh.agent_id.as_str(), pb::EventType::Registered as i32)
    );
    drop(watcher);
    let after = server.resident_memory();
    println!(
        "{} streams in {:?}; resident memory: {:.1} MiB after the first round, {:.1} MiB at most with streams open, {:.1} MiB after the last round",
        (FLOOD_ROUNDS + 1) * FLOOD_CONNECTIONS * FLOOD_STREAMS,
        started.elapsed(),
        mib(before),
        mib(peak),
        mib(after)
    );
    assert!(
        after <= before + MEMORY_GROWTH_BOUND,
        "resident memory grew from {:.1} MiB to {:.1} MiB over {FLOOD_ROUNDS} rounds{}",
        mib(before),
        mib(after),
        server.log()
    );
    assert_survived(&mut server, &bystanders).await;
}
