//! Queries: agents, listings with paging, history pages and fleet counts.
//! Reads come from the agent table (the latest committed version of every
//! agent) except history, which pages through the store's event log.

use std::{collections::BTreeMap, sync::Arc};

use super::{
    AgentFilter, AgentLifecycleService, DEFAULT_HISTORY_PAGE, HistoryCursor, HistoryPage,
    HistoryQuery, LifecycleMetrics, MAX_LIST_SCAN, StateInfo,
};
use crate::{
    domain::{Agent, AgentId, AgentState, Heartbeat, limits},
    error::{Error, Result},
    store::{HistoryRange, SavedHeartbeats},
};

impl AgentLifecycleService {
    /// The agent's latest version.
    ///
    /// # Errors
    /// [`Error::AgentNotFound`].
    pub fn get_agent(&self, id: AgentId) -> Result<Arc<Agent>> {
        self.shared().agent(id).ok_or(Error::AgentNotFound(id))
    }

    /// The agent's state information.
    ///
    /// # Errors
    /// [`Error::AgentNotFound`].
    pub fn get_agent_status(&self, id: AgentId) -> Result<StateInfo> {
        Ok(self.state_info(self.get_agent(id)?))
    }

    pub(crate) fn state_info(&self, agent: Arc<Agent>) -> StateInfo {
        StateInfo {
            valid_transitions: self.policy().allowed_targets(agent.state).to_vec(),
            agent,
        }
    }

    /// Every agent's state information, by id.
    pub fn get_all_agent_statuses(&self) -> BTreeMap<AgentId, StateInfo> {
        self.agents_where(|_| true)
            .into_iter()
            .map(|a| (a.id, self.state_info(a)))
            .collect()
    }

    /// Every agent, in no particular order: a pass over the fleet without
    /// building a map (see [`Self::get_all_agent_statuses`]).
    pub fn all_agents(&self) -> Vec<Arc<Agent>> {
        self.agents_where(|_| true)
    }

    pub(super) fn agents_where(&self, keep: impl Fn(&Agent) -> bool) -> Vec<Arc<Agent>> {
        self.shared()
            .read_table()
            .agents
            .values()
            .filter(|s| keep(&s.agent))
            .map(|s| Arc::clone(&s.agent))
            .collect()
    }

    fn ids_where(&self, keep: fn(AgentState) -> bool) -> Vec<AgentId> {
        self.agents_where(|a| keep(a.state))
            .iter()
            .map(|a| a.id)
            .collect()
    }

    /// Agents that are ONLINE, BUSY or IDLE.
    pub fn get_operational_agents(&self) -> Vec<AgentId> {
        self.ids_where(AgentState::is_operational)
    }

    /// Agents that are ONLINE or IDLE.
    pub fn get_available_agents(&self) -> Vec<AgentId> {
        self.ids_where(AgentState::is_available_for_tasks)
    }

    /// Agents in ERROR, FAILED or TIMEOUT.
    pub fn get_agents_in_error(&self) -> Vec<AgentId> {
        self.ids_where(AgentState::is_error)
    }

    /// Agents in MAINTENANCE, SUSPENDED or UPDATING.
    pub fn get_agents_in_maintenance(&self) -> Vec<AgentId> {
        self.ids_where(AgentState::is_maintenance)
    }

    /// Fleet-wide counts, from the metrics registry's per-state gauges
    /// (O(1) in the number of agents).
    pub fn get_lifecycle_metrics(&self) -> LifecycleMetrics {
        let shared = self.shared();
        // Under the table's read lock, the per-state gauges agree with the
        // head (the commit thread moves both under the write lock).
        let table = shared.read_table();
        let mut metrics = LifecycleMetrics {
            head_sequence: table.head,
            hook_failures: shared.metrics.hook_failures(),
            watch_backfills: shared.metrics.watch_backfills(),
            ..LifecycleMetrics::default()
        };
        for state in AgentState::ALL {
            let count = shared.metrics.agents(state);
            if count == 0 {
                continue;
            }
            metrics.total_agents += count;
            if state.is_operational() {
                metrics.operational_agents += count;
            }
            if state.is_available_for_tasks() {
                metrics.available_agents += count;
            }
            if state.is_error() {
                metrics.error_agents += count;
            }
            if state.is_maintenance() {
                metrics.maintenance_agents += count;
            }
            metrics.state_distribution.insert(state, count);
        }
        metrics
    }

    /// Up to `limit` agents with ids after `after`, in id order, that pass
    /// `filter`; and the id to continue after, when more may follow.
    ///
    /// One call examines at most [`MAX_LIST_SCAN`] agents, so that a filter
    /// matching few agents of a large fleet never holds the table for long: a
    /// page can then be short (even empty) and still have a continuation.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a label filter over the label limits.
    pub fn list_agents(
        &self,
        filter: &AgentFilter,
        after: Option<AgentId>,
        limit: usize,
    ) -> Result<(Vec<Arc<Agent>>, Option<AgentId>)> {
        use std::ops::Bound;
        limits::check_labels("labels", &filter.labels)?;
        let limit = limit.max(1);
        let table = self.shared().read_table();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut agents = Vec::new();
        let mut last_examined = None;
        let mut examined = 0;
        let mut iter = table.agents.range((lower, Bound::Unbounded)).peekable();
        for (id, slot) in iter.by_ref() {
            examined += 1;
            last_examined = Some(*id);
            if filter.matches(&slot.agent) {
                agents.push(Arc::clone(&slot.agent));
            }
            if agents.len() == limit || examined == MAX_LIST_SCAN {
                break;
            }
        }
        let next = if iter.peek().is_some() {
            last_examined
        } else {
            None
        };
        Ok((agents, next))
    }

    /// A page of the agent's history, oldest first.
    ///
    /// # Errors
    /// [`Error::AgentNotFound`] or a store failure.
    pub async fn history(&self, id: AgentId, query: HistoryQuery) -> Result<HistoryPage> {
        let agent = self.get_agent(id)?;
        let store = Arc::clone(&self.shared().store);
        let page_size = match query.page_size {
            0 => DEFAULT_HISTORY_PAGE,
            n => n.min(DEFAULT_HISTORY_PAGE),
        };
        let last = agent.last_transition.sequence;
        tokio::task::spawn_blocking(move || -> Result<HistoryPage> {
            let cursor = match query.cursor {
                Some(cursor) => cursor,
                None => {
                    let after = if query.limit > 0 {
                        store
                            .nth_newest(id, last, query.limit)?
                            .map_or(0, |s| s - 1)
                    } else {
                        0
                    };
                    HistoryCursor { after, upto: last }
                }
            };
            let mut transitions = store.history(
                id,
                HistoryRange {
                    after: cursor.after,
                    upto: cursor.upto,
                    max: page_size + 1,
                },
            )?;
            let next = if transitions.len() > page_size {
                transitions.truncate(page_size);
                transitions.last().map(|r| HistoryCursor {
                    after: r.sequence,
                    upto: cursor.upto,
                })
            } else {
                None
            };
            Ok(HistoryPage {
                transitions,
                total_count: store.history_count(id)?,
                next,
            })
        })
        .await
        .map_err(Error::TaskFailed)?
    }
}

impl AgentLifecycleService {
    /// The audit trail: the retained records `query` selects, newest first.
    ///
    /// # Errors
    /// The store failed.
    pub async fn audit(
        &self,
        query: crate::store::AuditQuery,
    ) -> Result<Vec<Arc<crate::domain::TransitionRecord>>> {
        self.shared()
            .read_store(move |store| store.audit(&query))
            .await
    }

    /// Reads the store's oldest retained sequence and size into the
    /// metrics (for a scrape).
    ///
    /// # Errors
    /// The store failed.
    pub async fn refresh_store_metrics(&self) -> Result<()> {
        let (oldest, size) = self
            .shared()
            .read_store(|store| Ok((store.oldest_sequence()?, store.size_bytes()?)))
            .await?;
        self.metrics().set_store_gauges(oldest, size);
        Ok(())
    }

    /// Whether other processes share this service's store (heartbeats and
    /// background work are then coordinated through it).
    pub fn is_store_shared(&self) -> bool {
        self.shared().store.is_shared()
    }

    /// Keeps heartbeats where every process sharing the store sees them
    /// (nothing to do on a store only this process uses).
    ///
    /// # Errors
    /// The store failed.
    pub async fn save_heartbeats(&self, beats: Vec<(AgentId, Heartbeat)>) -> Result<()> {
        if beats.is_empty() || !self.is_store_shared() {
            return Ok(());
        }
        self.shared()
            .read_store(move |store| store.save_heartbeats(&beats))
            .await
    }

    /// The heartbeats of `ids` kept in a shared store.
    ///
    /// # Errors
    /// The store failed.
    pub async fn saved_heartbeats(&self, ids: Vec<AgentId>) -> Result<Vec<(AgentId, Heartbeat)>> {
        if ids.is_empty() || !self.is_store_shared() {
            return Ok(Vec::new());
        }
        self.shared()
            .read_store(move |store| store.heartbeats(&ids))
            .await
    }

    /// The heartbeats saves after the save numbered `after` kept in a
    /// shared store, and the number to pass next time (see
    /// [`crate::store::Store::heartbeats_saved_after`]).
    ///
    /// # Errors
    /// The store failed.
    pub async fn heartbeats_saved_after(&self, after: u64) -> Result<SavedHeartbeats> {
        if !self.is_store_shared() {
            return Ok(SavedHeartbeats {
                beats: Vec::new(),
                through: after,
            });
        }
        self.shared()
            .read_store(move |store| store.heartbeats_saved_after(after))
            .await
    }
}
