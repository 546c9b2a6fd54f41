//! Retention on the durable store: compaction deletes the oldest events,
//! watchers asking for them get OUT_OF_RANGE naming the oldest available
//! sequence, history shrinks but agents keep their state, across restarts.

use crate::common;

use std::sync::Arc;

use agent_lifecycle::{
    api::grpc::pb::{self, AgentState as S},
    service::ServiceConfig,
    store::{Retention, SqliteStore, Store},
};
use common::{TestServer, online, transition};

/// Keep the newest 50; the timer is far off, so only `compact_now` compacts
/// and the counts below are exact.
fn config() -> ServiceConfig {
    ServiceConfig {
        retention: Retention {
            max_events: Some(50),
            max_age: None,
        },
        compaction_interval: std::time::Duration::from_secs(3600),
        ..Default::default()
    }
}

/// 300 events with "keep the newest 50": compaction leaves 251..=300; a
/// watch from 1 is OUT_OF_RANGE with oldest_available_sequence 251, a watch
/// from 251 replays; the agent keeps its version; all of it holds after a
/// restart, and new writes continue while compaction runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_on_sqlite_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("retention.db");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("open"));
    let server = TestServer::start_on(store, config()).await;
    let mut c = server.client().await;
    let agent = online(&mut c, &[]).await;
    for i in 0..295 {
        transition(
            &mut c,
            &agent.agent_id,
            if i % 2 == 0 { S::Idle } else { S::Online },
        )
        .await
        .expect("flip");
    }
    let deleted = server.service.compact_now().await.expect("compact");
    assert_eq!(deleted, 250);
    assert_eq!(server.service.oldest_sequence().await.expect("oldest"), 251);

    common::assert_compacted_before(&mut c, 1, 251).await;

    let history = c
        .get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: agent.agent_id.clone(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    assert_eq!(history.total_count, 50);
    assert_eq!(history.transitions.first().map(|t| t.sequence), Some(251));
    let got = common::get_agent(&mut c, &agent.agent_id).await;
    assert_eq!((got.version, got.history_count), (300, 300));
    server.shutdown().await.expect("stop");

    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).expect("reopen"));
    let server = TestServer::start_on(store, config()).await;
    assert_eq!(server.service.oldest_sequence().await.expect("oldest"), 251);
    assert_eq!(server.service.head_sequence(), 300);
    let mut c = server.client().await;
    let next = transition(&mut c, &agent.agent_id, S::Online)
        .await
        .expect("after restart");
    assert_eq!(next.transitions[0].sequence, 301);
    assert_eq!(next.transitions[0].version, 301);
    server.shutdown().await.expect("stop");
}
