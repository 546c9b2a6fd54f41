//! One conformance suite, run against every back end.

use std::{sync::Arc, time::Duration};

use super::{AgentChange, HistoryRange, MemoryStore, Retention, SqliteStore, Store, StoreError};
use crate::domain::{Agent, AgentId, AgentState, Labels, Metadata, TransitionRecord};

/// Builds a registration change at `sequence`.
fn register(id: AgentId, sequence: u64) -> AgentChange {
    let at = crate::domain::agent::commit_time();
    let mut metadata = Metadata::new();
    metadata.insert("k".into(), serde_json::json!({"nested": [1, "two"]}));
    let record = Arc::new(TransitionRecord {
        agent_id: id,
        from: None,
        to: AgentState::Registered,
        at,
        reason: "agent registered".into(),
        triggered_by: "test".into(),
        metadata,
        sequence,
        version: 1,
    });
    let mut labels = Labels::new();
    labels.insert("team".into(), "a".into());
    AgentChange {
        agent: Arc::new(Agent {
            id,
            name: Arc::from("agent"),
            labels: Arc::new(labels),
            state: AgentState::Registered,
            version: 1,
            created_at: at,
            updated_at: at,
            last_transition: Arc::clone(&record),
        }),
        prior_version: 0,
        records: vec![record],
    }
}

/// The change moving `agent` to `to` at `sequence`.
fn step(agent: &Agent, to: AgentState, sequence: u64) -> AgentChange {
    let record = Arc::new(TransitionRecord {
        agent_id: agent.id,
        from: Some(agent.state),
        to,
        at: crate::domain::agent::commit_time(),
        reason: format!("to {to}"),
        triggered_by: "test".into(),
        metadata: Metadata::new(),
        sequence,
        version: agent.version + 1,
    });
    AgentChange {
        agent: Arc::new(agent.after(Arc::clone(&record))),
        prior_version: agent.version,
        records: vec![record],
    }
}

fn range(after: u64, upto: u64, max: usize) -> HistoryRange {
    HistoryRange { after, upto, max }
}

/// The behaviour every store must have, given a fresh store. Returns what
/// the store holds at the end, sorted by id, for a reopen to compare.
fn conforms(store: &dyn Store) -> Vec<Agent> {
    let loaded = store.load().expect("load");
    assert_eq!(loaded.head, 0);
    assert!(loaded.agents.is_empty());
    assert_eq!(store.oldest_sequence(), 1);

    let a = AgentId::generate();
    let b = AgentId::generate();
    let ra = register(a, 1);
    let rb = register(b, 2);
    store
        .commit(&[ra.clone(), rb.clone()])
        .expect("commit registrations");
    let a1 = step(&ra.agent, AgentState::Deploying, 3);
    let a2 = step(&a1.agent, AgentState::Deployed, 4);
    store.commit(std::slice::from_ref(&a1)).expect("commit");
    store.commit(std::slice::from_ref(&a2)).expect("commit");

    // A stale prior version is a conflict and rolls back the whole batch.
    let b1 = step(&rb.agent, AgentState::Deploying, 5);
    let stale = step(&a1.agent, AgentState::Failed, 6);
    match store.commit(&[b1.clone(), stale]) {
        Err(StoreError::Conflict {
            agent_id,
            expected: 2,
            actual: 3,
        }) => assert_eq!(agent_id, a),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(store.events_after(0, 100).expect("read").len(), 4);
    // Registering an existing id is a conflict too.
    assert!(matches!(
        store.commit(&[register(a, 5)]),
        Err(StoreError::Conflict { .. })
    ));

    let all = store.events_after(0, 100).expect("read");
    assert_eq!(
        all.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        *all[0], *ra.records[0],
        "records round-trip exactly (metadata included)"
    );
    assert_eq!(store.events_after(2, 1).expect("read")[0].sequence, 3);

    let history = store.history(a, range(0, u64::MAX, 10)).expect("history");
    assert_eq!(
        history.iter().map(|r| r.version).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(store.history(a, range(1, 3, 10)).expect("history").len(), 1);
    assert_eq!(store.history_count(a).expect("count"), 3);
    assert_eq!(store.nth_newest(a, u64::MAX, 2).expect("nth"), Some(3));
    assert_eq!(store.nth_newest(a, u64::MAX, 4).expect("nth"), None);

    let loaded = store.load().expect("load");
    let agent = loaded.agents.iter().find(|x| x.id == a).expect("agent a");
    assert_eq!(agent, &*a2.agent, "the agent round-trips exactly");
    assert_eq!(agent.last_transition.sequence, 4);

    // Retention: keep the newest 2 events.
    let retention = Retention {
        max_events: Some(2),
        max_age: None,
    };
    let deleted = store.compact(&retention, 4, 1000).expect("compact");
    assert_eq!(deleted, 2);
    assert_eq!(store.oldest_sequence(), 3);
    assert_eq!(store.events_after(0, 100).expect("read")[0].sequence, 3);
    assert_eq!(store.history_count(a).expect("count"), 2);
    // Age retention deletes everything older than the cutoff.
    let age = Retention {
        max_events: None,
        max_age: Some(Duration::ZERO),
    };
    // Every retained event is older than "now" once the clock has moved past
    // the newest one.
    let newest = a2.records[0].at;
    while crate::domain::agent::commit_time() <= newest {
        std::hint::spin_loop();
    }
    store.compact(&age, 4, 1000).expect("compact");
    assert_eq!(store.oldest_sequence(), 5);
    assert!(store.events_after(0, 100).expect("read").is_empty());
    // Agents keep their latest version even when their events are gone.
    let mut loaded = store.load().expect("load");
    assert_eq!(loaded.agents.len(), 2);
    assert_eq!(loaded.head, 4);
    assert_eq!(store.committed_head().expect("head"), 4);
    store.close().expect("close");
    loaded.agents.sort_by_key(|a| a.id);
    loaded.agents
}

#[test]
fn memory_store_conforms() {
    let store = MemoryStore::new(&Retention::default());
    conforms(&store);
}

#[test]
fn sqlite_store_conforms_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/dir/test.db");
    let store = SqliteStore::open(&path).expect("open");
    let held = conforms(&store);
    drop(store);
    let reopened = SqliteStore::open(&path).expect("reopen");
    let mut loaded = reopened.load().expect("reload");
    loaded.agents.sort_by_key(|a| a.id);
    assert_eq!(
        loaded.agents, held,
        "agents round-trip exactly across a reopen"
    );
    assert_eq!(loaded.head, 4);
    assert_eq!(
        reopened.oldest_sequence(),
        5,
        "compaction survives a reopen"
    );
}

#[test]
fn memory_ring_evicts_the_oldest_events() {
    let store = MemoryStore::new(&Retention {
        max_events: Some(3),
        max_age: None,
    });
    let id = AgentId::generate();
    let mut change = register(id, 1);
    store.commit(&[change.clone()]).expect("commit");
    for sequence in 2..=5 {
        let to = if sequence % 2 == 0 {
            AgentState::Deploying
        } else {
            AgentState::Failed
        };
        change = step(&change.agent, to, sequence);
        store.commit(&[change.clone()]).expect("commit");
    }
    assert_eq!(store.oldest_sequence(), 3);
    assert_eq!(store.history_count(id).expect("count"), 3);
    assert_eq!(store.events_after(0, 10).expect("read").len(), 3);
}

#[test]
fn sqlite_refuses_a_newer_schema_and_a_read_only_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.db");
    drop(SqliteStore::open(&path).expect("open"));
    {
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        conn.execute_batch("PRAGMA user_version = 99;")
            .expect("bump");
    }
    assert!(matches!(
        SqliteStore::open(&path),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[test]
fn a_second_sqlite_store_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("one.db");
    let first = SqliteStore::open(&path).expect("open");
    assert!(matches!(
        SqliteStore::open(&path),
        Err(StoreError::Locked(_))
    ));
    drop(first);
    SqliteStore::open(&path).expect("free again once the first is closed");
}
