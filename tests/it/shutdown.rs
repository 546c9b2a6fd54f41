//! Graceful shutdown: health turns NOT_SERVING, open watch streams end with
//! UNAVAILABLE after their last event, the server task joins.

use crate::common;

use agent_lifecycle::api::grpc::pb;
use common::{TestServer, next_event, online, watch};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_types::StatusExt;

/// Three subscribers hold open streams and have read every event; on
/// shutdown a health watcher sees NOT_SERVING, each stream ends with
/// UNAVAILABLE (SHUTTING_DOWN) after its last event, and the server stops
/// cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_open_streams_after_their_last_event() {
    let mut server = TestServer::start().await;
    let mut c = server.client().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut health_stream = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = tokio::time::timeout(common::STEP, health_stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("status");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(watch(&mut c, pb::WatchEventsRequest::default()).await);
    }
    online(&mut c, &[]).await;
    for stream in &mut streams {
        for want in 1..=5 {
            assert_eq!(next_event(stream).await.sequence, want);
        }
    }

    server.signal_shutdown();
    let not_serving = tokio::time::timeout(common::STEP, health_stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("status");
    assert_eq!(not_serving.status, ServingStatus::NotServing as i32);
    drop(health_stream);

    for mut stream in streams {
        let end = tokio::time::timeout(common::STEP, stream.message())
            .await
            .expect("in time");
        let status = end.expect_err("the stream ends with a status");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.get_details_error_info().expect("info").reason,
            "SHUTTING_DOWN"
        );
    }
    let task = server.take_task();
    tokio::time::timeout(common::STEP, task)
        .await
        .expect("server stops in time")
        .expect("join")
        .expect("clean stop");
    let text = server.service.metrics().encode_text();
    assert!(
        text.contains("agent_lifecycle_watch_streams_ended_total{reason=\"shutdown\"} 3"),
        "{text}"
    );
    assert!(text.contains("agent_lifecycle_watch_streams 0"), "{text}");
}

/// After shutdown begins, new work is refused with UNAVAILABLE and the
/// library API reports ShuttingDown; nothing is half-applied.
#[tokio::test]
async fn work_after_shutdown_is_refused() {
    let server = TestServer::start().await;
    let service = server.service.clone();
    let mut c = server.client().await;
    let agent = online(&mut c, &[]).await;
    service.begin_shutdown();
    let err = c
        .assign_task(pb::AssignTaskRequest {
            agent_id: agent.agent_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable);
    let err = c
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unavailable);
    let got = service
        .get_agent(agent.agent_id.parse::<uuid::Uuid>().expect("uuid").into())
        .expect("agent");
    assert_eq!(got.version, 5);
    server.shutdown().await.expect("clean stop");
}
