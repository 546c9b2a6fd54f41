//! The commit thread: the one writer of the store and of the agent table.
//!
//! Proposals queue on a channel, each already validated by the service
//! against the agent's current version while it holds the agent's writer
//! lock (see `write::plan`). The thread takes every proposal waiting (up to
//! `max_batch`) and runs one [`Batch`] through named steps:
//!
//! 1. [`Batch::prepare`]: proposals become store changes.
//! 2. [`Batch::persist`]: one store transaction (one fsync). The store
//!    assigns the sequences and the commit time, and answers each change:
//!    committed, or a conflict (its prior version is no longer stored).
//! 3. [`Batch::apply`]: the committed records go into the agent table, under
//!    one write lock, in sequence order, each building its event (through
//!    [`Publication::apply`](super::Publication::apply), as followed events do).
//! 4. [`Batch::publish`]: their events go onto the broadcast channel, in
//!    sequence order ([`Publication::publish`](super::Publication::publish)).
//! 5. [`Batch::reply`]: each proposer gets its outcome, and the agents'
//!    writer locks are released.
//!
//! Between 2 and 3, [`Batch::follow_preceding`]: events other processes
//! committed before the batch (on a shared store; elsewhere there are none)
//! are applied and published first (see `follow`).
//!
//! Because this thread is the only writer, sequence order is commit order
//! is publication order, and the table never shows a change the store has
//! not made durable.
//!
//! Between batches the thread answers requests to follow other processes'
//! commits (`follow`), and runs compaction in bounded chunks when asked (by
//! the compactor's timer or by `compact_now`; see `compaction`), so it
//! never holds the writer for long.

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError, atomic::Ordering, mpsc},
    time::Duration,
};

use tokio::sync::{OwnedMutexGuard, oneshot};
use tracing::{error, info, warn};

use super::{
    batch::{Answering, Batch, BatchIds},
    compaction::Compaction,
    follow,
};
use crate::{
    domain::{Agent, AgentId, AgentState, Metadata, RequestTag, TransitionRecord},
    service::Shared,
    store::{AgentIdentity, Retention, StoreError},
};

/// One step of a proposal: the target and what the caller said.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub to: AgentState,
    pub reason: String,
    pub triggered_by: String,
    pub principal: String,
    pub request: Option<Arc<RequestTag>>,
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

/// Where a proposer waits for its outcome.
pub(crate) type Reply = oneshot::Sender<Result<Committed, Rejected>>;

/// What the commit thread is asked to do.
pub(crate) enum Message {
    Propose(Proposal, Reply),
    /// Commit what is queued before it, close the store, stop.
    Close(oneshot::Sender<Result<(), Arc<StoreError>>>),
    /// Run compaction to completion now (chunk by chunk, committing queued
    /// proposals between chunks); reply with the rows deleted in the round.
    Compact(oneshot::Sender<Result<u64, Arc<StoreError>>>),
    /// Apply what other processes committed (a shared store): read the log
    /// after the table's head until it ends; reply with the new head.
    Follow(follow::Done),
    /// Another process announced commits up to this sequence (`u64::MAX`:
    /// of unknown extent): follow the log unless the table holds them by
    /// the time this is handled (a batch of this process follows what
    /// precedes it before it is applied, see `batch.rs`).
    Announced(u64),
}

/// How long the thread waits, after a commit, for the next proposal before
/// it lets the store settle ([`crate::store::Store::settle`]): long enough
/// that a steady stream of commits, even one client's one at a time, leaves
/// no such gap; short enough that a store gone quiet has settled before
/// most reads come.
const SETTLE_AFTER: Duration = Duration::from_millis(200);

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
    /// or writes refused). Every proposer is answered before this returns,
    /// or, for a committed batch answered [`Answering::FromRuntime`], by a
    /// task this spawns on the runtime.
    pub(crate) fn commit(
        &mut self,
        shared: &Shared,
        proposals: impl ExactSizeIterator<Item = (Proposal, Reply)>,
        from: Answering,
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
        if let Err(err) = batch.run(shared, from) {
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

/// What one turn of the thread took off the channel besides proposals.
#[derive(Default)]
struct Requests {
    close: Option<oneshot::Sender<Result<(), Arc<StoreError>>>>,
    follow: Vec<follow::Done>,
    /// The highest sequence announced by other processes.
    announced: Option<u64>,
    compact: Vec<oneshot::Sender<Result<u64, Arc<StoreError>>>>,
}

/// Runs until a `Close` message or until every sender is gone.
pub(crate) fn run(shared: Arc<Shared>, rx: mpsc::Receiver<Message>, writer: Arc<Mutex<Writer>>) {
    let max_batch = lock(&writer).settings.max_batch;
    let mut queue: Vec<(Proposal, Reply)> = Vec::with_capacity(max_batch);
    let mut compacting = false;
    // A batch was committed since the store last settled.
    let mut unsettled = false;
    loop {
        // While a compaction round is under way, only take what is queued;
        // after a commit, wait a moment and settle the store if nothing came.
        let first = if compacting {
            match rx.try_recv() {
                Ok(message) => Some(message),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => break,
            }
        } else if unsettled {
            match rx.recv_timeout(SETTLE_AFTER) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    settle(&shared, &writer);
                    unsettled = false;
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(message) => Some(message),
                Err(_) => break,
            }
        };
        if matches!(first, Some(Message::Propose(..))) {
            take_turn(&shared);
        }
        let mut requests = take_queued(&rx, first, &mut queue, max_batch);
        let mut writer = lock(&writer);
        writer.compaction.waiters.append(&mut requests.compact);
        unsettled |= !queue.is_empty();
        writer.commit(&shared, queue.drain(..), Answering::FromRuntime);
        if let Err(err) = shared.store.end_commit_turn() {
            warn!(error = %crate::error::chain(&err), "ending an unused turn to commit failed");
        }
        if requests.announced.is_some() {
            shared.follow_requested.store(false, Ordering::Release);
        }
        let announced_beyond = requests
            .announced
            .is_some_and(|sequence| sequence > shared.head());
        if announced_beyond || !requests.follow.is_empty() {
            follow::answer(&shared, requests.follow);
        }
        if let Some(done) = requests.close {
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

/// Has the store do the work it put off while commits kept coming (see
/// [`crate::store::Store::settle`]), unless writes are refused. A failure
/// is logged: nothing committed depends on it.
fn settle(shared: &Shared, writer: &Mutex<Writer>) {
    let writer = lock(writer);
    if writer.closed || writer.poisoned.is_some() {
        return;
    }
    if let Err(err) = shared.store.settle() {
        warn!(error = %crate::error::chain(&err), "settling the store after its commits failed");
    }
}

/// Waits for this process's turn to commit (see
/// [`crate::store::Store::take_commit_turn`]) before the batch is gathered.
/// A failure is logged: the commit then takes the turn itself, and reports
/// what fails to its proposers.
fn take_turn(shared: &Shared) {
    if let Err(err) = shared.store.take_commit_turn() {
        warn!(error = %crate::error::chain(&err), "waiting for the turn to commit failed");
    }
}

/// Takes `first` and what is queued behind it: proposals into `queue` (up
/// to `max_batch`), the other requests into the answer. Stops at a `Close`.
fn take_queued(
    rx: &mpsc::Receiver<Message>,
    first: Option<Message>,
    queue: &mut Vec<(Proposal, Reply)>,
    max_batch: usize,
) -> Requests {
    let mut requests = Requests::default();
    let mut next = first;
    while let Some(message) = next.take() {
        match message {
            Message::Propose(proposal, reply) => queue.push((proposal, reply)),
            Message::Close(done) => requests.close = Some(done),
            Message::Compact(done) => requests.compact.push(done),
            Message::Follow(done) => requests.follow.push(done),
            Message::Announced(sequence) => {
                requests.announced = requests.announced.max(Some(sequence));
            }
        }
        if requests.close.is_none() && queue.len() < max_batch {
            next = rx.try_recv().ok();
        }
    }
    requests
}

#[cfg(test)]
mod tests;
