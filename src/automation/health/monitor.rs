//! The monitor loop: every `check_interval`, the holder of the
//! `health-monitor` lease looks at every agent and acts on what timed out
//! (no first heartbeat in time, heartbeats missed, a state held past its
//! `max_dwell`); restarting is `restart.rs`'s.
//!
//! A pass is a look at every agent under one lock of the watches, which
//! sorts out the few agents that need an action; the actions then run side
//! by side (so that on a durable store they share group commits). When a
//! heartbeat or start-up deadline falls before the next regular pass, the
//! monitor also wakes just after it (no sooner than a quarter of
//! `check_interval` after the last pass): a silent agent goes to ERROR
//! shortly after `heartbeat_timeout`, well within `heartbeat_timeout` +
//! `check_interval`, and a fleet whose agents all beat costs one pass per
//! interval.
//!
//! Drives the service through its public API only; knows nothing of gRPC.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures_util::StreamExt as _;

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
            let interval = self.settings.check_interval.max(Duration::from_millis(10));
            // The first pass at once, then every interval.
            let mut next_pass = tokio::time::Instant::now();
            let mut passes: u64 = 0;
            loop {
                tokio::time::sleep_until(next_pass).await;
                let pass_started = tokio::time::Instant::now();
                next_pass = pass_started + interval;
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
                // Every PRUNE_EVERY passes, from the first: forget the
                // agents that are gone and read every saved heartbeat.
                let full = passes.is_multiple_of(PRUNE_EVERY);
                self.load_saved(full).await;
                passes += 1;
                let deadline = self.check(now, full).await;
                if let Some(deadline) = deadline {
                    // Just after the deadline (a silence must exceed the
                    // timeout), no sooner than a quarter interval on.
                    let wait = deadline.duration_since(now).unwrap_or_default() + AFTER_DEADLINE;
                    next_pass = (pass_started + wait.max(interval / 4)).min(next_pass);
                }
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

    /// One pass over all agents: a look at each, then the actions the look
    /// found due. Forgets the agents that are gone when `prune`. Returns
    /// the earliest heartbeat or start-up deadline still ahead.
    async fn check(&self, now: SystemTime, prune: bool) -> Option<SystemTime> {
        let agents = self.service.all_agents();
        let (due, next) = self.look(&agents, now, prune);
        futures_util::stream::iter(due)
            .for_each_concurrent(ACTIONS_AT_ONCE, |(agent, due)| async move {
                if let Err(err) = self.act(&agent, due, now).await {
                    warn!(agent_id = %agent.id, error = %err, "health monitor action failed");
                }
            })
            .await;
        next
    }

    /// Looks at every agent under one lock of the watches: keeps the
    /// healthy ones' bookkeeping, and returns those that need an action
    /// with the earliest deadline still ahead.
    fn look(
        &self,
        agents: &[Arc<Agent>],
        now: SystemTime,
        prune: bool,
    ) -> (Vec<(Arc<Agent>, Due)>, Option<SystemTime>) {
        let mut watches = self.watches();
        if prune || watches.len() > agents.len() {
            let ids: std::collections::HashSet<_> = agents.iter().map(|a| a.id).collect();
            watches.retain(|id, _| ids.contains(id));
        }
        let mut due = Vec::new();
        let mut next: Option<SystemTime> = None;
        let mut ahead = |deadline: SystemTime| {
            if deadline > now && next.is_none_or(|n| deadline < n) {
                next = Some(deadline);
            }
        };
        for agent in agents {
            if self.stuck(agent, now) {
                due.push((Arc::clone(agent), Due::Dwell));
                continue;
            }
            let settings = self.settings.for_agent(agent);
            match agent.state {
                AgentState::Starting if awaits_heartbeat(agent) || awaits_platform(agent) => {
                    let deadline = agent.updated_at + settings.startup_timeout;
                    if now > deadline {
                        due.push((Arc::clone(agent), Due::Startup));
                    } else {
                        ahead(deadline);
                    }
                }
                AgentState::Online | AgentState::Idle | AgentState::Busy => {
                    // Never sent a heartbeat: not watched.
                    let Some(watch) = watches.get_mut(&agent.id) else {
                        continue;
                    };
                    let Some(last) = watch.last.as_ref().map(|b| b.at) else {
                        continue;
                    };
                    let silent = now.duration_since(last).unwrap_or_default();
                    if silent > settings.heartbeat_timeout {
                        watch.healthy_since = None;
                        due.push((Arc::clone(agent), Due::Silent(silent)));
                        continue;
                    }
                    ahead(last + settings.heartbeat_timeout);
                    let since = *watch.healthy_since.get_or_insert(now);
                    let restarts = watch.restarts.unwrap_or_else(|| recorded_restarts(agent));
                    if restarts > 0
                        && now.duration_since(since).unwrap_or_default() > settings.reset_after
                    {
                        info!(agent_id = %agent.id, restarts, "healthy long enough: restart count reset");
                        watch.restarts = Some(0);
                    }
                }
                AgentState::Timeout | AgentState::Error
                    if self.restarts_after(&agent.last_transition.triggered_by) =>
                {
                    due.push((Arc::clone(agent), Due::Restart));
                }
                _ => {
                    if let Some(w) = watches.get_mut(&agent.id) {
                        w.healthy_since = None;
                    }
                }
            }
        }
        (due, next)
    }

    /// Whether `agent` stayed past its state's `max_dwell` (and the policy
    /// has a timeout edge out of it).
    fn stuck(&self, agent: &Agent, now: SystemTime) -> bool {
        self.settings
            .max_dwell
            .iter()
            .find(|(state, _)| *state == agent.state)
            .is_some_and(|(_, limit)| {
                now.duration_since(agent.updated_at).unwrap_or_default() > *limit
                    && timeout_edge(self.service.policy(), agent.state).is_some()
            })
    }

    /// The action [`Self::look`] found due for `agent`.
    async fn act(&self, agent: &Agent, due: Due, now: SystemTime) -> Result<()> {
        let settings = self.settings.for_agent(agent);
        let restarts = self.restarts(agent);
        match due {
            Due::Dwell => {
                self.check_dwell(agent, now).await;
                Ok(())
            }
            Due::Startup => self.check_startup(agent, settings, restarts, now).await,
            Due::Silent(silent) => self.missed(agent, settings, silent, restarts).await,
            Due::Restart => self.restart(agent, restarts, now).await,
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

    /// An operational agent `silent` since its last heartbeat for longer
    /// than `heartbeat_timeout` goes to ERROR.
    async fn missed(
        &self,
        agent: &Agent,
        settings: &HealthSettings,
        silent: Duration,
        restarts: u32,
    ) -> Result<()> {
        let interval = settings.heartbeat_interval.max(Duration::from_millis(1));
        let missed = (silent.as_secs_f64() / interval.as_secs_f64()).floor() as u64;
        let reason = format!(
            "{MISSED}: last seen {} ago, timeout {}, {missed} heartbeats missed",
            secs(silent),
            secs(settings.heartbeat_timeout)
        );
        self.service.metrics().heartbeat_missed();
        self.move_to(agent.id, agent.version, AgentState::Error, reason, restarts)
            .await
    }
}

/// What a pass found due for an agent.
#[derive(Clone, Copy, Debug)]
enum Due {
    /// Held its state past `max_dwell`.
    Dwell,
    /// No first heartbeat (or platform report) within `startup_timeout`.
    Startup,
    /// Silent this long, past `heartbeat_timeout`.
    Silent(Duration),
    /// In TIMEOUT or ERROR by the monitor or a driver: restart when due.
    Restart,
}

/// Actions of one pass run at once.
const ACTIONS_AT_ONCE: usize = 64;

/// A pass due to a deadline runs this long after it.
const AFTER_DEADLINE: Duration = Duration::from_millis(1);

/// Every this many passes (the first included), the watches of agents that
/// are gone are forgotten (at once when there are more watches than
/// agents), and a shared store's saved heartbeats are all read again.
const PRUNE_EVERY: u64 = 64;
