//! The agent table: every agent's latest version, in memory, and what the
//! commit thread shares with the rest of the service.
//!
//! Only the log writes the table (the commit thread, or a proposer holding
//! the writer's lock), through [`Table::apply`], once per batch, under one
//! write lock that also moves the head sequence and the per-state gauges, so
//! a reader holding the read lock sees all three consistent. Readers hold it
//! briefly and never across I/O.
//!
//! Plain data and locks: must not depend on the log or the watchers; of the
//! write path it holds only the request index (`write::idempotency`), which
//! every applied record feeds.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, atomic::AtomicBool},
};

use tokio::sync::broadcast;

use super::metrics::Metrics;
use crate::service::PublishedEvent;
use crate::{
    domain::{Agent, AgentId, Clock, TransitionPolicy, TransitionRecord},
    store::{AgentIdentity, Store},
};

/// One agent in the table.
#[derive(Debug)]
pub(crate) struct Slot {
    /// The latest committed version; replaced by the commit thread.
    pub agent: Arc<Agent>,
    /// Held (async) for the whole of a change to this agent, so changes to
    /// one agent never overlap; never held by readers.
    pub writer: Arc<tokio::sync::Mutex<()>>,
}

impl Slot {
    pub(crate) fn new(agent: Arc<Agent>) -> Self {
        Slot {
            agent,
            writer: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// Every agent's latest version, ordered by id for stable paging.
#[derive(Debug, Default)]
pub(crate) struct Table {
    pub agents: BTreeMap<AgentId, Slot>,
    /// Newest committed sequence; consistent with `agents` (both change under
    /// one write lock), which snapshots rely on.
    pub head: u64,
    /// Recent client request ids and what they committed.
    pub requests: super::write::idempotency::RequestIndex,
}

/// What the commit thread shares with the service.
pub(crate) struct Shared {
    pub policy: TransitionPolicy,
    /// Written only by the commit thread, once per batch; held briefly (no
    /// I/O inside) by readers.
    pub table: RwLock<Table>,
    /// Committed events, in sequence order.
    pub bus: broadcast::Sender<Arc<PublishedEvent>>,
    pub store: Arc<dyn Store>,
    /// The service's one metrics registry.
    pub metrics: Metrics,
    /// Wall-clock time.
    pub clock: Arc<dyn Clock>,
    /// Set while a `Follow` message is queued, so the follower thread sends
    /// at most one at a time.
    pub follow_requested: AtomicBool,
    /// Requests with a request id being served, one at a time per id.
    pub in_flight: super::write::idempotency::InFlight,
    /// Head reads of a shared store, shared by the calls that wait at once.
    pub head_reads: Arc<super::head_reads::HeadReads>,
    /// The runtime the commit thread hands each batch's answers to (see
    /// `log::batch::Batch::reply`); `None` outside one.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Shared {
    pub(crate) fn read_table(&self) -> RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write_table(&self) -> RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn head(&self) -> u64 {
        self.read_table().head
    }

    /// Runs a store read on the blocking pool: store calls may block (and
    /// the PostgreSQL client refuses to run on an async worker).
    pub(crate) async fn read_store<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn Store) -> crate::store::Result<T> + Send + 'static,
    ) -> crate::Result<T> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || read(store.as_ref()))
            .await
            .map_err(crate::Error::TaskFailed)?
            .map_err(crate::Error::from)
    }

    pub(crate) fn agent(&self, id: AgentId) -> Option<Arc<Agent>> {
        self.read_table()
            .agents
            .get(&id)
            .map(|s| Arc::clone(&s.agent))
    }
}

impl Table {
    /// Applies one committed record and returns the agent after it; `None`
    /// when the record cannot apply (a transition of an agent the table does
    /// not hold, or a registration without its identity), which callers
    /// treat as a broken invariant.
    pub(crate) fn apply(
        &mut self,
        record: Arc<TransitionRecord>,
        identity: Option<&AgentIdentity>,
        metrics: &Metrics,
    ) -> Option<Arc<Agent>> {
        let agent = match (record.from, self.agents.get_mut(&record.agent_id)) {
            (Some(_), Some(slot)) => {
                let agent = Arc::new(slot.agent.after(Arc::clone(&record)));
                slot.agent = Arc::clone(&agent);
                agent
            }
            (None, None) => {
                let identity = identity?;
                let agent = Arc::new(Agent::registered(
                    record.agent_id,
                    Arc::clone(&identity.name),
                    Arc::clone(&identity.labels),
                    Arc::clone(&record),
                ));
                self.agents
                    .insert(record.agent_id, Slot::new(Arc::clone(&agent)));
                agent
            }
            _ => return None,
        };
        self.head = self.head.max(record.sequence);
        self.requests.note(&record);
        metrics.agent_moved(
            record.from,
            record.to,
            super::metrics::trigger_source(&record.triggered_by),
        );
        Some(agent)
    }
}

#[cfg(test)]
impl Shared {
    /// An empty table over `store`, with the default policy, a bus of
    /// `bus_capacity` events and no runtime (answers go straight to the
    /// proposers).
    pub(crate) fn for_tests(store: Arc<dyn Store>, bus_capacity: usize) -> Arc<Shared> {
        let (bus, _) = broadcast::channel(bus_capacity);
        Arc::new(Shared {
            policy: TransitionPolicy::default(),
            table: RwLock::new(Table::default()),
            bus,
            store,
            metrics: Metrics::new(),
            clock: Arc::new(crate::domain::SystemClock),
            follow_requested: AtomicBool::new(false),
            in_flight: super::write::idempotency::InFlight::default(),
            head_reads: Arc::default(),
            runtime: None,
        })
    }
}
