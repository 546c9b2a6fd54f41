//! The PostgreSQL commit path: the writer's connection and one transaction
//! per batch, in the steps of [`write_batch`], tried again when it loses a
//! race with another process. Depends on the domain's records and
//! [`super::batch`]; nothing above the store.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use postgres::{Client, Statement, Transaction};

use super::{PostgresStore, batch::BatchRows, batch::WRITE_BATCH, connect, pg};
use crate::{
    domain::{AgentId, Clock, clock::to_stored_precision},
    store::{AgentChange, BatchId, ChangeOutcome, Result, StoreError},
};

/// Step 1 of a commit: the stored versions of the batch's agents, their
/// rows locked until the commit (changes of one agent from several
/// processes queue here, not on the counter).
///
/// Rows are locked in key order, so two processes' batches over the same
/// agents lock them in the same order and cannot deadlock each other.
const LOCK_AGENTS: &str = "SELECT agent_id, version FROM agents WHERE agent_id = ANY($1::bytea[])
    ORDER BY agent_id FOR UPDATE";

/// How many times a batch is tried again after losing a race with another
/// process (see [`write_batch`]).
const RACE_RETRIES: usize = 3;

/// The writer's connection and its prepared statements.
pub(super) struct Writer {
    pub client: Client,
    lock_agents: Statement,
    write_batch: Statement,
}

impl Writer {
    /// A new connection to `url`, with the statements prepared.
    pub(super) fn connect(url: &str) -> Result<Self> {
        Writer::new(connect(url)?)
    }

    /// Prepares the statements on `client`.
    pub(super) fn new(mut client: Client) -> Result<Self> {
        let mut prepare = |sql: &str| client.prepare(sql).map_err(pg("preparing statements"));
        Ok(Writer {
            lock_agents: prepare(LOCK_AGENTS)?,
            write_batch: prepare(&WRITE_BATCH)?,
            client,
        })
    }
}

/// Commits `batch` (see [`crate::store::Store::commit`]), trying again
/// when an attempt lost a race with another process.
pub(super) fn commit(
    store: &PostgresStore,
    id: BatchId,
    batch: &mut [AgentChange],
    clock: &dyn Clock,
) -> Result<Vec<ChangeOutcome>> {
    let at = to_stored_precision(clock.now());
    for attempt in 1.. {
        let written = store.with_writer(|w| write_batch(w, &store.writer_id, id, batch, at))?;
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

/// One attempt at a commit; `None` when the attempt lost a race with
/// another process and rolled back, so the batch may be tried again:
/// another process registered one of the batch's new ids between the
/// version check and the write, or PostgreSQL broke a deadlock between
/// two batches' row locks by aborting this one.
///
/// 1. [`check_versions`] locks the agents' rows and checks each change;
/// 2. [`WRITE_BATCH`] writes the [`BatchRows`] of the changes that passed
///    at sequences after the counter, which it advances;
/// 3. COMMIT; its failure is [`StoreError::CommitOutcomeUnknown`];
/// 4. [`stamp`] gives the records their sequences and time.
fn write_batch(
    w: &mut Writer,
    writer_id: &[u8; 16],
    id: BatchId,
    batch: &mut [AgentChange],
    at: SystemTime,
) -> Result<Option<Vec<ChangeOutcome>>> {
    let mut tx = w.client.transaction().map_err(pg("beginning a commit"))?;
    let Some(outcomes) = check_versions(&mut tx, &w.lock_agents, batch)? else {
        return Ok(None);
    };
    let mut rows = BatchRows::new(writer_id, id, at);
    for (change, outcome) in batch.iter().zip(&outcomes) {
        if *outcome == ChangeOutcome::Committed {
            rows.add(change);
        }
    }
    let written = match tx.query_one(&w.write_batch, &rows.params()) {
        Ok(row) => row,
        Err(err) if is_retryable(&err) => return Ok(None),
        Err(err) => return Err(pg("writing a batch")(err)),
    };
    let base = written.get::<_, i64>(0) as u64;
    let created: i64 = written.get(1);
    if created != rows.new_agents() as i64 {
        tx.rollback().map_err(pg("rolling back a raced batch"))?;
        return Ok(None);
    }
    tx.commit().map_err(|e| StoreError::CommitOutcomeUnknown {
        source: Box::new(e),
    })?;
    stamp(batch, &outcomes, base, at);
    Ok(Some(outcomes))
}

/// Locks the rows of the batch's agents and checks each change against its
/// agent's stored version (a later change of the same agent against the
/// earlier one's result). `None` when PostgreSQL aborted the transaction
/// for another's sake ([`is_retryable`]).
fn check_versions(
    tx: &mut Transaction<'_>,
    lock_agents: &Statement,
    batch: &[AgentChange],
) -> Result<Option<Vec<ChangeOutcome>>> {
    let ids: Vec<&[u8]> = batch
        .iter()
        .map(|c| c.agent_id.as_bytes().as_slice())
        .collect();
    let locked = match tx.query(lock_agents, &[&ids]) {
        Ok(rows) => rows,
        Err(err) if is_retryable(&err) => return Ok(None),
        Err(err) => return Err(pg("reading agent versions")(err)),
    };
    let mut stored: HashMap<AgentId, u64> = locked
        .iter()
        .filter_map(|row| {
            let bytes: &[u8] = row.get(0);
            let key: [u8; 16] = bytes.try_into().ok()?;
            Some((AgentId::from_bytes(key), row.get::<_, i64>(1) as u64))
        })
        .collect();
    let mut outcomes = Vec::with_capacity(batch.len());
    for change in batch {
        let actual = stored.get(&change.agent_id).copied().unwrap_or(0);
        let creatable = change.prior_version == 0 && change.identity.is_some();
        if actual != change.prior_version || (actual == 0 && !creatable) {
            outcomes.push(ChangeOutcome::Conflict { actual });
            continue;
        }
        if let Some(last) = change.records.last() {
            stored.insert(change.agent_id, last.version);
        }
        outcomes.push(ChangeOutcome::Committed);
    }
    Ok(Some(outcomes))
}

/// Gives the committed changes' records the sequences after `base`, in
/// batch order, and the commit time `at`.
fn stamp(batch: &mut [AgentChange], outcomes: &[ChangeOutcome], base: u64, at: SystemTime) {
    let mut next = base;
    for (change, outcome) in batch.iter_mut().zip(outcomes) {
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
}

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
