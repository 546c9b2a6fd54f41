//! The in-memory store: everything in process memory, nothing survives a
//! restart. The event log is a bounded ring (`Retention::max_events`, default
//! [`MemoryStore::DEFAULT_MAX_EVENTS`]): an agent's history is the part of
//! the ring that is its own, so memory stays bounded however long it runs.

use std::{
    collections::{VecDeque, hash_map::Entry},
    sync::{Arc, RwLock},
};

use foldhash::HashMap;

use super::{
    AgentChange, AgentIdentity, AuditQuery, BatchId, ChangeOutcome, HistoryRange, Recovered,
    Result, Retention, Store, check_cursor_name, stored_cursor,
};
use crate::domain::{Agent, AgentId, Clock, TransitionRecord, clock::to_stored_precision};

/// The in-memory back end.
#[derive(Debug)]
pub struct MemoryStore {
    /// Short critical sections only (no I/O inside); readers and the commit
    /// thread never hold it across anything slow.
    inner: RwLock<Inner>,
    /// Ring capacity.
    max_events: u64,
}

/// The maps are hashed with foldhash (seeded per process), several lookups
/// per commit.
#[derive(Debug, Default)]
struct Inner {
    agents: HashMap<AgentId, Agent>,
    /// The retained global log, oldest first.
    log: VecDeque<Arc<TransitionRecord>>,
    /// Each agent's retained records, oldest first (shared with `log`).
    by_agent: HashMap<AgentId, VecDeque<Arc<TransitionRecord>>>,
    head: u64,
    /// The last committed batch.
    last_batch: Option<BatchId>,
    /// Each consumer's cursor ([`Store::cursor`]); never evicted.
    cursors: HashMap<String, u64>,
}

impl MemoryStore {
    /// Ring capacity when no retention is configured.
    pub const DEFAULT_MAX_EVENTS: u64 = 100_000;

    /// An empty store retaining at most `retention.max_events` events (or
    /// the default); `max_age` is applied by [`Store::compact`].
    pub fn new(retention: &Retention) -> Self {
        MemoryStore {
            inner: RwLock::new(Inner::default()),
            max_events: retention
                .max_events
                .unwrap_or(Self::DEFAULT_MAX_EVENTS)
                .max(1),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self.log.pop_front() else {
            return false;
        };
        if let Some(list) = self.by_agent.get_mut(&oldest.agent_id) {
            list.pop_front();
            if list.is_empty() {
                self.by_agent.remove(&oldest.agent_id);
            }
        }
        true
    }
}

impl Store for MemoryStore {
    fn commits_in_memory(&self) -> bool {
        true
    }

    fn load(&self) -> Result<Recovered> {
        let inner = self.read();
        Ok(Recovered {
            agents: inner.agents.values().cloned().collect(),
            head: inner.head,
        })
    }

    fn commit(
        &self,
        id: BatchId,
        batch: &mut [AgentChange],
        clock: &dyn Clock,
    ) -> Result<Vec<ChangeOutcome>> {
        let mut guard = self.write();
        let inner = &mut *guard;
        let at = to_stored_precision(clock.now());
        let mut outcomes = Vec::with_capacity(batch.len());
        for change in batch.iter_mut() {
            // One lookup per change: the stored agent is updated in place.
            let creatable = change.prior_version == 0 && change.identity.is_some();
            let slot = match inner.agents.entry(change.agent_id) {
                Entry::Occupied(stored) if stored.get().version == change.prior_version => {
                    Ok(stored.into_mut())
                }
                Entry::Occupied(stored) => {
                    outcomes.push(ChangeOutcome::Conflict {
                        actual: stored.get().version,
                    });
                    continue;
                }
                Entry::Vacant(vacant) if creatable => Err(vacant),
                Entry::Vacant(_) => {
                    outcomes.push(ChangeOutcome::Conflict { actual: 0 });
                    continue;
                }
            };
            if change.records.is_empty() {
                outcomes.push(ChangeOutcome::Committed);
                continue;
            }
            let history = inner.by_agent.entry(change.agent_id).or_default();
            for record in &mut change.records {
                inner.head += 1;
                let stamped = Arc::make_mut(record);
                stamped.sequence = inner.head;
                stamped.at = at;
                inner.log.push_back(Arc::clone(record));
                history.push_back(Arc::clone(record));
            }
            if let (Some(first), Some(last)) = (change.records.first(), change.records.last()) {
                match (slot, &change.identity) {
                    (Ok(agent), _) => agent.advance(Arc::clone(last)),
                    (Err(vacant), Some(identity)) => {
                        let mut agent = Agent::registered(
                            change.agent_id,
                            Arc::clone(&identity.name),
                            Arc::clone(&identity.labels),
                            Arc::clone(first),
                        );
                        agent.advance(Arc::clone(last));
                        vacant.insert(agent);
                    }
                    // `creatable` holds only with an identity.
                    (Err(_), None) => {}
                }
            }
            outcomes.push(ChangeOutcome::Committed);
        }
        while inner.log.len() as u64 > self.max_events {
            inner.evict_oldest();
        }
        inner.last_batch = Some(id);
        Ok(outcomes)
    }

    fn batch_committed(&self, id: BatchId) -> Result<bool> {
        Ok(self.read().last_batch == Some(id))
    }

    fn head(&self) -> Result<u64> {
        Ok(self.read().head)
    }

    fn identities(&self, ids: &[AgentId]) -> Result<Vec<(AgentId, AgentIdentity)>> {
        let inner = self.read();
        Ok(ids
            .iter()
            .filter_map(|id| inner.agents.get(id))
            .map(|a| {
                (
                    a.id,
                    AgentIdentity {
                        name: Arc::clone(&a.name),
                        labels: Arc::clone(&a.labels),
                    },
                )
            })
            .collect())
    }

    fn cursor(&self, name: &str) -> Result<u64> {
        check_cursor_name(name)?;
        Ok(self.read().cursors.get(name).copied().unwrap_or(0))
    }

    fn advance_cursor(&self, name: &str, sequence: u64) -> Result<()> {
        stored_cursor(name, sequence)?;
        let mut inner = self.write();
        match inner.cursors.get_mut(name) {
            Some(stored) => *stored = (*stored).max(sequence),
            None => {
                inner.cursors.insert(name.to_owned(), sequence);
            }
        }
        Ok(())
    }

    fn events_after(&self, after: u64, max: usize) -> Result<Vec<Arc<TransitionRecord>>> {
        let inner = self.read();
        let start = inner.log.partition_point(|r| r.sequence <= after);
        Ok(inner.log.range(start..).take(max).cloned().collect())
    }

    fn oldest_sequence(&self) -> Result<u64> {
        let inner = self.read();
        Ok(inner.log.front().map_or(inner.head + 1, |r| r.sequence))
    }

    fn history(
        &self,
        agent_id: AgentId,
        range: HistoryRange,
    ) -> Result<Vec<Arc<TransitionRecord>>> {
        let inner = self.read();
        let Some(list) = inner.by_agent.get(&agent_id) else {
            return Ok(Vec::new());
        };
        let start = list.partition_point(|r| r.sequence <= range.after);
        Ok(list
            .range(start..)
            .take_while(|r| r.sequence <= range.upto)
            .take(range.max)
            .cloned()
            .collect())
    }

    fn nth_newest(&self, agent_id: AgentId, upto: u64, n: u64) -> Result<Option<u64>> {
        let inner = self.read();
        let Some(list) = inner.by_agent.get(&agent_id) else {
            return Ok(None);
        };
        let end = list.partition_point(|r| r.sequence <= upto);
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        Ok(end.checked_sub(n).map(|i| list[i].sequence))
    }

    fn requests_since(&self, since: std::time::SystemTime) -> Result<Vec<Arc<TransitionRecord>>> {
        Ok(self
            .read()
            .log
            .iter()
            .filter(|r| r.request.is_some() && r.at >= since)
            .cloned()
            .collect())
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<Arc<TransitionRecord>>> {
        let inner = self.read();
        let matches = |r: &&Arc<TransitionRecord>| {
            r.sequence < query.before && query.principal.as_ref().is_none_or(|p| r.principal == *p)
        };
        let records: Vec<_> = match query.agent_id {
            Some(id) => inner.by_agent.get(&id).map_or_else(Vec::new, |list| {
                list.iter()
                    .rev()
                    .filter(matches)
                    .take(query.max)
                    .cloned()
                    .collect()
            }),
            None => inner
                .log
                .iter()
                .rev()
                .filter(matches)
                .take(query.max)
                .cloned()
                .collect(),
        };
        Ok(records)
    }

    fn history_count(&self, agent_id: AgentId) -> Result<u64> {
        Ok(self
            .read()
            .by_agent
            .get(&agent_id)
            .map_or(0, |l| l.len() as u64))
    }

    fn compact(
        &self,
        retention: &Retention,
        head: u64,
        max_rows: usize,
        clock: &dyn Clock,
    ) -> Result<usize> {
        let Some(bounds) = retention.bounds(head, clock) else {
            return Ok(0);
        };
        let mut inner = self.write();
        let mut deleted = 0;
        while deleted < max_rows
            && inner
                .log
                .front()
                .is_some_and(|r| bounds.lets_go(r.sequence, r.at))
        {
            inner.evict_oldest();
            deleted += 1;
        }
        Ok(deleted)
    }

    fn close(&self) -> Result<()> {
        Ok(())
    }
}
