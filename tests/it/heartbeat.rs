//! Heartbeats over gRPC: a start that waits for one, the unary and the
//! streaming RPC, the last heartbeat in GetAgent, the counts in
//! GetLifecycleMetrics, and refusals that name the field.

use crate::common;

use agent_lifecycle::api::grpc::pb::{self, AgentState as S};
use common::{TestServer, register};
use tonic::Code;
use tonic_types::StatusExt;

fn beat(agent_id: &str, load: Option<f64>, task: &str) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        agent_id: agent_id.to_string(),
        load,
        current_task: task.to_string(),
    }
}

/// StartAgent with wait_for_heartbeat stops in STARTING; the first
/// heartbeat completes the start (triggered_by health-monitor); GetAgent
/// shows the last heartbeat with its load and task; a stream of three
/// heartbeats is counted; GetLifecycleMetrics counts them all.
#[tokio::test]
async fn a_start_waits_for_the_first_heartbeat() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let id = common::deployed(&mut c, &[]).await;
    let started = c
        .start_agent(pb::StartAgentRequest {
            agent_id: id.clone(),
            wait_for_heartbeat: Some(true),
            ..Default::default()
        })
        .await
        .expect("start")
        .into_inner();
    assert_eq!(started.transitions.len(), 1);
    assert_eq!(started.agent.expect("agent").state, S::Starting as i32);

    let online = c
        .heartbeat(beat(&id, Some(0.5), "warm-up"))
        .await
        .expect("heartbeat")
        .into_inner()
        .agent
        .expect("agent");
    assert_eq!(online.state, S::Online as i32);
    let last = online.last_transition.expect("last transition");
    assert_eq!(last.triggered_by, "health-monitor");
    let seen = online.last_heartbeat.expect("last heartbeat");
    assert_eq!(seen.load, Some(0.5));
    assert_eq!(seen.current_task, "warm-up");
    assert!(seen.received_at.is_some());

    let beats = vec![
        beat(&id, None, "a"),
        beat(&id, None, "b"),
        beat(&id, Some(0.9), "c"),
    ];
    let counted = c
        .heartbeat_stream(tokio_stream::iter(beats))
        .await
        .expect("stream")
        .into_inner()
        .heartbeats;
    assert_eq!(counted, 3);
    let got = common::get_agent(&mut c, &id).await;
    assert_eq!(got.last_heartbeat.expect("heartbeat").current_task, "c");
    assert_eq!(
        got.state,
        S::Online as i32,
        "steady heartbeats change nothing"
    );
    let metrics = c
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
        .await
        .expect("metrics")
        .into_inner();
    assert_eq!(metrics.heartbeats, 4);
}

/// Unknown agents are NOT_FOUND; a bad load or an oversized task is
/// INVALID_ARGUMENT naming the field, on the unary RPC and on the stream.
#[tokio::test]
async fn bad_heartbeats_are_refused() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let agent = register(&mut c, &[]).await;
    let err = c
        .heartbeat(beat(&uuid::Uuid::new_v4().to_string(), None, ""))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    for (request, field) in [
        (beat(&agent.agent_id, Some(f64::NAN), ""), "load"),
        (
            beat(&agent.agent_id, None, &"x".repeat(300)),
            "current_task",
        ),
        (beat("not-a-uuid", None, ""), "agent_id"),
    ] {
        let err = c.heartbeat(request.clone()).await.expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument);
        let violations = err
            .get_details_bad_request()
            .expect("bad request")
            .field_violations;
        assert_eq!(violations[0].field, field);
        let err = c
            .heartbeat_stream(tokio_stream::iter(vec![
                beat(&agent.agent_id, None, ""),
                request,
            ]))
            .await
            .expect_err("invalid on the stream");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
}
