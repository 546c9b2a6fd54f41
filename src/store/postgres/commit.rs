//! The PostgreSQL commit path: the writer's connection and one transaction
//! per batch, in the steps of [`write_batch`], tried again when it loses a
//! race with another process. The batch statement and COMMIT are sent
//! together (pipelined), so the turn to commit that serialises all
//! processes is not held across a round trip between them. Depends on the
//! domain's records and [`super::batch`]; nothing above the store.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use futures_util::future::{join, join3};
use tokio::runtime::Runtime;
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::{PostgresStore, batch::BatchRows, batch::WRITE_BATCH, config, pg};
use crate::{
    domain::{AgentId, Clock, clock::to_stored_precision},
    store::{AgentChange, BatchId, ChangeOutcome, Result, StoreError},
};

/// The stored versions of a batch's agents, read in the turn to commit
/// ([`TAKE_TURN`]) when the batch statement cannot check them itself:
/// every commit writes under that lock, so the versions read here stay
/// current until this COMMIT, without locking the agents' rows.
const READ_VERSIONS: &str =
    "SELECT agent_id, version FROM agents WHERE agent_id = ANY($1::bytea[])";

/// Begins a commit's transaction and takes the head row's lock, which
/// serialises commits from here to COMMIT: the turn to commit. Every
/// commit takes it before it reads or writes anything else, and the
/// statements after it take their snapshots once it is granted, so they
/// see every commit before this one.
const TAKE_TURN: &str = "BEGIN; SELECT value FROM meta WHERE key = 'head' FOR UPDATE";

/// How many times a batch is tried again after losing a race with another
/// process (see [`write_batch`]).
const RACE_RETRIES: usize = 3;

/// The writer's connection, its prepared statements, and the runtime that
/// drives the connection while the commit thread waits for an answer.
pub(super) struct Writer {
    runtime: Runtime,
    client: Client,
    read_versions: Statement,
    write_batch: Statement,
    /// Whether a commit's transaction is open, holding the turn to commit
    /// ([`TAKE_TURN`]): from [`take_turn`] to the COMMIT or ROLLBACK sent
    /// after it.
    in_turn: bool,
}

impl Writer {
    /// A new connection to `url`, with the statements prepared.
    pub(super) fn connect(url: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::backend("starting the writer connection's runtime", e))?;
        let (client, connection) = runtime
            .block_on(config(url)?.connect(NoTls))
            .map_err(pg("connecting to PostgreSQL"))?;
        runtime.spawn(async move {
            // A lost connection fails the commit that uses it, which
            // reports it; the next commit connects again.
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "the writer connection ended");
            }
        });
        let (read_versions, write_batch) = runtime.block_on(join(
            client.prepare(READ_VERSIONS),
            client.prepare(&WRITE_BATCH),
        ));
        let prepared = pg("preparing statements");
        match (read_versions, write_batch) {
            (Ok(read_versions), Ok(write_batch)) => Ok(Writer {
                runtime,
                client,
                read_versions,
                write_batch,
                in_turn: false,
            }),
            (Err(err), _) | (_, Err(err)) => Err(prepared(err)),
        }
    }

    /// Whether the connection is gone (the store then connects again).
    pub(super) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

/// Waits for this process's turn to commit (see [`TAKE_TURN`]) and keeps
/// the transaction open for the next [`commit`]. While other processes
/// commit, the proposals that queue meanwhile join the batch, so batches
/// grow with the number of processes instead of shrinking.
pub(super) fn take_turn(w: &mut Writer) -> Result<()> {
    if !w.in_turn {
        if let Err(err) = w.runtime.block_on(w.client.batch_execute(TAKE_TURN)) {
            // BEGIN may have run before the lock failed: leave no aborted
            // transaction behind for the next commit to stumble on.
            let _ = w.runtime.block_on(w.client.batch_execute("ROLLBACK"));
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
        w.runtime
            .block_on(w.client.batch_execute("ROLLBACK"))
            .map_err(pg("ending an unused turn to commit"))?;
    }
    Ok(())
}

/// Sends [`TAKE_TURN`] unless the turn is held already; the statements
/// sent behind it run in its transaction. Whatever it answers, the turn
/// counts as ended once the COMMIT or ROLLBACK sent behind it answers.
async fn turn(client: &Client, held: bool) -> std::result::Result<(), tokio_postgres::Error> {
    if held {
        Ok(())
    } else {
        client.batch_execute(TAKE_TURN).await
    }
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
/// 1. When the batch allows it ([`checked_in_statement`]), one round trip
///    sends [`TAKE_TURN`] (unless the commit thread took the turn already,
///    [`take_turn`]), [`WRITE_BATCH`] with every change's expected version
///    ([`BatchRows::expect`]), and COMMIT. The statement writes nothing
///    when a version differs; the empty transaction then commits.
/// 2. Otherwise, or when a version differed, one round trip takes the turn
///    (unless held) and reads the stored versions ([`check_versions`]),
///    and a second sends [`WRITE_BATCH`] with the changes that match, and
///    COMMIT.
/// 3. [`stamp`] gives the records their sequences and time.
///
/// A statement that fails aborts its transaction, and the COMMIT sent
/// behind it rolls it back: nothing of the attempt stays. When COMMIT's
/// answer is lost, the outcome is [`StoreError::CommitOutcomeUnknown`].
fn write_batch(
    w: &mut Writer,
    of: &Batch<'_>,
    batch: &mut [AgentChange],
) -> Result<Option<Vec<ChangeOutcome>>> {
    if checked_in_statement(batch) {
        let mut rows = BatchRows::new(of.writer_id, of.id, of.at);
        for change in batch.iter() {
            rows.add(change);
            rows.expect(change);
        }
        let held = std::mem::take(&mut w.in_turn);
        let (turn, written, committed) = w.runtime.block_on(join3(
            turn(&w.client, held),
            w.client.query_opt(&w.write_batch, &rows.params()),
            w.client.batch_execute("COMMIT"),
        ));
        let written = match (turn, written) {
            (Ok(()), written) => written,
            (Err(err), _) => Err(err),
        };
        match ended(written, committed, "writing a batch")? {
            None => return Ok(None),
            Some(Some(row)) => {
                let outcomes = vec![ChangeOutcome::Committed; batch.len()];
                stamp(batch, &outcomes, base(&row), of.at);
                return Ok(Some(outcomes));
            }
            // A version differed: nothing was written.
            Some(None) => {}
        }
    }

    let held = std::mem::take(&mut w.in_turn);
    let (turn, stored) = w.runtime.block_on(join(
        turn(&w.client, held),
        read_versions(&w.client, &w.read_versions, batch),
    ));
    let stored = match (turn, stored) {
        (Ok(()), Ok(stored)) => stored,
        (Err(err), _) | (_, Err(err)) => {
            let rolled_back = w.runtime.block_on(w.client.batch_execute("ROLLBACK"));
            if is_retryable(&err) && rolled_back.is_ok() {
                return Ok(None);
            }
            return Err(pg("reading agent versions")(err));
        }
    };
    let outcomes = check_versions(stored, batch);
    let mut rows = BatchRows::new(of.writer_id, of.id, of.at);
    for (change, outcome) in batch.iter().zip(&outcomes) {
        if *outcome == ChangeOutcome::Committed {
            rows.add(change);
        }
    }
    let (written, committed) = w.runtime.block_on(join(
        w.client.query_opt(&w.write_batch, &rows.params()),
        w.client.batch_execute("COMMIT"),
    ));
    match ended(written, committed, "writing a batch")? {
        Some(Some(row)) => {
            stamp(batch, &outcomes, base(&row), of.at);
            Ok(Some(outcomes))
        }
        // Lost to another transaction, or (without expectations) no row:
        // tried again.
        _ => Ok(None),
    }
}

/// What a transaction whose last statement answered `written` and whose
/// COMMIT, sent behind it, answered `committed` did: `Some` with the
/// statement's row when it committed; `None` when PostgreSQL aborted it
/// for another transaction's sake ([`is_retryable`]) and COMMIT rolled it
/// back, so the batch may be tried again.
///
/// # Errors
/// [`StoreError::CommitOutcomeUnknown`] when COMMIT failed without an
/// earlier statement's error telling that the transaction was aborted:
/// the commit may have happened. Otherwise the statement's error, with
/// `context`: nothing was written.
fn ended(
    written: std::result::Result<Option<Row>, tokio_postgres::Error>,
    committed: std::result::Result<(), tokio_postgres::Error>,
    context: &'static str,
) -> Result<Option<Option<Row>>> {
    match (written, committed) {
        (Ok(row), Ok(())) => Ok(Some(row)),
        // The server refused a statement: the transaction was aborted
        // there, whatever became of COMMIT's answer.
        (Err(err), committed) if err.code().is_some() => {
            if is_retryable(&err) && committed.is_ok() {
                Ok(None)
            } else {
                Err(pg(context)(err))
            }
        }
        (Ok(_), Err(err)) | (Err(_), Err(err)) => Err(StoreError::CommitOutcomeUnknown {
            source: Box::new(err),
        }),
        // COMMIT answered, so the connection delivered every answer: a
        // failed statement aborted the transaction and COMMIT rolled it
        // back.
        (Err(err), Ok(())) => Err(pg(context)(err)),
    }
}

/// The base sequence a [`WRITE_BATCH`] row reports.
fn base(row: &Row) -> u64 {
    row.get::<_, i64>(0) as u64
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

/// Reads the stored versions of the batch's agents.
async fn read_versions(
    client: &Client,
    read_versions: &Statement,
    batch: &[AgentChange],
) -> std::result::Result<HashMap<AgentId, u64>, tokio_postgres::Error> {
    let ids: Vec<&[u8]> = batch
        .iter()
        .map(|c| c.agent_id.as_bytes().as_slice())
        .collect();
    let rows = client.query(read_versions, &[&ids]).await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let bytes: &[u8] = row.get(0);
            let key: [u8; 16] = bytes.try_into().ok()?;
            Some((AgentId::from_bytes(key), row.get::<_, i64>(1) as u64))
        })
        .collect())
}

/// Checks each change against its agent's `stored` version (read in the
/// turn), a later change of the same agent against the earlier one's
/// result.
fn check_versions(mut stored: HashMap<AgentId, u64>, batch: &[AgentChange]) -> Vec<ChangeOutcome> {
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
    outcomes
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
/// transaction (a deadlock, a serialization failure, or a new agent's id
/// that another commit stored first): nothing was written, and the same
/// batch may simply be tried again.
fn is_retryable(err: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    err.code().is_some_and(|code| {
        *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::LOCK_NOT_AVAILABLE
            || *code == SqlState::UNIQUE_VIOLATION
    })
}
