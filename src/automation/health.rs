//! Heartbeats and the health monitor: dead or stuck agents are noticed and
//! repaired as far as policy allows.
//!
//! Agents report heartbeats (optionally with their load and current task);
//! [`Health`] keeps the last one of each agent. An agent that has sent a
//! heartbeat is watched from then on:
//!
//! - STARTING, when its start waits for a heartbeat (StartAgent with
//!   `wait_for_heartbeat`, or by the policy's `start_waits_for_heartbeat`,
//!   or a restart by the monitor; the transition to STARTING carries
//!   `health.await_heartbeat: true`): the first heartbeat moves it to
//!   ONLINE; none within `startup_timeout` moves it to TIMEOUT.
//! - ONLINE, IDLE, BUSY: no heartbeat for `heartbeat_timeout` moves it to
//!   ERROR with reason "heartbeat missed" (the reason counts the missed
//!   beats). An agent with no task but steady heartbeats is never touched.
//! - ERROR after missed heartbeats: heartbeats resuming move it back to
//!   ONLINE.
//! - TIMEOUT, and ERROR after missed heartbeats, are restarted (STARTING,
//!   along the policy's path) after a back-off: `initial_delay`, times
//!   `multiplier` per attempt, at most `max_delay`, with `jitter`; after
//!   `max_restarts` attempts the agent goes to FAILED. The count resets once
//!   the agent has been healthy for `reset_after`.
//!
//! After the monitor starts (a server restart) no timeout fires for `grace`.
//! Every automatic transition records `triggered_by = "health-monitor"` and
//! a reason with the numbers. Like every automation, this drives the service
//! through its public API with its own timers (tokio time, wall times from
//! the service's clock, so tests run it on a paused clock).
//!
//! On a shared store (PostgreSQL) every process saves the heartbeats it
//! receives to the store once per `check_interval`, and the monitor, in
//! the process that holds the `health-monitor` lease, reads them all before
//! each look: heartbeats count whichever process receives them (seen up to
//! about two check intervals late, so `heartbeat_timeout` should span
//! several). The restart count travels with the monitor's transitions
//! (`health.restarts` in their metadata), so a monitor that takes over
//! carries on counting.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

pub use crate::domain::Heartbeat;
use crate::{
    AgentLifecycleService,
    domain::{Agent, AgentId, AgentState, Caller, Metadata},
    error::{Error, Result},
    service::{ChangeRequest, lease_holder},
};

/// `triggered_by` of the monitor's transitions.
pub const TRIGGER: &str = "health-monitor";

/// Reason prefix of the ERROR transition after missed heartbeats.
const MISSED: &str = "heartbeat missed";

/// Metadata key of a transition to STARTING whose start completes with the
/// agent's first heartbeat (`true`).
pub const AWAIT_KEY: &str = "health.await_heartbeat";

/// Metadata key of the restart count the monitor records with its
/// transitions.
pub const RESTARTS_KEY: &str = "health.restarts";

/// Health and restart settings (`[health]` in the configuration file).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthSettings {
    /// StartAgent without `wait_for_heartbeat` waits for the first
    /// heartbeat (stays in STARTING) when this is set; the default, as in
    /// the original design, goes straight on to ONLINE.
    pub start_waits_for_heartbeat: bool,
    /// STARTING (waiting for a heartbeat) longer than this: TIMEOUT.
    pub startup_timeout: Duration,
    /// Expected time between heartbeats, for counting misses.
    pub heartbeat_interval: Duration,
    /// No heartbeat for this long: ERROR.
    pub heartbeat_timeout: Duration,
    /// No timeout fires this long after the monitor starts.
    pub grace: Duration,
    /// Restarts before FAILED.
    pub max_restarts: u32,
    /// Wait before the first restart.
    pub initial_delay: Duration,
    /// Factor of each further wait.
    pub multiplier: f64,
    /// Longest wait.
    pub max_delay: Duration,
    /// Each wait varies by up to this fraction (0 to 1).
    pub jitter: f64,
    /// Healthy this long: the restart count starts over.
    pub reset_after: Duration,
    /// How often the monitor looks.
    pub check_interval: Duration,
    /// Longest stay in a state (for any agent, heartbeats or not): past it
    /// the agent moves along the state's timeout edge (the first the policy
    /// allows of TIMEOUT, ERROR, FAILED). Typically DEPLOYING, STARTING,
    /// STOPPING and UPDATING; none by default.
    pub max_dwell: Vec<(AgentState, Duration)>,
    /// Settings for agents with certain labels: the first rule whose
    /// selector the agent's labels match applies (its timeouts and restart
    /// policy; `grace`, `check_interval` and `max_dwell` are the monitor's).
    pub rules: Vec<HealthRule>,
}

/// Health settings for the agents a label selector matches.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthRule {
    /// Labels an agent must carry (all of them).
    pub selector: crate::domain::Labels,
    /// The settings for those agents.
    pub settings: HealthSettings,
}

impl Default for HealthSettings {
    /// Kubernetes-like defaults: restarts after 10 s, doubling to 300 s,
    /// reset after 10 minutes healthy.
    fn default() -> Self {
        HealthSettings {
            start_waits_for_heartbeat: false,
            startup_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(30),
            max_restarts: 5,
            initial_delay: Duration::from_secs(10),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            jitter: 0.1,
            reset_after: Duration::from_secs(600),
            check_interval: Duration::from_secs(1),
            max_dwell: Vec::new(),
            rules: Vec::new(),
        }
    }
}

impl HealthSettings {
    /// The settings for `agent`: those of the first rule whose selector
    /// matches its labels, or these.
    pub fn for_agent(&self, agent: &crate::domain::Agent) -> &HealthSettings {
        self.rules
            .iter()
            .find(|rule| agent.has_labels(&rule.selector))
            .map_or(self, |rule| &rule.settings)
    }

    /// The wait before restart `attempt` (1-based), before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = self
            .multiplier
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let delay = self.initial_delay.as_secs_f64() * factor;
        Duration::from_secs_f64(delay.min(self.max_delay.as_secs_f64()))
    }
}

/// What the monitor knows of one agent.
#[derive(Clone, Debug, Default)]
struct Watch {
    last: Option<Heartbeat>,
    /// Restarts since it was last healthy for `reset_after`; `None` until
    /// this monitor has counted one (then the count recorded with the
    /// agent's last automatic transition applies: a monitor taking over
    /// from another process, or after a restart, carries on counting).
    restarts: Option<u32>,
    /// When the pending restart is due.
    restart_at: Option<SystemTime>,
    /// Since when it has been operational with fresh heartbeats.
    healthy_since: Option<SystemTime>,
}

/// Heartbeats and the monitor. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Health {
    service: AgentLifecycleService,
    settings: Arc<HealthSettings>,
    watches: Arc<Mutex<HashMap<AgentId, Watch>>>,
    /// Heartbeats received here and not yet saved to a shared store.
    unsaved: Arc<Mutex<HashMap<AgentId, Heartbeat>>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

fn change(reason: String, metadata: Metadata, expected_version: u64) -> ChangeRequest {
    ChangeRequest {
        reason,
        triggered_by: TRIGGER.to_string(),
        metadata,
        expected_version: Some(expected_version),
        caller: Caller::principal(TRIGGER),
        request_id: None,
    }
}

/// Transition metadata that records the restart count.
fn counted(restarts: u32) -> Metadata {
    let mut metadata = Metadata::new();
    metadata.insert(RESTARTS_KEY.to_string(), restarts.into());
    metadata
}

/// Whether the agent is in STARTING waiting for its first heartbeat: its
/// transition to STARTING carried `health.await_heartbeat = true`.
pub fn awaits_heartbeat(agent: &Agent) -> bool {
    agent.state == AgentState::Starting
        && agent
            .last_transition
            .metadata
            .get(AWAIT_KEY)
            .and_then(serde_json::Value::as_bool)
            == Some(true)
}

/// The restart count recorded with the agent's last transition, when the
/// monitor made it.
fn recorded_restarts(agent: &Agent) -> u32 {
    if agent.last_transition.triggered_by != TRIGGER {
        return 0;
    }
    recorded_count(&agent.last_transition.metadata)
}

/// The restart count in monitor metadata.
fn recorded_count(metadata: &Metadata) -> u32 {
    metadata
        .get(RESTARTS_KEY)
        .and_then(serde_json::Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Where an agent stuck in `state` goes: the first of TIMEOUT, ERROR and
/// FAILED that the policy allows from it.
pub fn timeout_edge(
    policy: &crate::domain::TransitionPolicy,
    state: AgentState,
) -> Option<AgentState> {
    [AgentState::Timeout, AgentState::Error, AgentState::Failed]
        .into_iter()
        .find(|to| policy.allows(state, *to))
}

fn secs(d: Duration) -> String {
    format!("{:.0}s", d.as_secs_f64())
}

impl Health {
    /// Heartbeat tracking over `service` with `settings`.
    pub fn new(service: AgentLifecycleService, settings: HealthSettings) -> Self {
        Health {
            service,
            settings: Arc::new(settings),
            watches: Arc::default(),
            unsaved: Arc::default(),
        }
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, HashMap<AgentId, Watch>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unsaved(&self) -> std::sync::MutexGuard<'_, HashMap<AgentId, Heartbeat>> {
        self.unsaved.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> SystemTime {
        self.service.config().clock.now()
    }

    /// The agent's last heartbeat that reached this process.
    pub fn local_heartbeat(&self, id: AgentId) -> Option<Heartbeat> {
        self.watches().get(&id).and_then(|w| w.last.clone())
    }

    /// The last heartbeats of `ids`, whichever process of a shared store
    /// received them. A store that cannot be read leaves this process's own.
    pub async fn last_heartbeats(&self, ids: &[AgentId]) -> HashMap<AgentId, Heartbeat> {
        let mut found: HashMap<AgentId, Heartbeat> = ids
            .iter()
            .filter_map(|id| Some((*id, self.local_heartbeat(*id)?)))
            .collect();
        if !self.service.is_store_shared() || ids.is_empty() {
            return found;
        }
        match self.service.saved_heartbeats(Some(ids.to_vec())).await {
            Ok(saved) => {
                for (id, beat) in saved {
                    let newest = match found.remove(&id) {
                        Some(local) => local.newer(beat),
                        None => beat,
                    };
                    found.insert(id, newest);
                }
            }
            Err(err) => warn!(error = %err, "reading saved heartbeats failed"),
        }
        found
    }

    /// StartAgent: with `wait` (or, when the request does not say, when the
    /// agent's health settings say `start_waits_for_heartbeat`) the agent
    /// goes to STARTING only, marked as waiting for its first heartbeat
    /// (metadata `health.await_heartbeat = true`, durable, so any process
    /// completes the start); otherwise STARTING then ONLINE at once.
    ///
    /// # Errors
    /// As [`AgentLifecycleService::start_agent`].
    pub async fn start(
        &self,
        id: AgentId,
        wait: Option<bool>,
        mut change: ChangeRequest,
    ) -> Result<crate::service::Outcome> {
        let wait = match wait {
            Some(wait) => wait,
            None => match self.service.get_agent(id) {
                Ok(agent) => self.settings.for_agent(&agent).start_waits_for_heartbeat,
                // Let the service report it.
                Err(_) => false,
            },
        };
        if !wait {
            return self.service.start_agent(id, change).await;
        }
        change
            .metadata
            .insert(AWAIT_KEY.to_string(), serde_json::Value::Bool(true));
        if change.reason.is_empty() {
            change.reason = "agent starting, waiting for its first heartbeat".to_string();
        }
        self.service
            .transition(id, AgentState::Starting, change)
            .await
    }

    /// Records a heartbeat; a STARTING agent waiting for it goes ONLINE, an
    /// agent in ERROR after missed heartbeats goes back ONLINE.
    ///
    /// # Errors
    /// [`Error::AgentNotFound`], or the transition failed.
    pub async fn heartbeat(
        &self,
        id: AgentId,
        load: Option<f64>,
        current_task: Option<String>,
    ) -> Result<Heartbeat> {
        let agent = self.service.get_agent(id)?;
        self.service.metrics().heartbeat_received();
        let beat = Heartbeat {
            at: self.now(),
            load,
            current_task,
        };
        let restarts = {
            let mut watches = self.watches();
            let watch = watches.entry(id).or_default();
            watch.last = Some(beat.clone());
            watch.restarts
        };
        if self.service.is_store_shared() {
            self.unsaved().insert(id, beat.clone());
        }
        let recovering = agent.state == AgentState::Error
            && agent.last_transition.triggered_by == TRIGGER
            && agent.last_transition.reason.starts_with(MISSED);
        let reason = match agent.state {
            AgentState::Starting if awaits_heartbeat(&agent) => {
                "first heartbeat: start-up complete"
            }
            AgentState::Error if recovering => "heartbeats resumed",
            _ => return Ok(beat),
        };
        let restarts = restarts.unwrap_or_else(|| recorded_restarts(&agent));
        match self
            .service
            .transition(
                id,
                AgentState::Online,
                change(reason.to_string(), counted(restarts), agent.version),
            )
            .await
        {
            Ok(_) => {
                if let Some(watch) = self.watches().get_mut(&id) {
                    watch.restart_at = None;
                }
                Ok(beat)
            }
            // Someone else moved it meanwhile: the heartbeat still counts.
            Err(Error::Transition(_)) => Ok(beat),
            Err(err) => Err(err),
        }
    }

    /// Saves the heartbeats received here since the last call to a shared
    /// store, where the monitor (in whichever process) reads them.
    async fn save(&self) {
        let beats: Vec<(AgentId, Heartbeat)> = self.unsaved().drain().collect();
        if beats.is_empty() {
            return;
        }
        if let Err(err) = self.service.save_heartbeats(beats.clone()).await {
            warn!(error = %err, "saving heartbeats failed; trying again");
            let mut unsaved = self.unsaved();
            for (id, beat) in beats {
                let newest = match unsaved.remove(&id) {
                    Some(newer) => beat.newer(newer),
                    None => beat,
                };
                unsaved.insert(id, newest);
            }
        }
    }

    /// Takes in the heartbeats other processes saved.
    async fn load_saved(&self) {
        if !self.service.is_store_shared() {
            return;
        }
        match self.service.saved_heartbeats(None).await {
            Ok(saved) => {
                let mut watches = self.watches();
                for (id, beat) in saved {
                    let watch = watches.entry(id).or_default();
                    watch.last = Some(match watch.last.take() {
                        Some(local) => local.newer(beat),
                        None => beat,
                    });
                }
            }
            Err(err) => warn!(error = %err, "reading saved heartbeats failed"),
        }
    }

    /// The monitor: runs until the service shuts down. The grace period
    /// counts from this call. Every process runs it (it saves the
    /// heartbeats the process receives); only the holder of the
    /// `health-monitor` lease acts.
    pub fn run(self) -> impl std::future::Future<Output = ()> + Send {
        let started = self.now();
        async move {
            let mut lease = lease_holder(&self.service, "health-monitor");
            let mut ticks =
                tokio::time::interval(self.settings.check_interval.max(Duration::from_millis(10)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                self.save().await;
                if self.service.is_shutting_down() {
                    return;
                }
                if !lease.held().await {
                    continue;
                }
                let now = self.now();
                if now < started + self.settings.grace {
                    continue;
                }
                self.load_saved().await;
                self.check(now).await;
            }
        }
    }

    /// An agent that stayed longer than `max_dwell` in its state moves
    /// along the state's timeout edge. Returns whether it did.
    async fn check_dwell(&self, agent: &Agent, now: SystemTime) -> bool {
        let Some((_, limit)) = self
            .settings
            .max_dwell
            .iter()
            .find(|(state, _)| *state == agent.state)
        else {
            return false;
        };
        let stayed = now.duration_since(agent.updated_at).unwrap_or_default();
        if stayed <= *limit {
            return false;
        }
        let Some(edge) = timeout_edge(self.service.policy(), agent.state) else {
            return false;
        };
        let reason = format!(
            "stuck in {} for {}, max_dwell {}",
            agent.state,
            secs(stayed),
            secs(*limit)
        );
        warn!(agent_id = %agent.id, state = %agent.state, %edge, %reason, "agent stuck");
        self.service.metrics().stuck_agent();
        let restarts = self.restarts(agent);
        if let Err(err) = self
            .move_to(agent.id, agent.version, edge, reason, restarts)
            .await
        {
            warn!(agent_id = %agent.id, error = %err, "moving a stuck agent failed");
        }
        true
    }

    /// The agent's restart count: this monitor's, or the recorded one.
    fn restarts(&self, agent: &Agent) -> u32 {
        self.watches()
            .get(&agent.id)
            .and_then(|w| w.restarts)
            .unwrap_or_else(|| recorded_restarts(agent))
    }

    /// One pass over all agents.
    async fn check(&self, now: SystemTime) {
        let agents = self.service.get_all_agent_statuses();
        // Forget the agents that are gone.
        self.watches().retain(|id, _| agents.contains_key(id));
        for info in agents.into_values() {
            let agent = info.agent;
            if self.check_dwell(&agent, now).await {
                continue;
            }
            if let Err(err) = self.check_one(&agent, now).await {
                warn!(agent_id = %agent.id, error = %err, "health monitor action failed");
            }
        }
    }

    async fn check_one(&self, agent: &Agent, now: SystemTime) -> Result<()> {
        let id = agent.id;
        let settings = self.settings.for_agent(agent);
        let since_beat = self
            .watches()
            .get(&id)
            .and_then(|w| w.last.as_ref())
            .and_then(|b| now.duration_since(b.at).ok());
        let restarts = self.restarts(agent);
        match agent.state {
            AgentState::Starting if awaits_heartbeat(agent) => {
                let waited = now.duration_since(agent.updated_at).unwrap_or_default();
                if waited <= settings.startup_timeout {
                    return Ok(());
                }
                let reason = format!(
                    "no heartbeat within startup_timeout {} (waited {}, restart {restarts} of {})",
                    secs(settings.startup_timeout),
                    secs(waited),
                    settings.max_restarts
                );
                self.service.metrics().stuck_agent();
                self.move_to(id, agent.version, AgentState::Timeout, reason, restarts)
                    .await
            }
            AgentState::Online | AgentState::Idle | AgentState::Busy => {
                let Some(silent) = since_beat else {
                    // Never sent a heartbeat: not watched.
                    return Ok(());
                };
                if silent > settings.heartbeat_timeout {
                    let interval = settings.heartbeat_interval.max(Duration::from_millis(1));
                    let missed = (silent.as_secs_f64() / interval.as_secs_f64()).floor() as u64;
                    let reason = format!(
                        "{MISSED}: last seen {} ago, timeout {}, {missed} heartbeats missed",
                        secs(silent),
                        secs(settings.heartbeat_timeout)
                    );
                    self.service.metrics().heartbeat_missed();
                    if let Some(w) = self.watches().get_mut(&id) {
                        w.healthy_since = None;
                    }
                    return self
                        .move_to(id, agent.version, AgentState::Error, reason, restarts)
                        .await;
                }
                // Healthy: after reset_after the restart count starts over.
                let mut watches = self.watches();
                let watch = watches.entry(id).or_default();
                let since = *watch.healthy_since.get_or_insert(now);
                if restarts > 0
                    && now.duration_since(since).unwrap_or_default() > settings.reset_after
                {
                    info!(agent_id = %id, restarts, "healthy long enough: restart count reset");
                    watch.restarts = Some(0);
                }
                Ok(())
            }
            AgentState::Timeout | AgentState::Error
                if agent.last_transition.triggered_by == TRIGGER =>
            {
                self.restart(agent, restarts, now).await
            }
            _ => {
                if let Some(w) = self.watches().get_mut(&id) {
                    w.healthy_since = None;
                }
                Ok(())
            }
        }
    }

    /// Schedules, performs or gives up a restart of an agent the monitor
    /// put in TIMEOUT or ERROR.
    async fn restart(&self, agent: &Agent, restarts: u32, now: SystemTime) -> Result<()> {
        let id = agent.id;
        let settings = self.settings.for_agent(agent);
        if restarts >= settings.max_restarts {
            let reason = format!(
                "restarts exhausted: {restarts} of {}",
                settings.max_restarts
            );
            return self
                .walk(agent, AgentState::Failed, reason, counted(restarts))
                .await;
        }
        let attempt = restarts + 1;
        let pending = self.watches().get(&id).and_then(|w| w.restart_at);
        let due = match pending {
            Some(due) => due,
            None => {
                let base = settings.backoff(attempt);
                let jitter = settings.jitter.clamp(0.0, 1.0);
                let spread = if jitter > 0.0 {
                    let unit = (uuid::Uuid::new_v4().as_u128() % 10_000) as f64 / 10_000.0;
                    1.0 + jitter * (2.0 * unit - 1.0)
                } else {
                    1.0
                };
                let wait = Duration::from_secs_f64(base.as_secs_f64() * spread);
                // Counted from when the agent entered TIMEOUT or ERROR.
                let due = agent.updated_at + wait;
                self.watches().entry(id).or_default().restart_at = Some(due);
                due
            }
        };
        if now < due {
            return Ok(());
        }
        let reason = format!(
            "restart {attempt} of {} after {} in {}",
            settings.max_restarts,
            secs(settings.backoff(attempt)),
            agent.state
        );
        let mut metadata = counted(attempt);
        metadata.insert(AWAIT_KEY.to_string(), serde_json::Value::Bool(true));
        self.walk(agent, AgentState::Starting, reason, metadata)
            .await?;
        self.service.metrics().restarted();
        info!(agent_id = %id, attempt, "health monitor restarted an agent");
        let mut watches = self.watches();
        let watch = watches.entry(id).or_default();
        watch.restarts = Some(attempt);
        watch.restart_at = None;
        Ok(())
    }

    async fn move_to(
        &self,
        id: AgentId,
        version: u64,
        to: AgentState,
        reason: String,
        restarts: u32,
    ) -> Result<()> {
        info!(agent_id = %id, %to, %reason, "health monitor");
        self.service
            .transition(id, to, change(reason, counted(restarts), version))
            .await
            .map(|_| ())
    }

    /// Walks the policy's path from the agent's state to `to`, one recorded
    /// step each; the last step carries `metadata`, the others its restart
    /// count (so a walk interrupted midway still tells a monitor taking
    /// over where it stood).
    async fn walk(
        &self,
        agent: &Agent,
        to: AgentState,
        reason: String,
        metadata: Metadata,
    ) -> Result<()> {
        let (id, from) = (agent.id, agent.state);
        let policy = self.service.policy();
        // Giving up goes through ERROR where the policy has no direct edge
        // (TIMEOUT -> ERROR -> FAILED), never through another start.
        let path = if to == AgentState::Failed
            && !policy.allows(from, to)
            && policy.allows(from, AgentState::Error)
            && policy.allows(AgentState::Error, AgentState::Failed)
        {
            Some(vec![AgentState::Error, AgentState::Failed])
        } else {
            policy.path_to(from, to)
        };
        let Some(path) = path else {
            warn!(agent_id = %id, %from, %to, "the policy has no path for the health monitor");
            return Ok(());
        };
        let mut version = agent.version;
        let last = path.len().saturating_sub(1);
        for (i, step) in path.into_iter().enumerate() {
            let step_metadata = if i == last {
                metadata.clone()
            } else {
                counted(recorded_count(&metadata))
            };
            let outcome = self
                .service
                .transition(id, step, change(reason.clone(), step_metadata, version))
                .await?;
            version = outcome.agent.version;
        }
        Ok(())
    }
}
