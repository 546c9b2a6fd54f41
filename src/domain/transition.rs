//! The transition policy: which state may follow which.
//!
//! [`TransitionPolicy::default`] is the seed's table. A policy is a value so
//! that configurable policies can replace it without touching callers.

use super::state::AgentState;

/// The seed's allowed targets for `from` (the default policy).
///
/// The match is exhaustive on purpose: a new state must be placed in the
/// table before the crate compiles.
pub fn default_targets(from: AgentState) -> &'static [AgentState] {
    use AgentState::*;
    match from {
        Registered => &[Deploying, Deleted],
        Deploying => &[Deployed, Failed, Error],
        Deployed => &[Starting, Updating, Deleted],
        Starting => &[Online, Failed, Error, Timeout],
        Online => &[
            Busy,
            Idle,
            Stopping,
            Updating,
            Maintenance,
            Suspended,
            Offline,
            Error,
        ],
        Busy => &[
            Idle,
            Online,
            Stopping,
            Maintenance,
            Suspended,
            Offline,
            Error,
        ],
        Idle => &[
            Busy,
            Online,
            Stopping,
            Updating,
            Maintenance,
            Suspended,
            Offline,
            Error,
        ],
        Stopping => &[Offline, Terminated, Error],
        Updating => &[Online, Failed, Error],
        Scaling => &[Online, Busy, Idle, Error],
        Error => &[Online, Offline, Maintenance, Failed],
        Failed => &[Starting, Deploying, Deleted],
        Timeout => &[Offline, Error, Starting],
        Maintenance => &[Online, Offline, Suspended],
        Suspended => &[Online, Maintenance, Offline],
        Offline => &[Starting, Maintenance, Terminated, Deleted],
        Terminated => &[Deleted],
        Deleted => &[],
    }
}

/// The active set of allowed transitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransitionPolicy {
    /// Allowed targets, indexed by [`AgentState::index`] of the source.
    targets: Vec<Vec<AgentState>>,
}

impl Default for TransitionPolicy {
    fn default() -> Self {
        TransitionPolicy {
            targets: AgentState::ALL
                .iter()
                .map(|from| default_targets(*from).to_vec())
                .collect(),
        }
    }
}

impl TransitionPolicy {
    /// States that may follow `from`, in table order.
    pub fn allowed_targets(&self, from: AgentState) -> &[AgentState] {
        &self.targets[from.index()]
    }

    /// Whether `from -> to` is allowed. A state never leads to itself unless
    /// a policy says so; the default does not.
    pub fn allows(&self, from: AgentState, to: AgentState) -> bool {
        self.allowed_targets(from).contains(&to)
    }

    /// A state with no way out.
    pub fn is_final(&self, state: AgentState) -> bool {
        self.allowed_targets(state).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The design document's table, written out again as text so that a
    /// typo in `default_targets` cannot hide behind itself.
    const TABLE: &str = "
        registered: deploying deleted
        deploying: deployed failed error
        deployed: starting updating deleted
        starting: online failed error timeout
        online: busy idle stopping updating maintenance suspended offline error
        busy: idle online stopping maintenance suspended offline error
        idle: busy online stopping updating maintenance suspended offline error
        stopping: offline terminated error
        updating: online failed error
        scaling: online busy idle error
        error: online offline maintenance failed
        failed: starting deploying deleted
        timeout: offline error starting
        maintenance: online offline suspended
        suspended: online maintenance offline
        offline: starting maintenance terminated deleted
        terminated: deleted
        deleted:
    ";

    #[test]
    fn all_324_pairs_match_the_design_table() {
        let mut expected = std::collections::HashSet::new();
        let mut sources = 0;
        for line in TABLE.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (from, targets) = line.split_once(':').expect("table line has a colon");
            sources += 1;
            for to in targets.split_whitespace() {
                expected.insert((from.to_string(), to.to_string()));
            }
        }
        assert_eq!(sources, 18);
        assert_eq!(expected.len(), 66);

        let policy = TransitionPolicy::default();
        let mut checked = 0;
        for from in AgentState::ALL {
            for to in AgentState::ALL {
                let want = expected.contains(&(from.as_str().to_string(), to.as_str().to_string()));
                assert_eq!(policy.allows(from, to), want, "{from} -> {to}");
                checked += 1;
            }
        }
        assert_eq!(checked, 324);
    }

    #[test]
    fn nothing_leads_into_scaling_and_only_starting_into_timeout() {
        let policy = TransitionPolicy::default();
        for from in AgentState::ALL {
            assert!(!policy.allows(from, AgentState::Scaling));
            assert_eq!(
                policy.allows(from, AgentState::Timeout),
                from == AgentState::Starting
            );
            assert!(!policy.allows(from, from), "{from} -> itself");
        }
        assert!(policy.is_final(AgentState::Deleted));
        assert!(!policy.is_final(AgentState::Terminated));
    }
}
