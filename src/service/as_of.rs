//! Reads of the fleet as it was at a point of the event log, as etcd
//! answers a read at a revision.
//!
//! A point is a sequence (the fleet right after that event) or a time (the
//! fleet right after the newest event committed at or before it). What an
//! agent was at sequence `S` follows from the log after `S`: the first
//! event of the agent after `S` left the state the agent had at `S` (its
//! `from`) and its version minus one; an agent with no event after `S` is
//! as it is now; one whose first event after `S` is its registration did
//! not exist yet. So a point can be read as long as the events after it
//! are retained: from the one before the oldest retained event to the
//! head. Older points are OUT_OF_RANGE, naming the oldest point kept.
//!
//! A read scans the events after the point (GetAgent only the agent's),
//! on the store's readers: the write path is not involved. The agent's
//! last transition at the point comes from its history; when retention
//! deleted it, the agent is known by state and version only.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::SystemTime,
};

use super::{AgentFilter, AgentLifecycleService, LifecycleMetrics, MAX_LIST_SCAN};
use crate::{
    domain::{Agent, AgentId, AgentState, TransitionRecord},
    error::{Error, Result},
    store::{HistoryRange, Store},
};

/// A point of the event log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsOf {
    /// Right after the event with this sequence (0: before the first).
    Sequence(u64),
    /// Right after the newest event committed at or before this time.
    Time(SystemTime),
}

/// An agent as it was at a point.
#[derive(Clone, Debug)]
pub struct AgentAt {
    /// The agent then: state, version, name and labels; its last
    /// transition and `updated_at` are the point's when `last_known`.
    pub agent: Arc<Agent>,
    /// Whether the agent's last transition at the point is still in the
    /// log (retention may have deleted it).
    pub last_known: bool,
}

/// How many events one read of the log after a point fetches.
const SCAN_CHUNK: usize = 4096;

/// The first event of each agent after a point: `from` and the version it
/// left.
type Since = HashMap<AgentId, (Option<AgentState>, u64)>;

impl AgentLifecycleService {
    /// The sequence `point` names, checked against the retained log.
    ///
    /// # Errors
    /// [`Error::SequenceNotYetWritten`] for a sequence after the head;
    /// [`Error::SequenceCompacted`] (naming the oldest point that can be
    /// read) for a sequence older than the retained log,
    /// [`Error::TimeCompacted`] for such a time; a store failure.
    pub async fn resolve_as_of(&self, point: AsOf) -> Result<u64> {
        self.catch_up_with_store().await?;
        let head = self.head_sequence();
        let oldest = self.oldest_sequence().await?;
        // The point just before the oldest retained event still reads.
        let oldest_point = oldest.saturating_sub(1);
        let sequence = match point {
            AsOf::Sequence(sequence) if sequence > head => {
                return Err(Error::SequenceNotYetWritten {
                    requested: sequence,
                    head,
                });
            }
            AsOf::Sequence(sequence) => sequence,
            AsOf::Time(at) => {
                let found = self
                    .shared()
                    .read_store(move |store| sequence_at(store, at, oldest, head))
                    .await?;
                match found {
                    Found::At(sequence) => sequence,
                    Found::Before(oldest_at) => {
                        return Err(Error::TimeCompacted {
                            requested: at,
                            oldest,
                            oldest_at,
                        });
                    }
                }
            }
        };
        if sequence < oldest_point {
            return Err(Error::SequenceCompacted {
                requested: sequence,
                oldest: oldest_point,
            });
        }
        Ok(sequence)
    }

    /// Agent `id` as it was at `sequence` (from [`Self::resolve_as_of`]).
    ///
    /// # Errors
    /// [`Error::AgentNotFound`] when it did not exist then; a store failure.
    pub async fn agent_as_of(&self, id: AgentId, sequence: u64) -> Result<AgentAt> {
        let now = self.get_agent(id)?;
        let first_after = self
            .shared()
            .read_store(move |store| {
                store.history(
                    id,
                    HistoryRange {
                        after: sequence,
                        upto: u64::MAX,
                        max: 1,
                    },
                )
            })
            .await?;
        let since: Since = first_after
            .first()
            .map(|r| (id, (r.from, r.version.saturating_sub(1))))
            .into_iter()
            .collect();
        let mut agents = self.agents_then(vec![now], &since, sequence).await?;
        agents.pop().ok_or(Error::AgentNotFound(id))
    }

    /// Up to `limit` agents after `after` (in id order) that passed
    /// `filter` at `sequence`, and the id to continue after, like
    /// [`Self::list_agents`] of the present.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a label filter over the limits; a
    /// store failure.
    pub async fn list_agents_as_of(
        &self,
        filter: &AgentFilter,
        after: Option<AgentId>,
        limit: usize,
        sequence: u64,
    ) -> Result<(Vec<AgentAt>, Option<AgentId>)> {
        use std::ops::Bound;
        crate::domain::limits::check_labels("labels", &filter.labels)?;
        let limit = limit.max(1);
        // The table first, then the log: an agent registered in between is
        // not in this snapshot, and every one in it has its events after
        // the point in what the scan reads.
        let snapshot: Vec<Arc<Agent>> = {
            let table = self.shared().read_table();
            let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
            table
                .agents
                .range((lower, Bound::Unbounded))
                .map(|(_, slot)| Arc::clone(&slot.agent))
                .collect()
        };
        let since = self.changes_since(sequence).await?;
        let mut page = Vec::new();
        let mut last_examined = None;
        let mut examined = 0;
        let mut rest = snapshot.iter().peekable();
        for agent in rest.by_ref() {
            examined += 1;
            last_examined = Some(agent.id);
            if let Some(then) = state_then(agent, &since)
                && filter.states.matches(then.0)
                && filter.category.is_none_or(|c| then.0.in_category(c))
                && agent.has_labels(&filter.labels)
            {
                page.push(Arc::clone(agent));
            }
            if page.len() == limit || examined == MAX_LIST_SCAN {
                break;
            }
        }
        let next = rest.peek().and(last_examined);
        let agents = self.agents_then(page, &since, sequence).await?;
        Ok((agents, next))
    }

    /// Every agent that existed at `sequence`, as it was then, in id
    /// order; without their last transitions (as when retention deleted
    /// them), so that one read costs one scan of the log after the point.
    ///
    /// # Errors
    /// A store failure.
    pub async fn fleet_as_of(&self, sequence: u64) -> Result<Vec<AgentAt>> {
        let snapshot = self.agents_where(|_| true);
        let since = self.changes_since(sequence).await?;
        let mut fleet: Vec<AgentAt> = snapshot
            .into_iter()
            .filter_map(|agent| {
                let (state, version) = state_then(&agent, &since)?;
                if !since.contains_key(&agent.id) {
                    return Some(AgentAt {
                        agent,
                        last_known: true,
                    });
                }
                Some(AgentAt {
                    agent: Arc::new(Agent {
                        state,
                        version,
                        updated_at: agent.created_at,
                        last_transition: Arc::new(unknown_transition(&agent, state, version)),
                        ..(*agent).clone()
                    }),
                    last_known: false,
                })
            })
            .collect();
        fleet.sort_by_key(|a| a.agent.id);
        Ok(fleet)
    }

    /// When the events `first` and `last` were committed (`None` for one
    /// not retained): the time range a read of the past can take.
    ///
    /// # Errors
    /// A store failure.
    pub async fn commit_times(
        &self,
        first: u64,
        last: u64,
    ) -> Result<(Option<SystemTime>, Option<SystemTime>)> {
        self.shared()
            .read_store(move |store| Ok((commit_time(store, first)?, commit_time(store, last)?)))
            .await
    }

    /// The fleet's counts at `sequence`. The counters of this process
    /// (hook failures, backfills) are not a property of the fleet at a
    /// point and are zero.
    ///
    /// # Errors
    /// A store failure.
    pub async fn lifecycle_metrics_as_of(&self, sequence: u64) -> Result<LifecycleMetrics> {
        let snapshot = self.agents_where(|_| true);
        let since = self.changes_since(sequence).await?;
        let mut metrics = LifecycleMetrics {
            head_sequence: sequence,
            ..LifecycleMetrics::default()
        };
        for agent in &snapshot {
            let Some((state, _)) = state_then(agent, &since) else {
                continue;
            };
            metrics.count(state);
        }
        Ok(metrics)
    }

    /// The first event of every agent after `sequence`.
    async fn changes_since(&self, sequence: u64) -> Result<Since> {
        self.shared()
            .read_store(move |store| {
                let mut since = Since::new();
                let mut after = sequence;
                loop {
                    let events = store.events_after(after, SCAN_CHUNK)?;
                    let Some(last) = events.last() else {
                        return Ok(since);
                    };
                    after = last.sequence;
                    for record in &events {
                        since
                            .entry(record.agent_id)
                            .or_insert((record.from, record.version.saturating_sub(1)));
                    }
                }
            })
            .await
    }

    /// `agents` (as they are now) as they were at `sequence`, leaving out
    /// those that did not exist then; the last transitions of those that
    /// changed since are read from their history.
    async fn agents_then(
        &self,
        agents: Vec<Arc<Agent>>,
        since: &Since,
        sequence: u64,
    ) -> Result<Vec<AgentAt>> {
        let changed: Vec<AgentId> = agents
            .iter()
            .filter(|a| matches!(since.get(&a.id), Some((Some(_), _))))
            .map(|a| a.id)
            .collect();
        let lasts: HashMap<AgentId, Arc<TransitionRecord>> = self
            .shared()
            .read_store(move |store| last_records(store, &changed, sequence))
            .await?;
        let mut then = Vec::with_capacity(agents.len());
        let mut seen = HashSet::new();
        for agent in agents {
            if !seen.insert(agent.id) {
                continue;
            }
            let Some((state, version)) = state_then(&agent, since) else {
                continue;
            };
            if !since.contains_key(&agent.id) {
                then.push(AgentAt {
                    agent,
                    last_known: true,
                });
                continue;
            }
            let last = lasts
                .get(&agent.id)
                .filter(|r| r.to == state && r.version == version);
            let agent_then = Agent {
                state,
                version,
                updated_at: last.map_or(agent.created_at, |r| r.at),
                last_transition: last.map_or_else(
                    || Arc::new(unknown_transition(&agent, state, version)),
                    Arc::clone,
                ),
                ..(*agent).clone()
            };
            then.push(AgentAt {
                agent: Arc::new(agent_then),
                last_known: last.is_some(),
            });
        }
        Ok(then)
    }
}

impl LifecycleMetrics {
    /// Counts one agent in `state`.
    pub(crate) fn count(&mut self, state: AgentState) {
        self.total_agents += 1;
        if state.is_operational() {
            self.operational_agents += 1;
        }
        if state.is_available_for_tasks() {
            self.available_agents += 1;
        }
        if state.is_error() {
            self.error_agents += 1;
        }
        if state.is_maintenance() {
            self.maintenance_agents += 1;
        }
        *self.state_distribution.entry(state).or_default() += 1;
    }
}

/// The state and version `agent` (as it is now) had at the point that
/// `since` was read after; `None` when it did not exist then.
fn state_then(agent: &Agent, since: &Since) -> Option<(AgentState, u64)> {
    match since.get(&agent.id) {
        None => Some((agent.state, agent.version)),
        Some((Some(from), version)) => Some((*from, *version)),
        Some((None, _)) => None,
    }
}

/// The newest retained record at or before `sequence` of each of `ids`.
fn last_records(
    store: &dyn Store,
    ids: &[AgentId],
    sequence: u64,
) -> crate::store::Result<HashMap<AgentId, Arc<TransitionRecord>>> {
    let mut lasts = HashMap::with_capacity(ids.len());
    for &id in ids {
        let Some(last) = store.nth_newest(id, sequence, 1)? else {
            continue;
        };
        let range = HistoryRange {
            after: last - 1,
            upto: last,
            max: 1,
        };
        if let Some(record) = store.history(id, range)?.pop() {
            lasts.insert(id, record);
        }
    }
    Ok(lasts)
}

/// Stands for a last transition that retention deleted: the state and
/// version are known, nothing else.
fn unknown_transition(agent: &Agent, state: AgentState, version: u64) -> TransitionRecord {
    TransitionRecord {
        agent_id: agent.id,
        from: None,
        to: state,
        at: agent.created_at,
        reason: String::new(),
        triggered_by: String::new(),
        principal: String::new(),
        request: None,
        metadata: crate::domain::Metadata::new(),
        sequence: 0,
        version,
    }
}

/// What [`sequence_at`] found.
enum Found {
    /// The point's sequence.
    At(u64),
    /// The time is before the oldest retained event, committed at this
    /// time, and events before it were deleted: the fleet then is unknown.
    Before(SystemTime),
}

/// The newest sequence whose event was committed at or before `at`, found
/// by bisection over the retained log (commit times rise with sequences).
fn sequence_at(
    store: &dyn Store,
    at: SystemTime,
    oldest: u64,
    head: u64,
) -> crate::store::Result<Found> {
    let time_of = |sequence| commit_time(store, sequence);
    if head < oldest {
        // Nothing retained at all: the head is the only point.
        return Ok(Found::At(head));
    }
    match time_of(oldest)? {
        Some(first) if first > at && oldest > 1 => return Ok(Found::Before(first)),
        // Before the first event ever: the empty fleet.
        Some(first) if first > at => return Ok(Found::At(0)),
        _ => {}
    }
    // Invariant: the event at `lo` was committed at or before `at`.
    let (mut lo, mut hi) = (oldest, head);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        match time_of(mid)? {
            Some(t) if t <= at => lo = mid,
            _ => hi = mid - 1,
        }
    }
    Ok(Found::At(lo))
}

/// When the event `sequence` was committed; `None` when it is not
/// retained (or is 0).
fn commit_time(store: &dyn Store, sequence: u64) -> crate::store::Result<Option<SystemTime>> {
    if sequence == 0 {
        return Ok(None);
    }
    Ok(store
        .events_after(sequence - 1, 1)?
        .first()
        .filter(|r| r.sequence == sequence)
        .map(|r| r.at))
}
