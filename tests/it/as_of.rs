//! Reads of the fleet as it was (`as_of` on GetAgent, ListAgents and
//! GetLifecycleMetrics) against fleets computed by hand at several points:
//! by sequence and by time, on SQLite across a compaction, on PostgreSQL
//! with the writes and the reads in different processes, and from the CLI.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use agent_lifecycle::{
    api::grpc::pb::{self, AgentState as S},
    service::ServiceConfig,
    store::{Retention, SqliteStore, Store},
};
use tonic::Code;
use tonic_types::StatusExt;

use crate::common::{self, Client, TestServer, process::ServerProcess, transition};

fn at_sequence(sequence: u64) -> Option<pb::AsOf> {
    Some(pb::AsOf {
        point: Some(pb::as_of::Point::Sequence(sequence)),
    })
}

fn at_time(at: SystemTime) -> Option<pb::AsOf> {
    Some(pb::AsOf {
        point: Some(pb::as_of::Point::Time(prost_types::Timestamp::from(at))),
    })
}

/// The fleet at `as_of` by ListAgents (every page): id -> (state, version).
async fn fleet(
    client: &mut Client,
    as_of: Option<pb::AsOf>,
) -> (BTreeMap<String, (i32, u64)>, u64) {
    let mut fleet = BTreeMap::new();
    let mut token = String::new();
    let mut point = as_of;
    loop {
        let page = client
            .list_agents(pb::ListAgentsRequest {
                page_size: 2,
                page_token: token,
                as_of: point,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        let answered = page.as_of_sequence;
        for agent in page.agents {
            fleet.insert(agent.agent_id, (agent.state, agent.version));
        }
        if page.next_page_token.is_empty() {
            return (fleet, answered);
        }
        token = page.next_page_token;
        point = at_sequence(answered);
    }
}

async fn agent_at(
    client: &mut Client,
    id: &str,
    as_of: Option<pb::AsOf>,
) -> Result<pb::Agent, tonic::Status> {
    client
        .get_agent(pb::GetAgentRequest {
            agent_id: id.to_string(),
            as_of,
        })
        .await
        .map(|r| r.into_inner().agent.expect("agent"))
}

async fn counts(client: &mut Client, as_of: Option<pb::AsOf>) -> pb::GetLifecycleMetricsResponse {
    client
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest { as_of })
        .await
        .expect("metrics")
        .into_inner()
}

async fn head(client: &mut Client) -> u64 {
    counts(client, None).await.head_sequence
}

async fn register(client: &mut Client, name: &str) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    client
        .register_agent(pb::RegisterAgentRequest {
            agent_id: id.clone(),
            name: name.into(),
            ..Default::default()
        })
        .await
        .expect("register");
    id
}

/// What the fleet is after each step, written down by hand, with the head
/// and the time after the step.
struct Point {
    head: u64,
    after: SystemTime,
    fleet: BTreeMap<String, (i32, u64)>,
}

/// Builds the fleet step by step (A, B, C) and records, after each step,
/// the head, the time, and the fleet as computed by hand.
async fn build_fleet(client: &mut Client) -> (Vec<Point>, [String; 3]) {
    let mut points = Vec::new();
    let mut expected = BTreeMap::new();
    let note = |points: &mut Vec<Point>, expected: &BTreeMap<String, (i32, u64)>, head| {
        points.push(Point {
            head,
            after: SystemTime::now(),
            fleet: expected.clone(),
        });
    };
    note(&mut points, &expected, head(client).await);
    let a = register(client, "a").await;
    expected.insert(a.clone(), (S::Registered as i32, 1));
    note(&mut points, &expected, head(client).await);
    let b = register(client, "b").await;
    expected.insert(b.clone(), (S::Registered as i32, 1));
    client
        .deploy_agent(pb::DeployAgentRequest {
            agent_id: a.clone(),
            ..Default::default()
        })
        .await
        .expect("deploy a");
    expected.insert(a.clone(), (S::Deployed as i32, 3));
    note(&mut points, &expected, head(client).await);
    client
        .start_agent(pb::StartAgentRequest {
            agent_id: a.clone(),
            ..Default::default()
        })
        .await
        .expect("start a");
    expected.insert(a.clone(), (S::Online as i32, 5));
    let c = register(client, "c").await;
    expected.insert(c.clone(), (S::Registered as i32, 1));
    note(&mut points, &expected, head(client).await);
    transition(client, &a, S::Error).await.expect("a errs");
    expected.insert(a.clone(), (S::Error as i32, 6));
    client
        .deploy_agent(pb::DeployAgentRequest {
            agent_id: b.clone(),
            ..Default::default()
        })
        .await
        .expect("deploy b");
    expected.insert(b.clone(), (S::Deployed as i32, 3));
    note(&mut points, &expected, head(client).await);
    (points, [a, b, c])
}

/// Every point answers with the fleet as it was, by sequence and by time,
/// through ListAgents (paged), GetAgent and GetLifecycleMetrics.
async fn check_points(client: &mut Client, points: &[Point], ids: &[String; 3]) {
    for point in points {
        let (listed, answered) = fleet(client, at_sequence(point.head)).await;
        assert_eq!(answered, point.head);
        assert_eq!(listed, point.fleet, "ListAgents at {}", point.head);
        let (by_time, answered) = fleet(client, at_time(point.after)).await;
        assert_eq!(
            answered, point.head,
            "the time after the step names its head"
        );
        assert_eq!(by_time, point.fleet);
        for id in ids {
            match (
                agent_at(client, id, at_sequence(point.head)).await,
                point.fleet.get(id),
            ) {
                (Ok(agent), Some(&(state, version))) => {
                    assert_eq!((agent.state, agent.version), (state, version));
                    let last = agent.last_transition.expect("last transition");
                    assert_eq!((last.to_state, last.version), (state, version));
                    assert!(last.sequence <= point.head);
                }
                (Err(status), None) => assert_eq!(status.code(), Code::NotFound),
                (got, expected) => panic!("{id} at {}: {got:?}, expected {expected:?}", point.head),
            }
        }
        let metrics = counts(client, at_sequence(point.head)).await;
        assert_eq!(metrics.as_of_sequence, point.head);
        assert_eq!(metrics.total_agents, point.fleet.len() as u64);
        let errors = point
            .fleet
            .values()
            .filter(|(s, _)| *s == S::Error as i32)
            .count();
        assert_eq!(metrics.error_agents, errors as u64);
    }
}

/// The memory store: several points, each read by sequence and by time; a
/// point after the head is OUT_OF_RANGE; a time before the first event is
/// the empty fleet.
#[tokio::test]
async fn the_fleet_as_it_was_at_each_point() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let before = SystemTime::now();
    let (points, ids) = build_fleet(&mut client).await;
    check_points(&mut client, &points, &ids).await;

    let (empty, answered) = fleet(&mut client, at_time(before)).await;
    assert!(empty.is_empty());
    assert_eq!(answered, 0);
    let head = head(&mut client).await;
    let err = agent_at(&mut client, &ids[0], at_sequence(head + 1))
        .await
        .expect_err("future");
    assert_eq!(err.code(), Code::OutOfRange);
    assert_eq!(
        err.get_details_error_info().expect("info").reason,
        "SEQUENCE_NOT_YET_WRITTEN"
    );
}

/// SQLite, then a compaction that keeps the newest 4 events: points from
/// the one before the oldest retained event on still read exactly (an
/// agent whose last transition was deleted is known by state and version),
/// older ones are OUT_OF_RANGE naming the oldest point and time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_across_a_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("as_of.db")).expect("open"));
    let config = ServiceConfig {
        retention: Retention {
            max_events: Some(4),
            max_age: None,
        },
        compaction_interval: std::time::Duration::from_secs(3600),
        ..Default::default()
    };
    let server = TestServer::start_on(store, config).await;
    let mut client = server.client().await;
    let (points, ids) = build_fleet(&mut client).await;
    check_points(&mut client, &points, &ids).await;

    server.service.compact_now().await.expect("compact");
    let oldest = server.service.oldest_sequence().await.expect("oldest");
    let head = head(&mut client).await;
    assert_eq!(oldest, head - 3, "the newest 4 are kept");
    for point in points.iter().filter(|p| p.head + 1 >= oldest) {
        let (listed, _) = fleet(&mut client, at_sequence(point.head)).await;
        assert_eq!(listed, point.fleet, "at {} after compaction", point.head);
    }
    // At the oldest retained event (C's registration), A's last transition
    // (ONLINE) was deleted: A is known by state and version.
    let a = agent_at(&mut client, &ids[0], at_sequence(oldest))
        .await
        .expect("a");
    assert_eq!((a.state, a.version), (S::Online as i32, 5));
    assert!(a.last_transition.is_none(), "deleted by retention");
    assert!(a.updated_at.is_none());
    let c = agent_at(&mut client, &ids[2], at_sequence(oldest))
        .await
        .expect("c");
    assert_eq!(c.last_transition.map(|t| t.sequence), Some(oldest));

    let err = agent_at(&mut client, &ids[0], at_sequence(oldest - 2))
        .await
        .expect_err("compacted");
    assert_eq!(err.code(), Code::OutOfRange);
    let info = err.get_details_error_info().expect("info");
    assert_eq!(info.reason, "SEQUENCE_COMPACTED");
    assert_eq!(
        info.metadata.get("oldest_available_sequence"),
        Some(&(oldest - 1).to_string())
    );
    let err = counts_err(&mut client, at_time(points[0].after)).await;
    assert_eq!(err.code(), Code::OutOfRange);
    let info = err.get_details_error_info().expect("info");
    assert_eq!(info.reason, "TIME_COMPACTED");
    assert_eq!(
        info.metadata.get("oldest_available_sequence"),
        Some(&oldest.to_string())
    );
    assert!(info.metadata.contains_key("oldest_available_time"));
}

async fn counts_err(client: &mut Client, as_of: Option<pb::AsOf>) -> tonic::Status {
    client
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest { as_of })
        .await
        .expect_err("refused")
}

/// PostgreSQL with two server processes: the fleet is written through one
/// and read at each point through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_read_from_another_process_on_postgres() {
    let Some(url) = common::postgres_database("as_of").await else {
        return;
    };
    let writer = ServerProcess::start(&["--log", "warn", "--store", &url]);
    let reader = ServerProcess::start(&["--log", "warn", "--store", &url]);
    let mut writes = writer.client().await;
    let mut reads = reader.client().await;
    let (points, ids) = build_fleet(&mut writes).await;
    check_points(&mut reads, &points, &ids).await;
}

/// `get`, `list` and `metrics` take `--as-of` as a sequence, a time or a
/// time ago.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_the_past() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (points, ids) = build_fleet(&mut client).await;
    let cli = |args: Vec<String>| {
        let url = server.url();
        async move {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_agent-lifecycle"));
            command.arg("--server").arg(url).args(&args);
            let run = tokio::task::spawn_blocking(move || command.output().expect("run the cli"));
            let output = tokio::time::timeout(std::time::Duration::from_secs(60), run)
                .await
                .expect("cli finishes")
                .expect("join");
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&output.stdout).expect("json")
        }
    };
    let at = points[2].head.to_string();
    let got = cli(vec![
        "-o".into(),
        "json".into(),
        "get".into(),
        ids[0].clone(),
        "--as-of".into(),
        at.clone(),
    ])
    .await;
    assert_eq!(got["state"], "deployed", "{got}");
    let listed = cli(vec![
        "-o".into(),
        "json".into(),
        "list".into(),
        "--as-of".into(),
        at.clone(),
    ])
    .await;
    assert_eq!(
        listed["agents"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let time = agent_lifecycle::domain::rfc3339(points[1].after);
    let metrics = cli(vec![
        "-o".into(),
        "json".into(),
        "metrics".into(),
        "--as-of".into(),
        time,
    ])
    .await;
    assert_eq!(metrics["total_agents"], 1, "{metrics}");
    let now = cli(vec![
        "-o".into(),
        "json".into(),
        "metrics".into(),
        "--as-of".into(),
        "1s ago".into(),
    ])
    .await;
    assert!(now["total_agents"].as_u64().is_some(), "{now}");
}
