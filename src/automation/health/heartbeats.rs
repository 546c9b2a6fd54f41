//! Receiving heartbeats and keeping the last one of each agent, StartAgent
//! waiting for the first one, and, on a shared store, saving the heartbeats
//! received here and taking in those other processes saved.
//!
//! Drives the service through its public API only; knows nothing of gRPC.

use std::{collections::HashMap, sync::atomic::Ordering};

use tracing::warn;

use super::{
    AWAIT_KEY, HeartbeatMonitor, MISSED, PLATFORM_AWAIT_KEY, TRIGGER, awaits_heartbeat, change,
    counted, recorded_restarts,
};
use crate::{
    domain::{AgentId, AgentState, Heartbeat},
    error::{Error, Result},
    service::{ChangeRequest, Outcome},
};

impl HeartbeatMonitor {
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
        match self.service.saved_heartbeats(ids.to_vec()).await {
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
    ) -> Result<Outcome> {
        let wait = match wait {
            Some(wait) => wait,
            None => match self.service.get_agent(id) {
                Ok(agent) => self.settings.for_agent(&agent).start_waits_for_heartbeat,
                // Let the service report it.
                Err(_) => false,
            },
        };
        if let Some(platform) = self
            .service
            .get_agent(id)
            .ok()
            .and_then(|agent| self.platform_of(&agent))
        {
            change.metadata.insert(
                PLATFORM_AWAIT_KEY.to_string(),
                serde_json::Value::Bool(true),
            );
            if change.reason.is_empty() {
                change.reason = format!(
                    "agent starting, waiting for {} to report it running",
                    platform.source
                );
            }
            return self
                .service
                .transition(id, AgentState::Starting, change)
                .await;
        }
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
    pub(super) async fn save(&self) {
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

    /// Takes in the heartbeats other processes saved: those saved since
    /// the last call, or, when `all`, every one kept (which also takes in
    /// rows that a process of an older version saved unnumbered).
    pub(super) async fn load_saved(&self, all: bool) {
        if !self.service.is_store_shared() {
            return;
        }
        let after = match all {
            true => 0,
            false => self.saved_through.load(Ordering::Acquire),
        };
        match self.service.heartbeats_saved_after(after).await {
            Ok(saved) => {
                self.saved_through
                    .fetch_max(saved.through, Ordering::AcqRel);
                let mut watches = self.watches();
                for (id, beat) in saved.beats {
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
}
