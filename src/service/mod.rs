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
//! - `write`: every mutating operation: validate once under the agent's
//!   writer lock, then one path for registrations and transitions
//!   (pre-hooks -> commit -> post-hooks).
//! - `commit`: the commit thread: prepare -> persist -> apply -> publish ->
//!   reply, one batch at a time.
//! - `queries`: reads of the table and of the history.
//! - `watch`: event streams. `hooks`: transition hooks. `metrics`: the
//!   registry. `clock`: a wall clock that follows tokio's time.
//! - `manager`: the per-agent handle (the seed's `AgentLifecycleManager`).

mod clock;
mod commit;
mod hooks;
mod lease;
mod manager;
mod metrics;
mod queries;
mod requests;
mod table;
mod types;
mod watch;
mod write;

use std::{
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use tokio::sync::{broadcast, oneshot, watch as watch_channel};
use tracing::{info, warn};

pub use self::{
    clock::TokioClock,
    hooks::Hook,
    manager::AgentLifecycleManager,
    metrics::Metrics,
    requests::{DEFAULT_REQUEST_WINDOW, MAX_REQUEST_ID_BYTES},
    types::{
        AgentFilter, ChangeRequest, DEFAULT_EVENT_BUFFER, DEFAULT_HISTORY_PAGE, DEFAULT_MAX_BATCH,
        DEFAULT_PROGRESS_INTERVAL, HistoryCursor, HistoryPage, HistoryQuery, LifecycleMetrics,
        MAX_LIST_SCAN, Outcome, Registration, ServiceConfig, StateInfo,
    },
    watch::{WatchItem, WatchRequest, Watcher},
};
use self::{
    commit::Message,
    table::{Shared, Slot, Table},
};
use crate::{
    domain::{AgentId, HookPhase, TransitionPolicy},
    error::{Error, Result},
    store::{MemoryStore, Store},
};

struct Inner {
    shared: Arc<Shared>,
    /// To the commit thread. Unbounded, but every message has a caller
    /// waiting for its reply, so the queue is bounded by in-flight requests
    /// (which the server caps per connection).
    commits: mpsc::Sender<Message>,
    /// The writer, when the store commits in memory: proposers commit
    /// their own changes under its lock (see `commit::Writer`). The commit
    /// thread still closes the store and runs compaction, taking the same
    /// lock.
    inline_writer: Option<Arc<Mutex<commit::Writer>>>,
    hooks: hooks::Hooks,
    config: ServiceConfig,
    /// `true` once shutdown began: watch streams end, nothing new starts.
    shutdown: watch_channel::Sender<bool>,
    commit_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The compaction timer, when retention is configured.
    compactor: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Tells the follower thread (shared stores) to stop.
    stop_following: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop_following.store(true, Ordering::Release);
    }
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
        let recovered = store.load()?;
        let metrics = Metrics::new();
        let mut table = Table {
            head: recovered.head,
            requests: requests::RequestIndex::new(config.request_window),
            ..Table::default()
        };
        // The request ids of the window, so retries after a restart are
        // recognised.
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
        let runtime = tokio::runtime::Handle::try_current();
        if !config.retention.keeps_everything() && runtime.is_err() {
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
            follow_requested: std::sync::atomic::AtomicBool::new(false),
            in_flight: requests::InFlight::default(),
            runtime: runtime.as_ref().ok().cloned(),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Arc::new(Mutex::new(commit::Writer::new(commit::Settings {
            max_batch: config.max_batch.max(1),
            retention: config.retention,
        })));
        let inline_writer = shared
            .store
            .commits_in_memory()
            .then(|| Arc::clone(&writer));
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("commit".into())
            .spawn(move || commit::run(thread_shared, rx, writer))
            .map_err(Error::Spawn)?;
        let compactor = match runtime {
            Ok(runtime) if !config.retention.keeps_everything() => {
                let lease = lease::LeaseHolder::new(
                    Arc::clone(&shared.store),
                    "compaction",
                    shared.metrics.clone(),
                );
                // The schedule starts now, not when the task first runs.
                let period = config.compaction_interval.max(Duration::from_millis(1));
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                Some(runtime.spawn(compact_every(tx.clone(), lease, ticks)))
            }
            _ => None,
        };
        let stop_following = Arc::new(AtomicBool::new(false));
        if shared.store.is_shared() {
            let shared = Arc::clone(&shared);
            let commits = tx.clone();
            let stop = Arc::clone(&stop_following);
            std::thread::Builder::new()
                .name("follower".into())
                .spawn(move || follow_commits(&shared, &commits, &stop))
                .map_err(Error::Spawn)?;
        }
        let (shutdown, _) = watch_channel::channel(false);
        Ok(AgentLifecycleService {
            inner: Arc::new(Inner {
                shared,
                commits: tx,
                inline_writer,
                hooks: hooks::Hooks::new(metrics),
                config,
                shutdown,
                commit_thread: Mutex::new(Some(thread)),
                compactor: Mutex::new(compactor),
                stop_following,
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

    fn commits(&self) -> &mpsc::Sender<Message> {
        &self.inner.commits
    }

    fn inline_writer(&self) -> Option<&Mutex<commit::Writer>> {
        self.inner.inline_writer.as_deref()
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
    /// before it was called, whichever process committed it.
    ///
    /// # Errors
    /// The store cannot be read, or the service is closed.
    pub async fn sync(&self) -> Result<()> {
        if !self.shared().store.is_shared() {
            return Ok(());
        }
        let head = self.shared().read_store(|store| store.head()).await?;
        if self.head_sequence() >= head {
            return Ok(());
        }
        self.catch_up().await
    }

    /// Has the commit thread apply whatever other processes committed.
    pub(crate) async fn catch_up(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.commits()
            .send(Message::Follow(Some(tx)))
            .map_err(|_| Error::ShuttingDown)?;
        match rx.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(Error::Store(err)),
            Err(_) => Err(Error::ShuttingDown),
        }
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
        self.inner.stop_following.store(true, Ordering::Release);
        let compactor = self
            .inner
            .compactor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(compactor) = compactor {
            // Wait until the task is gone: it owns a lease (a database
            // connection on a shared store), released with it.
            compactor.abort();
            let _ = compactor.await;
        }
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

/// How long the follower waits for a notification before reading the log
/// anyway (in case a notification was lost).
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);

/// The follower thread of a shared store: wakes on other processes' commits
/// (LISTEN/NOTIFY) or every [`FOLLOW_INTERVAL`], and asks the commit thread
/// to apply them. At most one request is queued at a time.
fn follow_commits(shared: &Shared, commits: &mpsc::Sender<Message>, stop: &AtomicBool) {
    let mut feed = None;
    while !stop.load(Ordering::Acquire) {
        if feed.is_none() {
            match shared.store.commit_feed() {
                Ok(Some(opened)) => feed = Some(opened),
                Ok(None) => return,
                Err(err) => {
                    warn!(error = %crate::error::chain(&err), "cannot listen for other processes' commits; reading the log every second");
                }
            }
        }
        let waited = match feed.as_mut() {
            Some(open) => open.wait(FOLLOW_INTERVAL),
            None => {
                std::thread::sleep(FOLLOW_INTERVAL);
                Ok(false)
            }
        };
        if let Err(err) = waited {
            warn!(error = %crate::error::chain(&err), "the commit feed failed; reopening it");
            feed = None;
        }
        if !shared.follow_requested.swap(true, Ordering::AcqRel)
            && commits.send(Message::Follow(None)).is_err()
        {
            return;
        }
    }
}

/// Asks the commit thread for a compaction round at every tick of `ticks`
/// (tokio time, so tests can drive it with a paused clock; the schedule
/// is made when the service opens, so a task first polled late still
/// keeps it) while this process holds the compaction lease, waiting for
/// each round to end before the next interval starts.
async fn compact_every(
    commits: mpsc::Sender<Message>,
    mut lease: lease::LeaseHolder,
    mut ticks: tokio::time::Interval,
) {
    loop {
        ticks.tick().await;
        if !lease.held().await {
            continue;
        }
        let (tx, rx) = oneshot::channel();
        if commits.send(Message::Compact(tx)).is_err() {
            return;
        }
        match rx.await {
            Ok(Ok(_)) => {}
            Ok(Err(err)) => {
                warn!(error = %crate::error::chain(&*err), "compaction failed; retrying at the next interval");
            }
            Err(_) => return,
        }
    }
}

/// A holder of the lease `name` on the service's store, for background work
/// that must run in one process of a fleet at a time.
pub(crate) fn lease_holder(
    service: &AgentLifecycleService,
    name: &'static str,
) -> lease::LeaseHolder {
    lease::LeaseHolder::new(
        Arc::clone(&service.shared().store),
        name,
        service.metrics().clone(),
    )
}
