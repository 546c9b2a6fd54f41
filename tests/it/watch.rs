//! WatchEvents over a real server: ordering, replay, snapshot, filters,
//! progress, lag backfill and compaction.

use crate::common;

use std::time::Duration;

use agent_lifecycle::{
    api::grpc::pb::{self, AgentState as S, watch_events_response::Kind},
    service::ServiceConfig,
    store::Retention,
};
use common::{TestServer, next, next_event, online, register, transition, watch};
use tonic::Code;
use tonic_types::StatusExt;

/// Drives `agents` agents through register, deploy, start, stop: 7 events
/// each.
async fn drive(server: &TestServer, agents: usize) {
    let tasks: Vec<_> = (0..agents)
        .map(|_| {
            let url = server.url();
            tokio::spawn(async move {
                let mut c = common::connect(&url).await;
                let agent = online(&mut c, &[]).await;
                c.stop_agent(pb::StopAgentRequest {
                    agent_id: agent.agent_id,
                    ..Default::default()
                })
                .await
                .expect("stop");
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("driver");
    }
}

/// 100 concurrent subscribers each receive every event exactly once, in
/// sequence order with no gap, and all see the same sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_subscribers_see_every_event_in_order() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(watch(&mut c, pb::WatchEventsRequest::default()).await);
    }
    drive(&server, 20).await;
    let expected: Vec<u64> = (1..=140).collect();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while seen.len() < 140 {
                    let event = next_event(&mut stream).await;
                    assert_eq!(
                        event.sequence,
                        event.transition.as_ref().expect("transition").sequence
                    );
                    seen.push(event.sequence);
                }
                seen
            })
        })
        .collect();
    for reader in readers {
        assert_eq!(reader.await.expect("reader"), expected);
    }
}

/// start_sequence replays from the log and continues live with no gap and
/// no duplicate at the seam, even while writers keep committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_from_a_sequence_has_no_gap_or_duplicate() {
    let server = TestServer::start().await;
    drive(&server, 10).await; // sequences 1..=70
    let mut c = server.client().await;
    let mut stream = watch(
        &mut c,
        pb::WatchEventsRequest {
            start_sequence: 30,
            ..Default::default()
        },
    )
    .await;
    let writer = {
        let server_url = server.url();
        tokio::spawn(async move {
            let mut c = common::connect(&server_url).await;
            for _ in 0..10 {
                register(&mut c, &[]).await;
            }
        })
    };
    let mut expected = 30;
    while expected <= 80 {
        let event = next_event(&mut stream).await;
        assert_eq!(event.sequence, expected);
        expected += 1;
    }
    writer.await.expect("writer");
    // The replayed events carry the agent as it was after each event.
    let mut c2 = server.client().await;
    let mut replay = watch(
        &mut c2,
        pb::WatchEventsRequest {
            start_sequence: 1,
            ..Default::default()
        },
    )
    .await;
    let first = next_event(&mut replay).await;
    assert_eq!(first.r#type, pb::EventType::Registered as i32);
    let agent = first.agent.expect("agent");
    assert_eq!((agent.state, agent.version), (S::Registered as i32, 1));
}

/// include_snapshot: every matching agent, the marker with the head
/// sequence, then only later events.
#[tokio::test]
async fn snapshot_then_live() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = online(&mut c, &[("pool", "gpu")]).await;
    let b = register(&mut c, &[("pool", "gpu")]).await;
    register(&mut c, &[("pool", "cpu")]).await;
    let mut stream = watch(
        &mut c,
        pb::WatchEventsRequest {
            include_snapshot: true,
            labels: [("pool".to_string(), "gpu".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    let mut snapshot = Vec::new();
    let head = loop {
        match next(&mut stream).await {
            Kind::SnapshotAgent(agent) => snapshot.push(agent),
            Kind::SnapshotComplete(done) => break done,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(head.head_sequence, 5 + 1 + 1);
    assert_eq!(head.agent_count, 2);
    let mut ids: Vec<_> = snapshot.iter().map(|a| a.agent_id.clone()).collect();
    ids.sort();
    let mut want = vec![a.agent_id.clone(), b.agent_id.clone()];
    want.sort();
    assert_eq!(ids, want);
    let a_now = snapshot
        .iter()
        .find(|x| x.agent_id == a.agent_id)
        .expect("a");
    assert_eq!(a_now.state, S::Online as i32);

    transition(&mut c, &a.agent_id, S::Idle)
        .await
        .expect("idle");
    let event = next_event(&mut stream).await;
    assert_eq!(event.sequence, head.head_sequence + 1);
    assert_eq!(event.agent_id, a.agent_id);
}

/// Filters on agent ids, target states, event types and labels all apply
/// together.
#[tokio::test]
async fn filters_select_events() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = register(&mut c, &[("env", "prod")]).await;
    let b = register(&mut c, &[("env", "dev")]).await;
    let mut by_id = watch(
        &mut c,
        pb::WatchEventsRequest {
            agent_ids: vec![b.agent_id.clone()],
            start_sequence: 1,
            ..Default::default()
        },
    )
    .await;
    let mut by_state = watch(
        &mut c,
        pb::WatchEventsRequest {
            states: vec![S::Deployed as i32],
            start_sequence: 1,
            ..Default::default()
        },
    )
    .await;
    let mut by_type = watch(
        &mut c,
        pb::WatchEventsRequest {
            event_types: vec![pb::EventType::Registered as i32],
            start_sequence: 1,
            ..Default::default()
        },
    )
    .await;
    let mut by_label = watch(
        &mut c,
        pb::WatchEventsRequest {
            labels: [("env".to_string(), "prod".to_string())].into(),
            event_types: vec![pb::EventType::Transitioned as i32],
            start_sequence: 1,
            ..Default::default()
        },
    )
    .await;
    for id in [&a.agent_id, &b.agent_id] {
        c.deploy_agent(pb::DeployAgentRequest {
            agent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("deploy");
    }
    let e = next_event(&mut by_id).await;
    assert_eq!((e.agent_id.as_str(), e.sequence), (b.agent_id.as_str(), 2));
    assert_eq!(next_event(&mut by_id).await.sequence, 5);
    assert_eq!(next_event(&mut by_id).await.sequence, 6);
    for want in [4, 6] {
        let e = next_event(&mut by_state).await;
        assert_eq!(
            (e.sequence, e.transition.expect("t").to_state),
            (want, S::Deployed as i32)
        );
    }
    for want in [1, 2] {
        assert_eq!(next_event(&mut by_type).await.sequence, want);
    }
    for want in [3, 4] {
        let e = next_event(&mut by_label).await;
        assert_eq!(
            (e.sequence, e.agent_id.as_str()),
            (want, a.agent_id.as_str())
        );
    }
    // Nothing else arrives on the narrow streams: the next register is
    // matched only by the type stream.
    register(&mut c, &[]).await;
    assert_eq!(next_event(&mut by_type).await.sequence, 7);
}

/// An idle stream gets progress messages carrying the head sequence.
#[tokio::test]
async fn idle_streams_get_progress() {
    let config = ServiceConfig {
        progress_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let server = TestServer::start_with(config, false).await;
    let mut c = server.client().await;
    register(&mut c, &[]).await;
    register(&mut c, &[]).await;
    let mut stream = watch(&mut c, pb::WatchEventsRequest::default()).await;
    match next(&mut stream).await {
        Kind::Progress(p) => assert_eq!(p.head_sequence, 2),
        other => panic!("expected progress, got {other:?}"),
    }
    register(&mut c, &[]).await;
    assert_eq!(next_event(&mut stream).await.sequence, 3);
    match next(&mut stream).await {
        Kind::Progress(p) => assert_eq!(p.head_sequence, 3),
        other => panic!("expected progress, got {other:?}"),
    }
}

/// A subscriber that reads nothing while thousands of events pass (far more
/// than the broadcast buffer) is backfilled from the log and then reads them
/// all, in order, with no gap; a fast subscriber on the same server is not
/// held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_subscriber_is_backfilled_from_the_log() {
    let config = ServiceConfig {
        event_buffer: 16,
        ..Default::default()
    };
    let server = TestServer::start_with(config, true).await;
    let mut c = server.client().await;
    let mut slow_client = server.small_window_client().await;
    let mut slow = watch(&mut slow_client, pb::WatchEventsRequest::default()).await;
    let mut fast = watch(&mut c, pb::WatchEventsRequest::default()).await;
    let total = 3000u64;
    let fast_reader = tokio::spawn(async move {
        for want in 1..=total {
            assert_eq!(next_event(&mut fast).await.sequence, want);
        }
    });
    let writers: Vec<_> = (0..10)
        .map(|_| {
            let url = server.url();
            tokio::spawn(async move {
                let mut c = common::connect(&url).await;
                let agent = online(&mut c, &[]).await; // 5 events
                for i in 0..(total / 10 - 5) {
                    let target = if i % 2 == 0 { S::Idle } else { S::Online };
                    transition(&mut c, &agent.agent_id, target)
                        .await
                        .expect("flip");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    fast_reader
        .await
        .expect("fast subscriber got everything while the slow one slept");
    for want in 1..=total {
        assert_eq!(next_event(&mut slow).await.sequence, want);
    }
    assert!(
        server.service.watch_backfills() >= 1,
        "the slow subscriber was backfilled from the log"
    );
}

/// Asking for compacted events is OUT_OF_RANGE with SEQUENCE_COMPACTED and
/// the oldest available sequence; asking beyond the head is OUT_OF_RANGE
/// too; a lagging subscriber whose events were compacted away ends with
/// SEQUENCE_COMPACTED after what it could deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compacted_sequences_are_out_of_range() {
    let config = ServiceConfig {
        event_buffer: 4,
        retention: Retention {
            max_events: Some(20),
            max_age: None,
        },
        ..Default::default()
    };
    let server = TestServer::start_with(config, false).await;
    let mut c = server.client().await;
    let mut lagging_client = server.small_window_client().await;
    let mut lagging = watch(&mut lagging_client, pb::WatchEventsRequest::default()).await;
    let agent = online(&mut c, &[]).await;
    for i in 0..1995 {
        transition(
            &mut c,
            &agent.agent_id,
            if i % 2 == 0 { S::Idle } else { S::Online },
        )
        .await
        .expect("flip");
    }
    common::assert_compacted_before(&mut c, 1, 1981).await;

    let err = c
        .watch_events(pb::WatchEventsRequest {
            start_sequence: 5000,
            ..Default::default()
        })
        .await
        .expect_err("future");
    assert_eq!(err.code(), Code::OutOfRange);
    assert_eq!(
        err.get_details_error_info().expect("info").reason,
        "SEQUENCE_NOT_YET_WRITTEN"
    );

    // The lagging stream delivers what it still can, in order, then ends.
    let mut last = 0;
    let status = loop {
        match tokio::time::timeout(common::STEP, lagging.message())
            .await
            .expect("in time")
        {
            Ok(Some(message)) => {
                if let Some(Kind::Event(e)) = message.kind {
                    assert_eq!(e.sequence, last + 1, "contiguous until the end");
                    last = e.sequence;
                }
            }
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(
        status.get_details_error_info().expect("info").reason,
        "SEQUENCE_COMPACTED"
    );
    assert!(last < 2000);
}
