//! The watcher's unit tests: catch-up then live, lag, compaction.

use super::*;
use crate::{
    service::{AgentLifecycleService, Registration, ServiceConfig},
    store::{MemoryStore, Retention},
};

/// Long enough for any step of these tests; the clock is paused, so a
/// stream that waits for nothing reaches it at once and fails the test.
const LIMIT: Duration = Duration::from_secs(600);

/// Progress messages of these tests' streams.
const PROGRESS: Duration = Duration::from_secs(5);

fn service(config: ServiceConfig) -> AgentLifecycleService {
    let store = Arc::new(MemoryStore::new(&config.retention));
    AgentLifecycleService::open(store, config).expect("service")
}

fn config() -> ServiceConfig {
    ServiceConfig {
        progress_interval: PROGRESS,
        ..ServiceConfig::default()
    }
}

/// Registers `n` agents: events `head + 1 ..= head + n`.
async fn register(service: &AgentLifecycleService, n: usize) {
    for _ in 0..n {
        service
            .register_agent(Registration {
                name: "a".into(),
                ..Registration::default()
            })
            .await
            .expect("registered");
    }
}

async fn next(watcher: &mut Watcher) -> Result<WatchItem> {
    tokio::time::timeout(LIMIT, watcher.next())
        .await
        .expect("an item in time")
        .expect("the stream is open")
}

/// The sequences of the next `n` items, each of which must be an event.
async fn events(watcher: &mut Watcher, n: usize) -> Vec<u64> {
    let mut sequences = Vec::with_capacity(n);
    for _ in 0..n {
        match next(watcher).await.expect("no error") {
            WatchItem::Event(event) => sequences.push(event.sequence()),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    sequences
}

/// The next item is a progress message at `head`: nothing else (no
/// duplicate) is waiting.
async fn quiet_at(watcher: &mut Watcher, head: u64) {
    match next(watcher).await.expect("no error") {
        WatchItem::Progress { head_sequence } => assert_eq!(head_sequence, head),
        other => panic!("expected progress, got {other:?}"),
    }
}

/// A watcher from sequence 1 reads the log, then the bus: the events
/// committed after it opened (on the bus and in the log) come once each,
/// in order, with no gap at the seam.
#[tokio::test(start_paused = true)]
async fn catch_up_then_live_without_duplicates_at_the_seam() {
    let service = service(config());
    register(&service, 5).await;
    let mut watcher = service
        .watch(WatchRequest {
            start_sequence: 1,
            ..WatchRequest::default()
        })
        .await
        .expect("watching");
    register(&service, 3).await;

    assert_eq!(events(&mut watcher, 8).await, (1..=8).collect::<Vec<_>>());
    register(&service, 2).await;
    assert_eq!(events(&mut watcher, 2).await, vec![9, 10]);
    quiet_at(&mut watcher, 10).await;
    assert_eq!(watcher.last_seen(), 10);
}

/// A live watcher that falls further behind than the bus buffers is
/// backfilled from the log: every event once, in order, and the backfill
/// counted.
#[tokio::test(start_paused = true)]
async fn a_lagging_watcher_rereads_the_log() {
    let service = service(ServiceConfig {
        event_buffer: 4,
        ..config()
    });
    register(&service, 2).await;
    let mut watcher = service
        .watch(WatchRequest::default())
        .await
        .expect("watching");
    register(&service, 20).await;

    assert_eq!(events(&mut watcher, 20).await, (3..=22).collect::<Vec<_>>());
    quiet_at(&mut watcher, 22).await;
    assert_eq!(service.watch_backfills(), 1);
}

/// Events retention deleted cannot be watched: opening before the oldest
/// is refused, and a stream that still needs them ends with the
/// compacted error.
#[tokio::test(start_paused = true)]
async fn compacted_events_end_the_stream_with_the_compacted_error() {
    let service = service(ServiceConfig {
        retention: Retention {
            max_events: Some(4),
            max_age: None,
        },
        ..config()
    });
    register(&service, 2).await;
    let mut watcher = service
        .watch(WatchRequest {
            start_sequence: 1,
            ..WatchRequest::default()
        })
        .await
        .expect("watching");
    register(&service, 8).await;
    service.compact_now().await.expect("compacted");
    let oldest = service.oldest_sequence().await.expect("oldest");
    assert!(oldest > 1, "events were compacted (oldest {oldest})");

    match next(&mut watcher).await {
        Err(Error::SequenceCompacted { requested, .. }) => assert_eq!(requested, 1),
        other => panic!("expected the compacted error, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(LIMIT, watcher.next())
            .await
            .expect("in time")
            .is_none(),
        "the stream ended"
    );

    let refused = service
        .watch(WatchRequest {
            start_sequence: 1,
            ..WatchRequest::default()
        })
        .await;
    assert!(
        matches!(refused, Err(Error::SequenceCompacted { requested: 1, oldest: o }) if o == oldest),
        "{refused:?}"
    );
}
