//! Restarts: an agent the monitor put in TIMEOUT or ERROR goes back to
//! STARTING after a back-off (`initial_delay`, times `multiplier` per
//! attempt, at most `max_delay`, with `jitter`), and to FAILED once
//! `max_restarts` are spent; the monitor's transitions, one recorded step
//! along the policy's path each.
//!
//! Drives the service through its public API only; knows nothing of gRPC.

use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::{
    AWAIT_KEY, HeartbeatMonitor, PLATFORM_AWAIT_KEY, change, counted, recorded_count, secs,
};
use crate::{
    domain::{Agent, AgentId, AgentState, Metadata},
    error::Result,
};

impl HeartbeatMonitor {
    /// Schedules, performs or gives up a restart of an agent the monitor
    /// put in TIMEOUT or ERROR.
    pub(super) async fn restart(
        &self,
        agent: &Agent,
        restarts: u32,
        now: SystemTime,
    ) -> Result<()> {
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
        // A bound agent's restart completes when its platform reports it
        // running; another's with its first heartbeat.
        let awaited = if self.platform_of(agent).is_some() {
            PLATFORM_AWAIT_KEY
        } else {
            AWAIT_KEY
        };
        metadata.insert(awaited.to_string(), serde_json::Value::Bool(true));
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

    pub(super) async fn move_to(
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
