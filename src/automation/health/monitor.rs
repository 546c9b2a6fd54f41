//! The monitor loop: every `check_interval`, the holder of the
//! `health-monitor` lease looks at every agent and acts on what timed out
//! (no first heartbeat in time, heartbeats missed, a state held past its
//! `max_dwell`); restarting is `restart.rs`'s.
//!
//! Drives the service through its public API only; knows nothing of gRPC.

use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::{
    HealthSettings, HeartbeatMonitor, MISSED, awaits_heartbeat, awaits_platform, recorded_restarts,
    secs,
};
use crate::{
    domain::{Agent, AgentState, TransitionPolicy},
    error::Result,
    service::lease_holder,
};

/// Where an agent stuck in `state` goes: the first of TIMEOUT, ERROR and
/// FAILED that the policy allows from it.
pub fn timeout_edge(policy: &TransitionPolicy, state: AgentState) -> Option<AgentState> {
    [AgentState::Timeout, AgentState::Error, AgentState::Failed]
        .into_iter()
        .find(|to| policy.allows(state, *to))
}

impl HeartbeatMonitor {
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

    /// Acts on what timed out for `agent` (by the settings that apply to
    /// it): no first heartbeat, heartbeats missed, or a restart due.
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
            AgentState::Starting if awaits_heartbeat(agent) || awaits_platform(agent) => {
                self.check_startup(agent, settings, restarts, now).await
            }
            AgentState::Online | AgentState::Idle | AgentState::Busy => {
                let Some(silent) = since_beat else {
                    // Never sent a heartbeat: not watched.
                    return Ok(());
                };
                self.check_heartbeats(agent, settings, silent, restarts, now)
                    .await
            }
            AgentState::Timeout | AgentState::Error
                if self.restarts_after(&agent.last_transition.triggered_by) =>
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

    /// A STARTING agent waiting for its first heartbeat (or for its
    /// platform) for longer than `startup_timeout` goes to TIMEOUT.
    async fn check_startup(
        &self,
        agent: &Agent,
        settings: &HealthSettings,
        restarts: u32,
        now: SystemTime,
    ) -> Result<()> {
        let waited = now.duration_since(agent.updated_at).unwrap_or_default();
        if waited <= settings.startup_timeout {
            return Ok(());
        }
        let awaited = if awaits_platform(agent) {
            "the platform did not report it running"
        } else {
            "no heartbeat"
        };
        let reason = format!(
            "{awaited} within startup_timeout {} (waited {}, restart {restarts} of {})",
            secs(settings.startup_timeout),
            secs(waited),
            settings.max_restarts
        );
        self.service.metrics().stuck_agent();
        self.move_to(
            agent.id,
            agent.version,
            AgentState::Timeout,
            reason,
            restarts,
        )
        .await
    }

    /// An operational agent `silent` since its last heartbeat: past
    /// `heartbeat_timeout` it goes to ERROR; otherwise it is healthy, and
    /// once healthy for `reset_after` its restart count starts over.
    async fn check_heartbeats(
        &self,
        agent: &Agent,
        settings: &HealthSettings,
        silent: Duration,
        restarts: u32,
        now: SystemTime,
    ) -> Result<()> {
        let id = agent.id;
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
        let mut watches = self.watches();
        let watch = watches.entry(id).or_default();
        let since = *watch.healthy_since.get_or_insert(now);
        if restarts > 0 && now.duration_since(since).unwrap_or_default() > settings.reset_after {
            info!(agent_id = %id, restarts, "healthy long enough: restart count reset");
            watch.restarts = Some(0);
        }
        Ok(())
    }
}
