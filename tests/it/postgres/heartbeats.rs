//! Heartbeats on several server processes sharing one PostgreSQL
//! database: they count whichever process receives them, and a beat on a
//! stream sees what another process committed before it.

use std::time::{Duration, Instant};

use agent_lifecycle::api::grpc::pb;

use super::{database, start};
use crate::common::{self, process::ServerProcess};

/// Two processes on the database `url`, with the health monitor's
/// `heartbeat_interval` and `heartbeat_timeout` (no grace); the directory
/// holds their config.
fn two_processes(
    url: &str,
    interval: &str,
    timeout: &str,
) -> (tempfile::TempDir, ServerProcess, ServerProcess) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("health.toml");
    std::fs::write(
        &config,
        format!(
            "[health]\ngrace = \"0s\"\nheartbeat_interval = \"{interval}\"\nheartbeat_timeout = \"{timeout}\"\n"
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8 path");
    let a = start(url, &["--config", config]);
    let b = start(url, &["--config", config]);
    (dir, a, b)
}

/// Heartbeats count whichever process receives them: two processes share
/// them through the database, so the health monitor (in whichever process
/// holds its lease) sees the heartbeats sent to the other one. Heartbeats
/// go to one process, then to the other, each for longer than the
/// timeout: the agent stays ONLINE and both processes show its latest
/// heartbeat. Then silence: the monitor moves it to ERROR.
#[tokio::test]
async fn heartbeats_count_whichever_process_receives_them() {
    let Some(url) = database("beats").await else {
        return;
    };
    let (_dir, a, b) = two_processes(&url, "1s", "4s");
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let id = common::deployed(&mut ca, &[]).await;
    ca.start_agent(pb::StartAgentRequest {
        agent_id: id.clone(),
        wait_for_heartbeat: Some(true),
        ..Default::default()
    })
    .await
    .expect("start");
    let beat = |task: &str| pb::HeartbeatRequest {
        agent_id: id.clone(),
        load: None,
        current_task: task.to_string(),
    };
    let online = cb
        .heartbeat(beat("b"))
        .await
        .expect("first heartbeat, to the other process")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(
        online.state,
        pb::AgentState::Online as i32,
        "start complete"
    );

    for task in ["b", "a", "b"] {
        let until = Instant::now() + Duration::from_secs(6);
        let mut ticks = tokio::time::interval(Duration::from_millis(300));
        while Instant::now() < until {
            ticks.tick().await;
            let sender = if task == "a" { &mut ca } else { &mut cb };
            sender.heartbeat(beat(task)).await.expect("heartbeat");
        }
        for client in [&mut ca, &mut cb] {
            let agent = common::get_agent(client, &id).await;
            assert_eq!(
                agent.state,
                pb::AgentState::Online as i32,
                "heartbeats to process {task} keep it online: {agent:?}"
            );
            let seen = agent.last_heartbeat.expect("last heartbeat");
            assert_eq!(seen.current_task, task, "both processes show the latest");
        }
    }

    let deadline = Instant::now() + Duration::from_secs(20);
    let agent = loop {
        let agent = common::get_agent(&mut ca, &id).await;
        if agent.state == pb::AgentState::Error as i32 {
            break agent;
        }
        assert!(Instant::now() < deadline, "silence is noticed: {agent:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last = agent.last_transition.expect("last transition");
    assert_eq!(last.triggered_by, "health-monitor");
    assert!(
        last.reason.starts_with("heartbeat missed"),
        "{}",
        last.reason
    );
}

/// A heartbeat on a HeartbeatStream to one process completes a start that
/// another process committed just before: the stream's beats wait for a
/// paced read of the database's head that started after they arrived, so
/// the process sees each start before it decides what the beat does. Each
/// agent's beat goes on the open stream the moment its start is answered.
/// When the stream's answer arrives every beat has been handled, so both
/// processes show every agent ONLINE at once.
#[tokio::test]
async fn streamed_heartbeats_complete_starts_the_other_process_committed() {
    let Some(url) = database("stream_beats").await else {
        return;
    };
    let (_dir, a, b) = two_processes(&url, "10s", "60s");
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(common::deployed(&mut ca, &[]).await);
    }
    let (beats, queued) = tokio::sync::mpsc::unbounded_channel();
    let stream = {
        let mut cb = cb.clone();
        tokio::spawn(async move {
            cb.heartbeat_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(queued))
                .await
        })
    };
    for id in &ids {
        let starting = ca
            .start_agent(pb::StartAgentRequest {
                agent_id: id.clone(),
                wait_for_heartbeat: Some(true),
                ..Default::default()
            })
            .await
            .expect("start")
            .into_inner()
            .agent
            .expect("agent");
        assert_eq!(starting.state, pb::AgentState::Starting as i32);
        beats
            .send(pb::HeartbeatRequest {
                agent_id: id.clone(),
                load: None,
                current_task: "first".to_string(),
            })
            .expect("queue the beat");
    }
    drop(beats);
    let counted = tokio::time::timeout(Duration::from_secs(30), stream)
        .await
        .expect("the stream is answered in time")
        .expect("stream task")
        .expect("stream")
        .into_inner()
        .heartbeats;
    assert_eq!(counted, 30);
    for client in [&mut cb, &mut ca] {
        for id in &ids {
            let agent = common::get_agent(client, id).await;
            assert_eq!(
                agent.state,
                pb::AgentState::Online as i32,
                "the first streamed beat completed the start: {agent:?}"
            );
            let last = agent.last_transition.expect("last transition");
            assert_eq!(last.reason, "first heartbeat: start-up complete");
        }
    }
}
