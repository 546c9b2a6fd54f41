//! The commit thread: the one writer of the store and of the agent table.
//!
//! Requests queue on a channel; the thread takes every request waiting
//! (up to `max_batch`), validates each against the table, assigns the next
//! global sequences, commits them in one store transaction (one fsync: group
//! commit), applies them to the table, publishes their events in sequence
//! order and replies. Because it is the only writer, sequence order is
//! commit order is publication order, and the table never shows a change the
//! store has not made durable.
//!
//! Compaction runs on the same thread between batches, in bounded chunks, so
//! it never holds the writer for long.

use std::{
    collections::HashMap,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::{Shared, Slot};
use crate::{
    domain::{Agent, AgentId, AgentState, Labels, LifecycleEvent, Metadata, TransitionRecord},
    store::{AgentChange, Retention, StoreError},
};

/// Rows deleted per compaction step; bounds how long one step holds the
/// writer (a few milliseconds).
const COMPACTION_CHUNK: usize = 2_000;

/// One step of a proposal: the target and what the caller said.
#[derive(Clone, Debug)]
pub(crate) struct Step {
    pub to: AgentState,
    pub reason: String,
    pub triggered_by: String,
    pub metadata: Metadata,
}

/// A change one request asks for. Every step of it commits, or none.
#[derive(Debug)]
pub(crate) enum Proposal {
    /// Create the agent with its registration step.
    Register {
        id: AgentId,
        name: Arc<str>,
        labels: Arc<Labels>,
        step: Step,
    },
    /// Apply `steps` to an agent whose version is `prior_version`.
    Transition {
        id: AgentId,
        prior_version: u64,
        steps: Vec<Step>,
        /// The agent's writer lock, held until the change is applied (or
        /// refused), so that no other change to the agent is validated
        /// against a version this one is about to replace.
        guard: tokio::sync::OwnedMutexGuard<()>,
    },
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
    /// Register: the id exists (the agent as committed).
    Exists(Arc<Agent>),
    /// Transition: no such agent.
    Missing,
    /// Transition: the agent moved on since the caller validated.
    Stale { expected: u64, actual: u64 },
    /// Transition: the policy refuses a step.
    NotAllowed { from: AgentState, to: AgentState },
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
}

/// Settings of the thread.
pub(crate) struct Settings {
    pub max_batch: usize,
    pub retention: Retention,
    pub compaction_interval: Duration,
}

/// Runs until a `Close` message or until every sender is gone.
pub(crate) fn run(shared: Arc<Shared>, rx: mpsc::Receiver<Message>, settings: Settings) {
    let compacting = !settings.retention.keeps_everything();
    let mut next_compaction = Instant::now() + settings.compaction_interval;
    let mut batch: Vec<(Proposal, Reply)> = Vec::with_capacity(settings.max_batch);
    // Callers of `compact_now`, answered when the current round ends.
    let mut waiters: Vec<oneshot::Sender<Result<u64, Arc<StoreError>>>> = Vec::new();
    let mut round_deleted = 0u64;
    // Set when a failed commit may still have reached the disk: from then on
    // the table may disagree with the store, so every write is refused until
    // a restart reloads the store.
    let mut poisoned: Option<Arc<StoreError>> = None;
    loop {
        let first = if !waiters.is_empty() {
            rx.recv_timeout(Duration::ZERO)
        } else if compacting {
            rx.recv_timeout(next_compaction.saturating_duration_since(Instant::now()))
        } else {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        };
        let mut close = None;
        match first {
            Ok(Message::Propose(p, reply)) => batch.push((p, reply)),
            Ok(Message::Close(done)) => close = Some(done),
            Ok(Message::Compact(done)) => waiters.push(done),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Err(err) = shared.store.close() {
                    error!(error = %crate::error::chain(&err), "closing the store failed");
                }
                return;
            }
        }
        while close.is_none() && batch.len() < settings.max_batch {
            match rx.try_recv() {
                Ok(Message::Propose(p, reply)) => batch.push((p, reply)),
                Ok(Message::Close(done)) => close = Some(done),
                Ok(Message::Compact(done)) => waiters.push(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            match &poisoned {
                Some(err) => {
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Err(Rejected::Store(Arc::clone(err))));
                    }
                }
                None => {
                    if let Err(err) = commit_batch(&shared, &mut batch) {
                        poisoned = Some(err);
                    }
                }
            }
        }
        if let Some(done) = close {
            let result = shared.store.close().map_err(Arc::new);
            info!("store closed");
            let _ = done.send(result);
            return;
        }
        if !waiters.is_empty() || (compacting && Instant::now() >= next_compaction) {
            // One bounded chunk; queued proposals are committed before the
            // next one, so compaction never holds writers for long.
            match shared
                .store
                .compact(&settings.retention, shared.head(), COMPACTION_CHUNK)
            {
                Ok(deleted) => {
                    round_deleted += deleted as u64;
                    if deleted > 0 {
                        debug!(
                            deleted,
                            oldest = shared.store.oldest_sequence(),
                            "compacted the event log"
                        );
                    }
                    if deleted == COMPACTION_CHUNK {
                        next_compaction = Instant::now();
                    } else {
                        next_compaction = Instant::now() + settings.compaction_interval;
                        for done in waiters.drain(..) {
                            let _ = done.send(Ok(round_deleted));
                        }
                        round_deleted = 0;
                    }
                }
                Err(err) => {
                    warn!(error = %crate::error::chain(&err), "compaction failed; retrying later");
                    next_compaction = Instant::now() + settings.compaction_interval;
                    let err = Arc::new(err);
                    for done in waiters.drain(..) {
                        let _ = done.send(Err(Arc::clone(&err)));
                    }
                    round_deleted = 0;
                }
            }
        }
    }
}

/// A proposal turned into a change, with the agent after each record.
struct Prepared {
    change: AgentChange,
    steps: Vec<(Arc<TransitionRecord>, Arc<Agent>)>,
    created: bool,
    prior_state: Option<AgentState>,
}

/// Validates, commits, applies and publishes one batch.
///
/// # Errors
/// Only when the store failed in a way that leaves it uncertain whether the
/// batch reached the disk; the caller must refuse further writes. A clean
/// failure (rolled back) is answered to the proposals and returns `Ok`.
fn commit_batch(
    shared: &Shared,
    batch: &mut Vec<(Proposal, Reply)>,
) -> Result<(), Arc<StoreError>> {
    let at = crate::domain::agent::commit_time();
    let mut prepared: Vec<(Prepared, Reply)> = Vec::with_capacity(batch.len());
    // Registrations of an id that an earlier proposal of this batch creates:
    // answered after the commit, with that agent.
    let mut duplicates: Vec<(usize, Reply)> = Vec::new();
    let mut created_here: HashMap<AgentId, usize> = HashMap::new();
    // Agents changed by earlier proposals of this batch, as they will be.
    let mut changed_here: HashMap<AgentId, Arc<Agent>> = HashMap::new();
    // Writer locks of the accepted changes, released once they are applied.
    let mut guards = Vec::new();
    {
        let table = shared.read_table();
        let mut head = table.head;
        for (proposal, reply) in batch.drain(..) {
            match proposal {
                Proposal::Register {
                    id,
                    name,
                    labels,
                    step,
                } => {
                    if let Some(slot) = table.agents.get(&id) {
                        let _ = reply.send(Err(Rejected::Exists(Arc::clone(&slot.agent))));
                        continue;
                    }
                    if let Some(index) = created_here.get(&id) {
                        duplicates.push((*index, reply));
                        continue;
                    }
                    head += 1;
                    let record = Arc::new(TransitionRecord {
                        agent_id: id,
                        from: None,
                        to: step.to,
                        at,
                        reason: step.reason,
                        triggered_by: step.triggered_by,
                        metadata: step.metadata,
                        sequence: head,
                        version: 1,
                    });
                    let agent = Arc::new(Agent {
                        id,
                        name,
                        labels,
                        state: step.to,
                        version: 1,
                        created_at: at,
                        updated_at: at,
                        last_transition: Arc::clone(&record),
                    });
                    created_here.insert(id, prepared.len());
                    changed_here.insert(id, Arc::clone(&agent));
                    prepared.push((
                        Prepared {
                            change: AgentChange {
                                agent: Arc::clone(&agent),
                                prior_version: 0,
                                records: vec![Arc::clone(&record)],
                            },
                            steps: vec![(record, agent)],
                            created: true,
                            prior_state: None,
                        },
                        reply,
                    ));
                }
                Proposal::Transition {
                    id,
                    prior_version,
                    steps,
                    guard,
                } => {
                    let known = changed_here
                        .get(&id)
                        .cloned()
                        .or_else(|| table.agents.get(&id).map(|slot| Arc::clone(&slot.agent)));
                    let Some(mut current) = known else {
                        let _ = reply.send(Err(Rejected::Missing));
                        continue;
                    };
                    if current.version != prior_version {
                        let _ = reply.send(Err(Rejected::Stale {
                            expected: prior_version,
                            actual: current.version,
                        }));
                        continue;
                    }
                    if let Some(bad) = steps
                        .iter()
                        .scan(current.state, |from, step| {
                            let edge = (*from, step.to);
                            *from = step.to;
                            Some(edge)
                        })
                        .find(|(from, to)| !shared.policy.allows(*from, *to))
                    {
                        let _ = reply.send(Err(Rejected::NotAllowed {
                            from: bad.0,
                            to: bad.1,
                        }));
                        continue;
                    }
                    let prior_state = Some(current.state);
                    let mut applied = Vec::with_capacity(steps.len());
                    for step in steps {
                        head += 1;
                        let record = Arc::new(TransitionRecord {
                            agent_id: id,
                            from: Some(current.state),
                            to: step.to,
                            at,
                            reason: step.reason,
                            triggered_by: step.triggered_by,
                            metadata: step.metadata,
                            sequence: head,
                            version: current.version + 1,
                        });
                        current = Arc::new(current.after(Arc::clone(&record)));
                        applied.push((record, Arc::clone(&current)));
                    }
                    changed_here.insert(id, Arc::clone(&current));
                    guards.push(guard);
                    prepared.push((
                        Prepared {
                            change: AgentChange {
                                agent: current,
                                prior_version,
                                records: applied.iter().map(|(r, _)| Arc::clone(r)).collect(),
                            },
                            steps: applied,
                            created: false,
                            prior_state,
                        },
                        reply,
                    ));
                }
            }
        }
    }
    if prepared.is_empty() {
        return Ok(());
    }

    let changes: Vec<AgentChange> = prepared.iter().map(|(p, _)| p.change.clone()).collect();
    if let Err(err) = shared.store.commit(&changes) {
        let err = Arc::new(err);
        error!(error = %crate::error::chain(&*err), batch = changes.len(), "commit failed; the batch was not applied");
        for (_, reply) in prepared {
            let _ = reply.send(Err(Rejected::Store(Arc::clone(&err))));
        }
        for (_, reply) in duplicates {
            let _ = reply.send(Err(Rejected::Store(Arc::clone(&err))));
        }
        // A rollback leaves the store's head where the table's is. Anything
        // else (the commit reached the disk after all, or the store cannot
        // even say) means table and store may disagree.
        let expected = shared.head();
        return match shared.store.committed_head() {
            Ok(head) if head == expected => Ok(()),
            outcome => {
                let found = outcome
                    .map(|h| h.to_string())
                    .unwrap_or_else(|e| crate::error::chain(&e));
                error!(
                    expected,
                    found,
                    "the store is in an unknown state after a failed commit; refusing writes until restart"
                );
                Err(Arc::new(StoreError::Uncertain))
            }
        };
    }

    {
        let mut table = shared.write_table();
        for (p, _) in &prepared {
            let agent = &p.change.agent;
            if let Some(prior) = p.prior_state {
                table.counts[prior.index()] = table.counts[prior.index()].saturating_sub(1);
            }
            table.counts[agent.state.index()] += 1;
            if let Some(last) = p.change.records.last() {
                table.head = table.head.max(last.sequence);
            }
            if p.created {
                table.agents.insert(agent.id, Slot::new(Arc::clone(agent)));
            } else if let Some(slot) = table.agents.get_mut(&agent.id) {
                slot.agent = Arc::clone(agent);
            }
        }
    }

    for (p, _) in &prepared {
        for (record, agent) in &p.steps {
            // No receivers is fine: nobody is watching.
            let _ = shared.bus.send(Arc::new(LifecycleEvent::new(
                Arc::clone(record),
                Arc::clone(agent),
            )));
        }
    }

    for (index, reply) in duplicates {
        let agent = Arc::clone(&prepared[index].0.change.agent);
        let _ = reply.send(Err(Rejected::Exists(agent)));
    }
    for (p, reply) in prepared {
        let records = p.steps.into_iter().map(|(r, _)| r).collect();
        let _ = reply.send(Ok(Committed {
            agent: p.change.agent,
            records,
        }));
    }
    // The table shows the changes now: the next change to these agents may
    // be validated.
    drop(guards);
    Ok(())
}
