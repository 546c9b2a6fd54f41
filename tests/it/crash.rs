//! Crash safety of the durable store, with the real server binary: every
//! acknowledged transition survives SIGKILL and SIGTERM, history and state
//! agree, and sequences continue without reuse.

use crate::common;

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_lifecycle::api::grpc::pb::{
    self, AgentState as S, agent_lifecycle_service_client::AgentLifecycleServiceClient,
};
use common::process::ServerProcess;
use tokio::sync::watch;
use tonic::transport::Channel;

fn start(db: &Path) -> ServerProcess {
    let store = format!("sqlite://{}", db.display());
    ServerProcess::start(&["--log", "warn", "--store", &store])
}

/// What a client saw acknowledged: agent -> (version, state, sequence) per
/// acknowledged transition.
type Acks = Arc<Mutex<HashMap<String, Vec<(u64, i32, u64)>>>>;

fn record(acks: &Acks, transitions: &[pb::StateTransition]) -> usize {
    let mut acks = acks.lock().expect("acks");
    for t in transitions {
        acks.entry(t.agent_id.clone())
            .or_default()
            .push((t.version, t.to_state, t.sequence));
    }
    transitions.len()
}

/// One client: full lifecycles until the server goes away. Counts
/// acknowledged transitions into `progress`.
async fn lifecycle_client(
    mut c: AgentLifecycleServiceClient<Channel>,
    acks: Acks,
    progress: watch::Sender<usize>,
) {
    loop {
        let id = uuid::Uuid::new_v4().to_string();
        let step = async {
            // Each call records what it acknowledged; the first error (the
            // server went away) ends the lifecycle.
            macro_rules! call {
                ($method:ident, $request:ident) => {
                    record(
                        &acks,
                        &c.$method(pb::$request {
                            agent_id: id.clone(),
                            ..Default::default()
                        })
                        .await?
                        .into_inner()
                        .transitions,
                    )
                };
            }
            let n = call!(register_agent, RegisterAgentRequest)
                + call!(deploy_agent, DeployAgentRequest)
                + call!(start_agent, StartAgentRequest)
                + call!(assign_task, AssignTaskRequest)
                + call!(complete_task, CompleteTaskRequest)
                + call!(stop_agent, StopAgentRequest);
            Ok::<usize, tonic::Status>(n)
        };
        match step.await {
            Ok(n) => {
                progress.send_modify(|total| *total += n);
            }
            Err(_) => return,
        }
    }
}

/// Runs 8 clients until `threshold` transitions were acknowledged, then
/// stops the server with `stop`; returns what was acknowledged.
async fn load_then_stop(
    server: &mut ServerProcess,
    threshold: usize,
    stop: impl FnOnce(&mut ServerProcess),
) -> Acks {
    let acks: Acks = Arc::default();
    let (progress, mut seen) = watch::channel(0usize);
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(tokio::spawn(lifecycle_client(
            server.client().await,
            Arc::clone(&acks),
            progress.clone(),
        )));
    }
    tokio::time::timeout(Duration::from_secs(60), seen.wait_for(|n| *n >= threshold))
        .await
        .expect("the load reaches the threshold in time")
        .expect("progress");
    stop(server);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(30), client)
            .await
            .expect("clients stop")
            .expect("join");
    }
    acks
}

/// Every acknowledged transition is present after the restart, each agent's
/// history agrees with its state and is contiguous, and new events continue
/// the sequence.
async fn verify(server: &ServerProcess, acks: &Acks) {
    let mut c = server.client().await;
    let acks = acks.lock().expect("acks").clone();
    assert!(!acks.is_empty());
    let mut max_seq = 0;
    for (agent_id, acked) in &acks {
        let agent = c
            .get_agent(pb::GetAgentRequest {
                agent_id: agent_id.clone(),
                ..Default::default()
            })
            .await
            .expect("an acknowledged agent survives")
            .into_inner()
            .agent
            .expect("agent");
        let history = c
            .get_agent_history(pb::GetAgentHistoryRequest {
                agent_id: agent_id.clone(),
                ..Default::default()
            })
            .await
            .expect("history")
            .into_inner();
        let transitions = &history.transitions;
        assert_eq!(
            transitions.len() as u64,
            agent.version,
            "history length equals version"
        );
        assert_eq!(history.total_count, agent.version);
        for (i, t) in transitions.iter().enumerate() {
            assert_eq!(t.version, i as u64 + 1, "versions are contiguous");
        }
        let last = transitions.last().expect("at least the registration");
        assert_eq!(last.to_state, agent.state, "state agrees with history");
        for (version, state, sequence) in acked {
            let t = &transitions[*version as usize - 1];
            assert_eq!(
                (t.to_state, t.sequence),
                (*state, *sequence),
                "acknowledged transition {version} of {agent_id}"
            );
            max_seq = max_seq.max(*sequence);
        }
    }
    let head = c
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
        .await
        .expect("metrics")
        .into_inner()
        .head_sequence;
    assert!(head >= max_seq);
    let fresh = c
        .register_agent(pb::RegisterAgentRequest::default())
        .await
        .expect("register after restart")
        .into_inner();
    assert_eq!(
        fresh.transitions[0].sequence,
        head + 1,
        "the sequence continues, never reused"
    );

    // The event log replays across the restart.
    let mut stream = c
        .watch_events(pb::WatchEventsRequest {
            start_sequence: 1,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    for want in 1..=20 {
        assert_eq!(common::next_event(&mut stream).await.sequence, want);
    }
}

/// SIGKILL in the middle of 8 clients' lifecycles loses no acknowledged
/// transition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_load_loses_no_acknowledged_transition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("crash.db");
    let mut server = start(&db);
    let acks = load_then_stop(&mut server, 3000, |p| {
        p.kill();
    })
    .await;
    drop(server);
    let restarted = start(&db);
    verify(&restarted, &acks).await;
}

/// A clean SIGTERM mid-load exits 0 and keeps everything acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_load_exits_cleanly_and_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("term.db");
    let mut server = start(&db);
    let acks = load_then_stop(&mut server, 3000, |p| {
        let status = p.terminate();
        assert!(status.success(), "exit status {status:?}");
    })
    .await;
    drop(server);
    let restarted = start(&db);
    verify(&restarted, &acks).await;
    // Agents, names and labels all come back: compare a listing before and
    // after one more clean restart.
    let mut c = restarted.client().await;
    c.register_agent(pb::RegisterAgentRequest {
        name: "named".into(),
        labels: [("k".to_string(), "v".to_string())].into(),
        ..Default::default()
    })
    .await
    .expect("register");
    let before = c
        .list_agents(pb::ListAgentsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .agents;
    let mut restarted = restarted;
    assert!(restarted.terminate().success());
    let again = start(&db);
    let after = again
        .client()
        .await
        .list_agents(pb::ListAgentsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(
        before, after,
        "agents, versions, names, labels and timestamps survive"
    );
    assert!(
        after
            .iter()
            .any(|a| a.name == "named" && a.labels.get("k").map(String::as_str) == Some("v"))
    );
    assert!(after.iter().any(|a| a.state == S::Offline as i32));
}
