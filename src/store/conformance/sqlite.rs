//! The suite on SQLite, and what only SQLite has: schema versions and
//! migrations, one writer per file, the event index and its lag.

use super::*;

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
            crate::store::sqlite::index::INDEX_LAG,
            crate::store::sqlite::index::INDEX_GROUP,
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
                    .audit(&crate::store::AuditQuery {
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
                .audit(&crate::store::AuditQuery {
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

/// Settling indexes the log's whole tail: `meta.indexed` reaches the head
/// and the index tables hold every event; reads by agent agree before and
/// after, and after a later commit; a second settle finds nothing to do.
#[test]
fn sqlite_settle_indexes_the_tail_and_reads_agree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("settle.db");
    // A lag and groups longer than this test's log: no commit indexes.
    let store = SqliteStore::open_with_index_lag(&path, 1000, 1000).expect("open");
    store.load().expect("load");
    let id = AgentId::generate();
    let mut reg = [register(id)];
    commit(&store, &mut reg);
    let mut agent = after(None, &reg[0]);
    for to in [
        AgentState::Deploying,
        AgentState::Deployed,
        AgentState::Starting,
    ] {
        let mut change = [step(&agent, to)];
        assert_eq!(commit(&store, &mut change), vec![ChangeOutcome::Committed]);
        agent = after(Some(&agent), &change[0]);
    }
    let file = rusqlite::Connection::open(&path).expect("open the file");
    let count = |sql: &str| -> i64 { file.query_row(sql, [], |r| r.get(0)).expect(sql) };
    let indexed = "SELECT value FROM meta WHERE key = 'indexed'";
    let head = store.head().expect("head") as i64;
    assert!(count(indexed) < head, "the commits left a tail");
    let versions = |store: &SqliteStore| -> Vec<u64> {
        store
            .history(id, range(0, u64::MAX, 100))
            .expect("history")
            .iter()
            .map(|r| r.version)
            .collect()
    };
    let before = versions(&store);
    assert_eq!(before.len(), 4);

    store.settle().expect("settle");
    assert_eq!(count(indexed), head);
    assert_eq!(count("SELECT count(*) FROM agent_events"), head);
    assert_eq!(count("SELECT count(*) FROM principal_events"), head);
    assert_eq!(versions(&store), before);
    assert_eq!(store.history_count(id).expect("count"), 4);
    store.settle().expect("nothing to do");
    assert_eq!(count(indexed), head);

    let mut change = [step(&agent, AgentState::Online)];
    assert_eq!(commit(&store, &mut change), vec![ChangeOutcome::Committed]);
    assert_eq!(versions(&store).len(), 5);
    assert_eq!(store.history_count(id).expect("count"), 5);
    assert_eq!(
        store.nth_newest(id, u64::MAX, 1).expect("nth"),
        Some(head as u64 + 1)
    );
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
        let [v1, v2, ..] = &crate::store::sqlite::schema::STEPS;
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

/// A file of schema version 6, made by the migration steps up to 6 only and
/// holding one agent, opens: it is migrated to the latest version, its
/// agent loads, and its cursors work and survive a reopen.
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
        let steps = &crate::store::sqlite::schema::STEPS;
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
    let latest = crate::store::sqlite::schema::STEPS
        .last()
        .map(|s| s.version);
    assert_eq!(Some(user_version(&conn)), latest);
    drop(conn);
    let reopened = SqliteStore::open(&path).expect("reopen");
    assert_eq!(reopened.cursor("driver").expect("cursor"), 1);
}

/// The writer's last batch is committed when its last event is in the file
/// (removed here behind the store's back, as a rolled-back COMMIT leaves
/// it), and a batch that wrote no event when it recorded its id; about
/// any other batch the store answers an error, not a guess. Commits do
/// not write `meta.head`: the head read from the log, across a reopen.
#[test]
fn sqlite_tells_whether_its_last_batch_reached_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("batches.db");
    let store = SqliteStore::open(&path).expect("open");
    store.load().expect("load");
    let id = AgentId::generate();
    let mut first = [register(id), register(AgentId::generate())];
    let outcomes = store
        .commit(BatchId(11), &mut first, &SystemClock)
        .expect("commit");
    assert_eq!(outcomes, vec![ChangeOutcome::Committed; 2]);
    assert!(store.batch_committed(BatchId(11)).expect("last batch"));
    assert!(
        store.batch_committed(BatchId(10)).is_err(),
        "a batch that is not the writer's last has no answer"
    );

    // Only conflicts: nothing written, and still committed.
    let mut conflicts = [register(id)];
    let outcomes = store
        .commit(BatchId(12), &mut conflicts, &SystemClock)
        .expect("commit");
    assert_eq!(outcomes, vec![ChangeOutcome::Conflict { actual: 1 }]);
    assert!(store.batch_committed(BatchId(12)).expect("eventless batch"));

    let agent = after(None, &first[0]);
    let mut next = [step(&agent, AgentState::Deploying)];
    assert_eq!(
        store
            .commit(BatchId(13), &mut next, &SystemClock)
            .expect("commit"),
        vec![ChangeOutcome::Committed]
    );
    assert_eq!(next[0].records[0].sequence, 3);
    assert!(store.batch_committed(BatchId(13)).expect("last batch"));
    {
        let conn = rusqlite::Connection::open(&path).expect("raw open");
        let stored_head: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'head'", [], |r| {
                r.get(0)
            })
            .expect("meta head");
        assert_eq!(stored_head, 0, "commits leave meta.head alone");
        conn.execute("DELETE FROM events WHERE sequence = 3", [])
            .expect("remove the batch's event");
    }
    assert!(!store.batch_committed(BatchId(13)).expect("rolled back"));
    assert_eq!(store.head().expect("head"), 2);
    drop(store);
    let reopened = SqliteStore::open(&path).expect("reopen");
    assert_eq!(reopened.load().expect("load").head, 2);
}
