//! State analytics from the event log: how long agents spent in each state
//! over a window, how often they moved and failed, how fast they recovered,
//! and how the fleet's states were distributed over time.
//!
//! Pure computation over records: the caller hands in, per agent, its
//! state at the window's start (or `None` when it did not exist yet) and
//! its records inside the window, oldest first. Because the records are
//! the durable log, the figures are the same before and after a restart.
//! Only retained events count: a window reaching past retention sees the
//! states the agents were in, but not the transitions compaction deleted.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::domain::{AgentId, AgentState, TransitionRecord};

/// One agent's figures over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentAnalytics {
    /// The agent (none for a fleet total).
    pub agent_id: Option<AgentId>,
    /// Time spent in each state within the window.
    pub time_in_state: BTreeMap<AgentState, Duration>,
    /// Time the agent existed within the window.
    pub observed: Duration,
    /// Transitions within the window.
    pub transitions: u64,
    /// Transitions into an error state (ERROR, FAILED, TIMEOUT).
    pub error_entries: u64,
    /// Returns from an error state to an operational one (ONLINE, IDLE,
    /// BUSY), and the time each took in total.
    pub recoveries: u64,
    /// Sum of the recovery times.
    pub recovery_time: Duration,
    /// The last transition into an error state within the window.
    pub last_error: Option<Arc<TransitionRecord>>,
}

impl AgentAnalytics {
    /// Mean time from entering an error state to being operational again;
    /// `None` without a recovery.
    pub fn mean_time_to_recovery(&self) -> Option<Duration> {
        (self.recoveries > 0)
            .then(|| self.recovery_time / u32::try_from(self.recoveries).unwrap_or(u32::MAX))
    }

    /// Operational time / observed time (0 when nothing was observed).
    pub fn availability(&self) -> f64 {
        let operational: Duration = self
            .time_in_state
            .iter()
            .filter(|(state, _)| state.is_operational())
            .map(|(_, d)| *d)
            .sum();
        if self.observed.is_zero() {
            return 0.0;
        }
        operational.as_secs_f64() / self.observed.as_secs_f64()
    }

    /// Adds `other`'s figures to these (a fleet total).
    pub fn add(&mut self, other: &AgentAnalytics) {
        for (state, d) in &other.time_in_state {
            *self.time_in_state.entry(*state).or_default() += *d;
        }
        self.observed += other.observed;
        self.transitions += other.transitions;
        self.error_entries += other.error_entries;
        self.recoveries += other.recoveries;
        self.recovery_time += other.recovery_time;
        let newer = match (&self.last_error, &other.last_error) {
            (Some(mine), Some(theirs)) => theirs.sequence > mine.sequence,
            (None, Some(_)) => true,
            _ => false,
        };
        if newer {
            self.last_error.clone_from(&other.last_error);
        }
    }
}

/// One agent's window: where it stood at the start, and what happened.
#[derive(Clone, Debug)]
pub struct AgentWindow {
    /// The agent.
    pub agent_id: AgentId,
    /// Its state at the window's start; `None` when it was registered
    /// within the window.
    pub initial: Option<AgentState>,
    /// Its records within the window, oldest first.
    pub records: Vec<Arc<TransitionRecord>>,
}

/// The figures of `window` over `[start, end)`.
pub fn agent_analytics(window: &AgentWindow, start: SystemTime, end: SystemTime) -> AgentAnalytics {
    let mut out = AgentAnalytics {
        agent_id: Some(window.agent_id),
        ..AgentAnalytics::default()
    };
    let mut state = window.initial;
    let mut since = start;
    // When the current error spell began (for the time to recovery). A
    // spell that began before the window has no known start: its recovery
    // is not counted.
    let mut error_since = None;
    for record in &window.records {
        let at = record.at.clamp(start, end);
        if let Some(current) = state {
            let spent = at.duration_since(since).unwrap_or_default();
            *out.time_in_state.entry(current).or_default() += spent;
            out.observed += spent;
        }
        if record.from.is_some() {
            out.transitions += 1;
        }
        if record.to.is_error() && !state.is_some_and(AgentState::is_error) {
            out.error_entries += 1;
            out.last_error = Some(Arc::clone(record));
            error_since = Some(at);
        } else if record.to.is_error() {
            out.last_error = Some(Arc::clone(record));
        }
        if record.to.is_operational()
            && let Some(began) = error_since.take()
        {
            out.recoveries += 1;
            out.recovery_time += at.duration_since(began).unwrap_or_default();
        }
        state = Some(record.to);
        since = at;
    }
    if let Some(current) = state {
        let spent = end.duration_since(since).unwrap_or_default();
        *out.time_in_state.entry(current).or_default() += spent;
        out.observed += spent;
    }
    out
}

/// How many agents were in each state at `at` (each agent's last record at
/// or before it, or its initial state).
pub fn distribution_at(windows: &[AgentWindow], at: SystemTime) -> BTreeMap<AgentState, u64> {
    let mut counts = BTreeMap::new();
    for window in windows {
        let state = window
            .records
            .iter()
            .take_while(|r| r.at <= at)
            .last()
            .map(|r| r.to)
            .or(window.initial);
        if let Some(state) = state {
            *counts.entry(state).or_default() += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    fn record(seq: u64, from: Option<AgentState>, to: AgentState, s: u64) -> Arc<TransitionRecord> {
        Arc::new(TransitionRecord {
            agent_id: AgentId::from_u128(7),
            from,
            to,
            at: at(s),
            reason: String::new(),
            triggered_by: String::new(),
            principal: String::new(),
            request: None,
            metadata: Default::default(),
            sequence: seq,
            version: seq,
        })
    }

    /// ONLINE from before the window; ERROR at 100 for 50 s; ONLINE again
    /// until 400; OFFLINE until the end at 1000.
    #[test]
    fn time_in_state_errors_and_recovery() {
        use AgentState::*;
        let window = AgentWindow {
            agent_id: AgentId::from_u128(7),
            initial: Some(Online),
            records: vec![
                record(10, Some(Online), Error, 100),
                record(11, Some(Error), Online, 150),
                record(12, Some(Online), Offline, 400),
            ],
        };
        let a = agent_analytics(&window, at(0), at(1000));
        assert_eq!(a.time_in_state[&Online], Duration::from_secs(100 + 250));
        assert_eq!(a.time_in_state[&Error], Duration::from_secs(50));
        assert_eq!(a.time_in_state[&Offline], Duration::from_secs(600));
        assert_eq!(a.observed, Duration::from_secs(1000));
        assert_eq!((a.transitions, a.error_entries, a.recoveries), (3, 1, 1));
        assert_eq!(a.mean_time_to_recovery(), Some(Duration::from_secs(50)));
        assert!((a.availability() - 0.35).abs() < 1e-9);
        assert_eq!(a.last_error.as_ref().map(|r| r.sequence), Some(10));
        let counts = distribution_at(std::slice::from_ref(&window), at(120));
        assert_eq!(counts.get(&Error), Some(&1));
    }

    /// Registered within the window: only the time since counts.
    #[test]
    fn an_agent_registered_within_the_window() {
        use AgentState::*;
        let window = AgentWindow {
            agent_id: AgentId::from_u128(7),
            initial: None,
            records: vec![record(1, None, Registered, 600)],
        };
        let a = agent_analytics(&window, at(0), at(1000));
        assert_eq!(a.observed, Duration::from_secs(400));
        assert_eq!(a.transitions, 0, "registration is not a transition");
        assert_eq!(a.availability(), 0.0);
        assert!(distribution_at(&[window], at(100)).is_empty());
    }
}

/// Records scanned at most for one fleet query.
const MAX_SCANNED: usize = 1_000_000;

/// Records read per page of the log.
const PAGE: usize = 10_000;

/// The retained records committed in `[start, end]`, oldest first (of one
/// agent, or of all), at most [`MAX_SCANNED`].
async fn records_between(
    service: &crate::AgentLifecycleService,
    agent_id: Option<AgentId>,
    start: SystemTime,
) -> crate::Result<Vec<Arc<TransitionRecord>>> {
    let mut records = Vec::new();
    let mut before = u64::MAX;
    loop {
        let page = service
            .audit(crate::store::AuditQuery {
                agent_id,
                principal: None,
                before,
                max: PAGE,
            })
            .await?;
        let full = page.len() == PAGE;
        let mut done = !full;
        for record in page {
            if record.at < start {
                done = true;
                break;
            }
            before = record.sequence;
            records.push(record);
        }
        if done || records.len() >= MAX_SCANNED {
            break;
        }
    }
    records.reverse();
    Ok(records)
}

/// The window of `agent` given its records since the window's start.
fn window_of(agent: &crate::domain::Agent, records: Vec<Arc<TransitionRecord>>) -> AgentWindow {
    let initial = match records.first() {
        Some(first) => first.from,
        None => Some(agent.state),
    };
    AgentWindow {
        agent_id: agent.id,
        initial,
        records,
    }
}

/// One agent's figures over the `window` that ends now.
///
/// # Errors
/// [`crate::Error::AgentNotFound`], or the store failed.
pub async fn for_agent(
    service: &crate::AgentLifecycleService,
    id: AgentId,
    window: Duration,
) -> crate::Result<(AgentAnalytics, SystemTime, SystemTime)> {
    let agent = service.get_agent(id)?;
    let end = service.config().clock.now();
    let start = end.checked_sub(window).unwrap_or(std::time::UNIX_EPOCH);
    let records = records_between(service, Some(id), start).await?;
    let window = window_of(&agent, records);
    Ok((agent_analytics(&window, start, end), start, end))
}

/// The fleet's figures over the `window` that ends now.
#[derive(Clone, Debug)]
pub struct FleetAnalytics {
    /// The agents counted (those carrying the labels asked for).
    pub agents: u64,
    /// Their figures added up.
    pub total: AgentAnalytics,
    /// The agents with the most entries into error states, most first.
    pub top_by_errors: Vec<AgentAnalytics>,
    /// The agents with the most transitions (flapping), most first.
    pub top_by_transitions: Vec<AgentAnalytics>,
    /// Agents per state at the end of each of the equal buckets of the
    /// window.
    pub distribution: Vec<(SystemTime, BTreeMap<AgentState, u64>)>,
    /// The window.
    pub start: SystemTime,
    /// Its end (now).
    pub end: SystemTime,
}

/// The fleet's figures over `window`, for the agents carrying `labels`,
/// with the `top` agents of each ranking and `buckets` distribution points.
///
/// # Errors
/// The store failed.
pub async fn for_fleet(
    service: &crate::AgentLifecycleService,
    window: Duration,
    labels: &crate::domain::Labels,
    buckets: usize,
    top: usize,
) -> crate::Result<FleetAnalytics> {
    let end = service.config().clock.now();
    let start = end.checked_sub(window).unwrap_or(std::time::UNIX_EPOCH);
    let mut by_agent: BTreeMap<AgentId, Vec<Arc<TransitionRecord>>> = BTreeMap::new();
    for record in records_between(service, None, start).await? {
        by_agent.entry(record.agent_id).or_default().push(record);
    }
    let windows: Vec<AgentWindow> = service
        .get_all_agent_statuses()
        .into_values()
        .filter(|info| info.agent.has_labels(labels))
        .map(|info| {
            let records = by_agent.remove(&info.agent.id).unwrap_or_default();
            window_of(&info.agent, records)
        })
        .collect();
    let per_agent: Vec<AgentAnalytics> = windows
        .iter()
        .map(|w| agent_analytics(w, start, end))
        .collect();
    let mut total = AgentAnalytics::default();
    for a in &per_agent {
        total.add(a);
    }
    let ranked = |key: fn(&AgentAnalytics) -> u64| {
        let mut list: Vec<AgentAnalytics> =
            per_agent.iter().filter(|a| key(a) > 0).cloned().collect();
        list.sort_by(|a, b| key(b).cmp(&key(a)).then(a.agent_id.cmp(&b.agent_id)));
        list.truncate(top);
        list
    };
    let buckets = buckets.clamp(1, 1000);
    let step = window / u32::try_from(buckets).unwrap_or(u32::MAX);
    let distribution = (1..=buckets)
        .map(|i| {
            let at = start + step * u32::try_from(i).unwrap_or(u32::MAX);
            let at = if i == buckets { end } else { at };
            (at, distribution_at(&windows, at))
        })
        .collect();
    Ok(FleetAnalytics {
        agents: windows.len() as u64,
        top_by_errors: ranked(|a| a.error_entries),
        top_by_transitions: ranked(|a| a.transitions),
        total,
        distribution,
        start,
        end,
    })
}
