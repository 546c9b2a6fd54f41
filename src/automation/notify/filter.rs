//! Which events a webhook is sent: a filter over the event's new state, the
//! agent's labels and id, and who made the change. Pure; nothing here
//! does I/O.

use crate::domain::{AgentCategory, AgentId, AgentState, Labels, LifecycleEvent, StateSet};

/// What an event must be for a webhook to be sent it. Every part that is
/// set must hold (an empty part holds for every event); within one part,
/// any of its values will do.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventFilter {
    /// The states the event must move into: the webhook's `states` and
    /// every state of its `categories` (empty: any state).
    pub states: StateSet,
    /// Labels the agent must carry, every one with the given value.
    pub labels: Labels,
    /// Values of `triggered_by` the event must carry (`system`,
    /// `health-monitor`, `hf_sync`, a client's own value...).
    pub sources: Vec<String>,
    /// The agents the event must be about.
    pub agents: Vec<AgentId>,
}

impl EventFilter {
    /// The set of states that `states` names and `categories` cover.
    pub fn target_states(states: &[AgentState], categories: &[AgentCategory]) -> StateSet {
        AgentState::ALL
            .into_iter()
            .filter(|state| {
                states.contains(state)
                    || categories
                        .iter()
                        .any(|category| state.in_category(*category))
            })
            .collect()
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &LifecycleEvent) -> bool {
        let record = &event.record;
        self.states.matches(record.to)
            && event.agent.has_labels(&self.labels)
            && (self.sources.is_empty() || self.sources.contains(&record.triggered_by))
            && (self.agents.is_empty() || self.agents.contains(&record.agent_id))
    }
}

/// An event of agent `id` (`summarizer`, labelled `team=ml`) moving from
/// online into `to`, made by `by`: sequence 7, version 3, at the epoch.
#[cfg(test)]
pub(super) fn sample_event(id: u128, to: AgentState, by: &str) -> LifecycleEvent {
    use std::{sync::Arc, time::SystemTime};

    use crate::domain::{Agent, TransitionRecord};

    let record = Arc::new(TransitionRecord {
        agent_id: AgentId::from_u128(id),
        from: Some(AgentState::Online),
        to,
        at: SystemTime::UNIX_EPOCH,
        reason: "why".into(),
        triggered_by: by.into(),
        principal: String::new(),
        request: None,
        metadata: Default::default(),
        sequence: 7,
        version: 3,
    });
    let labels = Labels::from([("team".to_string(), "ml".to_string())]);
    let agent = Agent::registered(
        AgentId::from_u128(id),
        "summarizer".into(),
        Arc::new(labels),
        Arc::clone(&record),
    );
    LifecycleEvent::new(record, Arc::new(agent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: u128, to: AgentState, by: &str) -> LifecycleEvent {
        sample_event(id, to, by)
    }

    #[test]
    fn an_empty_filter_passes_everything() {
        let filter = EventFilter::default();
        for state in AgentState::ALL {
            assert!(filter.matches(&event(1, state, "system")));
        }
    }

    #[test]
    fn states_and_categories_together_name_the_target_states() {
        let set = EventFilter::target_states(&[AgentState::Offline], &[AgentCategory::Error]);
        for state in AgentState::ALL {
            let expected = matches!(
                state,
                AgentState::Offline | AgentState::Error | AgentState::Failed | AgentState::Timeout
            );
            assert_eq!(set.contains(state), expected, "{state}");
        }
        let filter = EventFilter {
            states: set,
            ..EventFilter::default()
        };
        assert!(filter.matches(&event(1, AgentState::Timeout, "system")));
        assert!(!filter.matches(&event(1, AgentState::Online, "system")));
    }

    #[test]
    fn every_part_that_is_set_must_hold() {
        let filter = EventFilter {
            states: EventFilter::target_states(&[AgentState::Error], &[]),
            labels: Labels::from([("team".to_string(), "ml".to_string())]),
            sources: vec!["health-monitor".into(), "oncall".into()],
            agents: vec![AgentId::from_u128(1), AgentId::from_u128(2)],
        };
        assert!(filter.matches(&event(1, AgentState::Error, "health-monitor")));
        assert!(filter.matches(&event(2, AgentState::Error, "oncall")));
        assert!(
            !filter.matches(&event(3, AgentState::Error, "oncall")),
            "agent"
        );
        assert!(
            !filter.matches(&event(1, AgentState::Online, "oncall")),
            "state"
        );
        assert!(
            !filter.matches(&event(1, AgentState::Error, "client")),
            "source"
        );
        let other_team = EventFilter {
            labels: Labels::from([("team".to_string(), "web".to_string())]),
            ..filter
        };
        assert!(
            !other_team.matches(&event(1, AgentState::Error, "oncall")),
            "labels"
        );
    }
}
