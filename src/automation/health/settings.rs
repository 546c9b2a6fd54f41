//! The monitor's settings (`[health]` in the configuration file): the
//! timeouts, the restart back-off, and the rules that give agents with
//! certain labels settings of their own.
//!
//! Plain values: depends on the domain's states, labels and agents only.

use std::time::Duration;

use crate::domain::AgentState;

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
