//! The suite on PostgreSQL, and what only a shared store has: concurrent
//! openers, several writers, migrations.

use super::*;

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
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
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
    let mut other = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
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
    let mut watcher = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
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

/// A PostgreSQL database of schema version 2 (no `cursors` table) opens:
/// it is migrated to version 3 and its cursors work.
#[test]
fn postgres_migrates_a_version_2_database_to_cursors() {
    let Some(url) = fresh_postgres("cursors_v2") else {
        return;
    };
    drop(PostgresStore::open(&url).expect("create the schema"));
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
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

/// A burst of concurrent reads shares at most `MAX_READERS` connections:
/// the database never sees more from this process, and every read answers.
#[test]
fn postgres_readers_are_bounded_under_a_burst_of_reads() {
    let Some(url) = fresh_postgres("readers") else {
        return;
    };
    let store = Arc::new(PostgresStore::open(&url).expect("open"));
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("admin connection");
    let database: String = admin
        .query_one("SELECT current_database()", &[])
        .expect("database")
        .get(0);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..64)
        .map(|_| {
            let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && reads < 200 {
                    store.head().expect("a read answers");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    let mut most = 0i64;
    for _ in 0..50 {
        let open: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&database],
            )
            .expect("count connections")
            .get(0);
        most = most.max(open);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().expect("reader")).sum();
    assert!(reads >= 64, "every reader read");
    // The writer's connection and the readers.
    let bound = 1 + crate::store::postgres::MAX_READERS as i64;
    assert!(
        most <= bound,
        "{most} connections open, at most {bound} expected"
    );
}

#[test]
fn postgres_commits_wait_for_the_turn_and_an_unused_turn_is_released() {
    let Some(url) = fresh_postgres("turns") else {
        return;
    };
    let a = PostgresStore::open(&url).expect("open a");
    let b = std::sync::Arc::new(PostgresStore::open(&url).expect("open b"));
    a.take_commit_turn().expect("a takes the turn");
    let (done, finished) = std::sync::mpsc::channel();
    let writer = std::sync::Arc::clone(&b);
    let other = std::thread::spawn(move || {
        let mut batch = [register(AgentId::generate())];
        let outcome = writer.commit(BatchId(7), &mut batch, &SystemClock);
        let _ = done.send(outcome.map(|o| (o, batch[0].records[0].sequence)));
    });
    // B cannot commit while A holds the turn: nothing comes back in a while.
    assert!(
        finished
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err(),
        "a commit went through while another process held the turn"
    );
    a.end_commit_turn().expect("a ends its unused turn");
    let (outcome, sequence) = finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("b commits once the turn is released")
        .expect("b's commit");
    assert_eq!(outcome, vec![ChangeOutcome::Committed]);
    assert_eq!(sequence, 1, "the unused turn advanced nothing");
    other.join().expect("thread");
    // A's connection is usable: its next commit takes the turn itself.
    let mut next = [register(AgentId::generate())];
    assert_eq!(commit(&a, &mut next), vec![ChangeOutcome::Committed]);
    assert_eq!(next[0].records[0].sequence, 2);
    // Taking the turn twice before a commit is one turn.
    a.take_commit_turn().expect("take");
    a.take_commit_turn().expect("take again");
    let mut last = [register(AgentId::generate())];
    assert_eq!(commit(&a, &mut last), vec![ChangeOutcome::Committed]);
    a.end_commit_turn().expect("nothing left to end");
    assert_eq!(b.head().expect("head"), 3);
}

/// A process that finds a lease taken tries again on the same connection
/// instead of opening one per attempt (every second per lease, in every
/// process that does not hold it).
#[test]
fn postgres_lease_attempts_reuse_one_connection() {
    let Some(url) = fresh_postgres("lease_tries") else {
        return;
    };
    let a = PostgresStore::open(&url).expect("open a");
    let b = PostgresStore::open(&url).expect("open b");
    let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("admin connection");
    let mut trying = || -> Vec<i32> {
        let mut pids: Vec<i32> = admin
            .query(
                "SELECT pid FROM pg_stat_activity
                 WHERE datname = current_database() AND query LIKE 'SELECT pg_try_advisory_lock%'",
                &[],
            )
            .expect("list connections")
            .iter()
            .map(|row| row.get(0))
            .collect();
        pids.sort_unstable();
        pids
    };
    let held = a
        .try_lease("compaction")
        .expect("a tries")
        .expect("a takes the free lease");
    for _ in 0..2 {
        assert!(
            b.try_lease("compaction").expect("b tries").is_none(),
            "a holds it"
        );
    }
    let first = trying();
    assert_eq!(
        first.len(),
        2,
        "a's lease and b's one connection for attempts: {first:?}"
    );
    for _ in 0..3 {
        assert!(
            b.try_lease("compaction").expect("b tries").is_none(),
            "a holds it"
        );
    }
    assert_eq!(trying(), first, "b's attempts reused its connection");
    drop(held);
}
