//! The service's request and result types: what callers pass in and get
//! back, and the service's settings.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use crate::{
    domain::{
        Agent, AgentCategory, AgentId, AgentState, Caller, Clock, Labels, Metadata, StateSet,
        SystemClock, TransitionPolicy, TransitionRecord,
    },
    store::Retention,
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
/// [`AgentLifecycleService::list_agents`](super::AgentLifecycleService::list_agents)).
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
    /// Where wall-clock time comes from (commit times, retention by age).
    pub clock: Arc<dyn Clock>,
    /// How long a client `request_id` is remembered for retries
    /// ([`super::DEFAULT_REQUEST_WINDOW`]).
    pub request_window: Duration,
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
            clock: Arc::new(SystemClock),
            request_window: super::DEFAULT_REQUEST_WINDOW,
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
    /// The client's idempotency key (AIP-155): a retry with the same id and
    /// content within the request window returns the original outcome
    /// without a second change; the same id with other content is refused.
    pub request_id: Option<String>,
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
    /// Hook failures and panics since start.
    pub hook_failures: u64,
    /// Watchers refilled from the event log since start.
    pub watch_backfills: u64,
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
