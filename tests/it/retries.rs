//! Idempotent retries (AIP-155): a mutating request with a `request_id`
//! applies once; a retry with the same id and content gets the original
//! response (same sequences), also when it overtakes the original, also
//! after a server restart (SQLite, the real binary), also through another
//! process (PostgreSQL); the same id with other content is ALREADY_EXISTS
//! with reason REQUEST_ID_REUSED and changes nothing.

use crate::common;

use agent_lifecycle::api::grpc::pb::{self, AgentState as S};
use common::{Client, TestServer, process::ServerProcess};
use tonic::Code;
use tonic_types::StatusExt;

fn transition(id: &str, target: S, request_id: &str) -> pb::TransitionAgentRequest {
    pb::TransitionAgentRequest {
        agent_id: id.to_string(),
        target_state: target as i32,
        reason: "retried".into(),
        request_id: request_id.to_string(),
        ..Default::default()
    }
}

async fn history_len(c: &mut Client, id: &str) -> usize {
    c.get_agent_history(pb::GetAgentHistoryRequest {
        agent_id: id.to_string(),
        ..Default::default()
    })
    .await
    .expect("history")
    .into_inner()
    .transitions
    .len()
}

#[tokio::test]
async fn a_retry_gets_the_original_response_and_a_reused_id_is_refused() {
    let server = TestServer::start().await;
    let mut c = server.client().await;

    // A registration without an agent id: the retry names the same agent.
    let register = pb::RegisterAgentRequest {
        name: "retried".into(),
        request_id: "reg-1".into(),
        ..Default::default()
    };
    let first = c
        .register_agent(register.clone())
        .await
        .expect("register")
        .into_inner();
    let again = c
        .register_agent(register)
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(first, again, "the original response");
    let id = first.agent.expect("agent").agent_id;

    let deploy = pb::DeployAgentRequest {
        agent_id: id.clone(),
        request_id: "deploy-1".into(),
        ..Default::default()
    };
    let first = c
        .deploy_agent(deploy.clone())
        .await
        .expect("deploy")
        .into_inner();
    assert_eq!(first.transitions.len(), 2);
    // Not applicable any more (DEPLOYED -> DEPLOYING is not an edge), and
    // still answered with the original two transitions.
    let again = c.deploy_agent(deploy).await.expect("retry").into_inner();
    assert_eq!(first, again);
    assert_eq!(history_len(&mut c, &id).await, 3);

    // The same id, other content: refused, nothing recorded.
    let reused = c
        .deploy_agent(pb::DeployAgentRequest {
            agent_id: id.clone(),
            reason: "other".into(),
            request_id: "deploy-1".into(),
            ..Default::default()
        })
        .await
        .expect_err("reused");
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert_eq!(
        reused.get_details_error_info().map(|i| i.reason).as_deref(),
        Some("REQUEST_ID_REUSED")
    );
    assert_eq!(history_len(&mut c, &id).await, 3);

    // Eight identical requests at once: one transition, one answer.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = c.clone();
        let request = transition(&id, S::Starting, "start-1");
        calls.push(tokio::spawn(async move {
            c.transition_agent(request).await.map(|r| r.into_inner())
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("joined").expect("answered"));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    assert_eq!(history_len(&mut c, &id).await, 4);

    // An oversized id is refused, naming the field.
    let long = c
        .transition_agent(transition(&id, S::Online, &"r".repeat(129)))
        .await
        .expect_err("too long");
    assert_eq!(long.code(), Code::InvalidArgument);
}

/// The ids survive a restart: the retry after it gets the original
/// response, the transition is not applied twice.
#[tokio::test]
async fn a_retry_after_a_restart_is_recognised() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("sqlite://{}", dir.path().join("retries.db").display());
    let mut server = ServerProcess::start(&["--store", &store]);
    let mut c = server.client().await;
    let agent = common::online(&mut c, &[]).await;
    let request = transition(&agent.agent_id, S::Idle, "idle-1");
    let first = c
        .transition_agent(request.clone())
        .await
        .expect("idle")
        .into_inner();
    server.kill();

    let server = ServerProcess::start(&["--store", &store]);
    let mut c = server.client().await;
    let again = c
        .transition_agent(request)
        .await
        .expect("retry after the restart")
        .into_inner();
    assert_eq!(first.transitions, again.transitions);
    assert_eq!(history_len(&mut c, &agent.agent_id).await, 6);
}

/// A retry that reaches another process sharing the database gets the
/// original response.
#[tokio::test]
async fn a_retry_through_another_process_is_recognised() {
    let Some(url) = common::postgres_database("retries").await else {
        return;
    };
    let a = ServerProcess::start(&["--store", &url]);
    let b = ServerProcess::start(&["--store", &url]);
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let agent = common::online(&mut ca, &[]).await;
    let request = transition(&agent.agent_id, S::Maintenance, "maint-1");
    let first = ca
        .transition_agent(request.clone())
        .await
        .expect("maintenance")
        .into_inner();
    let again = cb
        .transition_agent(request)
        .await
        .expect("retry elsewhere")
        .into_inner();
    assert_eq!(first.transitions, again.transitions);
    assert_eq!(history_len(&mut cb, &agent.agent_id).await, 6);
}
