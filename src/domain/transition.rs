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

    /// Every allowed `(from, to)` edge, sources in state order, targets in
    /// table order.
    pub fn edges(&self) -> impl Iterator<Item = (AgentState, AgentState)> + '_ {
        AgentState::ALL.iter().flat_map(move |from| {
            self.allowed_targets(*from)
                .iter()
                .map(move |to| (*from, *to))
        })
    }

    /// This policy with `add` allowed and `remove` refused.
    ///
    /// # Errors
    /// An edge out of DELETED (it is final), a state to itself, adding an
    /// edge the policy already has, or removing one it does not have; the
    /// error names the edge.
    pub fn with_changes(
        &self,
        add: &[(AgentState, AgentState)],
        remove: &[(AgentState, AgentState)],
    ) -> Result<TransitionPolicy, String> {
        let mut targets = self.targets.clone();
        for (from, to) in remove {
            let list = &mut targets[from.index()];
            let Some(at) = list.iter().position(|t| t == to) else {
                return Err(format!(
                    "{from} -> {to} is not allowed, so it cannot be removed"
                ));
            };
            list.remove(at);
        }
        for (from, to) in add {
            if *from == AgentState::Deleted {
                return Err(format!(
                    "{from} -> {to}: deleted is final, nothing may leave it"
                ));
            }
            if from == to {
                return Err(format!("{from} -> {to}: a state cannot lead to itself"));
            }
            let list = &mut targets[from.index()];
            if list.contains(to) {
                return Err(format!("{from} -> {to} is already allowed"));
            }
            list.push(*to);
        }
        Ok(TransitionPolicy { targets })
    }

    /// The states to pass through, in order, to get from `from` to `to`
    /// (`to` last; empty when already there): the shortest allowed path
    /// whose intermediate states are not error states (ERROR, FAILED,
    /// TIMEOUT), or, where every path passes through one, the shortest path
    /// at all. `None` when `to` cannot be reached. Ties go to the policy's
    /// table order, so the answer is stable.
    pub fn path_to(&self, from: AgentState, to: AgentState) -> Option<Vec<AgentState>> {
        if from == to {
            return Some(Vec::new());
        }
        self.shortest(from, to, true)
            .or_else(|| self.shortest(from, to, false))
    }

    /// Breadth-first search; with `avoid_errors`, error states are only
    /// allowed as the destination.
    fn shortest(
        &self,
        from: AgentState,
        to: AgentState,
        avoid_errors: bool,
    ) -> Option<Vec<AgentState>> {
        let mut previous: [Option<AgentState>; 18] = [None; 18];
        let mut seen = [false; 18];
        seen[from.index()] = true;
        let mut queue = std::collections::VecDeque::from([from]);
        while let Some(state) = queue.pop_front() {
            for next in self.allowed_targets(state) {
                if seen[next.index()] {
                    continue;
                }
                if *next == to {
                    let mut path = vec![to];
                    let mut at = state;
                    while at != from {
                        path.push(at);
                        at = previous[at.index()]?;
                    }
                    path.reverse();
                    return Some(path);
                }
                if avoid_errors && next.is_error() {
                    continue;
                }
                seen[next.index()] = true;
                previous[next.index()] = Some(state);
                queue.push_back(*next);
            }
        }
        None
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
    fn paths_avoid_error_states_unless_there_is_no_other_way() {
        use AgentState::*;
        let policy = TransitionPolicy::default();
        assert_eq!(policy.path_to(Online, Online), Some(vec![]));
        assert_eq!(policy.path_to(Online, Busy), Some(vec![Busy]));
        // REGISTERED -> ONLINE: deploy, start.
        assert_eq!(
            policy.path_to(Registered, Online),
            Some(vec![Deploying, Deployed, Starting, Online])
        );
        // OFFLINE -> DEPLOYING needs a detour: through FAILED is the only
        // way (OFFLINE -> STARTING -> FAILED -> DEPLOYING), so the fallback
        // takes it.
        assert_eq!(
            policy.path_to(Offline, Deploying),
            Some(vec![Starting, Failed, Deploying])
        );
        // TERMINATED -> ONLINE: nothing leads back.
        assert_eq!(policy.path_to(Terminated, Online), None);
        assert_eq!(policy.path_to(Deleted, Offline), None);
        // An error state as the destination is fine: ONLINE -> ERROR.
        assert_eq!(policy.path_to(Online, Error), Some(vec![Error]));
        // ERROR -> DEPLOYING: via FAILED only (an error state, the fallback).
        assert_eq!(
            policy.path_to(Error, Deploying),
            Some(vec![Failed, Deploying])
        );
        // STOPPING -> ONLINE avoids ERROR (STOPPING -> ERROR -> ONLINE is
        // shorter): STOPPING -> OFFLINE -> STARTING -> ONLINE.
        assert_eq!(
            policy.path_to(Stopping, Online),
            Some(vec![Offline, Starting, Online])
        );
    }

    #[test]
    fn policies_add_and_remove_edges_and_refuse_nonsense() {
        use AgentState::*;
        let scaling = [(Online, Scaling), (Idle, Scaling), (Busy, Scaling)];
        let policy = TransitionPolicy::default()
            .with_changes(&scaling, &[(Busy, Offline)])
            .expect("valid changes");
        assert!(policy.allows(Online, Scaling) && policy.allows(Busy, Scaling));
        assert!(!policy.allows(Busy, Offline));
        assert_eq!(policy.edges().count(), 66 + 3 - 1);
        let base = TransitionPolicy::default();
        assert!(
            base.with_changes(&[(Deleted, Registered)], &[])
                .unwrap_err()
                .contains("final")
        );
        assert!(
            base.with_changes(&[(Online, Online)], &[])
                .unwrap_err()
                .contains("itself")
        );
        assert!(
            base.with_changes(&[(Online, Busy)], &[])
                .unwrap_err()
                .contains("already")
        );
        assert!(
            base.with_changes(&[], &[(Online, Registered)])
                .unwrap_err()
                .contains("cannot be removed")
        );
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
