//! Limits through the real binary: a per-agent transition rate and a
//! per-principal request rate answer RESOURCE_EXHAUSTED with a RetryInfo
//! delay and change nothing; open WatchEvents streams are capped per
//! principal and in total, and a closed stream frees its place; metadata
//! nested too deep is INVALID_ARGUMENT.

use crate::common;

use std::time::{Duration, Instant};

use agent_lifecycle::{api::auth, api::grpc::pb};
use common::process::ServerProcess;
use tonic::Code;
use tonic_types::StatusExt;

use common::with_token as with;

fn server(config: &str) -> (ServerProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("limits.toml");
    std::fs::write(&path, config).expect("write config");
    let server = ServerProcess::start(&[
        "--store",
        "memory",
        "--config",
        path.to_str().expect("utf-8 path"),
    ]);
    (server, dir)
}

fn retry_delay(status: &tonic::Status) -> Duration {
    status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .expect("RetryInfo with a delay")
}

#[tokio::test]
async fn an_agent_over_its_transition_rate_waits() {
    let (server, _dir) =
        server("[limits]\nagent_transitions_per_second = 0.5\nagent_transition_burst = 4\n");
    let mut c = server.client().await;
    let agent = common::online(&mut c, &[]).await; // deploy + start: 2 calls
    let id = agent.agent_id.clone();
    common::transition(&mut c, &id, pb::AgentState::Idle)
        .await
        .expect("third");
    common::transition(&mut c, &id, pb::AgentState::Online)
        .await
        .expect("fourth");
    let refused = common::transition(&mut c, &id, pb::AgentState::Idle)
        .await
        .expect_err("over the rate");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let delay = retry_delay(&refused);
    assert!(
        delay > Duration::ZERO && delay <= Duration::from_secs(2),
        "{delay:?}"
    );
    assert!(refused.message().contains(&id), "{}", refused.message());
    let unchanged = common::get_agent(&mut c, &id).await;
    assert_eq!(unchanged.state, pb::AgentState::Online as i32);
    // Other agents are not held back.
    common::online(&mut c, &[]).await;
}

#[tokio::test]
async fn a_principal_over_its_request_rate_waits() {
    let token = auth::new_token().expect("token");
    let (server, _dir) = server(&format!(
        "[limits]\nprincipal_requests_per_second = 0.5\nprincipal_request_burst = 3\n\
         [[auth.principal]]\nname = \"ops\"\nrole = \"operator\"\ntoken_sha256 = {:?}\n",
        auth::hex(&auth::sha256(&token))
    ));
    let mut c = server.client().await;
    for _ in 0..3 {
        c.list_agents(with(&token, pb::ListAgentsRequest::default()))
            .await
            .expect("within the burst");
    }
    let refused = c
        .list_agents(with(&token, pb::ListAgentsRequest::default()))
        .await
        .expect_err("over the rate");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(retry_delay(&refused) > Duration::ZERO);
    assert!(refused.message().contains("ops"), "{}", refused.message());
}

#[tokio::test]
async fn watch_streams_are_capped_and_freed() {
    let (a, b) = (
        auth::new_token().expect("token"),
        auth::new_token().expect("token"),
    );
    let entry = |name: &str, token: &str| {
        format!(
            "[[auth.principal]]\nname = {name:?}\nrole = \"viewer\"\ntoken_sha256 = {:?}\n",
            auth::hex(&auth::sha256(token))
        )
    };
    let (server, _dir) = server(&format!(
        "[limits]\nmax_watches_per_principal = 2\nmax_watches = 3\n{}{}",
        entry("a", &a),
        entry("b", &b)
    ));
    let mut c = server.client().await;
    let watch = |token: &str| with(token, pb::WatchEventsRequest::default());
    let first = c.watch_events(watch(&a)).await.expect("a: 1");
    let _second = c.watch_events(watch(&a)).await.expect("a: 2");
    let refused = c.watch_events(watch(&a)).await.expect_err("a: 3");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let _third = c.watch_events(watch(&b)).await.expect("b: 1 (3 in total)");
    let refused = c.watch_events(watch(&b)).await.expect_err("total");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("3"), "{}", refused.message());

    // Closing a stream frees its place once the server sees it closed.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.watch_events(watch(&a)).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(Instant::now() < deadline, "the closed stream is released");
                tokio::task::yield_now().await;
            }
        }
    }
}

/// 20 levels of objects: deeper than the 16 allowed, well within what the
/// protobuf decoder accepts (about 33 levels of Struct).
#[tokio::test]
async fn metadata_nested_too_deep_is_refused() {
    let (server, _dir) = server("");
    let mut c = server.client().await;
    let mut value = prost_types::Value {
        kind: Some(prost_types::value::Kind::StringValue("leaf".into())),
    };
    for _ in 0..20 {
        let mut inner = prost_types::Struct::default();
        inner.fields.insert("k".into(), value);
        value = prost_types::Value {
            kind: Some(prost_types::value::Kind::StructValue(inner)),
        };
    }
    let Some(prost_types::value::Kind::StructValue(metadata)) = value.kind else {
        unreachable!("built as a struct");
    };
    let refused = c
        .register_agent(pb::RegisterAgentRequest {
            metadata: Some(metadata),
            ..Default::default()
        })
        .await
        .expect_err("too deep");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("nested"),
        "{}",
        refused.message()
    );
}
