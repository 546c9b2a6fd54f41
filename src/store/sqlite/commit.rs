//! The SQLite commit path: one immediate transaction per batch, in the
//! steps of [`commit`]. Depends on the domain's records and the store's
//! codec; nothing above the store.
//!
//! A commit appends the batch's events and writes an agent's row only when
//! it creates the agent. It records neither the head nor the batch's id
//! apart from the events: the head is the newest event's sequence, and the
//! writer remembers its last attempt ([`Attempt`]), whose last event tells
//! whether it reached the file. Only a batch that wrote no event records
//! its id in `meta`, and `meta.indexed` moves in steps of
//! [`INDEXED_STEP`], so that most commits write the log's pages and no
//! other.
//!
//! `meta.synced` is the sequence up to which the agents' rows hold every
//! event; a commit that brings the log's tail after it to [`REFRESH_LAG`]
//! events, a compaction about to delete events after it, and start-up
//! bring the rows up to date ([`refresh_agent_rows`]). Meanwhile the
//! writer keeps each agent's version in memory ([`WriterCache::versions`]),
//! so that a commit still refuses a change whose prior version is not the
//! stored one.

use std::{collections::HashMap, sync::Arc};

use rusqlite::{Connection, Transaction, TransactionBehavior, params};

use super::{
    Tuning, Writer,
    index::{INDEXED_STEP, Unindexed},
    read_head, read_meta, sql,
};
use crate::{
    domain::{AgentId, AgentState, Clock, TransitionRecord, clock::to_stored_precision},
    store::{
        AgentChange, BatchId, ChangeOutcome, Result, StoreError,
        codec::{encode_map, encode_request, to_micros},
    },
};

/// Events after `meta.synced` after which a commit brings the agents' rows
/// up to date.
pub(super) const REFRESH_LAG: u64 = 1024;

/// The last commit a writer attempted: enough to tell, after its COMMIT
/// failed, whether it reached the file.
#[derive(Clone, Copy, Debug)]
pub(super) struct Attempt {
    id: BatchId,
    /// The sequence of its last event; `None` when it wrote none, and so
    /// recorded its id as `meta.last_batch` instead.
    last_sequence: Option<u64>,
}

/// What the one writer knows of the file between commits, so that a commit
/// need not read it. Each commit takes it out and puts it back once
/// committed: after a failed commit it is empty, and the next commit reads
/// the file again.
#[derive(Debug, Default)]
pub(super) struct WriterCache {
    /// The head ([`read_head`]).
    pub head: Option<u64>,
    /// `meta.indexed`.
    pub indexed: Option<u64>,
    /// `meta.synced`.
    pub synced: Option<u64>,
    /// The stored version of each agent a commit (or start-up) looked at;
    /// an agent not in it is looked up in the file.
    pub versions: HashMap<AgentId, u64>,
    /// The unindexed events after `meta.indexed`.
    pub unindexed: Unindexed,
}

/// The `meta` counters during one commit.
struct Counters {
    head: u64,
    indexed: u64,
    synced: u64,
}

impl Counters {
    /// The cached counters, or the file's for those not cached.
    fn of(cache: &WriterCache, conn: &Connection) -> Result<Self> {
        let cached_or_read =
            |cached: Option<u64>, key| cached.map_or_else(|| read_meta(conn, key), Ok);
        Ok(Counters {
            head: cache.head.map_or_else(|| read_head(conn), Ok)?,
            indexed: cached_or_read(cache.indexed, "indexed")?,
            synced: cached_or_read(cache.synced, "synced")?,
        })
    }
}

/// Commits `batch` (see [`crate::store::Store::commit`]):
/// 1. [`write_changes`]: each change's records get their sequences and
///    time and are written, or the change is refused as a conflict;
/// 2. the attempt, remembered by the writer; [`record_batch`] only when
///    the batch wrote no event;
/// 3. [`Unindexed::index`]: the index entries that fall due, then
///    `meta.indexed` once it moved by [`INDEXED_STEP`];
/// 4. [`refresh_agent_rows`], once the tail after `meta.synced` is long enough;
/// 5. COMMIT; its failure is [`StoreError::CommitOutcomeUnknown`].
///
/// # Errors
/// The back end failed; nothing was written unless the error is
/// [`StoreError::CommitOutcomeUnknown`].
pub(super) fn commit(
    writer: &mut Writer,
    tuning: &Tuning,
    id: BatchId,
    batch: &mut [AgentChange],
    clock: &dyn Clock,
) -> Result<Vec<ChangeOutcome>> {
    let Writer {
        conn,
        cache,
        attempt,
    } = writer;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("beginning a commit"))?;
    // The writer holds the file's lock, so nobody else moves the counters.
    let mut taken = std::mem::take(cache);
    let mut counters = Counters::of(&taken, &tx)?;
    let before = counters.head;
    let at = to_stored_precision(clock.now());
    let outcomes = write_changes(&tx, &mut taken.versions, &mut counters, batch, at)?;
    let last_sequence = (counters.head > before).then_some(counters.head);
    if last_sequence.is_none() {
        record_batch(&tx, id)?;
    }
    let committed = batch
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| **outcome == ChangeOutcome::Committed)
        .flat_map(|(change, _)| change.records.iter().map(|record| &**record));
    let indexed = taken
        .unindexed
        .index(&tx, committed, counters.indexed, counters.head, tuning)?;
    let step = INDEXED_STEP.min(tuning.index_lag);
    if indexed > counters.indexed
        && (indexed >= counters.indexed + step || indexed == counters.head)
    {
        tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'indexed'")
            .and_then(|mut stmt| stmt.execute([indexed as i64]))
            .map_err(sql("indexing agents' events"))?;
        counters.indexed = indexed;
    }
    if counters.head.saturating_sub(counters.synced) >= tuning.refresh_lag {
        refresh_agent_rows(&tx, counters.synced, counters.head)?;
        counters.synced = counters.head;
    }
    *attempt = Some(Attempt { id, last_sequence });
    tx.commit().map_err(|e| StoreError::CommitOutcomeUnknown {
        source: Box::new(e),
    })?;
    *cache = WriterCache {
        head: Some(counters.head),
        indexed: Some(counters.indexed),
        synced: Some(counters.synced),
        ..taken
    };
    Ok(outcomes)
}

/// Indexes the log's whole tail after `meta.indexed` (see
/// [`crate::store::Store::settle`]) and records the head as
/// `meta.indexed`, in one transaction. Nothing when the index is complete,
/// or when no commit since start-up or since a failed one left the
/// counters in the cache.
///
/// # Errors
/// The back end failed; the cache is then emptied as after a failed commit.
pub(super) fn settle(writer: &mut Writer) -> Result<()> {
    let Writer { conn, cache, .. } = writer;
    let (Some(head), Some(indexed)) = (cache.head, cache.indexed) else {
        return Ok(());
    };
    if indexed >= head {
        return Ok(());
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("beginning to index the log's tail"))?;
    let mut taken = std::mem::take(cache);
    taken.unindexed.index_all(&tx, indexed)?;
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'indexed'")
        .and_then(|mut stmt| stmt.execute([head as i64]))
        .map_err(sql("indexing the log's tail"))?;
    tx.commit().map_err(sql("indexing the log's tail"))?;
    *cache = WriterCache {
        indexed: Some(head),
        ..taken
    };
    Ok(())
}

/// Gives each change's records the next sequences after `counters.head`
/// and the time `at`, and writes the change ([`write_change`]); the head
/// advances past the committed ones. Returns one outcome per change.
fn write_changes(
    tx: &Transaction<'_>,
    versions: &mut HashMap<AgentId, u64>,
    counters: &mut Counters,
    batch: &mut [AgentChange],
    at: std::time::SystemTime,
) -> Result<Vec<ChangeOutcome>> {
    let mut outcomes = Vec::with_capacity(batch.len());
    for change in batch.iter_mut() {
        for (offset, record) in change.records.iter_mut().enumerate() {
            let record = Arc::make_mut(record);
            record.sequence = counters.head + 1 + offset as u64;
            record.at = at;
        }
        let outcome = write_change(tx, versions, counters.synced, change)?;
        if outcome == ChangeOutcome::Committed {
            counters.head += change.records.len() as u64;
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Records the id of a batch that wrote no event as `meta.last_batch`.
fn record_batch(tx: &Transaction<'_>, id: BatchId) -> Result<()> {
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'last_batch'")
        .and_then(|mut stmt| stmt.execute([id.0 as i64]))
        .map_err(sql("recording the batch"))?;
    Ok(())
}

/// Whether the batch `id`, the writer's last attempt, reached the file: its
/// last event is in the log, or (a batch that wrote none) its id is
/// `meta.last_batch`. Only one writer commits to the file and compaction
/// keeps the newest events, so the event at that sequence is the batch's.
///
/// # Errors
/// The back end failed, or `id` is not the writer's last attempt.
pub(super) fn batch_committed(writer: &Writer, id: BatchId) -> Result<bool> {
    let Some(attempt) = writer.attempt.filter(|attempt| attempt.id == id) else {
        return Err(StoreError::backend(
            "reading whether a batch was committed",
            std::io::Error::other(format!("batch {} is not this writer's last commit", id.0)),
        ));
    };
    match attempt.last_sequence {
        Some(sequence) => writer
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM events WHERE sequence = ?1)")
            .and_then(|mut stmt| stmt.query_row([sequence as i64], |r| r.get(0)))
            .map_err(sql("reading a batch's last event")),
        None => Ok(read_meta(&writer.conn, "last_batch")? == id.0),
    }
}

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

/// Writes one change whose records carry their final sequences and time.
/// Returns the conflict instead when the stored version (`versions`, or
/// the file's for an agent not in it) is not the change's prior version;
/// then nothing of the change was written. A written change's version goes
/// into `versions`.
fn write_change(
    tx: &Transaction<'_>,
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
    insert_events(tx, &change.records)?;
    versions.insert(change.agent_id, last.version);
    Ok(ChangeOutcome::Committed)
}

/// Appends `records` to the log.
fn insert_events(tx: &Transaction<'_>, records: &[Arc<TransitionRecord>]) -> Result<()> {
    let mut insert = tx
        .prepare_cached(INSERT_EVENT)
        .map_err(sql("inserting an event"))?;
    for record in records {
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
    Ok(())
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

/// Brings every agent's row up to its newest event after `?1`: the newest
/// sequence of each agent (a sort of sequences and agent ids only), then
/// that event by its primary key.
const REFRESH_AGENT_ROWS: &str = "UPDATE agents SET state = l.to_state, version = l.version,
    updated_at = l.at, last_sequence = l.sequence, last_from = l.from_state,
    last_reason = l.reason, last_triggered_by = l.triggered_by, last_metadata = l.metadata,
    last_principal = l.principal, last_request = l.request
    FROM (SELECT e.sequence, e.agent_id, e.version, e.from_state, e.to_state, e.at, e.reason,
        e.triggered_by, e.metadata, e.principal, e.request
        FROM (SELECT max(sequence) AS last FROM events WHERE sequence > ?1 GROUP BY agent_id) AS m
        JOIN events e ON e.sequence = m.last) AS l
    WHERE agents.agent_id = l.agent_id AND agents.version < l.version";

/// Brings the agents' rows up to date with the events after `synced` and
/// records `head` as `meta.synced`, inside `tx`.
pub(super) fn refresh_agent_rows(tx: &Transaction<'_>, synced: u64, head: u64) -> Result<()> {
    tx.prepare_cached(REFRESH_AGENT_ROWS)
        .and_then(|mut stmt| stmt.execute([synced as i64]))
        .and_then(|_| {
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'synced'")
                .and_then(|mut stmt| stmt.execute([head as i64]))
        })
        .map_err(sql("bringing agents up to date"))?;
    Ok(())
}
