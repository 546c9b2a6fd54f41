//! One conformance suite, run against every back end.

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
    assert_eq!(loaded.head, 5);
    assert_eq!(
        reopened.oldest_sequence().expect("oldest"),
        6,
        "compaction survives a reopen"
    );
    let mut next = [register(AgentId::generate())];
    commit(&reopened, &mut next);
    assert_eq!(
        next[0].records[0].sequence, 6,
        "the counter survives a reopen"
    );
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

/// The PostgreSQL server the tests use: `TEST_DATABASE_URL`. CI always sets
/// it (`.ci/run` starts PostgreSQL); without it, locally, the PostgreSQL
/// tests are skipped with a note, and under CI they fail.
pub(crate) fn test_database_url() -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("TEST_DATABASE_URL is not set; CI must run the PostgreSQL tests")
        }
        _ => {
            eprintln!("TEST_DATABASE_URL is not set: skipping a PostgreSQL test");
            None
        }
    }
}

/// A fresh database on the test server.
pub(crate) fn fresh_postgres(prefix: &str) -> Option<String> {
    let url = test_database_url()?;
    let name = format!("{prefix}_{:x}", rand_id());
    Some(PostgresStore::create_database(&url, &name).expect("create a test database"))
}

#[test]
fn postgres_store_conforms_and_survives_reopen() {
    let Some(url) = fresh_postgres("conformance") else {
        return;
    };
    let store = PostgresStore::open(&url).expect("open");
    let held = conforms(&store);
    drop(store);
    let reopened = PostgresStore::open(&url).expect("reopen");
    let mut loaded = reopened.load().expect("reload");
    loaded.agents.sort_by_key(|a| a.id);
    assert_eq!(
        loaded.agents, held,
        "agents round-trip exactly across a reopen"
    );
    assert_eq!(loaded.head, 5);
    assert_eq!(reopened.oldest_sequence().expect("oldest"), 6);
    let mut next = [register(AgentId::generate())];
    commit(&reopened, &mut next);
    assert_eq!(
        next[0].records[0].sequence, 6,
        "the counter survives a reopen"
    );
}

#[test]
fn postgres_schema_is_created_once_by_concurrent_openers_and_newer_is_refused() {
    let Some(url) = fresh_postgres("migrate") else {
        return;
    };
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || PostgresStore::open(&url).map(|_| ()))
        })
        .collect();
    for opener in openers {
        opener.join().expect("thread").expect("concurrent open");
    }
    let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    client
        .execute(
            "UPDATE meta SET value = 99 WHERE key = 'schema_version'",
            &[],
        )
        .expect("bump");
    assert!(matches!(
        PostgresStore::open(&url),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[test]
fn postgres_conflicting_writers_have_one_winner_and_order_by_commit() {
    let Some(url) = fresh_postgres("writers") else {
        return;
    };
    let a = PostgresStore::open(&url).expect("open a");
    let b = PostgresStore::open(&url).expect("open b");
    let mut reg = [register(AgentId::generate())];
    commit(&a, &mut reg);
    let agent = after(None, &reg[0]);
    // Both writers saw version 1; the second to commit loses, alone.
    let other = register(AgentId::generate());
    let mut first = [step(&agent, AgentState::Deploying)];
    let mut second = [step(&agent, AgentState::Deleted), other];
    assert_eq!(commit(&b, &mut first), vec![ChangeOutcome::Committed]);
    assert_eq!(
        commit(&a, &mut second),
        vec![
            ChangeOutcome::Conflict { actual: 2 },
            ChangeOutcome::Committed
        ]
    );
    assert_eq!(
        second[1].records[0].sequence, 3,
        "one counter for every writer"
    );
    assert_eq!(a.head().expect("head"), 3);
    let ids = a
        .identities(&[second[1].agent_id, AgentId::generate()])
        .expect("identities");
    assert_eq!(ids.len(), 1);
    assert_eq!(&*ids[0].1.name, "agent");
}

/// A registration that races with another process's registration of the
/// same id (uncommitted when the batch checks versions, committed while it
/// writes) is answered as a conflict, alone; the rest of the batch commits
/// with contiguous sequences.
#[test]
fn postgres_registration_race_is_a_conflict_for_that_change_alone() {
    let Some(url) = fresh_postgres("race") else {
        return;
    };
    let store = PostgresStore::open(&url).expect("open");
    let raced = AgentId::generate();
    let mut other = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let mut open_tx = other.transaction().expect("begin");
    open_tx
        .execute(
            "INSERT INTO agents (agent_id, name, labels, state, version, created_at, updated_at,
             last_sequence, last_from, last_reason, last_triggered_by, last_metadata)
             VALUES ($1, 'other', '', 'registered', 1, 0, 0, 0, NULL, '', '', '')",
            &[&raced.as_bytes().as_slice()],
        )
        .expect("insert uncommitted");
    let writer = std::thread::spawn(move || {
        let mut batch = [register(raced), register(AgentId::generate())];
        let outcomes = commit(&store, &mut batch);
        (outcomes, batch[1].records[0].sequence, store)
    });
    // Wait until the batch's insert is blocked on the uncommitted row.
    let mut watcher = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .expect("activity")
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the batch never waited"
        );
        std::thread::yield_now();
    }
    open_tx.commit().expect("commit the other registration");
    let (outcomes, sequence, store) = writer.join().expect("writer");
    assert_eq!(
        outcomes,
        vec![
            ChangeOutcome::Conflict { actual: 1 },
            ChangeOutcome::Committed
        ]
    );
    assert_eq!(sequence, 1, "no sequence was spent on the raced change");
    assert_eq!(store.head().expect("head"), 1);
}

/// Reads of one agent's events combine the index and the log's unindexed
/// tail: the same answers whether everything is indexed at each commit
/// (lag 1), part of it (lag 2, 3), part of the tail too, in groups of 3,
/// only behind the lag (groups larger than the log), or nothing yet (the
/// default lag, larger than this test's log), across a reopen too.
#[test]
fn sqlite_agent_reads_agree_however_far_the_index_lags() {
    for (lag, group) in [
        (1, 1),
        (2, 1),
        (3, 2),
        (5, 3),
        (4, 1000),
        (16, 3),
        (
            super::sqlite::index::INDEX_LAG,
            super::sqlite::index::INDEX_GROUP,
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lag.db");
        let store = SqliteStore::open_with_index_lag(&path, lag, group).expect("open");
        conforms(&store);
        drop(store);
        let reopened = SqliteStore::open_with_index_lag(&path, lag, group).expect("reopen");
        let loaded = reopened.load().expect("load");
        let agent = loaded.agents[0].clone();
        // Eight more steps on one agent, read back whole and in pages, from
        // the oldest and from the newest, alone and with the audit filter.
        let mut current = agent.clone();
        for i in 0..8 {
            let to = if i % 2 == 0 {
                AgentState::Deploying
            } else {
                AgentState::Failed
            };
            let mut change = [step(&current, to)];
            assert_eq!(
                commit(&reopened, &mut change),
                vec![ChangeOutcome::Committed]
            );
            current = after(Some(&current), &change[0]);
        }
        let id = agent.id;
        let versions = |records: Vec<Arc<TransitionRecord>>| {
            records.iter().map(|r| r.version).collect::<Vec<_>>()
        };
        let first = agent.version + 1;
        let all: Vec<u64> = (first..first + 8).collect();
        let history = reopened
            .history(id, range(0, u64::MAX, 100))
            .expect("history");
        assert_eq!(versions(history.clone()), all, "lag {lag}, group {group}");
        let sequences: Vec<u64> = history.iter().map(|r| r.sequence).collect();
        assert_eq!(
            versions(
                reopened
                    .history(id, range(sequences[2], sequences[6], 3))
                    .expect("page")
            ),
            all[3..6],
            "lag {lag}, group {group}"
        );
        assert_eq!(
            reopened.history_count(id).expect("count"),
            8,
            "lag {lag}, group {group}"
        );
        assert_eq!(
            reopened.nth_newest(id, u64::MAX, 5).expect("nth"),
            Some(sequences[3]),
            "lag {lag}, group {group}"
        );
        assert_eq!(
            reopened.nth_newest(id, sequences[1], 2).expect("nth"),
            Some(sequences[0]),
            "lag {lag}, group {group}"
        );
        let audit = |principal: Option<&str>, before: u64, max: usize| {
            versions(
                reopened
                    .audit(&super::AuditQuery {
                        agent_id: Some(id),
                        principal: principal.map(str::to_owned),
                        before,
                        max,
                    })
                    .expect("audit"),
            )
        };
        let newest_first: Vec<u64> = all.iter().rev().copied().collect();
        assert_eq!(
            audit(None, u64::MAX, 100),
            newest_first,
            "lag {lag}, group {group}"
        );
        assert_eq!(
            audit(None, sequences[7], 4),
            newest_first[1..5],
            "lag {lag}, group {group}"
        );
        assert_eq!(
            audit(Some("alice"), u64::MAX, 100),
            newest_first,
            "lag {lag}, group {group}"
        );
        assert!(
            audit(Some("bob"), u64::MAX, 100).is_empty(),
            "lag {lag}, group {group}"
        );
        // Compaction takes index entries with their events.
        let retention = Retention {
            max_events: Some(3),
            max_age: None,
        };
        let head = reopened.head().expect("head");
        reopened
            .compact(&retention, head, 1000, &SystemClock)
            .expect("compact");
        assert_eq!(
            reopened.history_count(id).expect("count"),
            3,
            "lag {lag}, group {group}"
        );
        assert_eq!(
            versions(
                reopened
                    .history(id, range(0, u64::MAX, 100))
                    .expect("history")
            ),
            all[5..],
            "lag {lag}, group {group}"
        );
        assert_eq!(
            audit(None, u64::MAX, 100),
            newest_first[..3],
            "lag {lag}, group {group}"
        );
        // A stale prior version still conflicts, and the agent reads back
        // at its newest version after a reopen, whether its row was brought
        // up to date by a commit, by the compaction or at start-up.
        let mut stale = [step(&agent, AgentState::Deploying)];
        assert_eq!(
            commit(&reopened, &mut stale),
            vec![ChangeOutcome::Conflict {
                actual: current.version
            }],
            "lag {lag}, group {group}"
        );
        let mut one_more = [step(&current, AgentState::Deploying)];
        assert_eq!(
            commit(&reopened, &mut one_more),
            vec![ChangeOutcome::Committed]
        );
        current = after(Some(&current), &one_more[0]);
        // A principal's events alone, indexed or in the tail, and after a
        // compaction.
        let mut by_bob = Vec::new();
        for to in [AgentState::Failed, AgentState::Deploying] {
            let mut change = [step(&current, to)];
            Arc::make_mut(&mut change[0].records[0]).principal = "bob".into();
            assert_eq!(
                commit(&reopened, &mut change),
                vec![ChangeOutcome::Committed]
            );
            by_bob.insert(0, change[0].records[0].sequence);
            current = after(Some(&current), &change[0]);
        }
        let by_principal = |principal: Option<&str>, before: u64| -> Vec<u64> {
            reopened
                .audit(&super::AuditQuery {
                    agent_id: None,
                    principal: principal.map(str::to_owned),
                    before,
                    max: 1000,
                })
                .expect("audit")
                .iter()
                .map(|r| r.sequence)
                .collect()
        };
        let everything = by_principal(None, u64::MAX);
        assert_eq!(
            by_principal(Some("bob"), u64::MAX),
            by_bob,
            "lag {lag}, group {group}"
        );
        assert_eq!(
            by_principal(Some("alice"), u64::MAX),
            everything
                .iter()
                .copied()
                .filter(|s| !by_bob.contains(s))
                .collect::<Vec<_>>(),
            "lag {lag}, group {group}"
        );
        assert_eq!(
            by_principal(Some("bob"), by_bob[0]),
            by_bob[1..],
            "lag {lag}, group {group}"
        );
        let head = reopened.head().expect("head");
        let newest = Retention {
            max_events: Some(1),
            max_age: None,
        };
        reopened
            .compact(&newest, head, 1000, &SystemClock)
            .expect("compact");
        assert_eq!(
            by_principal(Some("bob"), u64::MAX),
            by_bob[..1],
            "lag {lag}, group {group}"
        );
        assert!(
            by_principal(Some("alice"), u64::MAX).is_empty(),
            "lag {lag}, group {group}"
        );
        drop(reopened);
        let again = SqliteStore::open_with_index_lag(&path, lag, group).expect("reopen");
        let loaded = again.load().expect("load");
        let found = loaded.agents.iter().find(|a| a.id == id).expect("agent");
        assert_eq!(found, &current, "lag {lag}, group {group}");
    }
}

/// A commit on a store that has not loaded the agents (so knows no
/// versions yet) finds each agent's version in the file, newer events than
/// the agent's row included.
#[test]
fn sqlite_versions_come_from_the_log_tail_before_a_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("versions.db");
    let id = AgentId::generate();
    let mut agent = {
        let store = SqliteStore::open(&path).expect("open");
        store.load().expect("load");
        let mut reg = [register(id)];
        commit(&store, &mut reg);
        let mut agent = after(None, &reg[0]);
        for to in [AgentState::Deploying, AgentState::Deployed] {
            let mut change = [step(&agent, to)];
            assert_eq!(commit(&store, &mut change), vec![ChangeOutcome::Committed]);
            agent = after(Some(&agent), &change[0]);
        }
        agent
    };
    let store = SqliteStore::open(&path).expect("reopen");
    let registered = after(None, &register(id));
    let mut stale = [step(&registered, AgentState::Deploying)];
    assert_eq!(
        commit(&store, &mut stale),
        vec![ChangeOutcome::Conflict {
            actual: agent.version
        }]
    );
    let mut next = [step(&agent, AgentState::Starting)];
    assert_eq!(commit(&store, &mut next), vec![ChangeOutcome::Committed]);
    agent = after(Some(&agent), &next[0]);
    let loaded = store.load().expect("load");
    assert_eq!(loaded.agents, vec![agent]);
    assert_eq!(loaded.head, 4);
}

/// A database of schema version 2 (before principals were recorded) opens:
/// its records read back with an empty principal, and new records keep
/// theirs; through version 4, its events are found by agent.
#[test]
fn sqlite_migrates_a_version_2_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v2.db");
    let id = AgentId::generate();
    {
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        let [v1, v2, ..] = &super::sqlite::schema::STEPS;
        conn.execute_batch(&format!("{}{}PRAGMA user_version = 2;", v1.sql, v2.sql))
            .expect("version 2 schema");
        conn.execute(
            "INSERT INTO agents (agent_id, name, labels, state, version, created_at, updated_at,
                last_sequence, last_from, last_reason, last_triggered_by, last_metadata)
             VALUES (?1, 'old', '', 'registered', 1, 0, 0, 1, NULL, 'r', 'system', '')",
            [id.as_bytes()],
        )
        .expect("old agent");
        conn.execute(
            "INSERT INTO events (sequence, agent_id, version, from_state, to_state, at, reason,
                triggered_by, metadata) VALUES (1, ?1, 1, NULL, 'registered', 0, 'r', 'system', '')",
            [id.as_bytes()],
        )
        .expect("old event");
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'head'", [])
            .expect("head");
    }
    let store = SqliteStore::open(&path).expect("open and migrate");
    let loaded = store.load().expect("load");
    assert_eq!(loaded.agents.len(), 1);
    assert_eq!(loaded.agents[0].last_transition.principal, "");
    let agent = loaded.agents[0].clone();
    let mut next = [step(&agent, AgentState::Deploying)];
    commit(&store, &mut next);
    let history = store.history(id, range(0, u64::MAX, 10)).expect("history");
    let principals: Vec<&str> = history.iter().map(|r| r.principal.as_str()).collect();
    assert_eq!(principals, ["", "alice"]);
    // Version 4 copied the old event into the agents' index.
    assert_eq!(store.history_count(id).expect("count"), 2);
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

#[test]
fn sqlite_cursors_conform_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cursors.db");
    let store = SqliteStore::open(&path).expect("open");
    cursors_conform(&store);
    store.close().expect("close");
    drop(store);
    let reopened = SqliteStore::open(&path).expect("reopen");
    assert_eq!(reopened.cursor("first").expect("cursor"), 9);
    assert_eq!(reopened.cursor("second").expect("cursor"), 4);
    reopened.advance_cursor("second", 2).expect("advance");
    assert_eq!(reopened.cursor("second").expect("cursor"), 4);
}

#[test]
fn postgres_cursors_conform_survive_reopen_and_are_shared() {
    let Some(url) = fresh_postgres("cursors") else {
        return;
    };
    let store = PostgresStore::open(&url).expect("open");
    cursors_conform(&store);
    store.close().expect("close");
    drop(store);
    let reopened = PostgresStore::open(&url).expect("reopen");
    assert_eq!(reopened.cursor("first").expect("cursor"), 9);
    assert_eq!(reopened.cursor("second").expect("cursor"), 4);
    // Another process sharing the database sees the cursor and cannot move
    // it back.
    let other = PostgresStore::open(&url).expect("open another");
    other.advance_cursor("second", 2).expect("advance");
    other.advance_cursor("first", 12).expect("advance");
    assert_eq!(reopened.cursor("second").expect("cursor"), 4);
    assert_eq!(reopened.cursor("first").expect("cursor"), 12);
}

/// A file of schema version 6, made by the migration steps up to 6 only and
/// holding one agent, opens: it is migrated to version 7, its agent loads,
/// and its cursors work and survive a reopen.
#[test]
fn sqlite_migrates_a_version_6_database_to_cursors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v6.db");
    let id = AgentId::generate();
    let user_version = |conn: &rusqlite::Connection| -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("user_version")
    };
    {
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        let steps = &super::sqlite::schema::STEPS;
        let (to_2, to_6) = steps[..6].split_at(2);
        for step in to_2 {
            conn.execute_batch(&format!(
                "BEGIN; {} PRAGMA user_version = {}; COMMIT;",
                step.sql, step.version
            ))
            .expect("steps 1 and 2");
        }
        conn.execute(
            "INSERT INTO agents (agent_id, name, labels, state, version, created_at, updated_at,
                last_sequence, last_from, last_reason, last_triggered_by, last_metadata)
             VALUES (?1, 'old', '', 'registered', 1, 0, 0, 1, NULL, 'r', 'system', '')",
            [id.as_bytes()],
        )
        .expect("old agent");
        conn.execute(
            "INSERT INTO events (sequence, agent_id, version, from_state, to_state, at, reason,
                triggered_by, metadata) VALUES (1, ?1, 1, NULL, 'registered', 0, 'r', 'system', '')",
            [id.as_bytes()],
        )
        .expect("old event");
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'head'", [])
            .expect("head");
        for step in to_6 {
            conn.execute_batch(&format!(
                "BEGIN; {} PRAGMA user_version = {}; COMMIT;",
                step.sql, step.version
            ))
            .expect("steps 3 to 6");
        }
        assert_eq!(user_version(&conn), 6);
        let cursors: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'cursors'",
                [],
                |r| r.get(0),
            )
            .expect("schema");
        assert_eq!(cursors, 0, "a version 6 file has no cursors table");
    }
    let store = SqliteStore::open(&path).expect("open and migrate");
    let loaded = store.load().expect("load");
    assert_eq!(loaded.head, 1);
    assert_eq!(loaded.agents.len(), 1);
    assert_eq!(loaded.agents[0].id, id);
    assert_eq!(store.cursor("driver").expect("cursor"), 0);
    store.advance_cursor("driver", 1).expect("advance");
    let mut next = [step(&loaded.agents[0], AgentState::Deploying)];
    assert_eq!(commit(&store, &mut next), vec![ChangeOutcome::Committed]);
    assert_eq!(next[0].records[0].sequence, 2);
    store.close().expect("close");
    drop(store);
    let conn = rusqlite::Connection::open(&path).expect("raw open");
    assert_eq!(user_version(&conn), 7);
    drop(conn);
    let reopened = SqliteStore::open(&path).expect("reopen");
    assert_eq!(reopened.cursor("driver").expect("cursor"), 1);
}

/// A PostgreSQL database of schema version 2 (no `cursors` table) opens:
/// it is migrated to version 3 and its cursors work.
#[test]
fn postgres_migrates_a_version_2_database_to_cursors() {
    let Some(url) = fresh_postgres("cursors_v2") else {
        return;
    };
    drop(PostgresStore::open(&url).expect("create the schema"));
    let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    client
        .batch_execute(
            "DROP TABLE cursors;
             UPDATE meta SET value = 2 WHERE key = 'schema_version';",
        )
        .expect("back to version 2");
    let store = PostgresStore::open(&url).expect("open and migrate");
    store.advance_cursor("driver", 3).expect("advance");
    assert_eq!(store.cursor("driver").expect("cursor"), 3);
    let version: i64 = client
        .query_one("SELECT value FROM meta WHERE key = 'schema_version'", &[])
        .expect("version")
        .get(0);
    assert_eq!(version, 3);
}
