//! Heartbeats and the health monitor: dead or stuck agents are noticed and
//! repaired as far as policy allows.
//!
//! Agents report heartbeats (optionally with their load and current task);
//! [`Health`] keeps the last one of each agent. An agent that has sent a
//! heartbeat is watched from then on:
//!
//! - STARTING, when its start waits for a heartbeat (StartAgent with
//!   `wait_for_heartbeat`, or a restart by the monitor): the first
//!   heartbeat moves it to ONLINE; none within `startup_timeout` moves it to
//!   TIMEOUT.
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
//! Heartbeats are kept by the process that receives them; the monitor runs
//! in the process that holds the `health-monitor` lease.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use crate::{
    AgentLifecycleService,
    domain::{AgentId, AgentState, Caller, Metadata},
    error::{Error, Result},
    service::{ChangeRequest, lease_holder},
};

/// `triggered_by` of the monitor's transitions.
pub const TRIGGER: &str = "health-monitor";

/// Reason prefix of the ERROR transition after missed heartbeats.
const MISSED: &str = "heartbeat missed";

/// Health and restart settings (`[health]` in the configuration file).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthSettings {
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

/// One heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct Heartbeat {
    /// When it arrived (the service's clock).
    pub at: SystemTime,
    /// The agent's load, as it reports it.
    pub load: Option<f64>,
    /// The task it works on, as it reports it.
    pub current_task: Option<String>,
}

/// What the monitor knows of one agent.
#[derive(Clone, Debug, Default)]
struct Watch {
    last: Option<Heartbeat>,
    /// Its start waits for a heartbeat; since when (wall time).
    awaiting_since: Option<SystemTime>,
    /// Restarts since it was last healthy for `reset_after`.
    restarts: u32,
    /// When the pending restart is due.
    restart_at: Option<SystemTime>,
}

/// Heartbeats and the monitor. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Health {
    service: AgentLifecycleService,
    settings: Arc<HealthSettings>,
    watches: Arc<Mutex<HashMap<AgentId, Watch>>>,
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
    }
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
        }
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, HashMap<AgentId, Watch>> {
        self.watches.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> SystemTime {
        self.service.config().clock.now()
    }

    /// The agent's last heartbeat, if it sent one to this process.
    pub fn last_heartbeat(&self, id: AgentId) -> Option<Heartbeat> {
        self.watches().get(&id).and_then(|w| w.last.clone())
    }

    /// Marks the agent's start (now in STARTING) as waiting for its first
    /// heartbeat.
    pub fn await_heartbeat(&self, id: AgentId) {
        let now = self.now();
        self.watches().entry(id).or_default().awaiting_since = Some(now);
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
    ) -> Result<()> {
        let agent = self.service.get_agent(id)?;
        self.service.metrics().heartbeat_received();
        let beat = Heartbeat {
            at: self.now(),
            load,
            current_task,
        };
        let awaiting = {
            let mut watches = self.watches();
            let watch = watches.entry(id).or_default();
            watch.last = Some(beat);
            watch.awaiting_since.is_some()
        };
        let recovering = agent.state == AgentState::Error
            && agent.last_transition.triggered_by == TRIGGER
            && agent.last_transition.reason.starts_with(MISSED);
        let reason = match agent.state {
            AgentState::Starting if awaiting => "first heartbeat: start-up complete",
            AgentState::Error if recovering => "heartbeats resumed",
            _ => return Ok(()),
        };
        match self
            .service
            .transition(
                id,
                AgentState::Online,
                change(reason.to_string(), Metadata::new(), agent.version),
            )
            .await
        {
            Ok(_) => {
                let mut watches = self.watches();
                if let Some(watch) = watches.get_mut(&id) {
                    watch.awaiting_since = None;
                    watch.restart_at = None;
                }
                Ok(())
            }
            // Someone else moved it meanwhile: the heartbeat still counts.
            Err(Error::Transition(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// The monitor: runs until the service shuts down. The grace period
    /// counts from this call.
    pub fn run(self) -> impl std::future::Future<Output = ()> + Send {
        let started = self.now();
        async move {
            let mut lease = lease_holder(&self.service, "health-monitor");
            let mut ticks =
                tokio::time::interval(self.settings.check_interval.max(Duration::from_millis(10)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
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
                self.check(now).await;
            }
        }
    }

    /// Agents that stayed longer than `max_dwell` in their state move along
    /// its timeout edge.
    async fn check_dwell(&self, now: SystemTime) {
        if self.settings.max_dwell.is_empty() {
            return;
        }
        for info in self.service.get_all_agent_statuses().into_values() {
            let agent = info.agent;
            let Some((_, limit)) = self
                .settings
                .max_dwell
                .iter()
                .find(|(state, _)| *state == agent.state)
            else {
                continue;
            };
            let stayed = now.duration_since(agent.updated_at).unwrap_or_default();
            if stayed <= *limit {
                continue;
            }
            let Some(edge) = timeout_edge(self.service.policy(), agent.state) else {
                continue;
            };
            let reason = format!(
                "stuck in {} for {}, max_dwell {}",
                agent.state,
                secs(stayed),
                secs(*limit)
            );
            warn!(agent_id = %agent.id, state = %agent.state, %edge, %reason, "agent stuck");
            self.service.metrics().stuck_agent();
            if let Err(err) = self.move_to(agent.id, agent.version, edge, reason).await {
                warn!(agent_id = %agent.id, error = %err, "moving a stuck agent failed");
            }
        }
    }

    /// One pass over the watched agents.
    async fn check(&self, now: SystemTime) {
        self.check_dwell(now).await;
        let ids: Vec<AgentId> = self.watches().keys().copied().collect();
        for id in ids {
            let Ok(agent) = self.service.get_agent(id) else {
                self.watches().remove(&id);
                continue;
            };
            let Some(watch) = self.watches().get(&id).cloned() else {
                continue;
            };
            let since_beat = watch
                .last
                .as_ref()
                .and_then(|b| now.duration_since(b.at).ok());
            let settings = self.settings.for_agent(&agent);
            let result = match agent.state {
                AgentState::Starting => match watch.awaiting_since {
                    Some(since)
                        if now.duration_since(since).unwrap_or_default()
                            > settings.startup_timeout =>
                    {
                        let reason = format!(
                            "no heartbeat within startup_timeout {} (restart {} of {})",
                            secs(settings.startup_timeout),
                            watch.restarts,
                            settings.max_restarts
                        );
                        self.service.metrics().stuck_agent();
                        self.move_to(id, agent.version, AgentState::Timeout, reason)
                            .await
                    }
                    _ => Ok(()),
                },
                AgentState::Online | AgentState::Idle | AgentState::Busy => match since_beat {
                    Some(silent) if silent > settings.heartbeat_timeout => {
                        let interval = settings.heartbeat_interval.max(Duration::from_millis(1));
                        let missed = (silent.as_secs_f64() / interval.as_secs_f64()).floor() as u64;
                        let reason = format!(
                            "{MISSED}: last seen {} ago, timeout {}, {missed} heartbeats missed",
                            secs(silent),
                            secs(settings.heartbeat_timeout)
                        );
                        self.service.metrics().heartbeat_missed();
                        self.move_to(id, agent.version, AgentState::Error, reason)
                            .await
                    }
                    Some(silent) => {
                        // Healthy: after reset_after the restart count
                        // starts over.
                        if watch.restarts > 0
                            && now.duration_since(agent.updated_at).unwrap_or_default()
                                > settings.reset_after
                            && silent <= settings.heartbeat_timeout
                            && let Some(w) = self.watches().get_mut(&id)
                        {
                            w.restarts = 0;
                        }
                        Ok(())
                    }
                    None => Ok(()),
                },
                AgentState::Timeout | AgentState::Error
                    if agent.last_transition.triggered_by == TRIGGER =>
                {
                    self.restart(id, &agent, watch, now).await
                }
                _ => Ok(()),
            };
            if let Err(err) = result {
                warn!(agent_id = %id, error = %err, "health monitor action failed");
            }
        }
    }

    /// Schedules, performs or gives up a restart of an agent the monitor
    /// put in TIMEOUT or ERROR.
    async fn restart(
        &self,
        id: AgentId,
        agent: &crate::domain::Agent,
        watch: Watch,
        now: SystemTime,
    ) -> Result<()> {
        let settings = self.settings.for_agent(agent);
        if watch.restarts >= settings.max_restarts {
            let reason = format!(
                "restarts exhausted: {} of {}",
                watch.restarts, settings.max_restarts
            );
            return self
                .walk(id, agent.state, agent.version, AgentState::Failed, reason)
                .await;
        }
        let due = match watch.restart_at {
            Some(due) => due,
            None => {
                let attempt = watch.restarts + 1;
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
                if let Some(w) = self.watches().get_mut(&id) {
                    w.restart_at = Some(due);
                }
                if now < due {
                    return Ok(());
                }
                due
            }
        };
        if now < due {
            return Ok(());
        }
        let attempt = watch.restarts + 1;
        let reason = format!(
            "restart {attempt} of {} after {} in {}",
            settings.max_restarts,
            secs(settings.backoff(attempt)),
            agent.state
        );
        self.walk(id, agent.state, agent.version, AgentState::Starting, reason)
            .await?;
        self.service.metrics().restarted();
        info!(agent_id = %id, attempt, "health monitor restarted an agent");
        let mut watches = self.watches();
        if let Some(w) = watches.get_mut(&id) {
            w.restarts = attempt;
            w.restart_at = None;
            w.awaiting_since = Some(now);
        }
        Ok(())
    }

    async fn move_to(
        &self,
        id: AgentId,
        version: u64,
        to: AgentState,
        reason: String,
    ) -> Result<()> {
        info!(agent_id = %id, %to, %reason, "health monitor");
        self.service
            .transition(id, to, change(reason, Metadata::new(), version))
            .await
            .map(|_| ())
    }

    /// Walks the policy's path from `from` to `to`, one recorded step each.
    async fn walk(
        &self,
        id: AgentId,
        from: AgentState,
        version: u64,
        to: AgentState,
        reason: String,
    ) -> Result<()> {
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
        let mut version = version;
        for step in path {
            let outcome = self
                .service
                .transition(id, step, change(reason.clone(), Metadata::new(), version))
                .await?;
            version = outcome.agent.version;
        }
        Ok(())
    }
}
