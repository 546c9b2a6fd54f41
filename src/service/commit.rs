//! The commit thread: the one writer of the store and of the agent table.
//!
//! Proposals queue on a channel, each already validated by the service
//! against the agent's current version while it holds the agent's writer
//! lock. The thread takes every proposal waiting (up to `max_batch`) and
//! runs one [`Batch`] through named steps:
//!
//! 1. [`Batch::prepare`]: proposals become store changes.
//! 2. [`Batch::persist`]: one store transaction (one fsync). The store
//!    assigns the sequences and the commit time, and answers each change:
//!    committed, or a conflict (its prior version is no longer stored).
//! 3. [`Batch::apply`]: the committed records go into the agent table, under
//!    one write lock, in sequence order.
//! 4. [`Batch::publish`]: their events go onto the broadcast channel, in
//!    sequence order.
//! 5. [`Batch::reply`]: each proposer gets its outcome, and the agents'
//!    writer locks are released.
//!
//! Because this thread is the only writer, sequence order is commit order
//! is publication order, and the table never shows a change the store has
//! not made durable.
//!
//! Compaction runs on the same thread between batches, in bounded chunks,
//! when asked (by the compactor's timer or by `compact_now`), so it never
//! holds the writer for long.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedMutexGuard, oneshot};
use tracing::{debug, error, info, warn};

use super::Shared;
use crate::{
    domain::{Agent, AgentId, AgentState, LifecycleEvent, Metadata, TransitionRecord},
    store::{AgentChange, AgentIdentity, BatchId, ChangeOutcome, Retention, StoreError},
};

/// Events read from the log per step when following other processes.
const FOLLOW_PAGE: usize = 1_000;

/// Pauses between attempts to read the log before applying a batch that
/// other processes' commits precede; after the last, writes are refused.
const FOLLOW_RETRIES: &[Duration] = &[
    Duration::from_millis(50),
    Duration::from_millis(250),
    Duration::from_secs(1),
];

/// Rows deleted per compaction step; bounds how long one step holds the
/// writer (a few milliseconds).
const COMPACTION_CHUNK: usize = 2_000;

/// One step of a proposal: the target and what the caller said.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub to: AgentState,
    pub reason: String,
    pub triggered_by: String,
    pub principal: String,
    pub request: Option<Arc<crate::domain::RequestTag>>,
    pub metadata: Metadata,
}

/// A change the service validated, ready to commit. Every step of it
/// commits, or none.
#[derive(Debug)]
pub(crate) struct Proposal {
    pub agent_id: AgentId,
    /// The agent as validated; `None` for a registration.
    pub prior: Option<Arc<Agent>>,
    /// Name and labels, for a registration.
    pub identity: Option<AgentIdentity>,
    pub steps: Vec<Step>,
    /// The agent's writer lock (transitions only), held until the change is
    /// applied or refused, so that no other change to the agent is validated
    /// against a version this one is about to replace.
    pub guard: Option<OwnedMutexGuard<()>>,
}

/// What a committed proposal produced.
#[derive(Debug)]
pub(crate) struct Committed {
    pub agent: Arc<Agent>,
    pub records: Vec<Arc<TransitionRecord>>,
}

/// Why a proposal was not committed.
#[derive(Debug)]
pub(crate) enum Rejected {
    /// The store holds version `actual` of the agent (0: none), not the one
    /// the proposal was based on: for a registration, the id exists.
    Conflict { actual: u64 },
    /// The store failed; nothing of the batch applied.
    Store(Arc<StoreError>),
    /// The commit thread has stopped (the service was closed).
    Closed,
}

pub(crate) type Reply = oneshot::Sender<Result<Committed, Rejected>>;

pub(crate) enum Message {
    Propose(Proposal, Reply),
    /// Commit what is queued before it, close the store, stop.
    Close(oneshot::Sender<Result<(), Arc<StoreError>>>),
    /// Run compaction to completion now (chunk by chunk, committing queued
    /// proposals between chunks); reply with the rows deleted in the round.
    Compact(oneshot::Sender<Result<u64, Arc<StoreError>>>),
    /// Apply what other processes committed (a shared store): read the log
    /// after the table's head until it ends; reply with the new head.
    Follow(Option<oneshot::Sender<Result<u64, Arc<StoreError>>>>),
}

/// Settings of the thread.
pub(crate) struct Settings {
    pub max_batch: usize,
    pub retention: Retention,
}

/// The writer's state: batch ids, the compaction round under way, and
/// whether writes are refused. One [`Writer`] exists per service, behind a
/// mutex: the commit thread holds it while it works on what it received,
/// and on a store that commits in memory ([`crate::store::Store::commits_in_memory`])
/// a proposer holds it to commit its own change, so that either way one
/// batch is written at a time, in sequence order.
pub(crate) struct Writer {
    settings: Settings,
    batch_ids: BatchIds,
    compaction: Compaction,
    /// Set when a failed commit may still have reached the disk: from then
    /// on the table may disagree with the store, so every write is refused
    /// until a restart reloads the store.
    poisoned: Option<Arc<StoreError>>,
    /// The store was closed: every proposal is refused.
    closed: bool,
}

impl Writer {
    pub(crate) fn new(settings: Settings) -> Self {
        Writer {
            settings,
            batch_ids: BatchIds::new(),
            compaction: Compaction::default(),
            poisoned: None,
            closed: false,
        }
    }

    /// Commits `proposals` as one batch, or refuses them all (store closed
    /// or writes refused); every proposer is answered before this returns.
    pub(crate) fn commit(
        &mut self,
        shared: &Shared,
        proposals: impl ExactSizeIterator<Item = (Proposal, Reply)>,
    ) {
        if proposals.len() == 0 {
            return;
        }
        if self.closed {
            for (_, reply) in proposals {
                let _ = reply.send(Err(Rejected::Closed));
            }
            return;
        }
        if let Some(err) = &self.poisoned {
            for (_, reply) in proposals {
                let _ = reply.send(Err(Rejected::Store(Arc::clone(err))));
            }
            return;
        }
        let batch = Batch::prepare(self.batch_ids.next(), proposals);
        if let Err(err) = batch.run(shared) {
            self.poisoned = Some(err);
        }
    }

    /// Closes the store; later proposals are refused.
    fn close(&mut self, shared: &Shared) -> Result<(), StoreError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        shared.store.close()
    }
}

/// Locks the writer. A panic while it was held cannot leave a batch half
/// applied to the table (the table is updated under its own lock), so a
/// poisoned lock is taken over.
pub(crate) fn lock(writer: &Mutex<Writer>) -> MutexGuard<'_, Writer> {
    writer.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs until a `Close` message or until every sender is gone.
pub(crate) fn run(shared: Arc<Shared>, rx: mpsc::Receiver<Message>, writer: Arc<Mutex<Writer>>) {
    let max_batch = lock(&writer).settings.max_batch;
    let mut queue: Vec<(Proposal, Reply)> = Vec::with_capacity(max_batch);
    let mut compacting = false;
    loop {
        // While a compaction round is under way, only take what is queued.
        let first = if compacting {
            match rx.try_recv() {
                Ok(message) => Some(message),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(message) => Some(message),
                Err(_) => break,
            }
        };
        let mut close = None;
        let mut followers = Vec::new();
        let mut compact = Vec::new();
        let mut next = first;
        while let Some(message) = next.take() {
            match message {
                Message::Propose(proposal, reply) => queue.push((proposal, reply)),
                Message::Close(done) => close = Some(done),
                Message::Compact(done) => compact.push(done),
                Message::Follow(done) => followers.push(done),
            }
            if close.is_none() && queue.len() < max_batch {
                next = rx.try_recv().ok();
            }
        }
        let mut writer = lock(&writer);
        writer.compaction.waiters.append(&mut compact);
        writer.commit(&shared, queue.drain(..));
        if !followers.is_empty() {
            shared.follow_requested.store(false, Ordering::Release);
            let result = follow(&shared, u64::MAX).map_err(Arc::new);
            if let Err(err) = &result {
                warn!(error = %crate::error::chain(&**err), "reading commits of other processes failed");
            }
            for done in followers.into_iter().flatten() {
                let _ = done.send(result.clone());
            }
        }
        if let Some(done) = close {
            let result = writer.close(&shared).map_err(Arc::new);
            info!("store closed");
            let _ = done.send(result);
            return;
        }
        if writer.compaction.active() {
            let retention = writer.settings.retention;
            writer.compaction.step(&shared, &retention);
        }
        compacting = writer.compaction.active();
    }
    if let Err(err) = lock(&writer).close(&shared) {
        error!(error = %crate::error::chain(&err), "closing the store failed");
    }
}

struct BatchIds(u64);

impl BatchIds {
    fn new() -> Self {
        BatchIds((AgentId::generate().as_uuid().as_u64_pair().1) >> 1)
    }

    fn next(&mut self) -> BatchId {
        self.0 = (self.0 + 1) & (i64::MAX as u64);
        BatchId(self.0)
    }
}

/// One proposer waiting for its change.
struct Waiter {
    reply: Reply,
    guard: Option<OwnedMutexGuard<()>>,
}

/// One batch on its way through the steps; `changes`, `waiters` and (once
/// persisted) `outcomes` are indexed alike.
struct Batch {
    id: BatchId,
    changes: Vec<AgentChange>,
    waiters: Vec<Waiter>,
    /// The store's answer for each change (filled by `persist`).
    outcomes: Vec<ChangeOutcome>,
    /// Each change's result (filled by `apply`).
    results: Vec<Result<Committed, Rejected>>,
    /// The events of the committed changes, in sequence order.
    events: Vec<Arc<LifecycleEvent>>,
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
    fn prepare(id: BatchId, proposals: impl Iterator<Item = (Proposal, Reply)>) -> Batch {
        let mut changes = Vec::new();
        let mut waiters = Vec::new();
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
            events: Vec::new(),
        }
    }

    /// Runs the steps after `prepare`.
    ///
    /// # Errors
    /// Only when the store failed in a way that leaves it uncertain whether
    /// the batch reached the disk; the caller must refuse further writes. A
    /// clean failure (rolled back) is answered to the proposers.
    fn run(mut self, shared: &Shared) -> Result<(), Arc<StoreError>> {
        match self.persist(shared) {
            Ok(()) => {
                if self.follow_preceding(shared)? {
                    self.apply(shared);
                    self.publish(shared);
                    self.reply(shared);
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
                // Whatever of the batch reached the store is in its log:
                // reading the log brings the table back in line with the
                // store (the proposers were told the outcome is unknown).
                // Only when the log cannot be read are writes refused.
                match follow(shared, u64::MAX) {
                    Ok(head) => {
                        warn!(
                            head,
                            "after a failed commit the table was brought in line with the store's log"
                        );
                        Ok(())
                    }
                    // A shared store is followed anyway (the follower
                    // applies what landed once the store answers again),
                    // and every change is a compare-and-set against the
                    // stored version: nothing to refuse.
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
            match follow(shared, first) {
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
                match table.apply(
                    Arc::clone(&record),
                    change.identity.as_ref(),
                    &shared.metrics,
                ) {
                    Some(after) => {
                        self.events.push(Arc::new(LifecycleEvent::new(
                            Arc::clone(&record),
                            Arc::clone(&after),
                        )));
                        agent = Some(after);
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

    /// Step 4: the events, in sequence order. No receivers is fine: nobody
    /// is watching.
    fn publish(&self, shared: &Shared) {
        for event in &self.events {
            let _ = shared.bus.send(Arc::clone(event));
        }
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
    fn reply(self, shared: &Shared) {
        let Batch {
            waiters, results, ..
        } = self;
        match &shared.runtime {
            Some(runtime) if tokio::runtime::Handle::try_current().is_err() => {
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

/// Applies events of the log after the table's head and before
/// `stop_before` (other processes' commits; on a store only this process
/// writes there are none), in sequence order, and publishes them. Returns
/// the table's new head.
///
/// # Errors
/// The log could not be read, or it has a gap (events compacted before this
/// process applied them).
fn follow(shared: &Shared, stop_before: u64) -> Result<u64, StoreError> {
    loop {
        let after = shared.head();
        if after.saturating_add(1) >= stop_before {
            return Ok(after);
        }
        let page = shared.store.events_after(after, FOLLOW_PAGE)?;
        // A short page is the end of the log as of the read: no need to ask
        // again.
        let last_page = page.len() < FOLLOW_PAGE;
        let records: Vec<_> = page
            .into_iter()
            .take_while(|r| r.sequence < stop_before)
            .collect();
        let Some(first) = records.first() else {
            // Nothing to apply: either the log ends here, or the events
            // after `after` are gone (compacted before this process applied
            // them), which must not pass for "nothing happened".
            let missing = if stop_before == u64::MAX {
                shared.store.head()? > after
            } else {
                true
            };
            if missing {
                return Err(StoreError::Corrupt(format!(
                    "the event log has no events after {after} although more were committed: \
                     they were compacted before this process applied them; restart it"
                )));
            }
            return Ok(after);
        };
        if first.sequence != after + 1 {
            return Err(StoreError::Corrupt(format!(
                "the event log continues at {} after {after}: events were compacted before this process applied them; restart it",
                first.sequence
            )));
        }
        let created: Vec<AgentId> = records
            .iter()
            .filter(|r| r.from.is_none())
            .map(|r| r.agent_id)
            .collect();
        let identities: HashMap<AgentId, AgentIdentity> = if created.is_empty() {
            HashMap::new()
        } else {
            shared.store.identities(&created)?.into_iter().collect()
        };
        let mut events = Vec::with_capacity(records.len());
        {
            let mut table = shared.write_table();
            for record in records {
                if record.sequence <= table.head {
                    continue;
                }
                let identity = identities.get(&record.agent_id);
                match table.apply(Arc::clone(&record), identity, &shared.metrics) {
                    Some(agent) => events.push(Arc::new(LifecycleEvent::new(record, agent))),
                    None => {
                        return Err(StoreError::Corrupt(format!(
                            "event {} of agent {} does not apply to the table",
                            record.sequence, record.agent_id
                        )));
                    }
                }
            }
            shared.metrics.set_head(table.head);
        }
        for event in events {
            let _ = shared.bus.send(event);
        }
        if last_page {
            return Ok(shared.head());
        }
    }
}

/// A compaction round in progress and who waits for its end.
#[derive(Default)]
struct Compaction {
    waiters: Vec<oneshot::Sender<Result<u64, Arc<StoreError>>>>,
    deleted: u64,
}

impl Compaction {
    fn active(&self) -> bool {
        !self.waiters.is_empty()
    }

    /// One bounded chunk; queued proposals are committed before the next
    /// one, so compaction never holds writers for long.
    fn step(&mut self, shared: &Shared, retention: &Retention) {
        let result = shared.store.compact(
            retention,
            shared.head(),
            COMPACTION_CHUNK,
            shared.clock.as_ref(),
        );
        match result {
            Ok(deleted) => {
                self.deleted += deleted as u64;
                if deleted > 0 {
                    debug!(deleted, "compacted the event log");
                }
                if deleted < COMPACTION_CHUNK {
                    for done in self.waiters.drain(..) {
                        let _ = done.send(Ok(self.deleted));
                    }
                    self.deleted = 0;
                }
            }
            Err(err) => {
                warn!(error = %crate::error::chain(&err), "compaction failed");
                let err = Arc::new(err);
                for done in self.waiters.drain(..) {
                    let _ = done.send(Err(Arc::clone(&err)));
                }
                self.deleted = 0;
            }
        }
    }
}
