//! The 18 lifecycle states and the seed's four categories.
//!
//! Pure data: no I/O, no async, no wire types.

use std::{fmt, str::FromStr};

/// A lifecycle state. The order is the proto enum order (1..=18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AgentState {
    /// Known to the control plane, not deployed.
    Registered,
    /// Being deployed.
    Deploying,
    /// Deployed but not active.
    Deployed,
    /// Starting up.
    Starting,
    /// Online and ready.
    Online,
    /// Processing a task.
    Busy,
    /// Online with no task.
    Idle,
    /// Shutting down.
    Stopping,
    /// Being updated.
    Updating,
    /// Being scaled.
    Scaling,
    /// In error.
    Error,
    /// Failed to start or operate.
    Failed,
    /// Timed out.
    Timeout,
    /// In maintenance.
    Maintenance,
    /// Suspended.
    Suspended,
    /// Offline.
    Offline,
    /// Terminated.
    Terminated,
    /// Deleted: final.
    Deleted,
}

/// The four category predicates of the seed, usable as a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AgentCategory {
    /// ONLINE, BUSY, IDLE.
    Operational,
    /// ONLINE, IDLE.
    Available,
    /// ERROR, FAILED, TIMEOUT.
    Error,
    /// MAINTENANCE, SUSPENDED, UPDATING.
    Maintenance,
}

impl AgentState {
    /// Every state, in proto order.
    pub const ALL: [AgentState; 18] = [
        AgentState::Registered,
        AgentState::Deploying,
        AgentState::Deployed,
        AgentState::Starting,
        AgentState::Online,
        AgentState::Busy,
        AgentState::Idle,
        AgentState::Stopping,
        AgentState::Updating,
        AgentState::Scaling,
        AgentState::Error,
        AgentState::Failed,
        AgentState::Timeout,
        AgentState::Maintenance,
        AgentState::Suspended,
        AgentState::Offline,
        AgentState::Terminated,
        AgentState::Deleted,
    ];

    /// The stable lowercase name (the seed's string value), used in the
    /// database, metrics keys, the CLI and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Registered => "registered",
            AgentState::Deploying => "deploying",
            AgentState::Deployed => "deployed",
            AgentState::Starting => "starting",
            AgentState::Online => "online",
            AgentState::Busy => "busy",
            AgentState::Idle => "idle",
            AgentState::Stopping => "stopping",
            AgentState::Updating => "updating",
            AgentState::Scaling => "scaling",
            AgentState::Error => "error",
            AgentState::Failed => "failed",
            AgentState::Timeout => "timeout",
            AgentState::Maintenance => "maintenance",
            AgentState::Suspended => "suspended",
            AgentState::Offline => "offline",
            AgentState::Terminated => "terminated",
            AgentState::Deleted => "deleted",
        }
    }

    /// Position in [`AgentState::ALL`] (proto number minus one).
    pub fn index(self) -> usize {
        self as usize
    }

    /// ONLINE, BUSY or IDLE.
    pub fn is_operational(self) -> bool {
        matches!(
            self,
            AgentState::Online | AgentState::Busy | AgentState::Idle
        )
    }

    /// ONLINE or IDLE.
    pub fn is_available_for_tasks(self) -> bool {
        matches!(self, AgentState::Online | AgentState::Idle)
    }

    /// ERROR, FAILED or TIMEOUT.
    pub fn is_error(self) -> bool {
        matches!(
            self,
            AgentState::Error | AgentState::Failed | AgentState::Timeout
        )
    }

    /// MAINTENANCE, SUSPENDED or UPDATING.
    pub fn is_maintenance(self) -> bool {
        matches!(
            self,
            AgentState::Maintenance | AgentState::Suspended | AgentState::Updating
        )
    }

    /// Whether this state belongs to `category`.
    pub fn in_category(self, category: AgentCategory) -> bool {
        match category {
            AgentCategory::Operational => self.is_operational(),
            AgentCategory::Available => self.is_available_for_tasks(),
            AgentCategory::Error => self.is_error(),
            AgentCategory::Maintenance => self.is_maintenance(),
        }
    }
}

/// A set of states (a bit per state): constant-time membership however many
/// states a filter names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StateSet(u32);

impl StateSet {
    /// No state.
    pub const EMPTY: StateSet = StateSet(0);

    /// Whether no state is in the set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether `state` is in the set.
    pub fn contains(self, state: AgentState) -> bool {
        self.0 & (1 << state.index()) != 0
    }

    /// Adds `state`.
    pub fn insert(&mut self, state: AgentState) {
        self.0 |= 1 << state.index();
    }

    /// Empty sets match everything (no filter); otherwise membership.
    pub fn matches(self, state: AgentState) -> bool {
        self.is_empty() || self.contains(state)
    }
}

impl FromIterator<AgentState> for StateSet {
    fn from_iter<I: IntoIterator<Item = AgentState>>(iter: I) -> Self {
        let mut set = StateSet::EMPTY;
        for state in iter {
            set.insert(state);
        }
        set
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for AgentState {
    type Err = UnknownState;

    /// Accepts the lowercase name, case-insensitively, with or without the
    /// proto prefix (`online`, `ONLINE`, `AGENT_STATE_ONLINE`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let name = lower.strip_prefix("agent_state_").unwrap_or(&lower);
        AgentState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

impl AgentCategory {
    /// Lowercase name, as the CLI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentCategory::Operational => "operational",
            AgentCategory::Available => "available",
            AgentCategory::Error => "error",
            AgentCategory::Maintenance => "maintenance",
        }
    }
}

impl FromStr for AgentCategory {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "operational" => Ok(AgentCategory::Operational),
            "available" => Ok(AgentCategory::Available),
            "error" => Ok(AgentCategory::Error),
            "maintenance" => Ok(AgentCategory::Maintenance),
            other => Err(format!(
                "unknown category {} (operational, available, error, maintenance)",
                super::limits::quoted(other)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for state in AgentState::ALL {
            assert_eq!(state.as_str().parse::<AgentState>(), Ok(state));
            assert_eq!(
                state.as_str().to_uppercase().parse::<AgentState>(),
                Ok(state)
            );
            assert_eq!(AgentState::ALL[state.index()], state);
        }
        assert!("AGENT_STATE_BUSY".parse::<AgentState>() == Ok(AgentState::Busy));
        assert!("bogus".parse::<AgentState>().is_err());
    }

    #[test]
    fn categories_match_the_seed() {
        let members = |f: fn(AgentState) -> bool| {
            AgentState::ALL
                .into_iter()
                .filter(|s| f(*s))
                .collect::<Vec<_>>()
        };
        use AgentState::*;
        assert_eq!(
            members(AgentState::is_operational),
            vec![Online, Busy, Idle]
        );
        assert_eq!(
            members(AgentState::is_available_for_tasks),
            vec![Online, Idle]
        );
        assert_eq!(members(AgentState::is_error), vec![Error, Failed, Timeout]);
        assert_eq!(
            members(AgentState::is_maintenance),
            vec![Updating, Maintenance, Suspended]
        );
    }
}
