//! The embedded durable store: one SQLite file in WAL mode with
//! `synchronous = FULL`, so a committed batch is fsync'd before `commit`
//! returns. Knows nothing of the service or anything above the store.
//!
//! # Tables
//! - `events`: the global event log (its primary key is the sequence) and
//!   every agent's history.
//! - `agents`: each agent's identity and its state as of `meta.synced`,
//!   including its last transition up to there, so that start-up reads one
//!   row per agent and compaction never loses an agent's state (see
//!   [`commit`]).
//! - `agent_events`, `principal_events`: the log indexed by agent and by
//!   principal (see [`index`]).
//! - `meta`: `indexed` and `synced`, and what the log itself does not
//!   always hold: `head`, the head as of the last compaction (the head is
//!   the newest event's sequence when that is larger, see [`read_head`]),
//!   and `last_batch`, the id of the last committed batch whose changes
//!   were all refused, so that it wrote no event. A batch that writes
//!   events writes neither, so that most commits write the log's pages and
//!   nothing else (see [`commit`]).
//!
//! # Connections
//! One writer connection (the service's commit thread, behind a mutex; also
//! start-up and compaction), with what it knows of the file beside it, and
//! a bounded pool of read-only connections ([`MAX_READERS`], reused;
//! reads beyond them wait for one), which WAL lets run beside the writer.
//!
//! # Files
//! This file opens the database and delegates the [`Store`] methods:
//! [`schema`] creates and migrates it, [`commit`] writes batches,
//! [`index`] keeps the index tables, [`compact`] deletes old events,
//! [`read`] answers the queries and [`rows`] decodes their rows;
//! [`cursors`] keeps the consumers' cursors.

mod commit;
mod compact;
mod cursors;
pub(super) mod index;
mod read;
mod rows;
pub(super) mod schema;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use self::{
    commit::{Attempt, REFRESH_LAG, WriterCache, refresh_agent_rows},
    index::{INDEX_GROUP, INDEX_LAG},
    rows::{SELECT_AGENTS, agent_from_row},
};
use super::{
    AgentChange, AgentIdentity, AuditQuery, BatchId, ChangeOutcome, HistoryRange, Recovered,
    Result, Retention, Store, StoreError, check_cursor_name, codec::to_micros, pool::Pool,
    stored_cursor,
};
use crate::domain::{AgentId, Clock, TransitionRecord};

/// The writer connection's settings: WAL, an fsync before each commit
/// returns, a 64 MiB page cache. The benchmarks' bare SQLite baselines
/// open their files with the same.
pub const PRAGMAS: &str = "PRAGMA journal_mode = WAL;
     PRAGMA synchronous = FULL;
     PRAGMA busy_timeout = 5000;
     PRAGMA cache_size = -65536;";

/// Reader connections open at most, reused. A read that finds them all
/// busy waits for one (up to [`READER_WAIT`]) instead of opening another,
/// which would open the file and parse its schema again.
const MAX_READERS: usize = 8;

/// How long a read waits for a busy reader before it fails.
const READER_WAIT: Duration = Duration::from_secs(30);

/// How far the writer lets the index and the agents' rows lag.
#[derive(Clone, Copy, Debug)]
struct Tuning {
    /// How far `meta.indexed` stays behind the head ([`INDEX_LAG`]).
    index_lag: u64,
    /// Events of one agent or principal indexed together ([`INDEX_GROUP`]).
    index_group: usize,
    /// Events after `meta.synced` after which a commit syncs the agents
    /// ([`REFRESH_LAG`]).
    refresh_lag: u64,
}

/// The one connection that writes and what the writer knows of the file.
struct Writer {
    conn: Connection,
    cache: WriterCache,
    /// The last commit this writer attempted, kept across a failed one
    /// (see [`commit::batch_committed`]).
    attempt: Option<Attempt>,
}

/// The SQLite back end.
pub struct SqliteStore {
    path: PathBuf,
    /// Exclusive lock on `<path>.lock`, held while the store is open.
    _lock: std::fs::File,
    /// The only connection that writes; used by the commit thread and by
    /// compaction, which runs on the same thread between batches.
    writer: Mutex<Writer>,
    /// The read-only connections, lent one read at a time.
    readers: Pool<Connection>,
    /// Oldest retained sequence, kept by the one writer (load and
    /// compaction change it; commits never do).
    oldest: AtomicU64,
    tuning: Tuning,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Wraps a rusqlite error with what the store was doing.
fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |err| StoreError::backend(context, err)
}

/// A value of the `meta` table (0 when absent).
fn read_meta(conn: &Connection, key: &str) -> Result<u64> {
    let value: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")
        .and_then(|mut stmt| stmt.query_row([key], |r| r.get(0)).optional())
        .map_err(sql("reading the meta table"))?;
    Ok(value.map_or(0, |v| v as u64))
}

/// The highest sequence ever committed: the newest event's, or the head
/// the last compaction recorded in `meta` when it deleted every event
/// (0 on an empty file). Both are reads of one B-tree's edge.
fn read_head(conn: &Connection) -> Result<u64> {
    let head: i64 = conn
        .prepare_cached(
            "SELECT max(coalesce((SELECT max(sequence) FROM events), 0),
                        coalesce((SELECT value FROM meta WHERE key = 'head'), 0))",
        )
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
        .map_err(sql("reading the head"))?;
    Ok(head as u64)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and its directory,
    /// and checks that it can be written.
    ///
    /// # Errors
    /// The directory cannot be created, the file cannot be opened or written
    /// (read-only, disk full), or it holds a newer schema.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_tuned(
            path,
            Tuning {
                index_lag: INDEX_LAG,
                index_group: INDEX_GROUP,
                refresh_lag: REFRESH_LAG,
            },
        )
    }

    /// [`SqliteStore::open`] with another [`INDEX_LAG`] and [`REFRESH_LAG`],
    /// both `lag` (`>= 1`), and another [`INDEX_GROUP`], for tests of the
    /// reads that combine the index and the log's tail, and of the agents'
    /// rows brought up to date.
    #[cfg(test)]
    pub(super) fn open_with_index_lag(
        path: impl AsRef<Path>,
        lag: u64,
        group: usize,
    ) -> Result<Self> {
        Self::open_tuned(
            path,
            Tuning {
                index_lag: lag,
                index_group: group,
                refresh_lag: lag,
            },
        )
    }

    fn open_tuned(path: impl AsRef<Path>, tuning: Tuning) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::backend("creating the data directory", e))?;
        }
        let lock = lock_file(&path)?;
        let writer = Connection::open(&path).map_err(sql("opening the database"))?;
        writer
            .execute_batch(PRAGMAS)
            .map_err(sql("configuring the database"))?;
        schema::migrate(&writer)?;
        // A real write at start-up: a read-only file or a full disk fails
        // here, with a clear error, instead of on the first transition.
        writer
            .execute(
                "INSERT INTO meta (key, value) VALUES ('opened_at', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [to_micros(SystemTime::now())],
            )
            .map_err(sql("writing to the database"))?;
        Ok(SqliteStore {
            path,
            _lock: lock,
            writer: Mutex::new(Writer {
                conn: writer,
                cache: WriterCache::default(),
                attempt: None,
            }),
            readers: Pool::new(MAX_READERS, READER_WAIT),
            oldest: AtomicU64::new(1),
            tuning: Tuning {
                index_lag: tuning.index_lag.max(1),
                index_group: tuning.index_group.max(1),
                refresh_lag: tuning.refresh_lag.max(1),
            },
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let (conn, _) = self.readers.acquire(|_| true, || open_reader(&self.path))?;
        let result = f(&conn);
        self.readers.release(conn, true);
        result
    }

    fn refresh_oldest(&self, conn: &Connection, head: u64) -> Result<()> {
        let min: Option<i64> = conn
            .query_row("SELECT min(sequence) FROM events", [], |r| r.get(0))
            .map_err(sql("reading the oldest event"))?;
        let oldest = min.map_or(head + 1, |s| s as u64);
        self.oldest.store(oldest, Ordering::Release);
        Ok(())
    }
}

/// A read-only connection to the file at `path`.
fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql("opening a reader"))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(sql("configuring a reader"))?;
    Ok(conn)
}

/// Takes the exclusive lock on `<path>.lock`: one server per file, since a
/// second one would work from a stale table and conflict on every write.
/// The OS releases the lock when the process exits, however it exits.
fn lock_file(path: &Path) -> Result<std::fs::File> {
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::backend("opening the lock file", e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(path.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::backend("locking the database", e)),
    }
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Recovered> {
        let mut writer = self.lock_writer();
        let Writer { conn, cache, .. } = &mut *writer;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("loading agents"))?;
        let head = read_head(&tx)?;
        let synced = read_meta(&tx, "synced")?;
        if synced < head {
            refresh_agent_rows(&tx, synced, head)?;
        }
        tx.commit().map_err(sql("loading agents"))?;
        cache.synced = Some(head);
        let mut stmt = conn.prepare(SELECT_AGENTS).map_err(sql("loading agents"))?;
        let agents = stmt
            .query_map([], agent_from_row)
            .map_err(sql("loading agents"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sql("loading agents"))?;
        drop(stmt);
        cache.versions = agents.iter().map(|a| (a.id, a.version)).collect();
        self.refresh_oldest(conn, head)?;
        Ok(Recovered { agents, head })
    }

    fn commit(
        &self,
        id: BatchId,
        batch: &mut [AgentChange],
        clock: &dyn Clock,
    ) -> Result<Vec<ChangeOutcome>> {
        commit::commit(&mut self.lock_writer(), &self.tuning, id, batch, clock)
    }

    fn batch_committed(&self, id: BatchId) -> Result<bool> {
        commit::batch_committed(&self.lock_writer(), id)
    }

    fn settle(&self) -> Result<()> {
        commit::settle(&mut self.lock_writer())
    }

    fn head(&self) -> Result<u64> {
        self.with_reader(read_head)
    }

    fn identities(&self, ids: &[AgentId]) -> Result<Vec<(AgentId, AgentIdentity)>> {
        self.with_reader(|conn| read::identities(conn, ids))
    }

    fn cursor(&self, name: &str) -> Result<u64> {
        check_cursor_name(name)?;
        self.with_reader(|conn| cursors::cursor(conn, name))
    }

    fn advance_cursor(&self, name: &str, sequence: u64) -> Result<()> {
        let sequence = stored_cursor(name, sequence)?;
        cursors::advance(&self.lock_writer().conn, name, sequence)
    }

    fn events_after(&self, after: u64, max: usize) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|conn| read::events_after(conn, after, max))
    }

    fn oldest_sequence(&self) -> Result<u64> {
        Ok(self.oldest.load(Ordering::Acquire))
    }

    fn history(
        &self,
        agent_id: AgentId,
        range: HistoryRange,
    ) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|conn| read::history(conn, agent_id, range))
    }

    fn nth_newest(&self, agent_id: AgentId, upto: u64, n: u64) -> Result<Option<u64>> {
        if n == 0 {
            return Ok(None);
        }
        self.with_reader(|conn| read::nth_newest(conn, agent_id, upto, n))
    }

    fn requests_since(&self, since: SystemTime) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|conn| read::requests_since(conn, since))
    }

    fn size_bytes(&self) -> Result<Option<u64>> {
        let mut total = 0;
        for suffix in ["", "-wal"] {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            if let Ok(meta) = std::fs::metadata(&path) {
                total += meta.len();
            }
        }
        Ok(Some(total))
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|conn| read::audit(conn, query))
    }

    fn history_count(&self, agent_id: AgentId) -> Result<u64> {
        self.with_reader(|conn| read::history_count(conn, agent_id))
    }

    fn compact(
        &self,
        retention: &Retention,
        head: u64,
        max_rows: usize,
        clock: &dyn Clock,
    ) -> Result<usize> {
        if max_rows == 0 {
            return Ok(0);
        }
        let Some(bounds) = retention.bounds(head, clock) else {
            return Ok(0);
        };
        let mut writer = self.lock_writer();
        let deleted = compact::compact(&mut writer, &bounds, max_rows)?;
        if deleted > 0 {
            self.refresh_oldest(&writer.conn, head)?;
        }
        Ok(deleted)
    }

    fn close(&self) -> Result<()> {
        self.readers.close();
        self.lock_writer()
            .conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(sql("checkpointing"))
    }
}
