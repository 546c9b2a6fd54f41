//! The PostgreSQL commit path: the writer's connection and one transaction
//! per batch, in the steps of [`write_batch`], tried again when it loses a
//! race with another process. Depends on the domain's records and
//! [`super::batch`]; nothing above the store.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use postgres::{Client, Statement};

use super::{PostgresStore, batch::BatchRows, batch::WRITE_BATCH, connect, pg};
use crate::{
    domain::{AgentId, Clock, clock::to_stored_precision},
    store::{AgentChange, BatchId, ChangeOutcome, Result, StoreError},
};

/// Step 1 of a commit: the stored versions of the batch's agents. Read in
/// the turn to commit ([`TAKE_TURN`]): every commit writes under that lock,
/// so the versions read here stay current until this COMMIT, without
/// locking the agents' rows.
const READ_VERSIONS: &str =
    "SELECT agent_id, version FROM agents WHERE agent_id = ANY($1::bytea[])";

/// Begins a commit's transaction and takes the head row's lock, which
/// serialises commits from here to COMMIT: the turn to commit. Every
/// commit takes it before it reads or writes anything else. One round
/// trip, as a plain BEGIN would be.
const TAKE_TURN: &str = "BEGIN; SELECT value FROM meta WHERE key = 'head' FOR UPDATE";

/// How many times a batch is tried again after losing a race with another
/// process (see [`write_batch`]).
const RACE_RETRIES: usize = 3;

/// The writer's connection and its prepared statements.
pub(super) struct Writer {
    pub client: Client,
    read_versions: Statement,
    write_batch: Statement,
    /// Whether a commit's transaction is open, holding the turn to commit
    /// ([`TAKE_TURN`]): from [`take_turn`] or the start of an attempt, to
    /// its COMMIT or ROLLBACK.
    in_turn: bool,
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
            read_versions: prepare(READ_VERSIONS)?,
            write_batch: prepare(&WRITE_BATCH)?,
            client,
            in_turn: false,
        })
    }
}

/// Waits for this process's turn to commit (see [`TAKE_TURN`]) and keeps
/// the transaction open for the next [`commit`]. While other processes
/// commit, the proposals that queue meanwhile join the batch, so batches
/// grow with the number of processes instead of shrinking.
pub(super) fn take_turn(w: &mut Writer) -> Result<()> {
    if !w.in_turn {
        if let Err(err) = w.client.batch_execute(TAKE_TURN) {
            // BEGIN may have run before the lock failed: leave no aborted
            // transaction behind for the next commit to stumble on.
            let _ = w.client.batch_execute("ROLLBACK");
            return Err(pg("waiting for the turn to commit")(err));
        }
        w.in_turn = true;
    }
    Ok(())
}

/// Ends a turn that no commit used (the batch was refused before it
/// reached the store): rolls its transaction back.
pub(super) fn end_turn(w: &mut Writer) -> Result<()> {
    if w.in_turn {
        w.in_turn = false;
        w.client
            .batch_execute("ROLLBACK")
            .map_err(pg("ending an unused turn to commit"))?;
    }
    Ok(())
}

/// What every attempt at one batch's commit writes alike.
struct Batch<'a> {
    writer_id: &'a [u8; 16],
    id: BatchId,
    /// The commit time, the same in every attempt.
    at: SystemTime,
}

/// Commits `batch` (see [`crate::store::Store::commit`]), trying again
/// when an attempt lost a race with another process.
pub(super) fn commit(
    store: &PostgresStore,
    id: BatchId,
    batch: &mut [AgentChange],
    clock: &dyn Clock,
) -> Result<Vec<ChangeOutcome>> {
    let attempt_of = Batch {
        writer_id: &store.writer_id,
        id,
        at: to_stored_precision(clock.now()),
    };
    for attempt in 1.. {
        let written = store.with_writer(|w| write_batch(w, &attempt_of, batch))?;
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
/// PostgreSQL aborted it for another transaction's sake (a deadlock with a
/// process that locks in another order), or one of the batch's new ids
/// exists after all (a safety net: registrations commit in the turn too).
///
/// 0. [`take_turn`], unless the commit thread took it already;
/// 1. each change is checked against its agent's stored version, by the
///    statement of step 2 itself or, when that cannot, by
///    [`check_versions`] before it;
/// 2. [`WRITE_BATCH`] writes the [`BatchRows`] of the changes that passed
///    at sequences after the counter, which it advances;
/// 3. COMMIT; its failure is [`StoreError::CommitOutcomeUnknown`];
/// 4. [`stamp`] gives the records their sequences and time.
///
/// An attempt that ends before its COMMIT is rolled back here.
fn write_batch(
    w: &mut Writer,
    of: &Batch<'_>,
    batch: &mut [AgentChange],
) -> Result<Option<Vec<ChangeOutcome>>> {
    take_turn(w)?;
    let written = write_in_turn(w, of, batch);
    if w.in_turn {
        // Ended before COMMIT: nothing of it stays.
        let rolled_back = end_turn(w);
        if written.is_ok() {
            rolled_back?;
        }
    }
    written
}

/// Steps 1 to 4 of [`write_batch`], in the open turn: first as one
/// statement that checks the versions itself ([`BatchRows::expect`]), when
/// the batch allows it ([`checked_in_statement`]); when that finds a
/// version changed, or the batch does not allow it, with the versions read
/// first.
fn write_in_turn(
    w: &mut Writer,
    of: &Batch<'_>,
    batch: &mut [AgentChange],
) -> Result<Option<Vec<ChangeOutcome>>> {
    let mut written = None;
    if checked_in_statement(batch) {
        let mut rows = BatchRows::new(of.writer_id, of.id, of.at);
        for change in batch.iter() {
            rows.add(change);
            rows.expect(change);
        }
        let Some(row) = write_rows(w, &rows)? else {
            return Ok(None);
        };
        written = row.map(|row| {
            (
                row,
                rows.new_agents(),
                vec![ChangeOutcome::Committed; batch.len()],
            )
        });
    }
    let (row, new_agents, outcomes) = match written {
        Some(written) => written,
        None => {
            let Some(outcomes) = check_versions(&mut w.client, &w.read_versions, batch)? else {
                return Ok(None);
            };
            let mut rows = BatchRows::new(of.writer_id, of.id, of.at);
            for (change, outcome) in batch.iter().zip(&outcomes) {
                if *outcome == ChangeOutcome::Committed {
                    rows.add(change);
                }
            }
            let Some(Some(row)) = write_rows(w, &rows)? else {
                // Lost to another transaction, or (without expectations) no
                // row: tried again.
                return Ok(None);
            };
            (row, rows.new_agents(), outcomes)
        }
    };
    let base = row.get::<_, i64>(0) as u64;
    let created: i64 = row.get(1);
    if created != new_agents as i64 {
        // Rolled back by the caller.
        return Ok(None);
    }
    w.in_turn = false;
    w.client
        .batch_execute("COMMIT")
        .map_err(|e| StoreError::CommitOutcomeUnknown {
            source: Box::new(e),
        })?;
    stamp(batch, &outcomes, base, of.at);
    Ok(Some(outcomes))
}

/// Whether [`WRITE_BATCH`] can check `batch`'s versions itself: each agent
/// once (a later change of an agent is checked against the earlier one's
/// result, which only [`check_versions`] does), and no change from version
/// 0 but a registration.
fn checked_in_statement(batch: &[AgentChange]) -> bool {
    let mut seen = std::collections::HashSet::with_capacity(batch.len());
    batch.iter().all(|change| {
        seen.insert(change.agent_id) && (change.prior_version != 0 || change.identity.is_some())
    })
}

/// Runs [`WRITE_BATCH`] with `rows`: `None` when PostgreSQL aborted it for
/// another transaction's sake ([`is_retryable`]); `Some(None)` when an
/// expected version did not match (nothing written).
fn write_rows(w: &mut Writer, rows: &BatchRows<'_>) -> Result<Option<Option<postgres::Row>>> {
    match w.client.query_opt(&w.write_batch, &rows.params()) {
        Ok(row) => Ok(Some(row)),
        Err(err) if is_retryable(&err) => Ok(None),
        Err(err) => Err(pg("writing a batch")(err)),
    }
}

/// Reads the stored versions of the batch's agents (in the turn) and checks
/// each change against its agent's (a later change of the same agent
/// against the earlier one's result). `None` when PostgreSQL aborted the
/// transaction for another's sake ([`is_retryable`]).
fn check_versions(
    client: &mut Client,
    read_versions: &Statement,
    batch: &[AgentChange],
) -> Result<Option<Vec<ChangeOutcome>>> {
    let ids: Vec<&[u8]> = batch
        .iter()
        .map(|c| c.agent_id.as_bytes().as_slice())
        .collect();
    let stored = match client.query(read_versions, &[&ids]) {
        Ok(rows) => rows,
        Err(err) if is_retryable(&err) => return Ok(None),
        Err(err) => return Err(pg("reading agent versions")(err)),
    };
    let mut stored: HashMap<AgentId, u64> = stored
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
