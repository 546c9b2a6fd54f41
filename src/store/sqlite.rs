//! The embedded durable store: one SQLite file in WAL mode with
//! `synchronous = FULL`, so a committed batch is fsync'd before `commit`
//! returns. The `events` table is the global event log (its primary key is
//! the sequence) and every agent's history; the `agents` table holds each
//! agent's identity and its state as of `meta.synced`, including its last
//! transition up to there, so that start-up reads one row per agent and
//! compaction never loses an agent's state. A commit appends its events and
//! writes no agent row unless it creates one; every [`SYNC_LAG`] events, a
//! commit brings the rows up to date from the log's tail in one statement
//! (see [`SCHEMA_V5`]).
//!
//! The `meta` table holds the sequence counter (`head`), advanced inside each
//! commit's transaction, and the id of the last committed batch
//! (`last_batch`), which tells a writer whether a commit that reported an
//! error reached the file after all.
//!
//! One writer connection (the service's commit thread, behind a mutex) and
//! a small pool of reader connections, which WAL lets run beside the writer.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params};

use super::{
    AgentChange, AgentIdentity, AuditQuery, BatchId, ChangeOutcome, HistoryRange, Recovered,
    Result, Retention, Store, StoreError,
    codec::{decode_request, encode_map, encode_request, from_micros, to_micros},
};
use crate::domain::{
    Agent, AgentId, AgentState, Clock, Labels, Metadata, TransitionRecord,
    clock::to_stored_precision,
};

/// The writer connection's settings: WAL, an fsync before each commit
/// returns, a 64 MiB page cache. The benchmarks' bare SQLite baselines
/// open their files with the same.
pub const PRAGMAS: &str = "PRAGMA journal_mode = WAL;
     PRAGMA synchronous = FULL;
     PRAGMA busy_timeout = 5000;
     PRAGMA cache_size = -65536;";

/// Schema version written to `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 6;

/// Reader connections kept open for reuse; more may be opened under load and
/// are closed after use.
const MAX_IDLE_READERS: usize = 8;

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS agents (
    agent_id          BLOB PRIMARY KEY,
    name              TEXT NOT NULL,
    labels            TEXT NOT NULL,
    state             TEXT NOT NULL,
    version           INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    last_sequence     INTEGER NOT NULL,
    last_from         TEXT,
    last_reason       TEXT NOT NULL,
    last_triggered_by TEXT NOT NULL,
    last_metadata     TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    sequence     INTEGER PRIMARY KEY,
    agent_id     BLOB NOT NULL,
    version      INTEGER NOT NULL,
    from_state   TEXT,
    to_state     TEXT NOT NULL,
    at           INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    triggered_by TEXT NOT NULL,
    metadata     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_agent ON events (agent_id, sequence);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// Version 2: the sequence counter and the last batch id, kept in `meta` and
/// advanced by every commit (before, the head was derived from the agents).
pub(super) const SCHEMA_V2: &str = "
INSERT INTO meta (key, value)
    SELECT 'head', coalesce(max(last_sequence), 0) FROM agents WHERE true
    ON CONFLICT (key) DO NOTHING;
INSERT INTO meta (key, value) VALUES ('last_batch', 0) ON CONFLICT (key) DO NOTHING;
";

/// Version 3: the authenticated principal of every record (empty for the
/// records written before, and without authentication), with an index to
/// find what a principal did; and the request tag of records made for a
/// client `request_id`, with an index to find the recent ones at start-up.
const SCHEMA_V3: &str = "
ALTER TABLE agents ADD COLUMN last_principal TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN last_request TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN principal TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN request TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS events_by_principal ON events (principal, sequence);
CREATE INDEX IF NOT EXISTS events_with_request ON events (at) WHERE request <> '';
";

/// Version 4: an agent's events are found through `agent_events` instead of
/// an index on `events`. An index on (agent, sequence) takes a write at a
/// different place for every agent a commit touches (a page of the WAL
/// each, and its writeback at the fsync); `agent_events` is instead filled
/// in bulk, by the commit that brings the unindexed tail of the log to
/// [`INDEX_LAG`] events, so that one page takes every entry an agent
/// gathered meanwhile. `meta.indexed` is the sequence up to which
/// `agent_events` holds every retained event; readers take the events after
/// it from the log itself (at most `INDEX_LAG` plus a batch, in sequence
/// order), in the same statement, so they read one snapshot of both.
const SCHEMA_V4: &str = "
CREATE TABLE IF NOT EXISTS agent_events (
    agent_id BLOB NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (agent_id, sequence)
) WITHOUT ROWID;
INSERT INTO agent_events (agent_id, sequence) SELECT agent_id, sequence FROM events WHERE true
    ON CONFLICT DO NOTHING;
DROP INDEX IF EXISTS events_by_agent;
INSERT INTO meta (key, value) SELECT 'indexed', value FROM meta WHERE key = 'head'
    ON CONFLICT (key) DO NOTHING;
";

/// How far `meta.indexed` stays behind the head: a commit indexes every
/// event older than this many events that is not indexed yet (see
/// [`SCHEMA_V6`]).
pub(super) const INDEX_LAG: u64 = 4096;

/// Unindexed events of one agent (or one principal) that a commit indexes
/// together, in one place of the index (see [`SCHEMA_V6`]).
pub(super) const INDEX_GROUP: usize = 64;

/// Version 5: a transition no longer updates its agent's row. Updating it
/// cost a seek and a rewrite of the row, and a page of the WAL, for every
/// agent a commit touches; the same facts are in the agent's newest event.
/// `meta.synced` is the sequence up to which the rows hold every event;
/// the commit that brings the tail after it to [`SYNC_LAG`] events, every
/// compaction before it deletes events, and start-up bring the rows up to
/// date with [`SYNC_AGENTS`]. The writer keeps each agent's version in
/// memory, so that a commit still refuses a change whose prior version is
/// not the stored one.
///
/// A principal's events are found through `principal_events`, filled in
/// bulk together with `agent_events` and complete up to the same
/// `meta.indexed`, instead of the index `events_by_principal`, which took
/// a write for every event.
const SCHEMA_V5: &str = "
INSERT INTO meta (key, value) SELECT 'synced', value FROM meta WHERE key = 'head'
    ON CONFLICT (key) DO NOTHING;
CREATE TABLE IF NOT EXISTS principal_events (
    principal TEXT NOT NULL,
    sequence  INTEGER NOT NULL,
    PRIMARY KEY (principal, sequence)
) WITHOUT ROWID;
INSERT INTO principal_events (principal, sequence)
    SELECT principal, sequence FROM events
    WHERE sequence <= (SELECT value FROM meta WHERE key = 'indexed')
    ON CONFLICT DO NOTHING;
DROP INDEX IF EXISTS events_by_principal;
";

/// Version 6: the index tables are no longer filled in bulk by the one
/// commit that brought the unindexed tail to [`INDEX_LAG`] events. That
/// commit wrote a page of the index (and often its neighbours, to make
/// room) for every agent in the tail, a few hundred pages in one
/// transaction, and held every proposal behind it for milliseconds. Now
/// the writer keeps each agent's and each principal's unindexed events in
/// memory, and a commit indexes an agent's (or a principal's) as soon as
/// they make a group of [`INDEX_GROUP`], which takes the same one place of
/// the index, and every event that falls [`INDEX_LAG`] behind the head.
/// `meta.indexed` still means that every event up to it is indexed, but
/// some events after it are too: readers take the log's tail after it
/// without the events the index already holds. No table changes: a file of
/// version 5 (nothing indexed after `meta.indexed`) is a valid one of
/// version 6, but a reader of version 5 would count the grouped events
/// twice, hence the new version.
const SCHEMA_V6: &str = "";

/// Events after `meta.synced` after which a commit brings the agents' rows
/// up to date (see [`SCHEMA_V5`]).
const SYNC_LAG: u64 = 1024;

/// Brings every agent's row up to its newest event after `?1`: the newest
/// sequence of each agent (a sort of sequences and agent ids only), then
/// that event by its primary key.
const SYNC_AGENTS: &str = "UPDATE agents SET state = l.to_state, version = l.version,
    updated_at = l.at, last_sequence = l.sequence, last_from = l.from_state,
    last_reason = l.reason, last_triggered_by = l.triggered_by, last_metadata = l.metadata,
    last_principal = l.principal, last_request = l.request
    FROM (SELECT e.sequence, e.agent_id, e.version, e.from_state, e.to_state, e.at, e.reason,
        e.triggered_by, e.metadata, e.principal, e.request
        FROM (SELECT max(sequence) AS last FROM events WHERE sequence > ?1 GROUP BY agent_id) AS m
        JOIN events e ON e.sequence = m.last) AS l
    WHERE agents.agent_id = l.agent_id AND agents.version < l.version";

const INSERT_AGENT: &str =
    "INSERT INTO agents (agent_id, name, labels, state, version, created_at, updated_at,
    last_sequence, last_from, last_reason, last_triggered_by, last_metadata, last_principal,
    last_request)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
    ON CONFLICT (agent_id) DO NOTHING";
const INSERT_EVENT: &str =
    "INSERT INTO events (sequence, agent_id, version, from_state, to_state, at, reason,
    triggered_by, metadata, principal, request)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";
const SELECT_AGENTS: &str = "SELECT agent_id, name, labels, state, version, created_at, updated_at,
    last_sequence, last_from, last_reason, last_triggered_by, last_metadata, last_principal,
    last_request FROM agents";
const EVENT_COLUMNS: &str =
    "sequence, agent_id, version, from_state, to_state, at, reason, triggered_by, metadata,
    principal, request";
/// [`EVENT_COLUMNS`] of `events e` joined to `agent_events a` (or
/// `principal_events a`): the sequence is the index's, so the rows come in
/// its order without a sort.
const INDEXED_EVENT_COLUMNS: &str = "a.sequence, e.agent_id, e.version, e.from_state, e.to_state,
    e.at, e.reason, e.triggered_by, e.metadata, e.principal, e.request";
/// The sequence up to which `agent_events` and `principal_events` are complete.
const INDEXED: &str = "(SELECT value FROM meta WHERE key = 'indexed')";
/// Of the log's tail after [`INDEXED`] (`events`), the events that
/// `agent_events` does not hold yet (see [`SCHEMA_V6`]).
const NOT_IN_AGENT_EVENTS: &str = "NOT EXISTS (SELECT 1 FROM agent_events x
    WHERE x.agent_id = events.agent_id AND x.sequence = events.sequence)";
/// The same for `principal_events`.
const NOT_IN_PRINCIPAL_EVENTS: &str = "NOT EXISTS (SELECT 1 FROM principal_events x
    WHERE x.principal = events.principal AND x.sequence = events.sequence)";

/// The SQLite back end.
pub struct SqliteStore {
    path: PathBuf,
    /// Exclusive lock on `<path>.lock`, held while the store is open.
    _lock: std::fs::File,
    /// The only connection that writes; used by the commit thread and by
    /// compaction, which runs on the same thread between batches.
    writer: Mutex<Connection>,
    /// Idle reader connections.
    readers: Mutex<Vec<Connection>>,
    /// Oldest retained sequence, kept by the one writer (load and
    /// compaction change it; commits never do).
    oldest: AtomicU64,
    /// The committed head (`meta.head`), cached by the one writer so a
    /// commit need not read it; [`UNKNOWN_HEAD`] until read, and again after
    /// a failed commit.
    head: AtomicU64,
    /// `meta.indexed`, cached the same way.
    indexed: AtomicU64,
    /// How far `meta.indexed` stays behind the head ([`INDEX_LAG`]).
    index_lag: u64,
    /// Events of one agent or principal indexed together ([`INDEX_GROUP`]).
    index_group: usize,
    /// The unindexed events after `meta.indexed`, kept by the one writer;
    /// emptied (and so not `complete`) by a failed commit, after which the
    /// next commit indexes the whole tail.
    unindexed: Mutex<Unindexed>,
    /// `meta.synced`, cached the same way.
    synced: AtomicU64,
    /// Events after `meta.synced` after which a commit syncs the agents.
    sync_lag: u64,
    /// The stored version of each agent a commit looked at, kept by the one
    /// writer; emptied by a failed commit, after which versions are read
    /// from the file again.
    versions: Mutex<HashMap<AgentId, u64>>,
}

/// The events after `meta.indexed` that are not in the index tables yet,
/// grouped as a commit indexes them (see [`SCHEMA_V6`]).
#[derive(Debug, Default)]
struct Unindexed {
    /// Whether these are all of them. False until the first commit of the
    /// writer, after a failed commit, and after a compaction that deleted
    /// events after `meta.indexed`: that commit indexes the whole tail.
    complete: bool,
    agents: Groups<AgentId>,
    principals: Groups<String>,
}

/// Unindexed sequences per key (an agent, a principal), oldest first.
#[derive(Debug)]
struct Groups<K> {
    open: HashMap<K, Vec<u64>>,
    /// Every sequence in `open` (and some already indexed), in order, to
    /// find the keys whose oldest falls behind `meta.indexed`.
    order: std::collections::VecDeque<(u64, K)>,
}

impl<K> Default for Groups<K> {
    fn default() -> Self {
        Groups {
            open: HashMap::new(),
            order: std::collections::VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Groups<K> {
    /// Adds `sequence` to `key`'s group; returns the group once it holds
    /// `size` sequences, to be indexed.
    fn add(&mut self, key: &K, sequence: u64, size: usize) -> Option<(K, Vec<u64>)> {
        self.order.push_back((sequence, key.clone()));
        let group = match self.open.get_mut(key) {
            Some(group) => group,
            None => self.open.entry(key.clone()).or_default(),
        };
        group.push(sequence);
        if group.len() >= size {
            self.open.remove_entry(key)
        } else {
            None
        }
    }

    /// Takes the groups holding a sequence up to `upto`, to be indexed.
    fn due(&mut self, upto: u64) -> Vec<(K, Vec<u64>)> {
        let mut due = Vec::new();
        while self
            .order
            .front()
            .is_some_and(|(sequence, _)| *sequence <= upto)
        {
            let Some((sequence, key)) = self.order.pop_front() else {
                break;
            };
            let oldest = self.open.get(&key).and_then(|group| group.first());
            if oldest.is_some_and(|&oldest| oldest <= sequence)
                && let Some(group) = self.open.remove_entry(&key)
            {
                due.push(group);
            }
        }
        due
    }
}

/// `SqliteStore::head` before it is read from the file.
const UNKNOWN_HEAD: u64 = u64::MAX;

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |err| StoreError::backend(context, err)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and its directory,
    /// and checks that it can be written.
    ///
    /// # Errors
    /// The directory cannot be created, the file cannot be opened or written
    /// (read-only, disk full), or it holds a newer schema.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_lags(path, INDEX_LAG, INDEX_GROUP, SYNC_LAG)
    }

    /// [`SqliteStore::open`] with another [`INDEX_LAG`] and [`SYNC_LAG`],
    /// both `lag` (`>= 1`), and another [`INDEX_GROUP`], for tests of the
    /// reads that combine the index and the log's tail, and of the agents'
    /// rows brought up to date.
    #[cfg(test)]
    pub(super) fn open_with_index_lag(
        path: impl AsRef<Path>,
        lag: u64,
        group: usize,
    ) -> Result<Self> {
        Self::open_with_lags(path, lag, group, lag)
    }

    fn open_with_lags(
        path: impl AsRef<Path>,
        index_lag: u64,
        index_group: usize,
        sync_lag: u64,
    ) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::backend("creating the data directory", e))?;
        }
        // One server per file: a second one would work from a stale table
        // and conflict on every write. The OS releases the lock when the
        // process exits, however it exits.
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::backend("opening the lock file", e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(path)),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::backend("locking the database", e));
            }
        }
        let writer = Connection::open(&path).map_err(sql("opening the database"))?;
        writer
            .execute_batch(PRAGMAS)
            .map_err(sql("configuring the database"))?;
        migrate(&writer)?;
        // A real write at start-up: a read-only file or a full disk fails
        // here, with a clear error, instead of on the first transition.
        writer
            .execute(
                "INSERT INTO meta (key, value) VALUES ('opened_at', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [to_micros(SystemTime::now())],
            )
            .map_err(sql("writing to the database"))?;
        let store = SqliteStore {
            path,
            _lock: lock,
            writer: Mutex::new(writer),
            readers: Mutex::new(Vec::new()),
            oldest: AtomicU64::new(1),
            head: AtomicU64::new(UNKNOWN_HEAD),
            indexed: AtomicU64::new(UNKNOWN_HEAD),
            index_lag: index_lag.max(1),
            index_group: index_group.max(1),
            unindexed: Mutex::new(Unindexed::default()),
            sync_lag: sync_lag.max(1),
            synced: AtomicU64::new(UNKNOWN_HEAD),
            versions: Mutex::new(HashMap::new()),
        };
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_reader<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let idle = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(sql("opening a reader"))?;
                conn.busy_timeout(Duration::from_secs(5))
                    .map_err(sql("configuring a reader"))?;
                conn
            }
        };
        let result = f(&conn);
        let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
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

fn migrate(conn: &Connection) -> Result<()> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("reading the schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    let steps = [
        (SCHEMA_V1, "creating the schema"),
        (SCHEMA_V2, "migrating the schema to version 2"),
        (SCHEMA_V3, "migrating the schema to version 3"),
        (SCHEMA_V4, "migrating the schema to version 4"),
        (SCHEMA_V5, "migrating the schema to version 5"),
        (SCHEMA_V6, "migrating the schema to version 6"),
    ];
    for (version, (schema, context)) in (1..).zip(steps) {
        if found < version {
            conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; {schema} PRAGMA user_version = {version}; COMMIT;"
            ))
            .map_err(sql(context))?;
        }
    }
    // Later schema versions add their step to `steps`: each runs in its
    // own transaction that ends by setting user_version.
    Ok(())
}

fn decode_metadata(text: &str) -> rusqlite::Result<Metadata> {
    if text.is_empty() {
        return Ok(Metadata::new());
    }
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn decode_labels(text: &str) -> rusqlite::Result<Labels> {
    if text.is_empty() {
        return Ok(Labels::new());
    }
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn decode_state(text: &str) -> rusqlite::Result<AgentState> {
    AgentState::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn decode_request_column(
    row: &Row<'_>,
    index: usize,
) -> rusqlite::Result<Option<Arc<crate::domain::RequestTag>>> {
    decode_request(&row.get::<_, String>(index)?).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            Box::new(std::io::Error::other(e)),
        )
    })
}

fn decode_id(row: &Row<'_>, index: usize) -> rusqlite::Result<AgentId> {
    let bytes: [u8; 16] = row.get(index)?;
    Ok(AgentId::from_bytes(bytes))
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<Arc<TransitionRecord>> {
    let from: Option<String> = row.get(3)?;
    Ok(Arc::new(TransitionRecord {
        sequence: row.get::<_, i64>(0)? as u64,
        agent_id: decode_id(row, 1)?,
        version: row.get::<_, i64>(2)? as u64,
        from: from.as_deref().map(decode_state).transpose()?,
        to: decode_state(&row.get::<_, String>(4)?)?,
        at: from_micros(row.get(5)?),
        reason: row.get(6)?,
        triggered_by: row.get(7)?,
        metadata: decode_metadata(&row.get::<_, String>(8)?)?,
        principal: row.get(9)?,
        request: decode_request_column(row, 10)?,
    }))
}

fn agent_from_row(row: &Row<'_>) -> rusqlite::Result<Agent> {
    let id = decode_id(row, 0)?;
    let state = decode_state(&row.get::<_, String>(3)?)?;
    let version = row.get::<_, i64>(4)? as u64;
    let updated_at = from_micros(row.get(6)?);
    let last_from: Option<String> = row.get(8)?;
    let last = TransitionRecord {
        agent_id: id,
        from: last_from.as_deref().map(decode_state).transpose()?,
        to: state,
        at: updated_at,
        reason: row.get(9)?,
        triggered_by: row.get(10)?,
        metadata: decode_metadata(&row.get::<_, String>(11)?)?,
        principal: row.get(12)?,
        request: decode_request_column(row, 13)?,
        sequence: row.get::<_, i64>(7)? as u64,
        version,
    };
    Ok(Agent {
        id,
        name: Arc::from(row.get::<_, String>(1)?),
        labels: Arc::new(decode_labels(&row.get::<_, String>(2)?)?),
        state,
        version,
        created_at: from_micros(row.get(5)?),
        updated_at,
        last_transition: Arc::new(last),
    })
}

/// Writes one change whose records carry their final sequences and time.
/// Returns the conflict instead when the stored version (`versions`, or
/// the file's for an agent not in it) is not the change's prior version;
/// then nothing of the change was written. A written change's version goes
/// into `versions`.
fn write_change(
    tx: &rusqlite::Transaction<'_>,
    versions: &mut HashMap<AgentId, u64>,
    synced: u64,
    change: &AgentChange,
) -> Result<ChangeOutcome> {
    let (Some(first), Some(last)) = (change.records.first(), change.records.last()) else {
        return Ok(ChangeOutcome::Committed);
    };
    match (&change.identity, change.prior_version) {
        (Some(identity), 0) => {
            let labels = encode_map(&*identity.labels, identity.labels.is_empty());
            let inserted = tx
                .prepare_cached(INSERT_AGENT)
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        change.agent_id.as_bytes(),
                        &*identity.name,
                        labels,
                        last.to.as_str(),
                        last.version as i64,
                        to_micros(first.at),
                        to_micros(last.at),
                        last.sequence as i64,
                        last.from.map(AgentState::as_str),
                        last.reason,
                        last.triggered_by,
                        encode_map(&last.metadata, last.metadata.is_empty()),
                        last.principal,
                        encode_request(last.request.as_deref()),
                    ])
                })
                .map_err(sql("inserting an agent"))?;
            if inserted == 0 {
                let actual = stored_version(tx, change.agent_id, synced)?.unwrap_or(0);
                return Ok(ChangeOutcome::Conflict { actual });
            }
        }
        _ => {
            let stored = match versions.get(&change.agent_id) {
                Some(&version) => Some(version),
                None => stored_version(tx, change.agent_id, synced)?,
            };
            if stored != Some(change.prior_version) {
                return Ok(ChangeOutcome::Conflict {
                    actual: stored.unwrap_or(0),
                });
            }
        }
    }
    let mut insert = tx
        .prepare_cached(INSERT_EVENT)
        .map_err(sql("inserting an event"))?;
    for record in &change.records {
        insert
            .execute(params![
                record.sequence as i64,
                record.agent_id.as_bytes(),
                record.version as i64,
                record.from.map(AgentState::as_str),
                record.to.as_str(),
                to_micros(record.at),
                record.reason,
                record.triggered_by,
                encode_map(&record.metadata, record.metadata.is_empty()),
                record.principal,
                encode_request(record.request.as_deref()),
            ])
            .map_err(sql("inserting an event"))?;
    }
    versions.insert(change.agent_id, last.version);
    Ok(ChangeOutcome::Committed)
}

/// Brings the agents' rows up to date with the events after `synced` and
/// records `head` as `meta.synced`, inside `tx`.
fn sync_agents(tx: &rusqlite::Transaction<'_>, synced: u64, head: u64) -> Result<()> {
    tx.prepare_cached(SYNC_AGENTS)
        .and_then(|mut stmt| stmt.execute([synced as i64]))
        .and_then(|_| {
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'synced'")
                .and_then(|mut stmt| stmt.execute([head as i64]))
        })
        .map_err(sql("bringing agents up to date"))?;
    Ok(())
}

/// Indexes one agent's group of events, inside `tx`.
fn index_agent(
    tx: &rusqlite::Transaction<'_>,
    (id, sequences): &(AgentId, Vec<u64>),
) -> Result<()> {
    index_group(
        tx,
        "agent_events (agent_id",
        &id.as_bytes().as_slice(),
        sequences,
    )
}

/// Indexes one principal's group of events, inside `tx`.
fn index_principal(
    tx: &rusqlite::Transaction<'_>,
    (principal, sequences): &(String, Vec<u64>),
) -> Result<()> {
    index_group(tx, "principal_events (principal", principal, sequences)
}

/// Inserts (`key`, sequence) into `table_and_key` (the table and its key
/// column) for every sequence of a group, in one statement: the sequences
/// travel as one JSON array, read back by `json_each`, instead of one
/// statement execution (bind, step, reset) per row.
fn index_group(
    tx: &rusqlite::Transaction<'_>,
    table_and_key: &str,
    key: &dyn rusqlite::ToSql,
    sequences: &[u64],
) -> Result<()> {
    // Integers always serialize; were it ever to fail, the empty text is
    // malformed JSON and the statement fails with it.
    let array = serde_json::to_string(sequences).unwrap_or_default();
    tx.prepare_cached(&format!(
        "INSERT INTO {table_and_key}, sequence) SELECT ?1, value FROM json_each(?2) WHERE true
         ON CONFLICT DO NOTHING"
    ))
    .and_then(|mut stmt| stmt.execute(params![key, array]))
    .map_err(sql("indexing events"))?;
    Ok(())
}

/// Indexes every event after `indexed` that the index does not hold yet,
/// inside `tx`: what a writer does first, since it does not know which of
/// them earlier writers grouped.
fn index_tail(tx: &rusqlite::Transaction<'_>, indexed: u64) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO agent_events (agent_id, sequence)
         SELECT agent_id, sequence FROM events WHERE sequence > ?1
         ON CONFLICT DO NOTHING",
    )
    .and_then(|mut stmt| stmt.execute([indexed as i64]))
    .and_then(|_| {
        tx.prepare_cached(
            "INSERT INTO principal_events (principal, sequence)
             SELECT principal, sequence FROM events WHERE sequence > ?1
             ON CONFLICT DO NOTHING",
        )
        .and_then(|mut stmt| stmt.execute([indexed as i64]))
    })
    .map_err(sql("indexing the log's tail"))?;
    Ok(())
}

/// A value of the `meta` table.
fn read_meta(conn: &Connection, key: &str) -> Result<u64> {
    let value: Option<i64> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")
        .and_then(|mut stmt| stmt.query_row([key], |r| r.get(0)).optional())
        .map_err(sql("reading the meta table"))?;
    Ok(value.map_or(0, |v| v as u64))
}

/// The stored version of agent `id`, `None` when there is no such agent:
/// its row's, or that of its newest event after `synced`.
fn stored_version(conn: &Connection, id: AgentId, synced: u64) -> Result<Option<u64>> {
    let version: Option<i64> = conn
        .prepare_cached(
            "SELECT max(version) FROM (
                 SELECT version FROM agents WHERE agent_id = ?1
                 UNION ALL
                 SELECT version FROM events WHERE sequence > ?2 AND agent_id = ?1)",
        )
        .and_then(|mut stmt| stmt.query_row(params![id.as_bytes(), synced as i64], |r| r.get(0)))
        .map_err(sql("reading an agent's version"))?;
    Ok(version.map(|v| v as u64))
}

impl Store for SqliteStore {
    fn load(&self) -> Result<Recovered> {
        let mut conn = self.lock_writer();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("loading agents"))?;
        let head = read_meta(&tx, "head")?;
        let synced = read_meta(&tx, "synced")?;
        if synced < head {
            sync_agents(&tx, synced, head)?;
        }
        tx.commit().map_err(sql("loading agents"))?;
        self.synced.store(head, Ordering::Release);
        let mut stmt = conn.prepare(SELECT_AGENTS).map_err(sql("loading agents"))?;
        let agents = stmt
            .query_map([], agent_from_row)
            .map_err(sql("loading agents"))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(sql("loading agents"))?;
        *self.versions.lock().unwrap_or_else(|p| p.into_inner()) =
            agents.iter().map(|a| (a.id, a.version)).collect();
        self.refresh_oldest(&conn, head)?;
        Ok(Recovered { agents, head })
    }

    fn commit(
        &self,
        id: BatchId,
        batch: &mut [AgentChange],
        clock: &dyn Clock,
    ) -> Result<Vec<ChangeOutcome>> {
        let mut conn = self.lock_writer();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("beginning a commit"))?;
        // The writer holds the file's lock, so nobody else moves the head.
        let cached = self.head.swap(UNKNOWN_HEAD, Ordering::AcqRel);
        let mut head = if cached == UNKNOWN_HEAD {
            read_meta(&tx, "head")?
        } else {
            cached
        };
        let cached = self.indexed.swap(UNKNOWN_HEAD, Ordering::AcqRel);
        let mut indexed = if cached == UNKNOWN_HEAD {
            read_meta(&tx, "indexed")?
        } else {
            cached
        };
        let cached = self.synced.swap(UNKNOWN_HEAD, Ordering::AcqRel);
        let mut synced = if cached == UNKNOWN_HEAD {
            read_meta(&tx, "synced")?
        } else {
            cached
        };
        // Taken out while the commit runs: an error leaves them empty.
        let mut versions =
            std::mem::take(&mut *self.versions.lock().unwrap_or_else(|p| p.into_inner()));
        let mut unindexed =
            std::mem::take(&mut *self.unindexed.lock().unwrap_or_else(|p| p.into_inner()));
        let at = to_stored_precision(clock.now());
        let mut outcomes = Vec::with_capacity(batch.len());
        for change in batch.iter_mut() {
            for (offset, record) in change.records.iter_mut().enumerate() {
                let record = Arc::make_mut(record);
                record.sequence = head + 1 + offset as u64;
                record.at = at;
            }
            let outcome = write_change(&tx, &mut versions, synced, change)?;
            if outcome == ChangeOutcome::Committed {
                head += change.records.len() as u64;
            }
            outcomes.push(outcome);
        }
        tx.prepare_cached(
            "UPDATE meta SET value = CASE key WHEN 'head' THEN ?1 ELSE ?2 END
             WHERE key IN ('head', 'last_batch')",
        )
        .and_then(|mut stmt| stmt.execute(params![head as i64, id.0 as i64]))
        .map_err(sql("advancing the head"))?;
        let advanced = if unindexed.complete {
            let committed = batch
                .iter()
                .zip(&outcomes)
                .filter(|(_, outcome)| **outcome == ChangeOutcome::Committed)
                .flat_map(|(change, _)| &change.records);
            for record in committed {
                let group = self.index_group;
                if let Some(full) = unindexed
                    .agents
                    .add(&record.agent_id, record.sequence, group)
                {
                    index_agent(&tx, &full)?;
                }
                if let Some(full) =
                    unindexed
                        .principals
                        .add(&record.principal, record.sequence, group)
                {
                    index_principal(&tx, &full)?;
                }
            }
            let upto = head.saturating_sub(self.index_lag).max(indexed);
            for due in unindexed.agents.due(upto) {
                index_agent(&tx, &due)?;
            }
            for due in unindexed.principals.due(upto) {
                index_principal(&tx, &due)?;
            }
            upto
        } else {
            index_tail(&tx, indexed)?;
            unindexed = Unindexed {
                complete: true,
                ..Unindexed::default()
            };
            head
        };
        if advanced != indexed {
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'indexed'")
                .and_then(|mut stmt| stmt.execute([advanced as i64]))
                .map_err(sql("indexing agents' events"))?;
            indexed = advanced;
        }
        if head.saturating_sub(synced) >= self.sync_lag {
            sync_agents(&tx, synced, head)?;
            synced = head;
        }
        tx.commit().map_err(|e| StoreError::CommitOutcomeUnknown {
            source: Box::new(e),
        })?;
        self.head.store(head, Ordering::Release);
        self.indexed.store(indexed, Ordering::Release);
        self.synced.store(synced, Ordering::Release);
        *self.versions.lock().unwrap_or_else(|p| p.into_inner()) = versions;
        *self.unindexed.lock().unwrap_or_else(|p| p.into_inner()) = unindexed;
        Ok(outcomes)
    }

    fn batch_committed(&self, id: BatchId) -> Result<bool> {
        Ok(read_meta(&self.lock_writer(), "last_batch")? == id.0)
    }

    fn head(&self) -> Result<u64> {
        self.with_reader(|conn| read_meta(conn, "head"))
    }

    fn identities(&self, ids: &[AgentId]) -> Result<Vec<(AgentId, AgentIdentity)>> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT name, labels FROM agents WHERE agent_id = ?1")
                .map_err(sql("reading agents"))?;
            let mut found = Vec::new();
            for id in ids {
                let row = stmt
                    .query_row([id.as_bytes()], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                    })
                    .optional()
                    .map_err(sql("reading agents"))?;
                if let Some((name, labels)) = row {
                    let labels = decode_labels(&labels).map_err(sql("reading agents"))?;
                    found.push((
                        *id,
                        AgentIdentity {
                            name: Arc::from(name),
                            labels: Arc::new(labels),
                        },
                    ));
                }
            }
            Ok(found)
        })
    }

    fn events_after(&self, after: u64, max: usize) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE sequence > ?1 ORDER BY sequence LIMIT ?2"
                ))
                .map_err(sql("reading events"))?;
            stmt.query_map(params![after as i64, max as i64], record_from_row)
                .and_then(|rows| rows.collect())
                .map_err(sql("reading events"))
        })
    }

    fn oldest_sequence(&self) -> Result<u64> {
        Ok(self.oldest.load(Ordering::Acquire))
    }

    fn history(
        &self,
        agent_id: AgentId,
        range: HistoryRange,
    ) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {INDEXED_EVENT_COLUMNS} FROM agent_events a
                     JOIN events e ON e.sequence = a.sequence
                     WHERE a.agent_id = ?1 AND a.sequence > ?2 AND a.sequence <= ?3
                     UNION ALL
                     SELECT {EVENT_COLUMNS} FROM events
                     WHERE sequence > max(?2, {INDEXED}) AND sequence <= ?3 AND agent_id = ?1
                         AND {NOT_IN_AGENT_EVENTS}
                     ORDER BY 1 LIMIT ?4"
                ))
                .map_err(sql("reading history"))?;
            stmt.query_map(
                params![
                    agent_id.as_bytes(),
                    range.after as i64,
                    range.upto.min(i64::MAX as u64) as i64,
                    range.max as i64
                ],
                record_from_row,
            )
            .and_then(|rows| rows.collect())
            .map_err(sql("reading history"))
        })
    }

    fn nth_newest(&self, agent_id: AgentId, upto: u64, n: u64) -> Result<Option<u64>> {
        if n == 0 {
            return Ok(None);
        }
        self.with_reader(|conn| {
            conn.prepare_cached(&format!(
                "SELECT sequence FROM agent_events WHERE agent_id = ?1 AND sequence <= ?2
                 UNION ALL
                 SELECT sequence FROM events
                 WHERE sequence > {INDEXED} AND sequence <= ?2 AND agent_id = ?1
                     AND {NOT_IN_AGENT_EVENTS}
                 ORDER BY 1 DESC LIMIT 1 OFFSET ?3"
            ))
            .and_then(|mut stmt| {
                stmt.query_row(
                    params![
                        agent_id.as_bytes(),
                        upto.min(i64::MAX as u64) as i64,
                        (n - 1).min(i64::MAX as u64) as i64
                    ],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
            })
            .map(|s| s.map(|s| s as u64))
            .map_err(sql("reading history"))
        })
    }

    fn requests_since(&self, since: std::time::SystemTime) -> Result<Vec<Arc<TransitionRecord>>> {
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE request <> '' AND at >= ?1
                     ORDER BY sequence"
                ))
                .map_err(sql("reading recent requests"))?;
            stmt.query_map([to_micros(since)], record_from_row)
                .and_then(|rows| rows.collect())
                .map_err(sql("reading recent requests"))
        })
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
        let mut conditions = vec!["sequence < ?1"];
        let mut values: Vec<rusqlite::types::Value> =
            vec![(query.before.min(i64::MAX as u64) as i64).into()];
        if let Some(id) = query.agent_id {
            conditions.push("agent_id = ?2");
            values.push(id.as_bytes().to_vec().into());
        }
        if let Some(principal) = &query.principal {
            conditions.push(if query.agent_id.is_some() {
                "principal = ?3"
            } else {
                "principal = ?2"
            });
            values.push(principal.clone().into());
        }
        values.push((query.max.min(i64::MAX as usize) as i64).into());
        let sql_text = if query.agent_id.is_some() {
            // The agent's indexed events, then the log's unindexed tail.
            let by_principal = if query.principal.is_some() {
                " AND e.principal = ?3"
            } else {
                ""
            };
            format!(
                "SELECT {INDEXED_EVENT_COLUMNS} FROM agent_events a
                 JOIN events e ON e.sequence = a.sequence
                 WHERE a.agent_id = ?2 AND a.sequence < ?1{by_principal}
                 UNION ALL
                 SELECT {EVENT_COLUMNS} FROM events WHERE sequence > {INDEXED} AND {}
                     AND {NOT_IN_AGENT_EVENTS}
                 ORDER BY 1 DESC LIMIT ?{}",
                conditions.join(" AND "),
                values.len()
            )
        } else if query.principal.is_some() {
            // The principal's indexed events, then the log's unindexed tail.
            format!(
                "SELECT {INDEXED_EVENT_COLUMNS} FROM principal_events a
                 JOIN events e ON e.sequence = a.sequence
                 WHERE a.principal = ?2 AND a.sequence < ?1
                 UNION ALL
                 SELECT {EVENT_COLUMNS} FROM events WHERE sequence > {INDEXED} AND {}
                     AND {NOT_IN_PRINCIPAL_EVENTS}
                 ORDER BY 1 DESC LIMIT ?{}",
                conditions.join(" AND "),
                values.len()
            )
        } else {
            format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE {} ORDER BY sequence DESC LIMIT ?{}",
                conditions.join(" AND "),
                values.len()
            )
        };
        self.with_reader(|conn| {
            let mut stmt = conn
                .prepare_cached(&sql_text)
                .map_err(sql("reading the audit trail"))?;
            stmt.query_map(rusqlite::params_from_iter(values.iter()), record_from_row)
                .and_then(|rows| rows.collect())
                .map_err(sql("reading the audit trail"))
        })
    }

    fn history_count(&self, agent_id: AgentId) -> Result<u64> {
        self.with_reader(|conn| {
            conn.prepare_cached(&format!(
                "SELECT (SELECT count(*) FROM agent_events WHERE agent_id = ?1)
                 + (SELECT count(*) FROM events WHERE sequence > {INDEXED} AND agent_id = ?1
                     AND {NOT_IN_AGENT_EVENTS})"
            ))
            .and_then(|mut stmt| stmt.query_row([agent_id.as_bytes()], |r| r.get::<_, i64>(0)))
            .map(|c| c as u64)
            .map_err(sql("counting history"))
        })
    }

    fn compact(
        &self,
        retention: &Retention,
        head: u64,
        max_rows: usize,
        clock: &dyn Clock,
    ) -> Result<usize> {
        if retention.keeps_everything() || max_rows == 0 {
            return Ok(0);
        }
        let keep_from = retention.max_events.map_or(0, |n| head.saturating_sub(n));
        let cutoff = retention
            .max_age
            .map(|age| to_micros(clock.now().checked_sub(age).unwrap_or(UNIX_EPOCH)));
        let mut conn = self.lock_writer();
        // The oldest rows, in sequence order: delete the longest prefix that
        // retention lets go, so that what remains is one contiguous range.
        let mut last_deletable = None;
        let mut count = 0;
        {
            let mut stmt = conn
                .prepare_cached("SELECT sequence, at FROM events ORDER BY sequence LIMIT ?1")
                .map_err(sql("compacting"))?;
            let mut rows = stmt.query([max_rows as i64]).map_err(sql("compacting"))?;
            while let Some(row) = rows.next().map_err(sql("compacting"))? {
                let sequence = row.get::<_, i64>(0).map_err(sql("compacting"))? as u64;
                let at: i64 = row.get(1).map_err(sql("compacting"))?;
                let by_count = sequence <= keep_from;
                let by_age = cutoff.is_some_and(|c| at < c);
                if !(by_count || by_age) {
                    break;
                }
                last_deletable = Some(sequence);
                count += 1;
            }
        }
        if let Some(last) = last_deletable {
            // The events and their index entries together, after the agents'
            // rows took the events about to go.
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql("compacting"))?;
            let synced = read_meta(&tx, "synced")?;
            if synced < last {
                let stored_head = read_meta(&tx, "head")?;
                sync_agents(&tx, synced, stored_head)?;
                self.synced.store(UNKNOWN_HEAD, Ordering::Release);
            }
            tx.execute(
                "DELETE FROM agent_events WHERE (agent_id, sequence) IN
                 (SELECT agent_id, sequence FROM events WHERE sequence <= ?1)",
                [last as i64],
            )
            .and_then(|_| {
                tx.execute(
                    "DELETE FROM principal_events WHERE (principal, sequence) IN
                     (SELECT principal, sequence FROM events WHERE sequence <= ?1)",
                    [last as i64],
                )
            })
            .and_then(|_| tx.execute("DELETE FROM events WHERE sequence <= ?1", [last as i64]))
            .map_err(sql("compacting"))?;
            // Unindexed events just deleted must not be indexed later: the
            // next commit indexes what remains of the tail instead.
            let forget_unindexed = last > read_meta(&tx, "indexed")?;
            tx.commit().map_err(sql("compacting"))?;
            if forget_unindexed {
                *self.unindexed.lock().unwrap_or_else(|p| p.into_inner()) = Unindexed::default();
            }
            self.refresh_oldest(&conn, head)?;
        }
        Ok(count)
    }

    fn close(&self) -> Result<()> {
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let conn = self.lock_writer();
        conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
            .map_err(sql("checkpointing"))
    }
}
