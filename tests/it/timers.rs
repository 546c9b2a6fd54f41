//! Time comes from one injectable clock: with tokio's clock paused, the
//! compaction timer and the age cutoff both follow virtual time.

use std::{
    sync::Arc,
    time::{Duration, Instant, UNIX_EPOCH},
};

use agent_lifecycle::{
    AgentLifecycleService,
    service::{ChangeRequest, Registration, ServiceConfig, TokioClock},
    store::{MemoryStore, Retention},
};

/// Keeps the runtime busy so that paused time moves only by
/// `tokio::time::advance`: an idle paused runtime jumps to its next timer,
/// and a test awaiting the commit thread (a real thread) would look idle.
fn hold_the_clock() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    })
}

/// Events older than `--retain-for` are compacted by the compaction timer:
/// with the clock paused, nothing happens until virtual time passes the age
/// limit and the timer's interval, and commit times are virtual times.
#[tokio::test(start_paused = true)]
async fn age_retention_follows_the_paused_clock() {
    let held = hold_the_clock();
    let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let retention = Retention {
        max_events: None,
        max_age: Some(Duration::from_secs(3600)),
    };
    let config = ServiceConfig {
        retention,
        compaction_interval: Duration::from_secs(60),
        clock: Arc::new(TokioClock::starting_at(start)),
        ..ServiceConfig::default()
    };
    let service = AgentLifecycleService::open(Arc::new(MemoryStore::new(&retention)), config)
        .expect("service");
    let registered = service
        .register_agent(Registration::default())
        .await
        .expect("register");
    assert_eq!(
        registered.transitions[0].at, start,
        "the commit time comes from the injected clock"
    );
    let id = registered.agent.id;
    service
        .deploy_agent(id, ChangeRequest::default())
        .await
        .expect("deploy");
    assert_eq!(service.oldest_sequence().await.expect("oldest"), 1);

    // Several compaction intervals, still within the age limit: kept.
    tokio::time::advance(Duration::from_secs(30 * 60)).await;
    assert_eq!(
        service.compact_now().await.expect("compact"),
        0,
        "nothing is older than an hour yet"
    );
    assert_eq!(service.oldest_sequence().await.expect("oldest"), 1);

    // Past the age limit: the timer's next round deletes all three events.
    tokio::time::advance(Duration::from_secs(31 * 60)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.oldest_sequence().await.expect("oldest") != 4 {
        assert!(Instant::now() < deadline, "compaction within 10 s");
        tokio::task::yield_now().await;
    }
    let later = service
        .transition(
            id,
            agent_lifecycle::domain::AgentState::Starting,
            ChangeRequest::default(),
        )
        .await
        .expect("start");
    assert_eq!(
        later.transitions[0].at,
        start + Duration::from_secs(61 * 60)
    );
    service.close().await.expect("close");
    held.abort();
}
