//! The shared store: PostgreSQL, written by several server processes.
//!
//! # Commit order is sequence order
//! The global sequence is a counter row (`meta.head`). A commit first locks
//! the rows of the batch's agents (in key order) and checks their versions;
//! then one statement advances the counter by the number of records it
//! writes (which locks the counter row until COMMIT), and writes the agents
//! and the events at `base + offset`. The counter's lock serialises the
//! tails of all processes' commits: the next writer's sequences are higher,
//! and PostgreSQL releases the lock only after the commit is visible, so a
//! reader never sees a sequence while a lower one is still uncommitted: a
//! watcher that reads the log by sequence never skips an event that commits
//! late. Group commit keeps the serialisation cheap: one process commits
//! many changes per lock hold, in four round trips per batch (arrays through
//! `unnest`), not per change.
//!
//! Each change is checked against the agent's stored version inside the
//! transaction (compare-and-set); a change that lost to another process is
//! answered as a conflict on its own, and the rest of the batch commits.
//!
//! # Following the log
//! Every commit sends `NOTIFY agent_lifecycle_commits` (delivered at commit).
//! [`Store::commit_feed`] opens a connection that LISTENs, so followers wake
//! up without polling; they also read the log periodically in case a
//! notification is lost.
//!
//! # Leases
//! Background work runs under a session-level advisory lock held on a
//! connection of its own ([`Store::try_lease`]). When the holding process
//! dies, PostgreSQL ends its session and releases the lock, and another
//! process takes it on its next attempt.
//!
//! # Schema
//! Created and migrated by the server under a transaction-level advisory
//! lock, so several processes starting at once migrate once. The version is
//! `meta.schema_version`; a database from a newer program is refused.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use postgres::{Client, NoTls, Row, Statement, fallible_iterator::FallibleIterator};

use super::{
    AgentChange, AgentIdentity, AuditQuery, BatchId, ChangeOutcome, CommitFeed, HistoryRange,
    Lease, Recovered, Result, Retention, Store, StoreError,
    codec::{decode_map, decode_request, encode_map, encode_request, from_micros, to_micros},
};
use crate::domain::{
    Agent, AgentId, AgentState, Clock, Heartbeat, Labels, Metadata, TransitionRecord,
    clock::to_stored_precision,
};

/// Schema version this program writes (`meta.schema_version`).
const SCHEMA_VERSION: i64 = 2;

/// Advisory lock key held while migrating (transaction level).
const MIGRATION_LOCK: i64 = 0x6167_6c63_6d69_6772;

/// The channel commits notify.
const CHANNEL: &str = "agent_lifecycle_commits";

/// Reader connections kept open for reuse.
const MAX_IDLE_READERS: usize = 8;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    agent_id          BYTEA PRIMARY KEY,
    name              TEXT NOT NULL,
    labels            TEXT NOT NULL,
    state             TEXT NOT NULL,
    version           BIGINT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    last_sequence     BIGINT NOT NULL,
    last_from         TEXT,
    last_reason       TEXT NOT NULL,
    last_triggered_by TEXT NOT NULL,
    last_metadata     TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    sequence     BIGINT PRIMARY KEY,
    agent_id     BYTEA NOT NULL,
    version      BIGINT NOT NULL,
    from_state   TEXT,
    to_state     TEXT NOT NULL,
    at           BIGINT NOT NULL,
    reason       TEXT NOT NULL,
    triggered_by TEXT NOT NULL,
    metadata     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_agent ON events (agent_id, sequence);
-- The last batch each writer (one per server process) committed: after a
-- failed commit, the writer reads it to learn whether the batch landed.
CREATE TABLE IF NOT EXISTS writers (
    writer_id  BYTEA PRIMARY KEY,
    last_batch BIGINT NOT NULL,
    seen_at    BIGINT NOT NULL
);
-- The newest heartbeat of each agent, whichever process received it, so
-- that the process running the health monitor sees them all. Added to
-- version 1 without a version step: older programs simply ignore it.
CREATE TABLE IF NOT EXISTS heartbeats (
    agent_id     BYTEA PRIMARY KEY,
    at           BIGINT NOT NULL,
    load         DOUBLE PRECISION,
    current_task TEXT
);
INSERT INTO meta (key, value) VALUES ('head', 0) ON CONFLICT (key) DO NOTHING;
";

/// Version 2: the authenticated principal of every record (empty for the
/// records written before, and without authentication), and an index to
/// find what a principal did.
/// The request tag of records made for a client `request_id`, with an
/// index to find the recent ones at start-up.
const SCHEMA_V2: &str = "
ALTER TABLE agents ADD COLUMN IF NOT EXISTS last_principal TEXT NOT NULL DEFAULT '';
ALTER TABLE agents ADD COLUMN IF NOT EXISTS last_request TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN IF NOT EXISTS principal TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN IF NOT EXISTS request TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS events_by_principal ON events (principal, sequence);
CREATE INDEX IF NOT EXISTS events_with_request ON events (at) WHERE request <> '';
";

/// Keeps the newer of the stored and the given heartbeat of each agent.
const SAVE_HEARTBEATS: &str = "
INSERT INTO heartbeats (agent_id, at, load, current_task)
SELECT * FROM UNNEST($1::bytea[], $2::int8[], $3::float8[], $4::text[])
ON CONFLICT (agent_id) DO UPDATE
    SET at = excluded.at, load = excluded.load, current_task = excluded.current_task
    WHERE heartbeats.at < excluded.at";

/// Step 1 of a commit: the stored versions of the batch's agents, their
/// rows locked until the commit (changes of one agent from several
/// processes queue here, not on the counter).
///
/// Rows are locked in key order, so two processes' batches over the same
/// agents lock them in the same order and cannot deadlock each other.
const LOCK_AGENTS: &str = "SELECT agent_id, version FROM agents WHERE agent_id = ANY($1::bytea[])
    ORDER BY agent_id FOR UPDATE";
/// Step 2, one statement: advance the counter by the batch's record count
/// (its row lock serialises commits from here to COMMIT), then write the
/// agents and events with sequences `base + offset`, record the batch id,
/// and notify. Returns the base and how many agents it created (fewer than
/// asked when another process registered one of the ids meanwhile).
const WRITE_BATCH: &str = "
WITH h AS (
    UPDATE meta SET value = value + $1 WHERE key = 'head' RETURNING value - $1 AS base
),
ins AS (
    INSERT INTO agents (agent_id, name, labels, state, version, created_at, updated_at,
        last_sequence, last_from, last_reason, last_triggered_by, last_metadata, last_principal,
        last_request)
    SELECT n.agent_id, n.name, n.labels, n.state, n.version, $2, $2, h.base + n.last_offset,
        n.last_from, n.reason, n.triggered_by, n.metadata, n.principal, n.request
    FROM h, unnest($3::bytea[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[],
        $9::text[], $10::text[], $11::text[], $12::text[], $30::text[], $33::text[])
        AS n(agent_id, name, labels, state, version, last_offset, last_from, reason,
             triggered_by, metadata, principal, request)
    ON CONFLICT (agent_id) DO NOTHING
    RETURNING 1
),
upd AS (
    UPDATE agents AS a SET state = u.state, version = u.version, updated_at = $2,
        last_sequence = h.base + u.last_offset, last_from = u.last_from,
        last_reason = u.reason, last_triggered_by = u.triggered_by, last_metadata = u.metadata,
        last_principal = u.principal, last_request = u.request
    FROM h, unnest($13::bytea[], $14::text[], $15::bigint[], $16::bigint[], $17::text[],
        $18::text[], $19::text[], $20::text[], $31::text[], $34::text[])
        AS u(agent_id, state, version, last_offset, last_from, reason, triggered_by, metadata,
             principal, request)
    WHERE a.agent_id = u.agent_id
    RETURNING 1
),
ev AS (
    INSERT INTO events (sequence, agent_id, version, from_state, to_state, at, reason,
        triggered_by, metadata, principal, request)
    SELECT h.base + e.pos, e.agent_id, e.version, e.from_state, e.to_state, $2, e.reason,
        e.triggered_by, e.metadata, e.principal, e.request
    FROM h, unnest($21::bytea[], $22::bigint[], $23::text[], $24::text[], $25::text[],
        $26::text[], $27::text[], $32::text[], $35::text[]) WITH ORDINALITY
        AS e(agent_id, version, from_state, to_state, reason, triggered_by, metadata, principal,
             request, pos)
),
w AS (
    INSERT INTO writers (writer_id, last_batch, seen_at) VALUES ($28, $29, $2)
    ON CONFLICT (writer_id) DO UPDATE
        SET last_batch = excluded.last_batch, seen_at = excluded.seen_at
)
SELECT h.base, (SELECT count(*) FROM ins), pg_notify('agent_lifecycle_commits', (h.base + $1)::text)
FROM h";
const SELECT_AGENTS: &str = "SELECT agent_id, name, labels, state, version, created_at, updated_at,
    last_sequence, last_from, last_reason, last_triggered_by, last_metadata, last_principal,
    last_request FROM agents";
const EVENT_COLUMNS: &str =
    "sequence, agent_id, version, from_state, to_state, at, reason, triggered_by, metadata,
    principal, request";

fn pg(context: &'static str) -> impl FnOnce(postgres::Error) -> StoreError {
    move |err| StoreError::backend(context, err)
}

fn corrupt(what: &str, err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {err}"))
}

/// The writer's connection and its prepared statements.
struct Writer {
    client: Client,
    lock_agents: Statement,
    write_batch: Statement,
}

impl Writer {
    fn connect(url: &str) -> Result<Self> {
        Writer::new(connect(url)?)
    }

    fn new(mut client: Client) -> Result<Self> {
        let mut prepare = |sql: &str| client.prepare(sql).map_err(pg("preparing statements"));
        Ok(Writer {
            lock_agents: prepare(LOCK_AGENTS)?,
            write_batch: prepare(WRITE_BATCH)?,
            client,
        })
    }
}

fn connect(url: &str) -> Result<Client> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| StoreError::backend("parsing the PostgreSQL URL", e))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    config
        .connect(NoTls)
        .map_err(pg("connecting to PostgreSQL"))
}

/// The PostgreSQL back end.
pub struct PostgresStore {
    url: String,
    /// This process's writer id (see the `writers` table).
    writer_id: [u8; 16],
    /// The one connection that commits (the commit thread's), with its
    /// prepared statements; reconnected after a failure.
    writer: Mutex<Option<Writer>>,
    /// Idle reader connections.
    readers: Mutex<Vec<Client>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user[:password]@host[:port]/db`) and
    /// creates or migrates the schema.
    ///
    /// # Errors
    /// The server cannot be reached, refuses the login, or holds a newer
    /// schema.
    pub fn open(url: &str) -> Result<Self> {
        let mut client = connect(url)?;
        migrate(&mut client)?;
        let writer = Writer::new(client)?;
        Ok(PostgresStore {
            url: url.to_string(),
            writer_id: *AgentId::generate().as_uuid().as_bytes(),
            writer: Mutex::new(Some(writer)),
            readers: Mutex::new(Vec::new()),
        })
    }

    /// Creates an empty database `name` on the server of `url` (whose user
    /// may create databases) and returns its URL: for tests and benchmarks
    /// that each want a database of their own.
    ///
    /// # Errors
    /// The server cannot be reached, `name` is not a plain identifier, or
    /// the database cannot be created.
    pub fn create_database(url: &str, name: &str) -> Result<String> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(StoreError::Corrupt(format!(
                "database name {name:?}: use lowercase letters, digits and _"
            )));
        }
        let mut client = connect(url)?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .map_err(pg("creating a database"))?;
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::backend("parsing the PostgreSQL URL", e))?;
        config.dbname(name);
        let (base, _) = url.split_once('?').unwrap_or((url, ""));
        let prefix = base.rsplit_once('/').map_or(base, |(prefix, _)| prefix);
        Ok(format!("{prefix}/{name}"))
    }

    /// One attempt at a commit; `None` when the attempt lost a race with
    /// another process and rolled back, so the batch may be tried again:
    /// another process registered one of the batch's new ids between the
    /// version check and the write, or PostgreSQL broke a deadlock between
    /// two batches' row locks by aborting this one.
    fn write_batch(
        &self,
        w: &mut Writer,
        id: BatchId,
        batch: &mut [AgentChange],
        at: std::time::SystemTime,
    ) -> Result<Option<Vec<ChangeOutcome>>> {
        let mut tx = w.client.transaction().map_err(pg("beginning a commit"))?;
        let ids: Vec<[u8; 16]> = batch.iter().map(|c| *c.agent_id.as_bytes()).collect();
        let id_refs: Vec<&[u8]> = ids.iter().map(|b| b.as_slice()).collect();
        let locked = match tx.query(&w.lock_agents, &[&id_refs]) {
            Ok(rows) => rows,
            Err(err) if is_retryable(&err) => return Ok(None),
            Err(err) => return Err(pg("reading agent versions")(err)),
        };
        let mut stored: std::collections::HashMap<[u8; 16], u64> = locked
            .iter()
            .filter_map(|row| {
                let bytes: &[u8] = row.get(0);
                let key: [u8; 16] = bytes.try_into().ok()?;
                Some((key, row.get::<_, i64>(1) as u64))
            })
            .collect();
        let mut outcomes = Vec::with_capacity(batch.len());
        for (change, key) in batch.iter().zip(&ids) {
            let actual = stored.get(key).copied().unwrap_or(0);
            let creatable = change.prior_version == 0 && change.identity.is_some();
            if actual != change.prior_version || (actual == 0 && !creatable) {
                outcomes.push(ChangeOutcome::Conflict { actual });
                continue;
            }
            if let Some(last) = change.records.last() {
                // A later change of the same agent in this batch is checked
                // against this one's result.
                stored.insert(*key, last.version);
            }
            outcomes.push(ChangeOutcome::Committed);
        }
        let mut rows = Rows::default();
        for ((change, key), outcome) in batch.iter().zip(&id_refs).zip(&outcomes) {
            if *outcome == ChangeOutcome::Committed {
                rows.add(change, key);
            }
        }
        let at_micros = to_micros(at);
        let batch_id = id.0 as i64;
        let writer_id = self.writer_id.as_slice();
        let row = tx.query_one(
            &w.write_batch,
            &[
                &rows.records,
                &at_micros,
                &rows.new_ids,
                &rows.new_names,
                &rows.new_labels,
                &rows.new_states,
                &rows.new_versions,
                &rows.new_last,
                &rows.new_last_from,
                &rows.new_reasons,
                &rows.new_triggers,
                &rows.new_metadata,
                &rows.upd_ids,
                &rows.upd_states,
                &rows.upd_versions,
                &rows.upd_last,
                &rows.upd_last_from,
                &rows.upd_reasons,
                &rows.upd_triggers,
                &rows.upd_metadata,
                &rows.ev_ids,
                &rows.ev_versions,
                &rows.ev_from,
                &rows.ev_to,
                &rows.ev_reasons,
                &rows.ev_triggers,
                &rows.ev_metadata,
                &writer_id,
                &batch_id,
                &rows.new_principals,
                &rows.upd_principals,
                &rows.ev_principals,
                &rows.new_requests,
                &rows.upd_requests,
                &rows.ev_requests,
            ],
        );
        let row = match row {
            Ok(row) => row,
            Err(err) if is_retryable(&err) => return Ok(None),
            Err(err) => return Err(pg("writing a batch")(err)),
        };
        let base = row.get::<_, i64>(0) as u64;
        let created: i64 = row.get(1);
        if created != rows.new_ids.len() as i64 {
            tx.rollback().map_err(pg("rolling back a raced batch"))?;
            return Ok(None);
        }
        tx.commit().map_err(|e| StoreError::CommitOutcomeUnknown {
            source: Box::new(e),
        })?;
        let mut next = base;
        for (change, outcome) in batch.iter_mut().zip(&outcomes) {
            if *outcome != ChangeOutcome::Committed {
                continue;
            }
            for record in &mut change.records {
                let record = Arc::make_mut(record);
                next += 1;
                record.sequence = next;
                record.at = at;
            }
        }
        Ok(Some(outcomes))
    }

    fn with_writer<T>(&self, f: impl FnOnce(&mut Writer) -> Result<T>) -> Result<T> {
        let mut slot = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let writer = match slot.as_mut() {
            Some(writer) if !writer.client.is_closed() => writer,
            _ => slot.insert(Writer::connect(&self.url)?),
        };
        let result = f(writer);
        if result.is_err() && writer.client.is_closed() {
            *slot = None;
        }
        result
    }

    fn with_reader<T>(&self, f: impl Fn(&mut Client) -> Result<T>) -> Result<T> {
        let idle = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (mut client, pooled) = match idle {
            Some(client) if !client.is_closed() => (client, true),
            _ => (connect(&self.url)?, false),
        };
        let mut result = f(&mut client);
        // A pooled connection learns that the server ended it only when it
        // is used (a database restart, an idle timeout): try once more on a
        // fresh one.
        if result.is_err() && pooled && client.is_closed() {
            client = connect(&self.url)?;
            result = f(&mut client);
        }
        if !client.is_closed() {
            let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < MAX_IDLE_READERS {
                idle.push(client);
            }
        }
        result
    }
}

fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client
        .transaction()
        .map_err(pg("beginning the migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(pg("locking the schema"))?;
    tx.batch_execute(SCHEMA_V1)
        .map_err(pg("creating the schema"))?;
    let found: Option<i64> = tx
        .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
        .map_err(pg("reading the schema version"))?
        .map(|row| row.get(0));
    if let Some(found) = found
        && found > SCHEMA_VERSION
    {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    if found.is_none_or(|found| found < 2) {
        tx.batch_execute(SCHEMA_V2)
            .map_err(pg("migrating the schema to version 2"))?;
    }
    // Later versions add their steps here, under the same lock.
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        &[&SCHEMA_VERSION],
    )
    .map_err(pg("writing the schema version"))?;
    tx.commit().map_err(pg("committing the migration"))
}

fn decode_id(bytes: &[u8]) -> Result<AgentId> {
    let bytes: [u8; 16] = bytes
        .try_into()
        .map_err(|_| corrupt("agent id", format!("{} bytes", bytes.len())))?;
    Ok(AgentId::from_bytes(bytes))
}

fn decode_state(text: &str) -> Result<AgentState> {
    text.parse().map_err(|e| corrupt("state", e))
}

fn record_from_row(row: &Row) -> Result<Arc<TransitionRecord>> {
    let from: Option<&str> = row.get(3);
    Ok(Arc::new(TransitionRecord {
        sequence: row.get::<_, i64>(0) as u64,
        agent_id: decode_id(row.get(1))?,
        version: row.get::<_, i64>(2) as u64,
        from: from.map(decode_state).transpose()?,
        to: decode_state(row.get(4))?,
        at: from_micros(row.get(5)),
        reason: row.get(6),
        triggered_by: row.get(7),
        metadata: decode_map::<Metadata>(row.get(8)).map_err(|e| corrupt("metadata", e))?,
        principal: row.get(9),
        request: decode_request(row.get(10)).map_err(|e| corrupt("request", e))?,
    }))
}

fn agent_from_row(row: &Row) -> Result<Agent> {
    let id = decode_id(row.get(0))?;
    let state = decode_state(row.get(3))?;
    let version = row.get::<_, i64>(4) as u64;
    let updated_at = from_micros(row.get(6));
    let last_from: Option<&str> = row.get(8);
    let last = TransitionRecord {
        agent_id: id,
        from: last_from.map(decode_state).transpose()?,
        to: state,
        at: updated_at,
        reason: row.get(9),
        triggered_by: row.get(10),
        metadata: decode_map::<Metadata>(row.get(11)).map_err(|e| corrupt("metadata", e))?,
        principal: row.get(12),
        request: decode_request(row.get(13)).map_err(|e| corrupt("request", e))?,
        sequence: row.get::<_, i64>(7) as u64,
        version,
    };
    Ok(Agent {
        id,
        name: Arc::from(row.get::<_, &str>(1)),
        labels: Arc::new(decode_map::<Labels>(row.get(2)).map_err(|e| corrupt("labels", e))?),
        state,
        version,
        created_at: from_micros(row.get(5)),
        updated_at,
        last_transition: Arc::new(last),
    })
}

/// Column arrays of the rows one batch writes; positions are 1-based
/// offsets from the batch's base sequence.
#[derive(Default)]
struct Rows<'a> {
    records: i64,
    new_ids: Vec<&'a [u8]>,
    new_names: Vec<&'a str>,
    new_labels: Vec<String>,
    new_states: Vec<&'static str>,
    new_versions: Vec<i64>,
    new_last: Vec<i64>,
    new_last_from: Vec<Option<&'static str>>,
    new_reasons: Vec<&'a str>,
    new_triggers: Vec<&'a str>,
    new_metadata: Vec<String>,
    new_principals: Vec<&'a str>,
    new_requests: Vec<String>,
    upd_ids: Vec<&'a [u8]>,
    upd_states: Vec<&'static str>,
    upd_versions: Vec<i64>,
    upd_last: Vec<i64>,
    upd_last_from: Vec<Option<&'static str>>,
    upd_reasons: Vec<&'a str>,
    upd_triggers: Vec<&'a str>,
    upd_metadata: Vec<String>,
    upd_principals: Vec<&'a str>,
    upd_requests: Vec<String>,
    ev_ids: Vec<&'a [u8]>,
    ev_versions: Vec<i64>,
    ev_from: Vec<Option<&'static str>>,
    ev_to: Vec<&'static str>,
    ev_reasons: Vec<&'a str>,
    ev_triggers: Vec<&'a str>,
    ev_metadata: Vec<String>,
    ev_principals: Vec<&'a str>,
    ev_requests: Vec<String>,
}

impl<'a> Rows<'a> {
    fn add(&mut self, change: &'a AgentChange, id: &'a [u8]) {
        let Some(last) = change.records.last() else {
            return;
        };
        for record in &change.records {
            self.records += 1;
            self.ev_ids.push(id);
            self.ev_versions.push(record.version as i64);
            self.ev_from.push(record.from.map(AgentState::as_str));
            self.ev_to.push(record.to.as_str());
            self.ev_reasons.push(&record.reason);
            self.ev_triggers.push(&record.triggered_by);
            self.ev_principals.push(&record.principal);
            self.ev_requests
                .push(encode_request(record.request.as_deref()));
            self.ev_metadata
                .push(encode_map(&record.metadata, record.metadata.is_empty()));
        }
        let last_metadata = encode_map(&last.metadata, last.metadata.is_empty());
        match &change.identity {
            Some(identity) if change.prior_version == 0 => {
                self.new_ids.push(id);
                self.new_names.push(&identity.name);
                self.new_labels
                    .push(encode_map(&*identity.labels, identity.labels.is_empty()));
                self.new_states.push(last.to.as_str());
                self.new_versions.push(last.version as i64);
                self.new_last.push(self.records);
                self.new_last_from.push(last.from.map(AgentState::as_str));
                self.new_reasons.push(&last.reason);
                self.new_triggers.push(&last.triggered_by);
                self.new_principals.push(&last.principal);
                self.new_requests
                    .push(encode_request(last.request.as_deref()));
                self.new_metadata.push(last_metadata);
            }
            _ => {
                self.upd_ids.push(id);
                self.upd_states.push(last.to.as_str());
                self.upd_versions.push(last.version as i64);
                self.upd_last.push(self.records);
                self.upd_last_from.push(last.from.map(AgentState::as_str));
                self.upd_reasons.push(&last.reason);
                self.upd_triggers.push(&last.triggered_by);
                self.upd_principals.push(&last.principal);
                self.upd_requests
                    .push(encode_request(last.request.as_deref()));
                self.upd_metadata.push(last_metadata);
            }
        }
    }
}

/// How many times a batch is tried again after losing a race with another
/// process (see `PostgresStore::write_batch`).
const RACE_RETRIES: usize = 3;

/// Whether `err` aborted the transaction only because of another
/// transaction (a deadlock or a serialization failure): nothing was
/// written, and the same batch may simply be tried again.
fn is_retryable(err: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    err.code().is_some_and(|code| {
        *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::LOCK_NOT_AVAILABLE
    })
}

impl Store for PostgresStore {
    fn load(&self) -> Result<Recovered> {
        self.with_reader(|client| {
            let mut tx = client
                .build_transaction()
                .isolation_level(postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .map_err(pg("loading agents"))?;
            let rows = tx.query(SELECT_AGENTS, &[]).map_err(pg("loading agents"))?;
            let agents = rows
                .iter()
                .map(agent_from_row)
                .collect::<Result<Vec<_>>>()?;
            let head: i64 = tx
                .query_one("SELECT value FROM meta WHERE key = 'head'", &[])
                .map_err(pg("reading the head sequence"))?
                .get(0);
            tx.commit().map_err(pg("loading agents"))?;
            Ok(Recovered {
                agents,
                head: head as u64,
            })
        })
    }

    fn commit(
        &self,
        id: BatchId,
        batch: &mut [AgentChange],
        clock: &dyn Clock,
    ) -> Result<Vec<ChangeOutcome>> {
        let at = to_stored_precision(clock.now());
        for attempt in 1.. {
            let written = self.with_writer(|w| self.write_batch(w, id, batch, at))?;
            if let Some(outcomes) = written {
                return Ok(outcomes);
            }
            if attempt >= RACE_RETRIES {
                break;
            }
        }
        Err(StoreError::backend(
            "committing",
            std::io::Error::other("the batch kept losing races with another process"),
        ))
    }

    fn batch_committed(&self, id: BatchId) -> Result<bool> {
        self.with_reader(|client| {
            let last: Option<i64> = client
                .query_opt(
                    "SELECT last_batch FROM writers WHERE writer_id = $1",
                    &[&self.writer_id.as_slice()],
                )
                .map_err(pg("reading the last batch"))?
                .map(|row| row.get(0));
            Ok(last == Some(id.0 as i64))
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn head(&self) -> Result<u64> {
        self.with_reader(|client| {
            let head: i64 = client
                .query_one("SELECT value FROM meta WHERE key = 'head'", &[])
                .map_err(pg("reading the head sequence"))?
                .get(0);
            Ok(head as u64)
        })
    }

    fn identities(&self, ids: &[AgentId]) -> Result<Vec<(AgentId, AgentIdentity)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<[u8; 16]> = ids.iter().map(|id| *id.as_bytes()).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        self.with_reader(|client| {
            client
                .query(
                    "SELECT agent_id, name, labels FROM agents WHERE agent_id = ANY($1::bytea[])",
                    &[&refs],
                )
                .map_err(pg("reading agents"))?
                .iter()
                .map(|row| {
                    Ok((
                        decode_id(row.get(0))?,
                        AgentIdentity {
                            name: Arc::from(row.get::<_, &str>(1)),
                            labels: Arc::new(
                                decode_map::<Labels>(row.get(2))
                                    .map_err(|e| corrupt("labels", e))?,
                            ),
                        },
                    ))
                })
                .collect()
        })
    }

    fn commit_feed(&self) -> Result<Option<Box<dyn CommitFeed>>> {
        let mut client = connect(&self.url)?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(pg("listening for commits"))?;
        Ok(Some(Box::new(Listener { client })))
    }

    fn try_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>> {
        let mut client = connect(&self.url)?;
        let key = lease_key(name);
        let granted: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .map_err(pg("taking a lease"))?
            .get(0);
        Ok(granted.then(|| Box::new(AdvisoryLease { client }) as Box<dyn Lease>))
    }

    fn save_heartbeats(&self, beats: &[(AgentId, Heartbeat)]) -> Result<()> {
        if beats.is_empty() {
            return Ok(());
        }
        // One row per agent: the newest of the given ones (an upsert may not
        // touch a row twice).
        let mut newest: HashMap<AgentId, &Heartbeat> = HashMap::new();
        for (id, beat) in beats {
            let slot = newest.entry(*id).or_insert(beat);
            if beat.at > slot.at {
                *slot = beat;
            }
        }
        let keys: Vec<[u8; 16]> = newest.keys().map(|id| *id.as_bytes()).collect();
        let ids: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let ats: Vec<i64> = newest.values().map(|b| to_micros(b.at)).collect();
        let loads: Vec<Option<f64>> = newest.values().map(|b| b.load).collect();
        let tasks: Vec<Option<&str>> = newest.values().map(|b| b.current_task.as_deref()).collect();
        self.with_reader(|client| {
            client
                .execute(SAVE_HEARTBEATS, &[&ids, &ats, &loads, &tasks])
                .map_err(pg("saving heartbeats"))?;
            Ok(())
        })
    }

    fn heartbeats(&self, ids: Option<&[AgentId]>) -> Result<Vec<(AgentId, Heartbeat)>> {
        let keys: Option<Vec<[u8; 16]>> =
            ids.map(|ids| ids.iter().map(|id| *id.as_bytes()).collect());
        let refs: Option<Vec<&[u8]>> = keys
            .as_ref()
            .map(|keys| keys.iter().map(|k| k.as_slice()).collect());
        self.with_reader(|client| {
            let rows = match &refs {
                Some(refs) => client.query(
                    "SELECT agent_id, at, load, current_task FROM heartbeats
                     WHERE agent_id = ANY($1::bytea[])",
                    &[refs],
                ),
                None => client.query(
                    "SELECT agent_id, at, load, current_task FROM heartbeats",
                    &[],
                ),
            }
            .map_err(pg("reading heartbeats"))?;
            rows.iter()
                .map(|row| {
                    Ok((
                        decode_id(row.get(0))?,
                        Heartbeat {
                            at: from_micros(row.get(1)),
                            load: row.get(2),
                            current_task: row.get(3),
                        },
                    ))
                })
                .collect()
        })
    }

    fn events_after(&self, after: u64, max: usize) -> Result<Vec<Arc<TransitionRecord>>> {
        let after = after.min(i64::MAX as u64) as i64;
        let max = max.min(i64::MAX as usize) as i64;
        self.with_reader(|client| {
            client
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE sequence > $1
                         ORDER BY sequence LIMIT $2"
                    ),
                    &[&after, &max],
                )
                .map_err(pg("reading events"))?
                .iter()
                .map(record_from_row)
                .collect()
        })
    }

    fn oldest_sequence(&self) -> Result<u64> {
        self.with_reader(|client| {
            let row = client
                .query_one(
                    "SELECT (SELECT min(sequence) FROM events),
                            (SELECT value FROM meta WHERE key = 'head')",
                    &[],
                )
                .map_err(pg("reading the oldest event"))?;
            let oldest: Option<i64> = row.get(0);
            let head: i64 = row.get(1);
            Ok(oldest.map_or(head as u64 + 1, |s| s as u64))
        })
    }

    fn history(
        &self,
        agent_id: AgentId,
        range: HistoryRange,
    ) -> Result<Vec<Arc<TransitionRecord>>> {
        let id = agent_id.as_bytes().as_slice();
        let after = range.after.min(i64::MAX as u64) as i64;
        let upto = range.upto.min(i64::MAX as u64) as i64;
        let max = range.max.min(i64::MAX as usize) as i64;
        self.with_reader(|client| {
            client
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE agent_id = $1 AND sequence > $2
                         AND sequence <= $3 ORDER BY sequence LIMIT $4"
                    ),
                    &[&id, &after, &upto, &max],
                )
                .map_err(pg("reading history"))?
                .iter()
                .map(record_from_row)
                .collect()
        })
    }

    fn nth_newest(&self, agent_id: AgentId, upto: u64, n: u64) -> Result<Option<u64>> {
        if n == 0 {
            return Ok(None);
        }
        let id = agent_id.as_bytes().as_slice();
        let upto = upto.min(i64::MAX as u64) as i64;
        let offset = (n - 1).min(i64::MAX as u64) as i64;
        self.with_reader(|client| {
            Ok(client
                .query_opt(
                    "SELECT sequence FROM events WHERE agent_id = $1 AND sequence <= $2
                     ORDER BY sequence DESC LIMIT 1 OFFSET $3",
                    &[&id, &upto, &offset],
                )
                .map_err(pg("reading history"))?
                .map(|row| row.get::<_, i64>(0) as u64))
        })
    }

    fn requests_since(&self, since: std::time::SystemTime) -> Result<Vec<Arc<TransitionRecord>>> {
        let since = to_micros(since);
        self.with_reader(|client| {
            client
                .query(
                    &format!(
                        "SELECT {EVENT_COLUMNS} FROM events WHERE request <> '' AND at >= $1
                         ORDER BY sequence"
                    ),
                    &[&since],
                )
                .map_err(pg("reading recent requests"))?
                .iter()
                .map(record_from_row)
                .collect()
        })
    }

    fn size_bytes(&self) -> Result<Option<u64>> {
        self.with_reader(|client| {
            let size: i64 = client
                .query_one("SELECT pg_database_size(current_database())", &[])
                .map_err(pg("reading the database size"))?
                .get(0);
            Ok(Some(u64::try_from(size).unwrap_or(0)))
        })
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<Arc<TransitionRecord>>> {
        let before = query.before.min(i64::MAX as u64) as i64;
        let max = query.max.min(i64::MAX as usize) as i64;
        let id = query.agent_id.map(|id| *id.as_bytes());
        let id = id.as_ref().map(|b| b.as_slice());
        let principal = query.principal.as_deref();
        let mut conditions = vec!["sequence < $1"];
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = vec![&before];
        let id_ref;
        if let Some(id) = &id {
            id_ref = *id;
            params.push(&id_ref);
            conditions.push("agent_id = $2");
        }
        if let Some(principal) = &principal {
            params.push(principal);
            conditions.push(if id.is_some() {
                "principal = $3"
            } else {
                "principal = $2"
            });
        }
        params.push(&max);
        let text = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE {} ORDER BY sequence DESC LIMIT ${}",
            conditions.join(" AND "),
            params.len()
        );
        self.with_reader(|client| {
            client
                .query(&text, &params)
                .map_err(pg("reading the audit trail"))?
                .iter()
                .map(record_from_row)
                .collect()
        })
    }

    fn history_count(&self, agent_id: AgentId) -> Result<u64> {
        let id = agent_id.as_bytes().as_slice();
        self.with_reader(|client| {
            let count: i64 = client
                .query_one("SELECT count(*) FROM events WHERE agent_id = $1", &[&id])
                .map_err(pg("counting history"))?
                .get(0);
            Ok(count as u64)
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
        let keep_from = retention
            .max_events
            .map_or(0, |n| head.saturating_sub(n))
            .min(i64::MAX as u64) as i64;
        let cutoff = retention
            .max_age
            .map(|age| {
                to_micros(
                    clock
                        .now()
                        .checked_sub(age)
                        .unwrap_or(std::time::UNIX_EPOCH),
                )
            })
            .unwrap_or(i64::MIN);
        let max = max_rows.min(i64::MAX as usize) as i64;
        // The longest prefix of the log that retention lets go, at most
        // `max_rows` long, so that what remains is one contiguous range.
        self.with_writer(|w| {
            let deleted = w
                .client
                .execute(
                    "WITH oldest AS (
                        SELECT sequence, (sequence <= $1 OR at < $2) AS deletable
                        FROM events ORDER BY sequence LIMIT $3),
                     cut AS (
                        SELECT coalesce(min(sequence) FILTER (WHERE NOT deletable), 0) AS stop
                        FROM oldest),
                     doomed AS (
                        SELECT o.sequence FROM oldest o, cut
                        WHERE o.deletable AND (cut.stop = 0 OR o.sequence < cut.stop))
                     DELETE FROM events WHERE sequence IN (SELECT sequence FROM doomed)",
                    &[&keep_from, &cutoff, &max],
                )
                .map_err(pg("compacting"))?;
            Ok(deleted as usize)
        })
    }

    fn close(&self) -> Result<()> {
        self.readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *self.writer.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}

/// The advisory lock key of a lease name (stable across processes).
fn lease_key(name: &str) -> i64 {
    // FNV-1a: stable, unlike std's randomly seeded hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"agent-lifecycle/".iter().chain(name.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// A LISTEN connection.
struct Listener {
    client: Client,
}

impl CommitFeed for Listener {
    fn wait(&mut self, timeout: Duration) -> Result<bool> {
        let first = self
            .client
            .notifications()
            .timeout_iter(timeout)
            .next()
            .map_err(pg("waiting for commits"))?;
        if first.is_none() && self.client.is_closed() {
            return Err(StoreError::backend(
                "waiting for commits",
                std::io::Error::other("the notification connection closed"),
            ));
        }
        // Whatever else is already buffered is covered by the same read of
        // the log.
        let mut notifications = self.client.notifications();
        let mut buffered = notifications.iter();
        while buffered
            .next()
            .map_err(pg("waiting for commits"))?
            .is_some()
        {}
        Ok(first.is_some())
    }
}

/// A session-level advisory lock on a connection of its own.
struct AdvisoryLease {
    client: Client,
}

impl Lease for AdvisoryLease {
    fn is_held(&mut self) -> bool {
        !self.client.is_closed() && self.client.simple_query("SELECT 1").is_ok()
    }
}
