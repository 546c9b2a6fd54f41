//! The lifecycle service: the seed's library API in Rust.
//!
//! [`AgentLifecycleService`] owns the agent table (every agent's current
//! version, in memory), the commit thread (the store's one writer, see
//! `commit`), the event bus (a tokio broadcast channel) and the handlers.
//! It is usable without any network; the gRPC layer is a thin adapter over
//! it.
//!
//! # Write path
//! A transition takes the agent's writer lock (so that transitions on one
//! agent are linearizable), checks the policy, runs the pre-transition
//! handlers, hands the change to the commit thread (which commits it with the
//! next sequence, updates the table and publishes the event in sequence
//! order), runs the post-transition handlers and replies.

mod commit;
mod handlers;
mod manager;
mod watch;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, mpsc},
    time::Duration,
};

use tokio::sync::{broadcast, oneshot, watch as watch_channel};
use tracing::{debug, info};

use self::commit::{Committed, Message, Proposal, Rejected, Step};
pub use self::{
    handlers::Handler,
    manager::AgentLifecycleManager,
    watch::{WatchItem, WatchRequest, Watcher},
};
use crate::{
    domain::{
        Agent, AgentCategory, AgentId, Caller, AgentState, HandlerPhase, Labels, LifecycleEvent, Metadata,
        StateSet, TransitionContext, TransitionError, TransitionPolicy, TransitionRecord, limits,
    },
    error::{Error, Result},
    store::{HistoryRange, MemoryStore, Retention, Store},
};

/// Events the broadcast channel buffers for its slowest receiver. A watcher
/// that falls further behind is backfilled from the store's event log, so
/// this bounds memory, not correctness.
pub const DEFAULT_EVENT_BUFFER: usize = 4096;

/// Proposals committed together at most (one transaction, one fsync).
pub const DEFAULT_MAX_BATCH: usize = 1024;

/// Default interval of progress messages on idle watch streams.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Agents one ListAgents call examines at most (see
/// [`AgentLifecycleService::list_agents`]).
pub const MAX_LIST_SCAN: usize = 100_000;

/// Default page size of history reads.
pub const DEFAULT_HISTORY_PAGE: usize = 1000;

/// Service settings.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The active transition policy.
    pub policy: TransitionPolicy,
    /// Broadcast buffer ([`DEFAULT_EVENT_BUFFER`]).
    pub event_buffer: usize,
    /// Which events compaction deletes.
    pub retention: Retention,
    /// How often compaction runs when retention is set.
    pub compaction_interval: Duration,
    /// Idle time after which a watch stream gets a progress message.
    pub progress_interval: Duration,
    /// Largest commit batch.
    pub max_batch: usize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            policy: TransitionPolicy::default(),
            event_buffer: DEFAULT_EVENT_BUFFER,
            retention: Retention::default(),
            compaction_interval: Duration::from_secs(1),
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }
}

/// What the caller says about a change. Empty `reason` and `triggered_by`
/// get the operation's defaults (`triggered_by` defaults to `system`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChangeRequest {
    /// Why.
    pub reason: String,
    /// Who.
    pub triggered_by: String,
    /// Free-form metadata recorded with every transition of the change.
    pub metadata: Metadata,
    /// Compare-and-set on the agent's version before the change.
    pub expected_version: Option<u64>,
    /// Who asks (the gRPC edge sets it from the request's extensions).
    pub caller: Caller,
}

impl ChangeRequest {
    /// A request with only a reason.
    pub fn because(reason: impl Into<String>) -> Self {
        ChangeRequest {
            reason: reason.into(),
            ..ChangeRequest::default()
        }
    }
}

/// A registration.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registration {
    /// The id; `None` generates a UUIDv7.
    pub agent_id: Option<AgentId>,
    /// Display name.
    pub name: String,
    /// Labels, matched by list and watch filters.
    pub labels: Labels,
    /// Reason, triggered_by and metadata of the registration transition.
    pub change: ChangeRequest,
}

/// The result of a mutating call.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The agent after the change.
    pub agent: Arc<Agent>,
    /// The transitions applied, in order; empty when nothing changed.
    pub transitions: Vec<Arc<TransitionRecord>>,
}

/// An agent's state information (the seed's `get_current_state_info`).
#[derive(Clone, Debug, PartialEq)]
pub struct StateInfo {
    /// The agent.
    pub agent: Arc<Agent>,
    /// What the policy allows from its state.
    pub valid_transitions: Vec<AgentState>,
}

impl StateInfo {
    /// ONLINE, BUSY or IDLE.
    pub fn is_operational(&self) -> bool {
        self.agent.state.is_operational()
    }
    /// ONLINE or IDLE.
    pub fn is_available_for_tasks(&self) -> bool {
        self.agent.state.is_available_for_tasks()
    }
    /// ERROR, FAILED or TIMEOUT.
    pub fn is_in_error_state(&self) -> bool {
        self.agent.state.is_error()
    }
    /// MAINTENANCE, SUSPENDED or UPDATING.
    pub fn is_in_maintenance(&self) -> bool {
        self.agent.state.is_maintenance()
    }
}

/// Fleet-wide counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LifecycleMetrics {
    /// All agents.
    pub total_agents: u64,
    /// ONLINE, BUSY, IDLE.
    pub operational_agents: u64,
    /// ONLINE, IDLE.
    pub available_agents: u64,
    /// ERROR, FAILED, TIMEOUT.
    pub error_agents: u64,
    /// MAINTENANCE, SUSPENDED, UPDATING.
    pub maintenance_agents: u64,
    /// Agents per state; states with none are absent.
    pub state_distribution: BTreeMap<AgentState, u64>,
    /// Newest committed sequence.
    pub head_sequence: u64,
    /// Handler failures and panics since start.
    pub handler_failures: u64,
}

/// Which agents a listing returns. Every given filter must match.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentFilter {
    /// Agents in one of these states (empty: any).
    pub states: StateSet,
    /// Agents of this category.
    pub category: Option<AgentCategory>,
    /// Agents carrying all these labels.
    pub labels: Labels,
}

impl AgentFilter {
    /// Whether `agent` passes.
    pub fn matches(&self, agent: &Agent) -> bool {
        self.states.matches(agent.state)
            && self.category.is_none_or(|c| agent.state.in_category(c))
            && agent.has_labels(&self.labels)
    }
}

/// Where a history page starts: records with `after < sequence <= upto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryCursor {
    /// Exclusive lower bound.
    pub after: u64,
    /// Inclusive upper bound, fixed when the listing began.
    pub upto: u64,
}

/// A history read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Only the newest `limit` records (0: all).
    pub limit: u64,
    /// Records per page (0: [`DEFAULT_HISTORY_PAGE`]).
    pub page_size: usize,
    /// Continue a listing.
    pub cursor: Option<HistoryCursor>,
}

/// One page of history.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryPage {
    /// Oldest first.
    pub transitions: Vec<Arc<TransitionRecord>>,
    /// Records retained for the agent.
    pub total_count: u64,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<HistoryCursor>,
}

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
    /// Agents per state, indexed by `AgentState::index`.
    pub counts: [u64; 18],
}

/// What the commit thread shares with the service.
pub(crate) struct Shared {
    pub policy: TransitionPolicy,
    /// Written only by the commit thread, once per batch; held briefly (no
    /// I/O inside) by readers.
    pub table: RwLock<Table>,
    /// Committed events, in sequence order.
    pub bus: broadcast::Sender<Arc<LifecycleEvent>>,
    pub store: Arc<dyn Store>,
    /// Times a watcher fell behind the bus and was backfilled from the log.
    pub backfills: std::sync::atomic::AtomicU64,
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

    pub(crate) fn agent(&self, id: AgentId) -> Option<Arc<Agent>> {
        self.read_table()
            .agents
            .get(&id)
            .map(|s| Arc::clone(&s.agent))
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// To the commit thread. Unbounded, but every message has a caller
    /// waiting for its reply, so the queue is bounded by in-flight requests
    /// (which the server caps per connection).
    commits: mpsc::Sender<Message>,
    handlers: handlers::Handlers,
    config: ServiceConfig,
    /// `true` once shutdown began: watch streams end, nothing new starts.
    shutdown: watch_channel::Sender<bool>,
    commit_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The lifecycle service. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct AgentLifecycleService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AgentLifecycleService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLifecycleService")
            .field("head", &self.head_sequence())
            .finish_non_exhaustive()
    }
}

fn defaulted(value: String, default: &str) -> String {
    if value.is_empty() {
        default.to_string()
    } else {
        value
    }
}

fn check_change(change: &ChangeRequest) -> Result<()> {
    limits::check_text("reason", &change.reason, limits::MAX_REASON_BYTES)?;
    limits::check_text(
        "triggered_by",
        &change.triggered_by,
        limits::MAX_SHORT_TEXT_BYTES,
    )?;
    limits::check_metadata("metadata", &change.metadata)?;
    Ok(())
}

/// The operations with a fixed path, their required states and default
/// reasons.
#[derive(Clone, Copy, Debug)]
struct Operation {
    name: &'static str,
    /// States the agent must be in (empty: whatever the policy allows).
    requires: &'static [AgentState],
    /// Targets, in order, each with its default reason.
    path: &'static [(AgentState, &'static str)],
}

const DEPLOY: Operation = Operation {
    name: "deploy_agent",
    requires: &[],
    path: &[
        (AgentState::Deploying, "deployment started"),
        (AgentState::Deployed, "deployment completed"),
    ],
};
const START: Operation = Operation {
    name: "start_agent",
    requires: &[],
    path: &[
        (AgentState::Starting, "agent starting"),
        (AgentState::Online, "agent started"),
    ],
};
const STOP: Operation = Operation {
    name: "stop_agent",
    requires: &[],
    path: &[
        (AgentState::Stopping, "agent stopping"),
        (AgentState::Offline, "agent stopped"),
    ],
};
const ASSIGN: Operation = Operation {
    name: "assign_task",
    requires: &[AgentState::Online, AgentState::Idle],
    path: &[(AgentState::Busy, "task assigned")],
};
const COMPLETE: Operation = Operation {
    name: "complete_task",
    requires: &[AgentState::Busy],
    path: &[(AgentState::Idle, "task completed")],
};
const HANDLE_ERROR: Operation = Operation {
    name: "handle_error",
    requires: &[],
    path: &[(AgentState::Error, "error")],
};
const MAINTENANCE: Operation = Operation {
    name: "put_in_maintenance",
    requires: &[],
    path: &[(AgentState::Maintenance, "maintenance")],
};
const RESUME: Operation = Operation {
    name: "resume_from_maintenance",
    requires: &[AgentState::Maintenance],
    path: &[(AgentState::Online, "resumed from maintenance")],
};

impl AgentLifecycleService {
    /// Opens the service over `store`: loads every agent, starts the commit
    /// thread.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn open(store: Arc<dyn Store>, config: ServiceConfig) -> Result<Self> {
        let recovered = store.load()?;
        let mut table = Table {
            head: recovered.head,
            ..Table::default()
        };
        for agent in recovered.agents {
            table.counts[agent.state.index()] += 1;
            table.agents.insert(agent.id, Slot::new(Arc::new(agent)));
        }
        info!(
            agents = table.agents.len(),
            head = table.head,
            "store loaded"
        );
        let (bus, _) = broadcast::channel(config.event_buffer.max(1));
        let shared = Arc::new(Shared {
            policy: config.policy.clone(),
            table: RwLock::new(table),
            bus,
            store,
            backfills: std::sync::atomic::AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let settings = commit::Settings {
            max_batch: config.max_batch.max(1),
            retention: config.retention,
            compaction_interval: config.compaction_interval,
        };
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || commit::run(thread_shared, rx, settings))
            .map_err(|e| crate::store::StoreError::backend("starting the commit thread", e))?;
        let (shutdown, _) = watch_channel::channel(false);
        Ok(AgentLifecycleService {
            inner: Arc::new(Inner {
                shared,
                commits: tx,
                handlers: handlers::Handlers::default(),
                config,
                shutdown,
                commit_thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// A service over a fresh [`MemoryStore`] with default settings.
    ///
    /// # Errors
    /// The commit thread cannot be started.
    pub fn in_memory() -> Result<Self> {
        let config = ServiceConfig::default();
        Self::open(Arc::new(MemoryStore::new(&config.retention)), config)
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.inner.shared
    }

    /// The settings in force.
    pub fn config(&self) -> &ServiceConfig {
        &self.inner.config
    }

    /// The active policy.
    pub fn policy(&self) -> &TransitionPolicy {
        &self.inner.shared.policy
    }

    /// The newest committed sequence.
    pub fn head_sequence(&self) -> u64 {
        self.inner.shared.head()
    }

    /// The oldest sequence still in the event log.
    pub fn oldest_sequence(&self) -> u64 {
        self.inner.shared.store.oldest_sequence()
    }

    /// Times a watcher fell behind the broadcast buffer and was backfilled
    /// from the event log, since start.
    pub fn watch_backfills(&self) -> u64 {
        self.inner
            .shared
            .backfills
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Registers a service-wide handler.
    pub fn on_event(&self, phase: HandlerPhase, handler: Handler) {
        self.inner.handlers.add(None, phase, handler);
    }

    pub(crate) fn on_agent_event(&self, id: AgentId, phase: HandlerPhase, handler: Handler) {
        self.inner.handlers.add(Some(id), phase, handler);
    }

    /// Handler failures and panics since start.
    pub fn handler_failures(&self) -> u64 {
        self.inner.handlers.failures()
    }

    async fn propose(&self, proposal: Proposal) -> Result<Committed, Rejected> {
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .commits
            .send(Message::Propose(proposal, tx))
            .is_err()
        {
            return Err(Rejected::Closed);
        }
        rx.await.unwrap_or(Err(Rejected::Closed))
    }

    fn refuse_when_closed(&self) -> Result<()> {
        if *self.inner.shutdown.borrow() {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    /// Creates an agent in REGISTERED. Idempotent while the agent is still
    /// REGISTERED (returns it, records nothing).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for oversized fields,
    /// [`Error::AgentExists`] when the id has left REGISTERED, a veto, or a
    /// store failure.
    pub async fn register_agent(&self, registration: Registration) -> Result<Outcome> {
        limits::check_text("name", &registration.name, limits::MAX_SHORT_TEXT_BYTES)?;
        limits::check_labels("labels", &registration.labels)?;
        check_change(&registration.change)?;
        self.refuse_when_closed()?;
        let id = registration.agent_id.unwrap_or_else(AgentId::generate);
        if let Some(existing) = self.inner.shared.agent(id) {
            return Self::existing_registration(existing);
        }
        let change = registration.change;
        let step = Step {
            to: AgentState::Registered,
            reason: defaulted(change.reason, "agent registered"),
            triggered_by: defaulted(change.triggered_by, "system"),
            metadata: change.metadata,
        };
        let pre = self.inner.handlers.select(id, HandlerPhase::PreTransition);
        if !pre.is_empty() {
            let ctx = context(HandlerPhase::PreTransition, id, None, &step);
            if let Some(reason) = self.inner.handlers.run(&pre, &ctx).await {
                return Err(TransitionError::Vetoed {
                    agent_id: id,
                    from: None,
                    to: AgentState::Registered,
                    reason,
                }
                .into());
            }
        }
        let proposal = Proposal::Register {
            id,
            name: Arc::from(registration.name),
            labels: Arc::new(registration.labels),
            step,
        };
        match self.propose(proposal).await {
            Ok(committed) => {
                info!(agent_id = %id, sequence = committed.records[0].sequence, "agent registered");
                self.after_commit(&committed).await;
                Ok(Outcome {
                    agent: committed.agent,
                    transitions: committed.records,
                })
            }
            Err(Rejected::Exists(agent)) => Self::existing_registration(agent),
            Err(rejected) => Err(self.rejection(id, rejected)),
        }
    }

    fn existing_registration(agent: Arc<Agent>) -> Result<Outcome> {
        if agent.state == AgentState::Registered {
            return Ok(Outcome {
                agent,
                transitions: Vec::new(),
            });
        }
        Err(Error::AgentExists {
            agent_id: agent.id,
            state: agent.state,
        })
    }

    fn rejection(&self, id: AgentId, rejected: Rejected) -> Error {
        match rejected {
            Rejected::Store(err) => Error::Store(err),
            Rejected::Exists(agent) => Error::AgentExists {
                agent_id: agent.id,
                state: agent.state,
            },
            Rejected::Stale { expected, actual } => TransitionError::VersionMismatch {
                agent_id: id,
                expected,
                actual,
            }
            .into(),
            Rejected::NotAllowed { from, to } => TransitionError::NotAllowed {
                agent_id: id,
                from,
                to,
                allowed: self.policy().allowed_targets(from).to_vec(),
            }
            .into(),
            Rejected::Missing => Error::AgentNotFound(id),
            Rejected::Closed => Error::ShuttingDown,
        }
    }

    async fn after_commit(&self, committed: &Committed) {
        let Some(first) = committed.records.first() else {
            return;
        };
        let post = self
            .inner
            .handlers
            .select(first.agent_id, HandlerPhase::PostTransition);
        if post.is_empty() {
            return;
        }
        for record in &committed.records {
            let ctx = TransitionContext {
                phase: HandlerPhase::PostTransition,
                agent_id: record.agent_id,
                from_state: record.from,
                to_state: record.to,
                reason: record.reason.clone(),
                triggered_by: record.triggered_by.clone(),
                metadata: record.metadata.clone(),
                sequence: Some(record.sequence),
                version: Some(record.version),
                timestamp: Some(record.at),
            };
            self.inner.handlers.run(&post, &ctx).await;
        }
    }

    /// Moves an agent to `target` if the policy allows it.
    ///
    /// # Errors
    /// [`Error::AgentNotFound`], [`TransitionError::NotAllowed`],
    /// [`TransitionError::VersionMismatch`], a veto, oversized fields, or a
    /// store failure. Nothing is recorded on any error.
    pub async fn transition(
        &self,
        id: AgentId,
        target: AgentState,
        change: ChangeRequest,
    ) -> Result<Outcome> {
        let op = Operation {
            name: "transition",
            requires: &[],
            path: &[],
        };
        self.apply(id, op, &[(target, "")], change).await
    }

    async fn apply(
        &self,
        id: AgentId,
        op: Operation,
        path: &[(AgentState, &'static str)],
        change: ChangeRequest,
    ) -> Result<Outcome> {
        check_change(&change)?;
        self.refuse_when_closed()?;
        let writer = {
            let table = self.inner.shared.read_table();
            let slot = table.agents.get(&id).ok_or(Error::AgentNotFound(id))?;
            Arc::clone(&slot.writer)
        };
        // Owned, so that it can travel with the proposal: the commit thread
        // releases it after applying the change, even if this request is
        // cancelled while the proposal waits in the queue.
        let guard = writer.lock_owned().await;
        let agent = self
            .inner
            .shared
            .agent(id)
            .ok_or(Error::AgentNotFound(id))?;
        if let Some(expected) = change.expected_version
            && expected != agent.version
        {
            return Err(TransitionError::VersionMismatch {
                agent_id: id,
                expected,
                actual: agent.version,
            }
            .into());
        }
        if !op.requires.is_empty() && !op.requires.contains(&agent.state) {
            return Err(TransitionError::RequiresState {
                agent_id: id,
                operation: op.name,
                state: agent.state,
                required: op.requires.to_vec(),
            }
            .into());
        }
        let mut from = agent.state;
        for (to, _) in path {
            if !self.policy().allows(from, *to) {
                return Err(TransitionError::NotAllowed {
                    agent_id: id,
                    from,
                    to: *to,
                    allowed: self.policy().allowed_targets(from).to_vec(),
                }
                .into());
            }
            from = *to;
        }
        let triggered_by = defaulted(change.triggered_by, "system");
        let steps: Vec<Step> = path
            .iter()
            .map(|(to, default_reason)| Step {
                to: *to,
                reason: if change.reason.is_empty() {
                    default_reason.to_string()
                } else {
                    change.reason.clone()
                },
                triggered_by: triggered_by.clone(),
                metadata: change.metadata.clone(),
            })
            .collect();

        let pre = self.inner.handlers.select(id, HandlerPhase::PreTransition);
        if !pre.is_empty() {
            let mut from = agent.state;
            for step in &steps {
                let ctx = context(HandlerPhase::PreTransition, id, Some(from), step);
                if let Some(reason) = self.inner.handlers.run(&pre, &ctx).await {
                    return Err(TransitionError::Vetoed {
                        agent_id: id,
                        from: Some(from),
                        to: step.to,
                        reason,
                    }
                    .into());
                }
                from = step.to;
            }
        }

        let proposal = Proposal::Transition {
            id,
            prior_version: agent.version,
            steps,
            guard,
        };
        let committed = self
            .propose(proposal)
            .await
            .map_err(|rejected| self.rejection(id, rejected))?;
        for record in &committed.records {
            debug!(agent_id = %id, from = ?record.from, to = %record.to, sequence = record.sequence, "agent transitioned");
        }
        self.after_commit(&committed).await;
        Ok(Outcome {
            agent: committed.agent,
            transitions: committed.records,
        })
    }

    /// DEPLOYING then DEPLOYED, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn deploy_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.apply(id, DEPLOY, DEPLOY.path, change).await
    }

    /// STARTING then ONLINE, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn start_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.apply(id, START, START.path, change).await
    }

    /// STOPPING then OFFLINE, committed together.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn stop_agent(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.apply(id, STOP, STOP.path, change).await
    }

    /// ONLINE or IDLE -> BUSY; `task_id` (optional) goes into the metadata.
    ///
    /// # Errors
    /// [`TransitionError::RequiresState`] when the agent is not available.
    pub async fn assign_task(
        &self,
        id: AgentId,
        task_id: Option<String>,
        mut change: ChangeRequest,
    ) -> Result<Outcome> {
        add_task_id(&mut change, task_id)?;
        self.apply(id, ASSIGN, ASSIGN.path, change).await
    }

    /// BUSY -> IDLE; `task_id` (optional) goes into the metadata.
    ///
    /// # Errors
    /// [`TransitionError::RequiresState`] when the agent is not BUSY.
    pub async fn complete_task(
        &self,
        id: AgentId,
        task_id: Option<String>,
        mut change: ChangeRequest,
    ) -> Result<Outcome> {
        add_task_id(&mut change, task_id)?;
        self.apply(id, COMPLETE, COMPLETE.path, change).await
    }

    /// -> ERROR with reason `Error: <message>` and metadata `error_message`.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn handle_error(
        &self,
        id: AgentId,
        error_message: &str,
        mut change: ChangeRequest,
    ) -> Result<Outcome> {
        // The message becomes the reason "Error: <message>", so its limit is
        // the reason's less the prefix, and a violation names the field the
        // caller sent.
        limits::check_text(
            "error_message",
            error_message,
            limits::MAX_ERROR_MESSAGE_BYTES,
        )?;
        change.reason = format!("Error: {error_message}");
        change
            .metadata
            .insert("error_message".into(), error_message.to_string().into());
        self.apply(id, HANDLE_ERROR, HANDLE_ERROR.path, change)
            .await
    }

    /// -> MAINTENANCE with the given reason.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::transition`].
    pub async fn put_in_maintenance(&self, id: AgentId, change: ChangeRequest) -> Result<Outcome> {
        self.apply(id, MAINTENANCE, MAINTENANCE.path, change).await
    }

    /// MAINTENANCE -> ONLINE.
    ///
    /// # Errors
    /// [`TransitionError::RequiresState`] when the agent is not in
    /// MAINTENANCE.
    pub async fn resume_from_maintenance(
        &self,
        id: AgentId,
        change: ChangeRequest,
    ) -> Result<Outcome> {
        self.apply(id, RESUME, RESUME.path, change).await
    }

    /// A handle on one agent (the seed's `get_manager`).
    ///
    /// # Errors
    /// [`Error::AgentNotFound`].
    pub fn get_manager(&self, id: AgentId) -> Result<AgentLifecycleManager> {
        self.get_agent(id)?;
        Ok(AgentLifecycleManager::new(self.clone(), id))
    }

    /// The agent's latest version.
    ///
    /// # Errors
    /// [`Error::AgentNotFound`].
    pub fn get_agent(&self, id: AgentId) -> Result<Arc<Agent>> {
        self.inner.shared.agent(id).ok_or(Error::AgentNotFound(id))
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

    fn agents_where(&self, keep: impl Fn(&Agent) -> bool) -> Vec<Arc<Agent>> {
        self.inner
            .shared
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

    /// Fleet-wide counts, from counters kept by the commit thread (O(1) in
    /// the number of agents).
    pub fn get_lifecycle_metrics(&self) -> LifecycleMetrics {
        let table = self.inner.shared.read_table();
        let mut metrics = LifecycleMetrics {
            head_sequence: table.head,
            handler_failures: self.handler_failures(),
            ..LifecycleMetrics::default()
        };
        for state in AgentState::ALL {
            let count = table.counts[state.index()];
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
        let table = self.inner.shared.read_table();
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
        let store = Arc::clone(&self.inner.shared.store);
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
        .map_err(|e| crate::store::StoreError::backend("reading history", e))?
    }

    /// Opens an event stream.
    ///
    /// # Errors
    /// [`Error::SequenceCompacted`], [`Error::SequenceNotYetWritten`],
    /// [`Error::ShuttingDown`], or a bad combination of options.
    pub fn watch(&self, request: WatchRequest) -> Result<Watcher> {
        self.refuse_when_closed()?;
        Watcher::open(
            Arc::clone(&self.inner.shared),
            request,
            self.inner.config.progress_interval,
            self.inner.shutdown.subscribe(),
        )
    }

    /// Runs compaction to completion now, under the configured retention,
    /// and returns the number of events deleted (compaction otherwise runs
    /// by itself every `compaction_interval`).
    ///
    /// # Errors
    /// The store failed, or the service is closed.
    pub async fn compact_now(&self) -> Result<u64> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commits
            .send(Message::Compact(tx))
            .map_err(|_| Error::ShuttingDown)?;
        match rx.await {
            Ok(result) => result.map_err(Error::Store),
            Err(_) => Err(Error::ShuttingDown),
        }
    }

    /// Begins shutdown: open watch streams end with [`Error::ShuttingDown`]
    /// after what they have delivered, and new requests are refused.
    pub fn begin_shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Commits whatever is queued, closes the store and stops the commit
    /// thread. Requests after this fail with [`Error::ShuttingDown`].
    ///
    /// # Errors
    /// The store failed to close.
    pub async fn close(&self) -> Result<()> {
        self.begin_shutdown();
        let (tx, rx) = oneshot::channel();
        if self.inner.commits.send(Message::Close(tx)).is_ok()
            && let Ok(result) = rx.await
        {
            result.map_err(Error::Store)?;
        }
        let thread = self
            .inner
            .commit_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}

fn add_task_id(change: &mut ChangeRequest, task_id: Option<String>) -> Result<()> {
    if let Some(task_id) = task_id.filter(|t| !t.is_empty()) {
        limits::check_text("task_id", &task_id, limits::MAX_SHORT_TEXT_BYTES)?;
        change.metadata.insert("task_id".into(), task_id.into());
    }
    Ok(())
}

fn context(
    phase: HandlerPhase,
    agent_id: AgentId,
    from: Option<AgentState>,
    step: &Step,
) -> TransitionContext {
    TransitionContext {
        phase,
        agent_id,
        from_state: from,
        to_state: step.to,
        reason: step.reason.clone(),
        triggered_by: step.triggered_by.clone(),
        metadata: step.metadata.clone(),
        sequence: None,
        version: None,
        timestamp: None,
    }
}
