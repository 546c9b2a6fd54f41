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
    /// proposals between chunks); reply with the rows deleted.
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
    loop {
        let first = if compacting {
            let wait = next_compaction.saturating_duration_since(Instant::now());
            rx.recv_timeout(wait)
        } else {
            rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        };
        let mut close = None;
        let mut compact_now = Vec::new();
        match first {
            Ok(Message::Propose(p, reply)) => batch.push((p, reply)),
            Ok(Message::Close(done)) => close = Some(done),
            Ok(Message::Compact(done)) => compact_now.push(done),
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
                Ok(Message::Compact(done)) => compact_now.push(done),
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            commit_batch(&shared, &mut batch);
        }
        for done in compact_now {
            let _ = done.send(compact_all(&shared, &settings.retention));
        }
        if let Some(done) = close {
            let result = shared.store.close().map_err(Arc::new);
            info!("store closed");
            let _ = done.send(result);
            return;
        }
        if compacting && Instant::now() >= next_compaction {
            let head = shared.head();
            match shared
                .store
                .compact(&settings.retention, head, COMPACTION_CHUNK)
            {
                Ok(deleted) => {
                    if deleted > 0 {
                        debug!(
                            deleted,
                            oldest = shared.store.oldest_sequence(),
                            "compacted the event log"
                        );
                    }
                    // A full chunk means more is due: continue after the
                    // next batch instead of waiting a whole interval.
                    next_compaction = if deleted == COMPACTION_CHUNK {
                        Instant::now()
                    } else {
                        Instant::now() + settings.compaction_interval
                    };
                }
                Err(err) => {
                    warn!(error = %crate::error::chain(&err), "compaction failed; retrying later");
                    next_compaction = Instant::now() + settings.compaction_interval;
                }
            }
        }
    }
}

/// Compacts until nothing more is due.
fn compact_all(shared: &Shared, retention: &Retention) -> Result<u64, Arc<StoreError>> {
    let mut total = 0u64;
    loop {
        let deleted = shared
            .store
            .compact(retention, shared.head(), COMPACTION_CHUNK)
            .map_err(Arc::new)?;
        total += deleted as u64;
        if deleted < COMPACTION_CHUNK {
            return Ok(total);
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

fn commit_batch(shared: &Shared, batch: &mut Vec<(Proposal, Reply)>) {
    let at = crate::domain::agent::commit_time();
    let mut prepared: Vec<(Prepared, Reply)> = Vec::with_capacity(batch.len());
    // Registrations of an id that an earlier proposal of this batch creates:
    // answered after the commit, with that agent.
    let mut duplicates: Vec<(usize, Reply)> = Vec::new();
    let mut created_here: HashMap<AgentId, usize> = HashMap::new();
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
                } => {
                    let Some(slot) = table.agents.get(&id) else {
                        let _ = reply.send(Err(Rejected::Missing));
                        continue;
                    };
                    let mut current = Arc::clone(&slot.agent);
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
        return;
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
        return;
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
}
