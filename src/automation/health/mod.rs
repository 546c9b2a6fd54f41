//! Heartbeats and the health monitor: dead or stuck agents are noticed and
//! repaired as far as policy allows.
//!
//! Agents report heartbeats (optionally with their load and current task);
//! [`HeartbeatMonitor`] keeps the last one of each agent. An agent that has
//! sent a heartbeat is watched from then on:
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
//! Agents bound to a platform that a driver follows
//! ([`HeartbeatMonitor::following`]) start differently: StartAgent stops
//! at STARTING (`platform.await_running: true`) and the platform's own
//! "running" moves the agent ONLINE; the platform not reporting it running
//! within `startup_timeout` moves it to TIMEOUT. An ERROR that the
//! platform's driver recorded (the container died) is restarted like one
//! after missed heartbeats, and the restart asks the platform to restart
//! the object.
//!
//! After the monitor starts (a server restart) no timeout fires for `grace`.
//! Every automatic transition records `triggered_by = "health-monitor"` and
//! a reason with the numbers. Like every automation, this drives the service
//! through its public API with its own timers (tokio time, wall times from
//! the service's clock, so tests run it on a paused clock).
//!
//! On a shared store (PostgreSQL) every process saves the heartbeats it
//! receives to the store once per `check_interval`, and the monitor, in
//! the process that holds the `health-monitor` lease, reads those saved
//! since its last read before each look (all of them at its first look and
//! every 64th): heartbeats count whichever process receives them (seen up to
//! about two check intervals late, so `heartbeat_timeout` should span
//! several). The restart count travels with the monitor's transitions
//! (`health.restarts` in their metadata), so a monitor that takes over
//! carries on counting.
//!
//! - `settings`: [`HealthSettings`], the timeouts and the back-off.
//! - `heartbeats`: receiving them, keeping the last one, StartAgent
//!   waiting for the first, saving them to a shared store.
//! - `monitor`: the loop and its timeouts.
//! - `restart`: the back-off and the walk to STARTING or FAILED.
//!
//! Depends on `domain` and `service`; knows nothing of gRPC (the edge's
//! Heartbeat RPCs call [`HeartbeatMonitor::heartbeat`]).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

pub use self::{
    monitor::timeout_edge,
    settings::{HealthRule, HealthSettings},
};
pub use crate::domain::Heartbeat;
use crate::{
    AgentLifecycleService,
    domain::{Agent, AgentId, AgentState, Binding, Caller, ExternalSource, Metadata},
    service::ChangeRequest,
};

mod heartbeats;
mod monitor;
mod restart;
mod settings;

/// `triggered_by` of the monitor's transitions.
pub const TRIGGER: &str = "health-monitor";

/// Reason prefix of the ERROR transition after missed heartbeats.
const MISSED: &str = "heartbeat missed";

/// Metadata key of a transition to STARTING whose start completes with the
/// agent's first heartbeat (`true`).
pub const AWAIT_KEY: &str = "health.await_heartbeat";

/// Metadata key of a transition to STARTING whose start completes when the
/// agent's platform reports it running (`true`).
pub const PLATFORM_AWAIT_KEY: &str = "platform.await_running";

/// A platform whose driver follows the agents bound to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FollowedPlatform {
    /// The source of the platform's statuses.
    pub source: ExternalSource,
    /// The `triggered_by` of the transitions its observations record
    /// (`docker-driver`, `hf_sync`).
    pub observer: &'static str,
}

/// Metadata key of the restart count the monitor records with its
/// transitions.
pub const RESTARTS_KEY: &str = "health.restarts";

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

/// The heartbeat monitor: keeps each agent's last heartbeat and, run
/// ([`HeartbeatMonitor::run`]), acts on timeouts and restarts. Cheap to
/// clone; clones share everything.
#[derive(Clone)]
pub struct HeartbeatMonitor {
    service: AgentLifecycleService,
    settings: Arc<HealthSettings>,
    watches: Arc<Mutex<HashMap<AgentId, Watch>>>,
    /// Heartbeats received here and not yet saved to a shared store.
    unsaved: Arc<Mutex<HashMap<AgentId, Heartbeat>>>,
    /// The number of the last save to a shared store taken in: the next
    /// read takes in only what was saved after it.
    saved_through: Arc<AtomicU64>,
    /// The platforms whose drivers run in this server.
    platforms: Arc<[FollowedPlatform]>,
}

impl std::fmt::Debug for HeartbeatMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeartbeatMonitor").finish_non_exhaustive()
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
    starting_with(agent, AWAIT_KEY)
}

/// Whether the agent is in STARTING waiting for its platform to report it
/// running: its transition to STARTING carried
/// `platform.await_running = true`.
pub fn awaits_platform(agent: &Agent) -> bool {
    starting_with(agent, PLATFORM_AWAIT_KEY)
}

fn starting_with(agent: &Agent, key: &str) -> bool {
    agent.state == AgentState::Starting
        && agent
            .last_transition
            .metadata
            .get(key)
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

fn secs(d: Duration) -> String {
    format!("{:.0}s", d.as_secs_f64())
}

impl HeartbeatMonitor {
    /// Heartbeat tracking over `service` with `settings`.
    pub fn new(service: AgentLifecycleService, settings: HealthSettings) -> Self {
        HeartbeatMonitor {
            service,
            settings: Arc::new(settings),
            watches: Arc::default(),
            unsaved: Arc::default(),
            saved_through: Arc::default(),
            platforms: Arc::new([]),
        }
    }

    /// The monitor, knowing that drivers follow `platforms` in this server.
    #[must_use]
    pub fn following(mut self, platforms: Vec<FollowedPlatform>) -> Self {
        self.platforms = platforms.into();
        self
    }

    /// The followed platform `agent` is bound to, if any.
    pub fn platform_of(&self, agent: &Agent) -> Option<FollowedPlatform> {
        let binding = Binding::of(&agent.labels).ok()??;
        self.platforms
            .iter()
            .find(|p| p.source == binding.source())
            .copied()
    }

    /// Whether `triggered_by` is the monitor or a followed platform's
    /// driver: an ERROR or TIMEOUT either recorded is restarted.
    fn restarts_after(&self, triggered_by: &str) -> bool {
        triggered_by == TRIGGER || self.platforms.iter().any(|p| p.observer == triggered_by)
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
}
