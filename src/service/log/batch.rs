//! One commit batch on its way through the steps the commit thread runs
//! (see `commit` for the numbered list): prepare, persist, follow what
//! precedes it, apply, publish, reply.
//!
//! A batch touches the store, the agent table and the bus through
//! [`Publication`]; it must not depend on the write path's callers.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::OwnedMutexGuard;
use tracing::{debug, error, warn};

use super::{
    Publication,
    commit::{Committed, Proposal, Rejected, Reply},
    follow,
};
use crate::{
    domain::{AgentId, TransitionRecord},
    service::Shared,
    store::{AgentChange, BatchId, ChangeOutcome, StoreError},
};

/// Pauses between attempts to read the log before applying a batch that
/// other processes' commits precede; after the last, writes are refused.
const FOLLOW_RETRIES: &[Duration] = &[
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(1),
];

/// Batch ids: random start, then counting, so that a restarted process does
/// not reuse the ids of its predecessor's batches.
pub(super) struct BatchIds(u64);

impl BatchIds {
    pub(super) fn new() -> Self {
        BatchIds((AgentId::generate().as_uuid().as_u64_pair().1) >> 1)
    }

    pub(super) fn next(&mut self) -> BatchId {
        self.0 = (self.0 + 1) & (i64::MAX as u64);
        BatchId(self.0)
    }
}

/// Where a batch's proposers are answered from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answering {
    /// Here, on the committing thread: an inline commit, on a runtime
    /// worker already.
    Here,
    /// From a task on the service's runtime, when it has one: the commit
    /// thread, outside the runtime (see [`Batch::reply`]).
    FromRuntime,
}

/// One proposer waiting for its change.
struct Waiter {
    reply: Reply,
    guard: Option<OwnedMutexGuard<()>>,
}

/// One batch on its way through the steps; `changes`, `waiters` and (once
/// persisted) `outcomes` are indexed alike.
pub(super) struct Batch {
    id: BatchId,
    changes: Vec<AgentChange>,
    waiters: Vec<Waiter>,
    /// The store's answer for each change (filled by `persist`).
    outcomes: Vec<ChangeOutcome>,
    /// Each change's result (filled by `apply`).
    results: Vec<Result<Committed, Rejected>>,
    /// The events of the committed changes, in sequence order (filled by
    /// `apply`, sent by `publish`).
    publication: Publication,
}

/// A shared store error as the source of another.
#[derive(Debug)]
struct ArcError(Arc<StoreError>);

impl std::fmt::Display for ArcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ArcError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// How a persist failed.
enum PersistError {
    /// Rolled back: nothing of the batch is stored.
    Clean(Arc<StoreError>),
    /// The batch may or may not have reached the store.
    Uncertain(Arc<StoreError>),
}

impl Batch {
    /// Step 1: proposals become store changes, with their versions and
    /// states filled in (sequences and time come from the store).
    pub(super) fn prepare(
        id: BatchId,
        proposals: impl ExactSizeIterator<Item = (Proposal, Reply)>,
    ) -> Batch {
        let mut changes = Vec::with_capacity(proposals.len());
        let mut waiters = Vec::with_capacity(proposals.len());
        for (proposal, reply) in proposals {
            let (mut from, mut version) = proposal
                .prior
                .as_ref()
                .map_or((None, 0), |agent| (Some(agent.state), agent.version));
            let prior_version = version;
            let records = proposal
                .steps
                .into_iter()
                .map(|step| {
                    version += 1;
                    let record = TransitionRecord {
                        agent_id: proposal.agent_id,
                        from,
                        to: step.to,
                        at: std::time::UNIX_EPOCH,
                        reason: step.reason,
                        triggered_by: step.triggered_by,
                        principal: step.principal,
                        request: step.request.clone(),
                        metadata: step.metadata,
                        sequence: 0,
                        version,
                    };
                    from = Some(step.to);
                    Arc::new(record)
                })
                .collect();
            changes.push(AgentChange {
                agent_id: proposal.agent_id,
                prior_version,
                identity: proposal.identity,
                records,
            });
            waiters.push(Waiter {
                reply,
                guard: proposal.guard,
            });
        }
        Batch {
            id,
            changes,
            waiters,
            outcomes: Vec::new(),
            results: Vec::new(),
            publication: Publication::default(),
        }
    }

    /// Runs the steps after `prepare`.
    ///
    /// # Errors
    /// Only when the store failed in a way that leaves it uncertain whether
    /// the batch reached the disk; the caller must refuse further writes. A
    /// clean failure (rolled back) is answered to the proposers.
    pub(super) fn run(mut self, shared: &Shared, from: Answering) -> Result<(), Arc<StoreError>> {
        match self.persist(shared) {
            Ok(()) => {
                if self.follow_preceding(shared)? {
                    self.apply(shared);
                    self.publish(shared);
                    self.reply(shared, from);
                }
                Ok(())
            }
            Err(PersistError::Clean(err)) => {
                self.fail(&err);
                Ok(())
            }
            Err(PersistError::Uncertain(err)) => {
                self.fail(&Arc::new(StoreError::CommitOutcomeUnknown {
                    source: Box::new(ArcError(err)),
                }));
                recover_from_log(shared)
            }
        }
    }

    /// Step 2: one store transaction.
    fn persist(&mut self, shared: &Shared) -> Result<(), PersistError> {
        // One span per commit batch (exported over OTLP when configured).
        let span = tracing::info_span!("commit", batch = self.id.0, changes = self.changes.len());
        let _entered = span.enter();
        let started = Instant::now();
        match shared
            .store
            .commit(self.id, &mut self.changes, shared.clock.as_ref())
        {
            Ok(outcomes) => {
                let transitions = self.changes.iter().map(|c| c.records.len()).sum();
                shared
                    .metrics
                    .batch_committed(transitions, started.elapsed().as_secs_f64());
                self.outcomes = outcomes;
                Ok(())
            }
            Err(err) => {
                shared.metrics.batch_failed();
                let unknown = matches!(err, StoreError::CommitOutcomeUnknown { .. });
                let err = Arc::new(err);
                error!(error = %crate::error::chain(&*err), batch = self.changes.len(), "commit failed");
                if !unknown {
                    // Failed before the commit itself: rolled back.
                    return Err(PersistError::Clean(err));
                }
                match shared.store.batch_committed(self.id) {
                    // Confirmed rolled back: nothing of it was stored.
                    Ok(false) => Err(PersistError::Clean(Arc::new(StoreError::Backend {
                        context: "committing (rolled back)",
                        source: Box::new(ArcError(err)),
                    }))),
                    outcome => {
                        let found = outcome
                            .map(|committed| format!("committed: {committed}"))
                            .unwrap_or_else(|e| crate::error::chain(&e));
                        error!(
                            batch = self.id.0,
                            found, "a failed commit may have reached the store; reading its log"
                        );
                        Err(PersistError::Uncertain(err))
                    }
                }
            }
        }
    }

    /// Before step 3, on a shared store: events other processes committed
    /// before this batch go into the table first, so that the table and the
    /// bus stay in sequence order.
    ///
    /// Returns whether the batch may be applied now; `false` on a shared
    /// store whose log could not be read: the proposers were answered and
    /// the follower applies the batch later, in order.
    ///
    /// # Errors
    /// The log could not be read after retries on a store only this process
    /// writes: the batch is committed but cannot be applied in order, so
    /// writes must be refused.
    fn follow_preceding(&mut self, shared: &Shared) -> Result<bool, Arc<StoreError>> {
        let Some(first) = self
            .changes
            .iter()
            .zip(&self.outcomes)
            .filter(|(_, outcome)| **outcome == ChangeOutcome::Committed)
            .find_map(|(change, _)| change.records.first().map(|r| r.sequence))
        else {
            return Ok(true);
        };
        let mut retries = FOLLOW_RETRIES.iter();
        loop {
            match follow::apply_until(shared, first) {
                Ok(_) => return Ok(true),
                Err(err) => match retries.next() {
                    Some(pause) => {
                        warn!(error = %crate::error::chain(&err), "reading the log before applying a batch failed; retrying");
                        std::thread::sleep(*pause);
                    }
                    None => {
                        let err = Arc::new(StoreError::CommitOutcomeUnknown {
                            source: Box::new(err),
                        });
                        self.fail_committed(&err);
                        if shared.store.is_shared() {
                            // The follower applies the batch, in order, once
                            // the log can be read again.
                            warn!(error = %crate::error::chain(&*err), "a committed batch waits for the follower to apply it");
                            return Ok(false);
                        }
                        error!(error = %crate::error::chain(&*err), "a committed batch cannot be applied in order; refusing writes until restart");
                        return Err(err);
                    }
                },
            }
        }
    }

    /// Step 3: the committed records go into the table, in sequence order,
    /// under one write lock.
    fn apply(&mut self, shared: &Shared) {
        let mut table = shared.write_table();
        for (change, outcome) in self.changes.iter_mut().zip(&self.outcomes) {
            let actual = match *outcome {
                ChangeOutcome::Conflict { actual } => {
                    self.results.push(Err(Rejected::Conflict { actual }));
                    continue;
                }
                ChangeOutcome::Committed => change.prior_version,
            };
            let mut records = Vec::with_capacity(change.records.len());
            let mut agent = None;
            for record in change.records.drain(..) {
                match self.publication.apply(
                    &mut table,
                    Arc::clone(&record),
                    change.identity.as_ref(),
                    &shared.metrics,
                ) {
                    Some(after) => {
                        agent = Some(Arc::clone(after));
                        records.push(record);
                    }
                    None => {
                        error!(agent_id = %record.agent_id, sequence = record.sequence, "a committed record does not apply to the table");
                    }
                }
            }
            self.results.push(match agent {
                Some(agent) => Ok(Committed { agent, records }),
                None => Err(Rejected::Conflict { actual }),
            });
        }
        shared.metrics.set_head(table.head);
    }

    /// Step 4: the events, in sequence order, once the table's lock is
    /// released.
    fn publish(&mut self, shared: &Shared) {
        std::mem::take(&mut self.publication).publish(&shared.bus);
    }

    /// Step 5: each proposer's outcome; then its writer lock is released
    /// (the table shows the change, so the next change to the agent may be
    /// validated).
    ///
    /// On the commit thread the answers are sent from one task on the
    /// runtime: waking each proposer from outside the runtime would queue
    /// it on the runtime's shared queue and wake a worker for it, and the
    /// proposers that share a connection would then finish one at a time,
    /// each answer leaving in a write of its own. Woken from a worker, they
    /// queue on that worker and finish in one turn, so the answers that
    /// share a connection leave together (see `server::Unvectored`). An
    /// inline commit (already on a worker) answers directly.
    fn reply(self, shared: &Shared, from: Answering) {
        let Batch {
            waiters, results, ..
        } = self;
        match (&shared.runtime, from) {
            (Some(runtime), Answering::FromRuntime) => {
                runtime.spawn(async move { answer(waiters, results) });
            }
            _ => answer(waiters, results),
        }
    }

    /// Committed but not applied: every proposer gets `err` (the change may
    /// be visible after a restart).
    fn fail_committed(&mut self, err: &Arc<StoreError>) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.reply.send(Err(Rejected::Store(Arc::clone(err))));
        }
    }

    /// A failed persist: every proposer gets the store's error.
    fn fail(self, err: &Arc<StoreError>) {
        for waiter in self.waiters {
            let _ = waiter.reply.send(Err(Rejected::Store(Arc::clone(err))));
        }
    }
}

/// After a commit whose outcome is unknown: whatever of the batch reached
/// the store is in its log, so reading the log brings the table back in
/// line with the store (the proposers were told the outcome is unknown).
///
/// # Errors
/// The log cannot be read on a store only this process writes: writes must
/// be refused until a restart.
fn recover_from_log(shared: &Shared) -> Result<(), Arc<StoreError>> {
    match follow::apply_until(shared, u64::MAX) {
        Ok(head) => {
            warn!(
                head,
                "after a failed commit the table was brought in line with the store's log"
            );
            Ok(())
        }
        // A shared store is followed anyway (the follower applies what
        // landed once the store answers again), and every change is a
        // compare-and-set against the stored version: nothing to refuse.
        Err(follow_err) if shared.store.is_shared() => {
            warn!(error = %crate::error::chain(&follow_err), "the store's log cannot be read after a failed commit; the follower will catch up");
            Ok(())
        }
        Err(follow_err) => {
            error!(error = %crate::error::chain(&follow_err), "the store's log cannot be read after a failed commit");
            Err(Arc::new(StoreError::Uncertain))
        }
    }
}

/// Sends each proposer its result, then releases its writer lock.
fn answer(waiters: Vec<Waiter>, results: Vec<Result<Committed, Rejected>>) {
    for (waiter, result) in waiters.into_iter().zip(results) {
        if let Ok(committed) = &result {
            for record in &committed.records {
                debug!(agent_id = %record.agent_id, from = ?record.from, to = %record.to, sequence = record.sequence, "agent transitioned");
            }
        }
        let _ = waiter.reply.send(result);
        drop(waiter.guard);
    }
}
