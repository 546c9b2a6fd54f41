//! One conformance suite, run against every back end: the behaviour every
//! store must have (`conforms`, `cursors_conform`) and the memory store's
//! runs here; the SQLite and PostgreSQL runs, and what only those back
//! ends have (schemas, migrations, the index, several writers), in
//! `sqlite` and `postgres`.

mod postgres;
mod sqlite;

use std::{sync::Arc, time::Duration};

use super::{
    AgentChange, AgentIdentity, BatchId, ChangeOutcome, HistoryRange, MemoryStore, PostgresStore,
    Retention, SqliteStore, Store, StoreError,
};
use crate::domain::{
    Agent, AgentId, AgentState, Labels, Metadata, SystemClock, TransitionRecord,
    clock::to_stored_precision,
};

/// A record with placeholder sequence and time (the store assigns both).
fn record(id: AgentId, from: Option<AgentState>, to: AgentState, version: u64) -> TransitionRecord {
    TransitionRecord {
        agent_id: id,
        from,
        to,
        at: std::time::UNIX_EPOCH,
        reason: format!("to {to}"),
        triggered_by: "test".into(),
        principal: "alice".into(),
        request: None,
        metadata: Metadata::new(),
        sequence: 0,
        version,
    }
}

/// A registration change.
fn register(id: AgentId) -> AgentChange {
    let mut metadata = Metadata::new();
    metadata.insert("k".into(), serde_json::json!({"nested": [1, "two"]}));
    let mut labels = Labels::new();
    labels.insert("team".into(), "a".into());
    AgentChange {
        agent_id: id,
        prior_version: 0,
        identity: Some(AgentIdentity {
            name: Arc::from("agent"),
            labels: Arc::new(labels),
        }),
        records: vec![Arc::new(TransitionRecord {
            metadata,
            ..record(id, None, AgentState::Registered, 1)
        })],
    }
}

/// The change moving `agent` to `to`.
fn step(agent: &Agent, to: AgentState) -> AgentChange {
    AgentChange {
        agent_id: agent.id,
        prior_version: agent.version,
        identity: None,
        records: vec![Arc::new(record(
            agent.id,
            Some(agent.state),
            to,
            agent.version + 1,
        ))],
    }
}

/// The agent after a committed change.
fn after(prior: Option<&Agent>, change: &AgentChange) -> Agent {
    let mut agent = prior.cloned();
    for record in &change.records {
        let record = Arc::clone(record);
        agent = Some(match (agent, &change.identity) {
            (Some(prior), _) => prior.after(record),
            (None, Some(identity)) => Agent::registered(
                change.agent_id,
                Arc::clone(&identity.name),
                Arc::clone(&identity.labels),
                record,
            ),
            (None, None) => panic!("a change to an unknown agent"),
        });
    }
    agent.expect("a change has records")
}

/// Commits `batch` as one batch with a fresh id.
fn commit(store: &dyn Store, batch: &mut [AgentChange]) -> Vec<ChangeOutcome> {
    store
        .commit(BatchId(rand_id()), batch, &SystemClock)
        .expect("commit")
}

fn rand_id() -> u64 {
    AgentId::generate().as_u128() as u64
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
    assert_eq!(store.oldest_sequence().expect("oldest"), 1);

    let a = AgentId::generate();
    let b = AgentId::generate();
    let mut regs = [register(a), register(b)];
    assert_eq!(commit(store, &mut regs), vec![ChangeOutcome::Committed; 2]);
    assert_eq!(
        (regs[0].records[0].sequence, regs[1].records[0].sequence),
        (1, 2),
        "the store assigns sequences in batch order"
    );
    let [ra, rb] = regs;
    let agent_a = after(None, &ra);
    let agent_b = after(None, &rb);
    let mut a1 = [step(&agent_a, AgentState::Deploying)];
    commit(store, &mut a1);
    let agent_a1 = after(Some(&agent_a), &a1[0]);
    let mut a2 = [step(&agent_a1, AgentState::Deployed)];
    commit(store, &mut a2);
    let agent_a2 = after(Some(&agent_a1), &a2[0]);
    assert_eq!(agent_a2.last_transition.sequence, 4);

    // A stale prior version is a conflict for that change alone; the rest
    // of the batch commits and takes the next sequence.
    let mut mixed = [
        step(&agent_a1, AgentState::Failed),
        step(&agent_b, AgentState::Deploying),
    ];
    let batch = BatchId(rand_id());
    assert_eq!(
        store
            .commit(batch, &mut mixed, &SystemClock)
            .expect("commit"),
        vec![
            ChangeOutcome::Conflict { actual: 3 },
            ChangeOutcome::Committed
        ]
    );
    assert!(store.batch_committed(batch).expect("batch state"));
    assert_eq!(mixed[1].records[0].sequence, 5);
    // Registering an existing id, or changing an unknown one, conflicts.
    let mut again = [
        register(a),
        step(
            &after(None, &register(AgentId::generate())),
            AgentState::Deploying,
        ),
    ];
    assert_eq!(
        commit(store, &mut again),
        vec![
            ChangeOutcome::Conflict { actual: 3 },
            ChangeOutcome::Conflict { actual: 0 }
        ]
    );

    let all = store.events_after(0, 100).expect("read");
    assert_eq!(
        all.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(
        *all[0], *ra.records[0],
        "records round-trip exactly (metadata included)"
    );
    assert_eq!(all[0].at, to_stored_precision(all[0].at));
    assert!(
        all.windows(2).all(|w| w[0].at <= w[1].at),
        "commit times never decrease along the sequence"
    );
    assert_eq!(store.events_after(2, 1).expect("read")[0].sequence, 3);

    let history = store.history(a, range(0, u64::MAX, 10)).expect("history");
    // (a: 1, 3, 4; b: 2, 5)
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
    assert_eq!(agent, &agent_a2, "the agent round-trips exactly");
    assert_eq!(loaded.head, 5);

    // Retention: keep the newest 2 events.
    let retention = Retention {
        max_events: Some(2),
        max_age: None,
    };
    let deleted = store
        .compact(&retention, 5, 1000, &SystemClock)
        .expect("compact");
    assert_eq!(deleted, 3);
    assert_eq!(store.oldest_sequence().expect("oldest"), 4);
    assert_eq!(store.events_after(0, 100).expect("read")[0].sequence, 4);
    assert_eq!(store.history_count(a).expect("count"), 1);
    // Age retention deletes everything older than the cutoff.
    let age = Retention {
        max_events: None,
        max_age: Some(Duration::ZERO),
    };
    // Every retained event is older than "now" once the clock has moved past
    // the newest one.
    let newest = mixed[1].records[0].at;
    while to_stored_precision(std::time::SystemTime::now()) <= newest {
        std::hint::spin_loop();
    }
    store.compact(&age, 5, 1000, &SystemClock).expect("compact");
    assert_eq!(store.oldest_sequence().expect("oldest"), 6);
    assert!(store.events_after(0, 100).expect("read").is_empty());
    // Agents keep their latest version even when their events are gone.
    let mut loaded = store.load().expect("load");
    assert_eq!(loaded.agents.len(), 2);
    assert_eq!(loaded.head, 5);
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
fn memory_ring_evicts_the_oldest_events() {
    let store = MemoryStore::new(&Retention {
        max_events: Some(3),
        max_age: None,
    });
    let id = AgentId::generate();
    let mut change = [register(id)];
    commit(&store, &mut change);
    let mut agent = after(None, &change[0]);
    for sequence in 2..=5 {
        let to = if sequence % 2 == 0 {
            AgentState::Deploying
        } else {
            AgentState::Failed
        };
        let mut next = [step(&agent, to)];
        commit(&store, &mut next);
        agent = after(Some(&agent), &next[0]);
    }
    assert_eq!(store.oldest_sequence().expect("oldest"), 3);
    assert_eq!(store.history_count(id).expect("count"), 3);
    assert_eq!(store.events_after(0, 10).expect("read").len(), 3);
}

/// The cursors' behaviour, given a store whose cursors `first` and `second`
/// never advanced: a new name reads 0; a cursor keeps the highest sequence
/// it was given; names are independent; bad names are refused; compaction
/// leaves cursors alone. Leaves `first` at 9 and `second` at 4.
fn cursors_conform(store: &dyn Store) {
    store.load().expect("load");
    assert_eq!(store.cursor("first").expect("cursor"), 0);
    store.advance_cursor("first", 5).expect("advance");
    assert_eq!(store.cursor("first").expect("cursor"), 5);
    store
        .advance_cursor("first", 3)
        .expect("a lower sequence is not an error");
    assert_eq!(
        store.cursor("first").expect("cursor"),
        5,
        "a cursor never moves backwards"
    );
    store.advance_cursor("first", 9).expect("advance");
    assert_eq!(store.cursor("first").expect("cursor"), 9);
    assert_eq!(store.cursor("second").expect("cursor"), 0);
    store.advance_cursor("second", 4).expect("advance");
    assert_eq!(
        (
            store.cursor("first").expect("cursor"),
            store.cursor("second").expect("cursor")
        ),
        (9, 4),
        "names are independent"
    );

    let longest = "n".repeat(super::MAX_CURSOR_NAME_BYTES);
    store
        .advance_cursor(&longest, 1)
        .expect("128 bytes is fine");
    assert_eq!(store.cursor(&longest).expect("cursor"), 1);
    for bad in [String::new(), "n".repeat(super::MAX_CURSOR_NAME_BYTES + 1)] {
        assert!(
            matches!(
                store.cursor(&bad),
                Err(StoreError::InvalidCursorName { .. })
            ),
            "reading {} bytes",
            bad.len()
        );
        assert!(
            matches!(
                store.advance_cursor(&bad, 1),
                Err(StoreError::InvalidCursorName { .. })
            ),
            "advancing {} bytes",
            bad.len()
        );
    }
    assert!(
        store.advance_cursor("first", u64::MAX).is_err(),
        "a sequence beyond the log's range is refused"
    );
    assert_eq!(store.cursor("first").expect("cursor"), 9);

    // Compaction deletes events, never cursors, even one that points at a
    // deleted event.
    let mut regs = [
        register(AgentId::generate()),
        register(AgentId::generate()),
        register(AgentId::generate()),
    ];
    commit(store, &mut regs);
    let head = store.head().expect("head");
    let newest = Retention {
        max_events: Some(1),
        max_age: None,
    };
    let deleted = store
        .compact(&newest, head, 1000, &SystemClock)
        .expect("compact");
    assert!(deleted >= 2, "compaction deleted {deleted} events");
    assert!(store.oldest_sequence().expect("oldest") > 1);
    assert_eq!(
        (
            store.cursor("first").expect("cursor"),
            store.cursor("second").expect("cursor")
        ),
        (9, 4),
        "compaction leaves cursors alone"
    );
}

#[test]
fn memory_cursors_conform() {
    cursors_conform(&MemoryStore::new(&Retention::default()));
}
