//! The lifecycle service: the seed's library API in Rust.
//!
//! [`AgentLifecycleService`] owns the agent table (every agent's current
//! version, in memory), the commit thread (the store's one writer), the
//! event bus (a tokio broadcast channel), the transition hooks and the
//! metrics registry. It is usable without any network; the gRPC layer is a
//! thin adapter over it.
//!
//! # Layout
//! - `types`: request and result types, settings.
//! - `table`: the agent table and what the commit thread shares.
//! - `write`: every mutating operation: a plan validated once under the
//!   agent's writer lock, then one path for registrations and transitions
//!   (pre-hooks -> commit -> post-hooks); idempotent retries.
//! - `log`: the event log's writing side: the commit thread (prepare ->
//!   persist -> apply -> publish -> reply, one batch at a time), following
//!   other processes' commits, compaction.
//! - `queries`: reads of the table and of the history.
//! - `cursor`: consumers' durable positions in the event log, kept by the
//!   store.
//! - `event`: [`PublishedEvent`], an event as the bus carries it.
//! - `watch`: event streams. `hooks`: transition hooks. `metrics`: the
//!   registry (`webhook_metrics`: the webhook deliverers' part). `clock`: a
//!   wall clock that follows tokio's time.
//! - `manager`: the per-agent handle (the seed's `AgentLifecycleManager`).
//!
//! The service depends on `domain` and `store` only: nothing here names
//! tonic, prost or `pb`, or knows the automation and the edges above it.

mod as_of;
mod clock;
mod cursor;
mod event;
mod head_reads;
mod hooks;
mod lease;
mod log;
mod manager;
mod metrics;
mod queries;
mod table;
mod types;
mod watch;
mod webhook_metrics;
mod write;

use std::sync::{Arc, RwLock, atomic::AtomicBool};

use tokio::sync::{broadcast, watch as watch_channel};
use tracing::info;

pub(crate) use self::lease::LeaseHolder;
pub use self::{
    as_of::{AgentAt, AsOf},
    clock::TokioClock,
    cursor::MAX_CURSOR_NAME_BYTES,
    event::PublishedEvent,
    hooks::Hook,
    manager::AgentLifecycleManager,
    metrics::Metrics,
    types::{
        AgentFilter, ChangeRequest, DEFAULT_EVENT_BUFFER, DEFAULT_HISTORY_PAGE, DEFAULT_MAX_BATCH,
        DEFAULT_PROGRESS_INTERVAL, HistoryCursor, HistoryPage, HistoryQuery, LifecycleMetrics,
        MAX_LIST_SCAN, Outcome, Registration, ServiceConfig, StateInfo,
    },
    watch::{WatchItem, WatchRequest, Watcher},
    webhook_metrics::WebhookMetrics,
    write::{DEFAULT_REQUEST_WINDOW, MAX_REQUEST_ID_BYTES},
};
use self::{
    log::Log,
    table::{Shared, Slot, Table},
    write::idempotency,
};
use crate::{
    domain::{AgentId, HookPhase, TransitionPolicy},
    error::{Error, Result},
    store::{MemoryStore, Store},
};

struct Inner {
    shared: Arc<Shared>,
    /// The commit thread and its companions: every change to the store goes
    /// through it.
    log: Log,
    hooks: hooks::Hooks,
    config: ServiceConfig,
    /// `true` once shutdown began: watch streams end, nothing new starts.
    shutdown: watch_channel::Sender<bool>,
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

impl AgentLifecycleService {
    /// Opens the service over `store`: loads every agent, starts the commit
    /// thread and, when retention is configured, the compaction timer.
    ///
    /// # Errors
    /// The store cannot be read, the commit thread cannot be started, or
    /// retention is configured outside a tokio runtime (its timer needs
    /// one).
    pub fn open(store: Arc<dyn Store>, config: ServiceConfig) -> Result<Self> {
        let metrics = Metrics::new();
        let table = load_table(store.as_ref(), &config, &metrics)?;
        let runtime = tokio::runtime::Handle::try_current().ok();
        if !config.retention.keeps_everything() && runtime.is_none() {
            return Err(Error::NoRuntime("compaction"));
        }
        let (bus, _) = broadcast::channel(config.event_buffer.max(1));
        let shared = Arc::new(Shared {
            policy: config.policy.clone(),
            table: RwLock::new(table),
            bus,
            store,
            metrics: metrics.clone(),
            clock: Arc::clone(&config.clock),
            follow_requested: AtomicBool::new(false),
            in_flight: idempotency::InFlight::default(),
            head_reads: Arc::default(),
            runtime,
        });
        let log = Log::start(&shared, &config)?;
        let (shutdown, _) = watch_channel::channel(false);
        Ok(AgentLifecycleService {
            inner: Arc::new(Inner {
                shared,
                log,
                hooks: hooks::Hooks::new(metrics),
                config,
                shutdown,
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

    fn hooks(&self) -> &hooks::Hooks {
        &self.inner.hooks
    }

    fn log(&self) -> &Log {
        &self.inner.log
    }

    /// The settings in force.
    pub fn config(&self) -> &ServiceConfig {
        &self.inner.config
    }

    /// The active policy.
    pub fn policy(&self) -> &TransitionPolicy {
        &self.inner.shared.policy
    }

    /// The metrics registry (read by GetLifecycleMetrics and the Prometheus
    /// endpoint; other layers register their own metrics in it).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.shared.metrics
    }

    /// The newest committed sequence.
    pub fn head_sequence(&self) -> u64 {
        self.inner.shared.head()
    }

    /// The oldest sequence still in the event log.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn oldest_sequence(&self) -> Result<u64> {
        self.shared()
            .read_store(|store| store.oldest_sequence())
            .await
    }

    /// Times a watcher fell behind the broadcast buffer and was backfilled
    /// from the event log, since start.
    pub fn watch_backfills(&self) -> u64 {
        self.metrics().watch_backfills()
    }

    /// Whether this process runs the background work `name` (for example
    /// `compaction`): always, on a store only it writes; on a shared store,
    /// while it holds that work's lease.
    pub fn holds_lease(&self, name: &str) -> bool {
        self.metrics().lease_held(name)
    }

    /// Brings the agent table up to date with the store before a read.
    ///
    /// On a store only this process writes, the table is the truth and this
    /// returns at once. On a shared store (PostgreSQL) it reads the store's
    /// head and, when other processes committed beyond the table, applies
    /// their events first: a read after it sees every change committed
    /// before it was called, whichever process committed it. Calls that
    /// wait at once share head reads (one query at a time, each call
    /// answered by one that started after it arrived).
    ///
    /// # Errors
    /// The store cannot be read, or the service is closed.
    pub async fn catch_up_with_store(&self) -> Result<()> {
        self.catch_up(head_reads::Pace::Now).await
    }

    /// [`Self::catch_up_with_store`] for a caller that awaits no answer (a
    /// heartbeat on a stream): its head read may wait up to 2 ms for the
    /// next one, so that a steady flow of such calls costs a process one
    /// head query per 2 ms rather than one per round trip.
    ///
    /// # Errors
    /// As [`Self::catch_up_with_store`].
    pub async fn catch_up_with_store_paced(&self) -> Result<()> {
        self.catch_up(head_reads::Pace::Paced).await
    }

    async fn catch_up(&self, pace: head_reads::Pace) -> Result<()> {
        if !self.shared().store.is_shared() {
            return Ok(());
        }
        let shared = self.shared();
        let head = shared.head_reads.head(&shared.store, pace).await?;
        if self.head_sequence() >= head {
            return Ok(());
        }
        self.log().follow_now().await
    }

    /// Registers a service-wide hook.
    pub fn on_event(&self, phase: HookPhase, hook: Hook) {
        self.hooks().add(None, phase, hook);
    }

    pub(crate) fn on_agent_event(&self, id: AgentId, phase: HookPhase, hook: Hook) {
        self.hooks().add(Some(id), phase, hook);
    }

    /// Hook failures and panics since start.
    pub fn hook_failures(&self) -> u64 {
        self.metrics().hook_failures()
    }

    /// Whether shutdown has begun (background tasks stop on it).
    pub fn is_shutting_down(&self) -> bool {
        *self.inner.shutdown.borrow()
    }

    /// Completes once shutdown has begun: background tasks that wait on
    /// something else (a platform's event stream) select on it.
    pub async fn shutting_down(&self) {
        let mut shutdown = self.inner.shutdown.subscribe();
        // An error means the sender is gone: the service is gone too.
        let _ = shutdown.wait_for(|closing| *closing).await;
    }

    fn refuse_when_closed(&self) -> Result<()> {
        if *self.inner.shutdown.borrow() {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    /// A handle on one agent (the seed's `get_manager`).
    ///
    /// # Errors
    /// [`Error::AgentNotFound`].
    pub fn get_manager(&self, id: AgentId) -> Result<AgentLifecycleManager> {
        self.get_agent(id)?;
        Ok(AgentLifecycleManager::new(self.clone(), id))
    }

    /// Opens an event stream.
    ///
    /// # Errors
    /// [`Error::SequenceCompacted`], [`Error::SequenceNotYetWritten`],
    /// [`Error::ShuttingDown`], or a bad combination of options.
    pub async fn watch(&self, request: WatchRequest) -> Result<Watcher> {
        self.refuse_when_closed()?;
        Watcher::open(
            Arc::clone(&self.inner.shared),
            request,
            self.inner.config.progress_interval,
            self.inner.shutdown.subscribe(),
        )
        .await
    }

    /// Runs compaction to completion now, under the configured retention,
    /// and returns the number of events deleted (compaction otherwise runs
    /// by itself every `compaction_interval`).
    ///
    /// # Errors
    /// The store failed, or the service is closed.
    pub async fn compact_now(&self) -> Result<u64> {
        self.log().compact_now().await
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
        self.log().close().await
    }
}

/// The agent table as the store holds it, with the request ids of the
/// configured window (so retries after a restart are recognised).
///
/// # Errors
/// The store cannot be read.
fn load_table(store: &dyn Store, config: &ServiceConfig, metrics: &Metrics) -> Result<Table> {
    let recovered = store.load()?;
    let mut table = Table {
        head: recovered.head,
        requests: idempotency::RequestIndex::new(config.request_window),
        ..Table::default()
    };
    let since = config
        .clock
        .now()
        .checked_sub(config.request_window)
        .unwrap_or(std::time::UNIX_EPOCH);
    for record in store.requests_since(since)? {
        table.requests.note(&record);
    }
    for agent in recovered.agents {
        metrics.agent_loaded(agent.state);
        table.agents.insert(agent.id, Slot::new(Arc::new(agent)));
    }
    metrics.set_head(table.head);
    info!(
        agents = table.agents.len(),
        head = table.head,
        "store loaded"
    );
    Ok(table)
}

/// A holder of the lease `name` on the service's store, for background work
/// that must run in one process of a fleet at a time.
pub(crate) fn lease_holder(service: &AgentLifecycleService, name: &str) -> lease::LeaseHolder {
    lease::LeaseHolder::new(
        Arc::clone(&service.shared().store),
        name,
        service.metrics().clone(),
    )
}
