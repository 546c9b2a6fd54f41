//! The service's one metrics registry.
//!
//! Every counter, gauge and histogram of the process lives in one
//! [`prometheus::Registry`], named by Prometheus conventions
//! (`agent_lifecycle_` prefix, base units, `_total` for counters), so that
//! `GetLifecycleMetrics` and the Prometheus text endpoint read the same
//! values. Hot-path handles (one counter per transition edge, one gauge per
//! state) are resolved once at start-up: recording is an atomic add, with no
//! label lookup.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use super::webhook_metrics::WebhookMetrics;
use crate::domain::{AgentState, HookPhase};

/// Number of states; `from` has one more value (none, for registrations).
const STATES: usize = AgentState::ALL.len();

/// Label value of `from` for a registration (it has no prior state).
pub const NO_STATE: &str = "none";

/// The `source` of transitions clients make (everything but the server's
/// automation).
pub const CLIENT_SOURCE: &str = "client";

/// The `source` of a transition, from its `triggered_by`: the server's
/// automation by name, every other value `client` (so that the label set
/// stays bounded whatever clients write).
pub fn trigger_source(triggered_by: &str) -> &'static str {
    match triggered_by {
        "health-monitor" => "health-monitor",
        "hf_sync" => "hf_sync",
        "k8s_sync" => "k8s_sync",
        "docker_sync" => "docker_sync",
        "hf-driver" => "hf-driver",
        "docker-driver" => "docker-driver",
        "k8s-driver" => "k8s-driver",
        _ => CLIENT_SOURCE,
    }
}

/// Upper bounds of the commit batch size histogram (transitions per batch).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Upper bounds of the commit duration histogram, in seconds (50 us to 1 s).
const COMMIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The registry and the service's own metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// `agent_lifecycle_agents{state}`: agents per state. Changed only by
    /// the commit thread, under the table's write lock, so a reader holding
    /// the table's read lock sees them consistent with the table.
    agents: Vec<IntGauge>,
    /// `agent_lifecycle_transitions_total{from,to,source}` of clients,
    /// resolved once and indexed `from * STATES + to` with `from == STATES`
    /// for registrations.
    transitions: Vec<IntCounter>,
    /// The same family, for the automation's sources (resolved when used).
    transitions_vec: IntCounterVec,
    /// `agent_lifecycle_hook_failures_total{phase}`: hooks that failed or
    /// panicked (pre, post).
    hook_failures: [IntCounter; 2],
    /// `agent_lifecycle_watch_backfills_total`.
    watch_backfills: IntCounter,
    /// `agent_lifecycle_watch_streams`: open WatchEvents streams.
    watch_streams: IntGauge,
    /// `agent_lifecycle_watch_streams_ended_total{reason}`: streams the
    /// server ended (`compacted`: a watcher fell behind past retention
    /// while catching up; `shutdown`; `failed`: the store failed).
    watch_ended: IntCounterVec,
    /// `agent_lifecycle_oldest_sequence`: the oldest retained event (set
    /// when scraped).
    oldest_sequence: IntGauge,
    /// `agent_lifecycle_store_size_bytes`: the store's size on disk (set
    /// when scraped; absent for the memory store).
    store_size: IntGauge,
    /// `agent_lifecycle_commit_batch_size`: transitions per committed batch.
    commit_batch_size: Histogram,
    /// `agent_lifecycle_commit_duration_seconds`: store commit time per
    /// batch (fsync included).
    commit_duration: Histogram,
    /// `agent_lifecycle_commit_failures_total`: batches the store refused.
    commit_failures: IntCounter,
    /// `agent_lifecycle_head_sequence`: the newest applied sequence.
    head_sequence: IntGauge,
    /// `agent_lifecycle_lease_held{lease}`: 1 while this process runs the
    /// named background work (one process of a fleet at a time).
    leases: IntGaugeVec,
    /// `agent_lifecycle_heartbeats_total`: heartbeats received.
    heartbeats: IntCounter,
    /// `agent_lifecycle_heartbeats_missed_total`: agents moved to ERROR for
    /// missed heartbeats.
    heartbeats_missed: IntCounter,
    /// `agent_lifecycle_restarts_total`: restarts by the health monitor.
    restarts: IntCounter,
    /// `agent_lifecycle_stuck_agents_total`: agents moved on for staying too
    /// long in a transitional state (start-up timeouts included).
    stuck_agents: IntCounter,
    /// `agent_lifecycle_sync_transitions_total`: transitions caused by
    /// external status sync.
    sync_transitions: IntCounter,
    /// `agent_lifecycle_driver_actions_total{driver, action, outcome}`:
    /// what platform drivers asked of their platforms, and how it ended
    /// (`done`, `settled` when the platform already showed it done, or
    /// `refused`).
    driver_actions: IntCounterVec,
    /// `agent_lifecycle_driver_retries_total{driver}`: platform actions
    /// tried again after a transient failure.
    driver_retries: IntCounterVec,
    /// The webhook deliverers' counters and lags.
    webhooks: WebhookMetrics,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are constant and registered once");
    metric
}

/// Defines metrics in one registry: each is registered as it is made.
struct Definitions<'a>(&'a Registry);

impl Definitions<'_> {
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        let metric =
            IntCounter::with_opts(Opts::new(name, help)).expect("valid counter definition");
        register(self.0, metric)
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        let metric =
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter definition");
        register(self.0, metric)
    }

    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        let metric = IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge definition");
        register(self.0, metric)
    }

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        let metric =
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge definition");
        register(self.0, metric)
    }

    fn histogram(&self, name: &str, help: &str, buckets: &[f64]) -> Histogram {
        let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .expect("valid histogram definition");
        register(self.0, metric)
    }

    /// `agent_lifecycle_agents{state}`, resolved for every state.
    fn agents(&self) -> Vec<IntGauge> {
        let agents = self.gauge_vec(
            "agent_lifecycle_agents",
            "Agents per lifecycle state.",
            &["state"],
        );
        AgentState::ALL
            .iter()
            .map(|s| agents.with_label_values(&[s.as_str()]))
            .collect()
    }

    /// `agent_lifecycle_transitions_total{from,to,source}`, and its client
    /// counters resolved for every edge (from every state and from none).
    fn transitions(&self) -> (IntCounterVec, Vec<IntCounter>) {
        let transitions_vec = self.counter_vec(
            "agent_lifecycle_transitions_total",
            "Committed transitions by edge (from \"none\": registrations) and source (client, health-monitor, hf_sync, k8s_sync, docker_sync, hf-driver, docker-driver, k8s-driver).",
            &["from", "to", "source"],
        );
        let mut transitions = Vec::with_capacity((STATES + 1) * STATES);
        for from in AgentState::ALL.iter().map(|s| s.as_str()).chain([NO_STATE]) {
            for to in AgentState::ALL {
                transitions.push(transitions_vec.with_label_values(&[
                    from,
                    to.as_str(),
                    CLIENT_SOURCE,
                ]));
            }
        }
        (transitions_vec, transitions)
    }

    /// `agent_lifecycle_hook_failures_total{phase}`, for both phases.
    fn hook_failures(&self) -> [IntCounter; 2] {
        let hooks = self.counter_vec(
            "agent_lifecycle_hook_failures_total",
            "Transition hooks that failed or panicked (never blocks a transition).",
            &["phase"],
        );
        [
            hooks.with_label_values(&[HookPhase::PreTransition.as_str()]),
            hooks.with_label_values(&[HookPhase::PostTransition.as_str()]),
        ]
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let registry = Registry::new();
        let define = Definitions(&registry);
        let (transitions_vec, transitions) = define.transitions();
        let head_sequence = define.gauge(
            "agent_lifecycle_head_sequence",
            "The newest applied event sequence.",
        );
        Metrics {
            agents: define.agents(),
            transitions,
            transitions_vec,
            hook_failures: define.hook_failures(),
            watch_backfills: define.counter(
                "agent_lifecycle_watch_backfills_total",
                "Times a watch stream fell behind the broadcast buffer and was refilled from the event log.",
            ),
            watch_ended: define.counter_vec(
                "agent_lifecycle_watch_streams_ended_total",
                "WatchEvents streams the server ended, by reason: compacted (fell behind past retention), shutdown, failed.",
                &["reason"],
            ),
            watch_streams: define.gauge("agent_lifecycle_watch_streams", "Open WatchEvents streams."),
            oldest_sequence: define.gauge(
                "agent_lifecycle_oldest_sequence",
                "The oldest event sequence the store retains (head + 1 when it retains none).",
            ),
            store_size: define.gauge(
                "agent_lifecycle_store_size_bytes",
                "The store's size (SQLite: database and WAL files; PostgreSQL: the database; memory: 0).",
            ),
            commit_batch_size: define.histogram(
                "agent_lifecycle_commit_batch_size",
                "Transitions committed per store transaction.",
                BATCH_BUCKETS,
            ),
            commit_duration: define.histogram(
                "agent_lifecycle_commit_duration_seconds",
                "Time of one store commit (the fsync included).",
                COMMIT_BUCKETS,
            ),
            commit_failures: define.counter(
                "agent_lifecycle_commit_failures_total",
                "Commit batches the store failed.",
            ),
            webhooks: WebhookMetrics::register(&registry, head_sequence.clone()),
            head_sequence,
            leases: define.gauge_vec(
                "agent_lifecycle_lease_held",
                "1 while this process holds the lease of a background task.",
                &["lease"],
            ),
            heartbeats: define.counter("agent_lifecycle_heartbeats_total", "Heartbeats received."),
            heartbeats_missed: define.counter(
                "agent_lifecycle_heartbeats_missed_total",
                "Agents moved to ERROR because their heartbeats stopped.",
            ),
            restarts: define.counter(
                "agent_lifecycle_restarts_total",
                "Agents restarted by the health monitor.",
            ),
            stuck_agents: define.counter(
                "agent_lifecycle_stuck_agents_total",
                "Agents moved on for staying too long in a transitional state.",
            ),
            sync_transitions: define.counter(
                "agent_lifecycle_sync_transitions_total",
                "Transitions caused by external status sync.",
            ),
            driver_actions: define.counter_vec(
                "agent_lifecycle_driver_actions_total",
                "Actions platform drivers asked of their platforms, by outcome (done, settled, refused).",
                &["driver", "action", "outcome"],
            ),
            driver_retries: define.counter_vec(
                "agent_lifecycle_driver_retries_total",
                "Platform actions tried again after a transient failure.",
                &["driver"],
            ),
            registry,
        }
    }

    /// The registry, for other layers to add their metrics to (the gRPC
    /// edge's per-RPC metrics).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn encode_text(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }

    /// Agents in `state` (read under the table lock for a consistent view).
    pub fn agents(&self, state: AgentState) -> u64 {
        self.agents[state.index()].get().max(0) as u64
    }

    pub(crate) fn agent_moved(&self, from: Option<AgentState>, to: AgentState, source: &str) {
        if let Some(from) = from {
            self.agents[from.index()].dec();
        }
        self.agents[to.index()].inc();
        if source == CLIENT_SOURCE {
            let row = from.map_or(STATES, AgentState::index);
            self.transitions[row * STATES + to.index()].inc();
        } else {
            let from = from.map_or(NO_STATE, AgentState::as_str);
            self.transitions_vec
                .with_label_values(&[from, to.as_str(), source])
                .inc();
        }
    }

    pub(crate) fn agent_loaded(&self, state: AgentState) {
        self.agents[state.index()].inc();
    }

    /// Committed transitions along one edge (`from` `None`: registrations),
    /// from every source (read from the registry: for reports, not for hot
    /// paths).
    pub fn transitions(&self, from: Option<AgentState>, to: AgentState) -> u64 {
        let from = from.map_or(NO_STATE, AgentState::as_str);
        self.registry
            .gather()
            .iter()
            .filter(|family| family.name() == "agent_lifecycle_transitions_total")
            .flat_map(|family| family.get_metric())
            .filter(|metric| {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                };
                label("from").as_deref() == Some(from)
                    && label("to").as_deref() == Some(to.as_str())
            })
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum()
    }

    pub(crate) fn hook_failed(&self, phase: HookPhase) {
        self.hook_failures[phase as usize].inc();
    }

    /// Hooks that failed or panicked, both phases.
    pub fn hook_failures(&self) -> u64 {
        self.hook_failures.iter().map(IntCounter::get).sum()
    }

    pub(crate) fn watch_backfilled(&self) {
        self.watch_backfills.inc();
    }

    pub(crate) fn watch_ended(&self, reason: &str) {
        self.watch_ended.with_label_values(&[reason]).inc();
    }

    pub(crate) fn watch_opened(&self) {
        self.watch_streams.inc();
    }

    pub(crate) fn watch_closed(&self) {
        self.watch_streams.dec();
    }

    /// Open WatchEvents streams.
    pub fn watch_streams(&self) -> u64 {
        u64::try_from(self.watch_streams.get()).unwrap_or(0)
    }

    pub(crate) fn set_store_gauges(&self, oldest: u64, size: Option<u64>) {
        self.oldest_sequence
            .set(i64::try_from(oldest).unwrap_or(i64::MAX));
        self.store_size
            .set(size.map_or(0, |s| i64::try_from(s).unwrap_or(i64::MAX)));
    }

    /// Times a watcher was refilled from the event log.
    pub fn watch_backfills(&self) -> u64 {
        self.watch_backfills.get()
    }

    pub(crate) fn batch_committed(&self, transitions: usize, seconds: f64) {
        self.commit_batch_size.observe(transitions as f64);
        self.commit_duration.observe(seconds);
    }

    pub(crate) fn batch_failed(&self) {
        self.commit_failures.inc();
    }

    /// Whether this process holds the lease `name`.
    pub fn lease_held(&self, name: &str) -> bool {
        self.leases.with_label_values(&[name]).get() == 1
    }

    pub(crate) fn set_lease_held(&self, name: &str, held: bool) {
        self.leases.with_label_values(&[name]).set(i64::from(held));
    }

    /// Counts a heartbeat.
    pub fn heartbeat_received(&self) {
        self.heartbeats.inc();
    }

    /// Counts an agent moved to ERROR for missed heartbeats.
    pub fn heartbeat_missed(&self) {
        self.heartbeats_missed.inc();
    }

    /// Counts a restart by the health monitor.
    pub fn restarted(&self) {
        self.restarts.inc();
    }

    /// Counts an agent moved on for staying too long in a state.
    pub fn stuck_agent(&self) {
        self.stuck_agents.inc();
    }

    /// Counts transitions caused by external status sync.
    pub fn sync_transitions(&self, n: usize) {
        self.sync_transitions.inc_by(n as u64);
    }

    /// Counts a platform action of `driver` that ended with `outcome`.
    pub fn driver_action(&self, driver: &str, action: &str, outcome: &str) {
        self.driver_actions
            .with_label_values(&[driver, action, outcome])
            .inc();
    }

    /// The webhook deliverers' metrics.
    pub fn webhooks(&self) -> &WebhookMetrics {
        &self.webhooks
    }

    /// Counts a platform action of `driver` tried again.
    pub fn driver_retry(&self, driver: &str) {
        self.driver_retries.with_label_values(&[driver]).inc();
    }

    /// Heartbeats, missed heartbeats, restarts, stuck agents and sync
    /// transitions since start.
    pub fn automation(&self) -> [u64; 5] {
        [
            self.heartbeats.get(),
            self.heartbeats_missed.get(),
            self.restarts.get(),
            self.stuck_agents.get(),
            self.sync_transitions.get(),
        ]
    }

    pub(crate) fn set_head(&self, head: u64) {
        self.head_sequence
            .set(i64::try_from(head).unwrap_or(i64::MAX));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
