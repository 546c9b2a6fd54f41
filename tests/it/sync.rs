//! SyncExternalStatus over gRPC: statuses of Hugging Face Spaces,
//! Kubernetes and Docker move agents along the policy's path, one recorded
//! transition per step with the source as `triggered_by`; unknown statuses
//! and unreachable states change nothing and say so.

use crate::common;

use agent_lifecycle::api::grpc::pb::{self, AgentState as S, SyncOutcome};
use common::{Client, TestServer, next_event, register, watch};
use tonic::Code;
use tonic_types::StatusExt;

async fn sync(
    client: &mut Client,
    agent_id: &str,
    source: &str,
    status: &str,
) -> Result<pb::SyncExternalStatusResponse, tonic::Status> {
    client
        .sync_external_status(pb::SyncExternalStatusRequest {
            agent_id: agent_id.to_string(),
            source: source.to_string(),
            status: status.to_string(),
            metadata: None,
        })
        .await
        .map(|r| r.into_inner())
}

fn path(response: &pb::SyncExternalStatusResponse) -> Vec<i32> {
    response.transitions.iter().map(|t| t.to_state).collect()
}

async fn head(client: &mut Client) -> u64 {
    client
        .get_lifecycle_metrics(pb::GetLifecycleMetricsRequest::default())
        .await
        .expect("metrics")
        .into_inner()
        .head_sequence
}

/// A Space's life: BUILDING, then RUNNING (three steps through the
/// policy), a RUNNING report for a BUSY agent (stays), a stage nobody knows
/// (nothing), a pod Terminating, a container being removed, and finally a
/// RUNNING report for a terminated agent (unreachable, nothing). Every step
/// is an event whose triggered_by names the source.
#[tokio::test]
async fn statuses_walk_the_policy_one_recorded_step_at_a_time() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let agent = register(&mut c, &[]).await;
    let id = agent.agent_id.clone();
    let mut events = watch(
        &mut c,
        pb::WatchEventsRequest {
            agent_ids: vec![id.clone()],
            ..Default::default()
        },
    )
    .await;

    let building = sync(&mut c, &id, "hf_space", "BUILDING")
        .await
        .expect("sync");
    assert_eq!(building.outcome, SyncOutcome::Applied as i32);
    assert_eq!(building.target_state, S::Deploying as i32);
    assert_eq!(path(&building), vec![S::Deploying as i32]);
    let step = &building.transitions[0];
    assert_eq!(step.triggered_by, "hf_sync");
    let metadata = step.metadata.as_ref().expect("metadata");
    assert!(metadata.fields.contains_key("source") && metadata.fields.contains_key("status"));

    let running = sync(&mut c, &id, "hf_space", "running")
        .await
        .expect("sync");
    assert_eq!(running.outcome, SyncOutcome::Applied as i32);
    assert_eq!(
        path(&running),
        vec![S::Deployed as i32, S::Starting as i32, S::Online as i32]
    );
    assert_eq!(running.agent.expect("agent").state, S::Online as i32);
    for expected in [S::Deploying, S::Deployed, S::Starting, S::Online] {
        let event = next_event(&mut events).await;
        let transition = event.transition.expect("transition");
        assert_eq!(transition.to_state, expected as i32);
        assert_eq!(
            transition.triggered_by, "hf_sync",
            "the stream carries the source"
        );
    }

    c.assign_task(pb::AssignTaskRequest {
        agent_id: id.clone(),
        ..Default::default()
    })
    .await
    .expect("assign");
    let before = head(&mut c).await;
    let stays = sync(&mut c, &id, "hf_space", "RUNNING")
        .await
        .expect("sync");
    assert_eq!(stays.outcome, SyncOutcome::AlreadyInState as i32);
    assert_eq!(stays.agent.expect("agent").state, S::Busy as i32);
    let unknown = sync(&mut c, &id, "hf_space", "QUANTUM_TUNNELING")
        .await
        .expect("sync");
    assert_eq!(unknown.outcome, SyncOutcome::UnknownStatus as i32);
    assert_eq!(unknown.target_state, S::Unspecified as i32);
    assert!(
        unknown.message.contains("QUANTUM_TUNNELING"),
        "{}",
        unknown.message
    );
    let k8s_unknown = sync(&mut c, &id, "kubernetes", "Unknown")
        .await
        .expect("sync");
    assert_eq!(k8s_unknown.outcome, SyncOutcome::UnknownStatus as i32);
    assert_eq!(head(&mut c).await, before, "nothing was recorded");

    let terminating = sync(&mut c, &id, "kubernetes", "Terminating")
        .await
        .expect("sync");
    assert_eq!(path(&terminating), vec![S::Stopping as i32]);
    assert_eq!(terminating.transitions[0].triggered_by, "k8s_sync");
    let removing = sync(&mut c, &id, "docker", "removing").await.expect("sync");
    assert_eq!(path(&removing), vec![S::Terminated as i32]);
    assert_eq!(removing.transitions[0].triggered_by, "docker_sync");

    let before = head(&mut c).await;
    let unreachable = sync(&mut c, &id, "hf_space", "RUNNING")
        .await
        .expect("sync");
    assert_eq!(unreachable.outcome, SyncOutcome::Unreachable as i32);
    assert_eq!(unreachable.target_state, S::Online as i32);
    assert_eq!(
        unreachable.agent.expect("agent").state,
        S::Terminated as i32
    );
    assert_eq!(head(&mut c).await, before, "nothing was recorded");
}

/// Bad requests name their field; an unknown agent is NOT_FOUND.
#[tokio::test]
async fn bad_sync_requests_are_refused_naming_the_field() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let agent = register(&mut c, &[]).await;
    for (source, status, field) in [("nomad", "running", "source"), ("docker", "  ", "status")] {
        let err = sync(&mut c, &agent.agent_id, source, status)
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), Code::InvalidArgument);
        let violations = err
            .get_details_bad_request()
            .expect("bad request")
            .field_violations;
        assert_eq!(violations[0].field, field);
    }
    let err = sync(
        &mut c,
        &uuid::Uuid::new_v4().to_string(),
        "docker",
        "running",
    )
    .await
    .expect_err("unknown agent");
    assert_eq!(err.code(), Code::NotFound);
}
