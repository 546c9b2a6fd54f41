//! The suite on PostgreSQL, and what only a shared store has: concurrent
//! openers, several writers, migrations.

use std::collections::HashMap;

use super::*;
use crate::{domain::Heartbeat, store::SavedHeartbeats};

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

/// Returns once a connection to `client`'s database waits for a lock, as
/// PostgreSQL reports it; fails with `never` after 20 s.
fn wait_for_a_lock_wait(client: &mut ::postgres::Client, never: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .expect("activity")
            .get(0);
        if waiting > 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{never}");
        std::thread::yield_now();
    }
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
    wait_for_a_lock_wait(&mut watcher, "the batch never waited");
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
/// it is migrated to the current version and its cursors work.
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
    assert_eq!(version, 4);
}

fn beat_at(micros: u64, task: &str) -> Heartbeat {
    Heartbeat {
        at: std::time::UNIX_EPOCH + Duration::from_micros(micros),
        load: Some(0.5),
        current_task: Some(task.to_string()),
    }
}

/// Heartbeat saves are numbered: a read after a save's number returns only
/// the rows later saves wrote, an older beat than the stored one changes
/// nothing, and the number of the last save read comes back for the next
/// read. A database of version 3 (rows without a number) is migrated.
#[test]
fn postgres_heartbeats_are_read_by_save_number() {
    let Some(url) = fresh_postgres("heartbeat_saves") else {
        return;
    };
    let store = PostgresStore::open(&url).expect("open");
    let (a, b) = (AgentId::generate(), AgentId::generate());
    let empty = store.heartbeats_saved_after(0).expect("read");
    assert_eq!(empty, SavedHeartbeats::default());

    store
        .save_heartbeats(&[(a, beat_at(1_000, "one"))])
        .expect("save");
    let first = store.heartbeats_saved_after(0).expect("read");
    assert_eq!(first.beats, vec![(a, beat_at(1_000, "one"))]);
    assert!(first.through > 0);

    // b is new; a's beat is older than the stored one: a's row stays.
    store
        .save_heartbeats(&[(b, beat_at(2_000, "two")), (a, beat_at(500, "old"))])
        .expect("save");
    let second = store.heartbeats_saved_after(first.through).expect("read");
    assert_eq!(second.beats, vec![(b, beat_at(2_000, "two"))]);
    assert!(second.through > first.through);

    store
        .save_heartbeats(&[(a, beat_at(3_000, "three"))])
        .expect("save");
    let third = store.heartbeats_saved_after(second.through).expect("read");
    assert_eq!(third.beats, vec![(a, beat_at(3_000, "three"))]);
    let nothing = store.heartbeats_saved_after(third.through).expect("read");
    assert_eq!(nothing.beats, vec![]);
    assert_eq!(nothing.through, third.through);

    let mut all = store.heartbeats_saved_after(0).expect("read").beats;
    all.sort_by_key(|(_, beat)| beat.at);
    assert_eq!(
        all,
        vec![(b, beat_at(2_000, "two")), (a, beat_at(3_000, "three"))]
    );
    let mut some = store.heartbeats(&[a]).expect("read");
    assert_eq!(some.pop(), Some((a, beat_at(3_000, "three"))));

    // Back to version 3: no numbers, no sequence. Opening migrates, the
    // old rows count as saved before every numbered save.
    let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).expect("connect");
    store.close().expect("close");
    drop(store);
    client
        .batch_execute(
            "DROP INDEX heartbeats_by_save;
             ALTER TABLE heartbeats DROP COLUMN saved;
             DROP SEQUENCE heartbeat_saves;
             UPDATE meta SET value = 3 WHERE key = 'schema_version';",
        )
        .expect("back to version 3");
    let store = PostgresStore::open(&url).expect("open and migrate");
    let unnumbered = store.heartbeats_saved_after(0).expect("read");
    assert_eq!((unnumbered.beats.len(), unnumbered.through), (2, 0));
    store
        .save_heartbeats(&[(b, beat_at(4_000, "four"))])
        .expect("save");
    let after = store.heartbeats_saved_after(0).expect("read");
    assert_eq!((after.beats.len(), after.through), (2, 1));
    assert!(after.beats.contains(&(b, beat_at(4_000, "four"))));
    assert_eq!(store.heartbeats_saved_after(1).expect("read").beats, vec![]);
}

/// Two processes save heartbeats at once while a third reads only what
/// was saved since its last read: it misses nothing (save numbers follow
/// commit order), and ends with every agent's stored heartbeat.
#[test]
fn postgres_reads_by_save_number_miss_nothing_under_concurrent_saves() {
    let Some(url) = fresh_postgres("heartbeat_races") else {
        return;
    };
    let reader = PostgresStore::open(&url).expect("open");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2u64)
        .map(|writer| {
            let url = url.clone();
            std::thread::spawn(move || {
                let store = PostgresStore::open(&url).expect("open");
                let agents: Vec<AgentId> = (0..40).map(|_| AgentId::generate()).collect();
                for save in 0..150u64 {
                    // A third of the agents each time, their beats newer.
                    let beats: Vec<_> = agents
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| (*i as u64 + save).is_multiple_of(3))
                        .map(|(_, id)| (*id, beat_at(save * 10 + writer, "t")))
                        .collect();
                    store.save_heartbeats(&beats).expect("save");
                }
                store.close().expect("close");
            })
        })
        .collect();
    let reading = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut seen: HashMap<AgentId, Heartbeat> = HashMap::new();
            let mut through = 0;
            let mut reads = 0;
            loop {
                // Whether the writers were done before this read began.
                let last = done.load(std::sync::atomic::Ordering::Acquire);
                let saved = reader.heartbeats_saved_after(through).expect("read");
                assert!(saved.through >= through);
                through = saved.through;
                reads += 1;
                for (id, beat) in saved.beats {
                    seen.insert(id, beat);
                }
                if last {
                    return (reader, seen, reads);
                }
            }
        })
    };
    for writer in writers {
        writer.join().expect("writer");
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let (reader, seen, reads) = reading.join().expect("reader");
    assert!(
        reads > 2,
        "the reader read while the writers saved ({reads} reads)"
    );
    let mut stored: HashMap<AgentId, Heartbeat> = reader
        .heartbeats_saved_after(0)
        .expect("read")
        .beats
        .into_iter()
        .collect();
    assert_eq!(stored.len(), 80);
    for (id, beat) in &seen {
        assert_eq!(stored.remove(id).as_ref(), Some(beat), "agent {id}");
    }
    assert!(stored.is_empty(), "never read: {stored:?}");
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
                // Client connections only: an autovacuum worker visiting
                // the database shows up there too.
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1
                 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
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

/// Holds the turn to commit on a connection of its own, as another
/// process's commit does between its first statement and COMMIT.
fn hold_turn(url: &str) -> ::postgres::Client {
    let mut holder =
        ::postgres::Client::connect(url, ::postgres::NoTls).expect("holder connection");
    holder
        .batch_execute("BEGIN; SELECT value FROM meta WHERE key = 'head' FOR UPDATE")
        .expect("take the turn");
    holder
}

/// What a background commit sends back: its outcomes and first sequence.
type Finished =
    std::sync::mpsc::Receiver<Result<(Vec<ChangeOutcome>, u64), crate::store::StoreError>>;

/// Runs a commit of one registration on `store` on a thread of its own:
/// its outcome and first sequence arrive on the returned channel.
fn commit_in_background(
    store: &std::sync::Arc<PostgresStore>,
    id: u64,
) -> (Finished, std::thread::JoinHandle<()>) {
    let (done, finished) = std::sync::mpsc::channel();
    let writer = std::sync::Arc::clone(store);
    let thread = std::thread::spawn(move || {
        let mut batch = [register(AgentId::generate())];
        let outcome = writer.commit(BatchId(id), &mut batch, &SystemClock);
        let _ = done.send(outcome.map(|o| (o, batch[0].records[0].sequence)));
    });
    (finished, thread)
}

#[test]
fn postgres_commits_wait_for_the_turn_and_an_unused_turn_is_released() {
    let Some(url) = fresh_postgres("turns") else {
        return;
    };
    let a = std::sync::Arc::new(PostgresStore::open(&url).expect("open a"));
    let b = std::sync::Arc::new(PostgresStore::open(&url).expect("open b"));
    a.take_commit_turn().expect("a takes the turn");
    let (finished, other) = commit_in_background(&b, 7);
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
    assert_eq!(commit(&*a, &mut next), vec![ChangeOutcome::Committed]);
    assert_eq!(next[0].records[0].sequence, 2);
    // Taking the turn twice before a commit is one turn, which the commit
    // ends: another process commits after it.
    a.take_commit_turn().expect("take");
    a.take_commit_turn().expect("take again");
    let mut last = [register(AgentId::generate())];
    assert_eq!(commit(&*a, &mut last), vec![ChangeOutcome::Committed]);
    a.end_commit_turn().expect("nothing left to end");
    let mut after = [register(AgentId::generate())];
    assert_eq!(commit(&*b, &mut after), vec![ChangeOutcome::Committed]);
    assert_eq!(b.head().expect("head"), 4);
}

/// A commit whose connection is ended while it waits for the turn (its
/// statements already sent behind the wait) fails with nothing written,
/// and the next commit connects again and takes the next sequence.
#[test]
fn postgres_commit_that_loses_its_connection_in_the_turn_writes_nothing() {
    let Some(url) = fresh_postgres("turn_lost") else {
        return;
    };
    let a = std::sync::Arc::new(PostgresStore::open(&url).expect("open a"));
    let mut holder = hold_turn(&url);
    let (finished, thread) = commit_in_background(&a, 7);
    // Ends the backend that waits for the lock, once it waits.
    wait_for_a_lock_wait(&mut holder, "the commit never waited for the turn");
    holder
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .expect("terminate the waiting backend");
    let failed = finished
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the commit answers");
    assert!(
        matches!(failed, Err(ref err) if !matches!(err, crate::store::StoreError::CommitOutcomeUnknown { .. })),
        "{failed:?}"
    );
    thread.join().expect("thread");
    holder.batch_execute("ROLLBACK").expect("release the turn");
    assert!(!a.batch_committed(BatchId(7)).expect("read the batch"));
    let mut next = [register(AgentId::generate())];
    assert_eq!(commit(&*a, &mut next), vec![ChangeOutcome::Committed]);
    assert_eq!(
        next[0].records[0].sequence, 1,
        "the failed commit wrote nothing"
    );
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
