//! Several server processes on one PostgreSQL database, with the real
//! binary: one winner per conflicting transition, one event order for every
//! watcher on every process, nothing acknowledged lost when a process is
//! killed, and background work that moves to a surviving process.
//!
//! Needs `TEST_DATABASE_URL` (a PostgreSQL server whose user may create
//! databases; each test creates its own). `.ci/run` starts one and sets it;
//! locally, without it, these tests return early with a note, and under CI
//! they fail.

use crate::common;

mod heartbeats;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_lifecycle::{api::grpc::pb, store::PostgresStore};
use common::{Client, next_event, process::ServerProcess};
use tonic::{Code, Streaming};

/// A fresh database on the test server (see [`common::postgres_database`]).
async fn database(prefix: &str) -> Option<String> {
    common::postgres_database(prefix).await
}

fn start(url: &str, extra: &[&str]) -> ServerProcess {
    let mut args = vec!["--log", "warn", "--store", url];
    args.extend_from_slice(extra);
    ServerProcess::start(&args)
}

/// The events of `stream` up to and including `head`, as (sequence, agent,
/// version, to_state), failing on a gap or a duplicate.
async fn events_until(
    stream: &mut Streaming<pb::WatchEventsResponse>,
    after: u64,
    head: u64,
) -> Vec<(u64, String, u64, i32)> {
    let mut seen = Vec::new();
    let mut last = after;
    while last < head {
        let event = next_event(stream).await;
        assert_eq!(event.sequence, last + 1, "no gap and no duplicate");
        last = event.sequence;
        let transition = event.transition.expect("transition");
        seen.push((
            event.sequence,
            event.agent_id,
            transition.version,
            transition.to_state,
        ));
    }
    seen
}

async fn head(client: &mut Client) -> u64 {
    client
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
        .await
        .expect("metrics")
        .into_inner()
        .head_sequence
}

async fn watch_from(
    client: &mut Client,
    start_sequence: u64,
) -> Streaming<pb::WatchEventsResponse> {
    common::watch(
        client,
        pb::WatchEventsRequest {
            start_sequence,
            ..Default::default()
        },
    )
    .await
}

/// Three processes, one database. An agent registered through one process
/// is moved through another at once (reads and writes see the other
/// process's commit). Concurrent compare-and-set transitions on the same
/// agent through the three processes have exactly one winner each time,
/// the losers get ABORTED. A watcher on each process sees the same events
/// in the same order, with no gap.
#[tokio::test]
async fn three_processes_agree_on_winners_and_on_the_event_order() {
    let Some(url) = database("three").await else {
        return;
    };
    let servers: Vec<_> = (0..3).map(|_| start(&url, &[])).collect();
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(server.client().await);
    }
    let mut watchers = Vec::new();
    for client in &mut clients {
        watchers.push(watch_from(client, 1).await);
    }

    const AGENTS: usize = 6;
    const ROUNDS: usize = 10;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let id = uuid::Uuid::new_v4().to_string();
        let by = i % 3;
        clients[by]
            .register_agent(pb::RegisterAgentRequest {
                agent_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("register");
        // Straight away through the next process: it must see the agent.
        clients[(by + 1) % 3]
            .deploy_agent(pb::DeployAgentRequest {
                agent_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("deploy through another process");
        let started = clients[(by + 2) % 3]
            .start_agent(pb::StartAgentRequest {
                agent_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("start through a third process")
            .into_inner();
        let agent = started.agent.expect("agent");
        assert_eq!(agent.state, pb::AgentState::Online as i32);
        agents.push((id, agent.version));
    }

    for round in 0..ROUNDS {
        for (id, version) in &mut agents {
            let target = if round % 2 == 0 {
                pb::AgentState::Idle
            } else {
                pb::AgentState::Online
            };
            let calls = clients.iter().cloned().map(|mut client| {
                let request = pb::TransitionAgentRequest {
                    agent_id: id.clone(),
                    target_state: target as i32,
                    expected_version: Some(*version),
                    ..Default::default()
                };
                tokio::spawn(async move { client.transition_agent(request).await })
            });
            let mut winners = 0;
            for call in calls.collect::<Vec<_>>() {
                match call.await.expect("join") {
                    Ok(_) => winners += 1,
                    Err(status) => assert_eq!(status.code(), Code::Aborted, "{status:?}"),
                }
            }
            assert_eq!(winners, 1, "exactly one winner (agent {id}, round {round})");
            *version += 1;
        }
    }

    let expected = (AGENTS * (1 + 2 + 2 + ROUNDS)) as u64;
    for client in &mut clients {
        assert_eq!(
            head(client).await,
            expected,
            "every process reads the same head"
        );
    }
    let mut streams = Vec::new();
    for watcher in &mut watchers {
        streams.push(events_until(watcher, 0, expected).await);
    }
    assert_eq!(
        streams[0], streams[1],
        "processes 0 and 1 saw the same events"
    );
    assert_eq!(
        streams[0], streams[2],
        "processes 0 and 2 saw the same events"
    );
    // Resume on any process from any point.
    let mut resumed = watch_from(&mut clients[2], 7).await;
    assert_eq!(
        events_until(&mut resumed, 6, expected).await,
        streams[0][6..].to_vec()
    );
}

/// What clients saw acknowledged: agent -> (version, state, sequence).
type Acks = Arc<Mutex<HashMap<String, Vec<(u64, i32, u64)>>>>;

/// Full lifecycles until the deadline or until the process goes away.
async fn lifecycles(mut client: Client, acks: Acks, until: Instant) {
    while Instant::now() < until {
        let id = uuid::Uuid::new_v4().to_string();
        let record = |transitions: Vec<pb::StateTransition>| {
            let mut acks = acks.lock().expect("acks");
            for t in transitions {
                acks.entry(t.agent_id.clone())
                    .or_default()
                    .push((t.version, t.to_state, t.sequence));
            }
        };
        // Each acknowledged step is recorded; the first error (the process
        // went away) ends the client.
        let steps = async {
            let agent_id = id.clone();
            record(
                client
                    .register_agent(pb::RegisterAgentRequest {
                        agent_id,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .transitions,
            );
            let agent_id = id.clone();
            record(
                client
                    .deploy_agent(pb::DeployAgentRequest {
                        agent_id,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .transitions,
            );
            let agent_id = id.clone();
            record(
                client
                    .start_agent(pb::StartAgentRequest {
                        agent_id,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .transitions,
            );
            let agent_id = id.clone();
            record(
                client
                    .stop_agent(pb::StopAgentRequest {
                        agent_id,
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .transitions,
            );
            Ok::<(), tonic::Status>(())
        };
        if steps.await.is_err() {
            return;
        }
    }
}

/// SIGKILL of one of three processes under load: every transition any
/// client saw acknowledged is in the shared history afterwards, a watcher
/// of the killed process resumes on another process from its last sequence
/// with no gap or duplicate, and the survivors keep serving.
#[tokio::test]
async fn killing_a_process_under_load_loses_nothing() {
    let Some(url) = database("kill").await else {
        return;
    };
    let mut servers: Vec<_> = (0..3).map(|_| start(&url, &[])).collect();
    let mut victim_watch = watch_from(&mut servers[0].client().await, 1).await;
    let acks: Acks = Arc::default();
    let until = Instant::now() + Duration::from_secs(6);
    let mut load = Vec::new();
    for server in &servers {
        for _ in 0..3 {
            load.push(tokio::spawn(lifecycles(
                server.client().await,
                Arc::clone(&acks),
                until,
            )));
        }
    }
    // Read some events through the victim, then kill it mid-load.
    let mut seen = Vec::new();
    while seen.len() < 200 {
        let event = next_event(&mut victim_watch).await;
        assert_eq!(event.sequence, seen.len() as u64 + 1);
        seen.push(event.sequence);
    }
    servers[0].kill();
    for task in load {
        task.await.expect("load task");
    }

    let mut survivor = servers[1].client().await;
    let head = head(&mut survivor).await;
    let mut resumed = watch_from(&mut servers[2].client().await, seen.len() as u64 + 1).await;
    let rest = events_until(&mut resumed, seen.len() as u64, head).await;
    assert_eq!(rest.len() as u64, head - seen.len() as u64);

    let acks = acks.lock().expect("acks").clone();
    let acknowledged: usize = acks.values().map(Vec::len).sum();
    assert!(
        acknowledged > 200,
        "the load ran ({acknowledged} acknowledged)"
    );
    let by_sequence: BTreeMap<u64, (String, u64, i32)> = rest
        .into_iter()
        .map(|(seq, agent, version, state)| (seq, (agent, version, state)))
        .collect();
    for (agent, list) in &acks {
        for (version, state, sequence) in list {
            if *sequence <= seen.len() as u64 {
                continue;
            }
            assert_eq!(
                by_sequence.get(sequence),
                Some(&(agent.clone(), *version, *state)),
                "acknowledged transition {sequence} of {agent} is in the log"
            );
        }
        let history = survivor
            .get_agent_history(pb::GetAgentHistoryRequest {
                agent_id: agent.clone(),
                ..Default::default()
            })
            .await
            .expect("history")
            .into_inner();
        let versions: Vec<u64> = history.transitions.iter().map(|t| t.version).collect();
        let max = list.iter().map(|(v, _, _)| *v).max().unwrap_or(0);
        assert!(
            versions.len() as u64 >= max,
            "history of {agent} holds every acknowledged version"
        );
        assert_eq!(versions, (1..=versions.len() as u64).collect::<Vec<_>>());
    }
}

/// Compaction runs on one process at a time, and moves to another within
/// seconds when that one is killed.
#[tokio::test]
async fn background_work_moves_to_a_survivor() {
    let Some(url) = database("lease").await else {
        return;
    };
    let args = [
        "--log",
        "agent_lifecycle::service=debug",
        "--store",
        &url,
        "--retain-events",
        "1000000",
        "--compaction-interval",
        "100ms",
    ];
    let held = |server: &ServerProcess| {
        server
            .log()
            .lines()
            .filter(|l| {
                l.contains("lease changed hands")
                    && l.contains("lease=\"compaction\"")
                    && l.contains("held=true")
            })
            .count()
    };
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "{what} within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut first = ServerProcess::start(&args);
    wait_for("the first process takes the lease", &|| held(&first) == 1);
    let second = ServerProcess::start(&args);
    let refused = |server: &ServerProcess| {
        server
            .log()
            .lines()
            .filter(|l| {
                l.contains("lease held by another process") && l.contains("lease=\"compaction\"")
            })
            .count()
    };
    wait_for("the second process tries three times", &|| {
        refused(&second) >= 3
    });
    assert_eq!(held(&second), 0, "one process at a time{}", second.log());
    assert_eq!(held(&first), 1, "the first keeps it{}", first.log());
    first.kill();
    let killed = Instant::now();
    wait_for("the survivor takes the lease", &|| held(&second) == 1);
    assert!(killed.elapsed() < Duration::from_secs(10));
}

async fn open_service(
    url: &str,
    config: agent_lifecycle::service::ServiceConfig,
) -> agent_lifecycle::AgentLifecycleService {
    let url = url.to_string();
    tokio::task::spawn_blocking(move || {
        let store = Arc::new(PostgresStore::open(&url).expect("open"));
        agent_lifecycle::AgentLifecycleService::open(store, config).expect("service")
    })
    .await
    .expect("join")
}

/// Every connection of the server to the database is ended (what a
/// PostgreSQL restart, a failover or a connection proxy does). The server
/// reconnects: writes work again (the first one may be refused, with
/// nothing applied), and nothing is refused for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_recover_after_the_database_drops_every_connection() {
    use agent_lifecycle::service::{ChangeRequest, Registration, ServiceConfig};
    let Some(url) = database("reconnect").await else {
        return;
    };
    let service = open_service(&url, ServiceConfig::default()).await;
    let agent = service
        .register_agent(Registration::default())
        .await
        .expect("register")
        .agent;
    // Concurrent reads leave several idle reader connections in the pool.
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let service = service.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    service
                        .catch_up_with_store()
                        .await
                        .expect("catch up with the store");
                    service.oldest_sequence().await.expect("oldest");
                }
            })
        })
        .collect();
    for read in reads {
        read.await.expect("join");
    }
    let admin = url.clone();
    tokio::task::spawn_blocking(move || {
        let mut client = postgres::Client::connect(&admin, postgres::NoTls).expect("admin");
        client
            .batch_execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .expect("terminate");
    })
    .await
    .expect("join");
    // Each attempt is one request; the first ones after the drop may fail.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempts = 0;
    let deployed = loop {
        attempts += 1;
        match service
            .deploy_agent(agent.id, ChangeRequest::default())
            .await
        {
            Ok(outcome) => break outcome,
            Err(err) => {
                assert!(Instant::now() < deadline, "writes never recovered: {err}");
                assert!(attempts < 50, "writes never recovered: {err}");
            }
        }
    };
    assert_eq!(deployed.agent.version, 3);
    service
        .register_agent(Registration::default())
        .await
        .expect("a fresh registration works too");
    service.close().await.expect("close");
}

/// Closing a server that runs compaction on PostgreSQL releases the
/// compaction lease (a database connection) without a panic, and another
/// server takes the lease over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_releases_the_lease_cleanly() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use agent_lifecycle::{service::ServiceConfig, store::Retention};
    let Some(url) = database("release").await else {
        return;
    };
    let panics = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&panics);
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counted.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
    let config = || ServiceConfig {
        retention: Retention {
            max_events: Some(1_000_000),
            max_age: None,
        },
        compaction_interval: Duration::from_millis(20),
        ..ServiceConfig::default()
    };
    let first = open_service(&url, config()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !first.holds_lease("compaction") {
        assert!(
            Instant::now() < deadline,
            "the first server takes the lease"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = open_service(&url, config()).await;
    first.close().await.expect("close");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "closing panicked");
    while !second.holds_lease("compaction") {
        assert!(
            Instant::now() < deadline,
            "the second server takes the lease over"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    second.close().await.expect("close");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "closing panicked");
}
