//! Conversions between wire (`pb`) and domain types, and the page tokens.
//!
//! Wire input is validated here: an UNSPECIFIED or unknown enum number, a
//! malformed UUID, a non-finite number in metadata or an unknown page token
//! becomes a [`FieldViolation`] naming the field.

use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};

use super::pb;

mod tokens;

pub use self::tokens::{
    audit_token, history_token, list_token, parse_audit_token, parse_history_token,
    parse_list_token,
};
use crate::{
    domain::{
        Agent, AgentCategory, AgentId, AgentState, Caller, EventKind, FieldViolation, Labels,
        LifecycleEvent, Metadata, TransitionPolicy, TransitionRecord,
    },
    service::{ChangeRequest, LifecycleMetrics, WatchItem, WatchRequest},
};

/// Domain and wire states, in order.
const STATES: [(AgentState, pb::AgentState); 18] = [
    (AgentState::Registered, pb::AgentState::Registered),
    (AgentState::Deploying, pb::AgentState::Deploying),
    (AgentState::Deployed, pb::AgentState::Deployed),
    (AgentState::Starting, pb::AgentState::Starting),
    (AgentState::Online, pb::AgentState::Online),
    (AgentState::Busy, pb::AgentState::Busy),
    (AgentState::Idle, pb::AgentState::Idle),
    (AgentState::Stopping, pb::AgentState::Stopping),
    (AgentState::Updating, pb::AgentState::Updating),
    (AgentState::Scaling, pb::AgentState::Scaling),
    (AgentState::Error, pb::AgentState::Error),
    (AgentState::Failed, pb::AgentState::Failed),
    (AgentState::Timeout, pb::AgentState::Timeout),
    (AgentState::Maintenance, pb::AgentState::Maintenance),
    (AgentState::Suspended, pb::AgentState::Suspended),
    (AgentState::Offline, pb::AgentState::Offline),
    (AgentState::Terminated, pb::AgentState::Terminated),
    (AgentState::Deleted, pb::AgentState::Deleted),
];

/// The wire value of a state.
pub fn state_to_pb(state: AgentState) -> pb::AgentState {
    STATES[state.index()].1
}

/// A required state from its wire number.
///
/// # Errors
/// UNSPECIFIED or an unknown number.
pub fn state_from_pb(field: &str, value: i32) -> Result<AgentState, FieldViolation> {
    match pb::AgentState::try_from(value) {
        Ok(pb::AgentState::Unspecified) => Err(FieldViolation::new(
            field,
            "must be set (AGENT_STATE_UNSPECIFIED is not a state)",
        )),
        Ok(wire) => STATES
            .iter()
            .find(|(_, w)| *w == wire)
            .map(|(d, _)| *d)
            .ok_or_else(|| FieldViolation::new(field, format!("unknown state {value}"))),
        Err(_) => Err(FieldViolation::new(
            field,
            format!("unknown state number {value}"),
        )),
    }
}

/// A list of states (each required to be a real state).
///
/// # Errors
/// Any UNSPECIFIED or unknown number.
pub fn states_from_pb(field: &str, values: &[i32]) -> Result<Vec<AgentState>, FieldViolation> {
    values.iter().map(|v| state_from_pb(field, *v)).collect()
}

/// A category filter; UNSPECIFIED is no filter.
///
/// # Errors
/// An unknown number.
pub fn category_from_pb(value: i32) -> Result<Option<AgentCategory>, FieldViolation> {
    match pb::AgentCategory::try_from(value) {
        Ok(pb::AgentCategory::Unspecified) => Ok(None),
        Ok(pb::AgentCategory::Operational) => Ok(Some(AgentCategory::Operational)),
        Ok(pb::AgentCategory::Available) => Ok(Some(AgentCategory::Available)),
        Ok(pb::AgentCategory::Error) => Ok(Some(AgentCategory::Error)),
        Ok(pb::AgentCategory::Maintenance) => Ok(Some(AgentCategory::Maintenance)),
        Err(_) => Err(FieldViolation::new(
            "category",
            format!("unknown category number {value}"),
        )),
    }
}

/// Event types of a watch filter.
///
/// # Errors
/// UNSPECIFIED or an unknown number.
pub fn event_kinds_from_pb(values: &[i32]) -> Result<Vec<EventKind>, FieldViolation> {
    values
        .iter()
        .map(|v| match pb::EventType::try_from(*v) {
            Ok(pb::EventType::Registered) => Ok(EventKind::Registered),
            Ok(pb::EventType::Transitioned) => Ok(EventKind::Transitioned),
            Ok(pb::EventType::Unspecified) => Err(FieldViolation::new(
                "event_types",
                "EVENT_TYPE_UNSPECIFIED is not an event type",
            )),
            Err(_) => Err(FieldViolation::new(
                "event_types",
                format!("unknown event type number {v}"),
            )),
        })
        .collect()
}

/// The wire event type.
pub fn kind_to_pb(kind: EventKind) -> pb::EventType {
    match kind {
        EventKind::Registered => pb::EventType::Registered,
        EventKind::Transitioned => pb::EventType::Transitioned,
    }
}

/// A required agent id.
///
/// # Errors
/// Empty or not a UUID.
pub fn agent_id_from_pb(field: &str, text: &str) -> Result<AgentId, FieldViolation> {
    if text.is_empty() {
        return Err(FieldViolation::new(field, "is required"));
    }
    AgentId::parse(field, text)
}

/// Wire timestamp of a time.
pub fn timestamp(at: SystemTime) -> Timestamp {
    let (seconds, nanos) = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos() as i32),
        Err(e) => {
            let d = e.duration();
            let mut seconds = -(d.as_secs() as i64);
            let mut nanos = -(d.subsec_nanos() as i32);
            if nanos < 0 {
                seconds -= 1;
                nanos += 1_000_000_000;
            }
            (seconds, nanos)
        }
    };
    Timestamp { seconds, nanos }
}

/// Wire metadata from JSON.
pub fn metadata_to_pb(metadata: &Metadata) -> Option<Struct> {
    if metadata.is_empty() {
        return None;
    }
    Some(Struct {
        fields: metadata
            .iter()
            .map(|(k, v)| (k.clone(), value_to_pb(v)))
            .collect(),
    })
}

fn value_to_pb(value: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    let kind = match value {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(*b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s.clone()),
        J::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(value_to_pb).collect(),
        }),
        J::Object(map) => Kind::StructValue(Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), value_to_pb(v)))
                .collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// JSON metadata from the wire.
///
/// # Errors
/// A NaN or infinite number (JSON has none).
pub fn metadata_from_pb(field: &str, metadata: Option<Struct>) -> Result<Metadata, FieldViolation> {
    let Some(metadata) = metadata else {
        return Ok(Metadata::new());
    };
    metadata
        .fields
        .into_iter()
        .map(|(k, v)| Ok((k, value_from_pb(field, v, 2)?)))
        .collect()
}

/// `value`, nested `depth` deep (the top-level object is 1).
fn value_from_pb(
    field: &str,
    value: Value,
    depth: usize,
) -> Result<serde_json::Value, FieldViolation> {
    use crate::domain::limits::MAX_METADATA_DEPTH;
    use serde_json::Value as J;
    let nested = matches!(value.kind, Some(Kind::ListValue(_) | Kind::StructValue(_)));
    if nested && depth > MAX_METADATA_DEPTH {
        return Err(FieldViolation::new(
            field,
            format!("nested deeper than {MAX_METADATA_DEPTH} levels"),
        ));
    }
    Ok(match value.kind {
        None | Some(Kind::NullValue(_)) => J::Null,
        Some(Kind::BoolValue(b)) => J::Bool(b),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map(J::Number)
            .ok_or_else(|| FieldViolation::new(field, format!("number {n} is not finite")))?,
        Some(Kind::StringValue(s)) => J::String(s),
        Some(Kind::ListValue(list)) => J::Array(
            list.values
                .into_iter()
                .map(|v| value_from_pb(field, v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Some(Kind::StructValue(s)) => J::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| Ok((k, value_from_pb(field, v, depth + 1)?)))
                .collect::<Result<_, FieldViolation>>()?,
        ),
    })
}

/// Labels from the wire (a map; ordered for stable storage).
pub fn labels_from_pb(labels: std::collections::HashMap<String, String>) -> Labels {
    labels.into_iter().collect()
}

/// The common fields of a mutating request, made by `caller`.
///
/// # Errors
/// Bad metadata.
pub fn change_from_pb(
    reason: String,
    triggered_by: String,
    metadata: Option<Struct>,
    expected_version: Option<u64>,
    caller: Caller,
    request_id: String,
) -> Result<ChangeRequest, FieldViolation> {
    Ok(ChangeRequest {
        reason,
        triggered_by,
        metadata: metadata_from_pb("metadata", metadata)?,
        expected_version,
        caller,
        request_id: Some(request_id).filter(|id| !id.is_empty()),
    })
}

/// The service's watch request from WatchEvents'.
///
/// # Errors
/// A malformed agent id, an UNSPECIFIED or unknown state or event type.
pub fn watch_request_from_pb(
    request: pb::WatchEventsRequest,
) -> Result<WatchRequest, FieldViolation> {
    let pb::WatchEventsRequest {
        agent_ids,
        states,
        event_types,
        labels,
        start_sequence,
        include_snapshot,
    } = request;
    Ok(WatchRequest {
        agent_ids: agent_ids
            .iter()
            .map(|id| agent_id_from_pb("agent_ids", id))
            .collect::<Result<_, _>>()?,
        states: states_from_pb("states", &states)?,
        kinds: event_kinds_from_pb(&event_types)?,
        labels: labels_from_pb(labels),
        start_sequence,
        include_snapshot,
    })
}

/// The response of SyncExternalStatus.
pub fn sync_result_to_pb(
    result: &crate::automation::sync::SyncResult,
    policy: &TransitionPolicy,
) -> pb::SyncExternalStatusResponse {
    use crate::automation::sync::SyncOutcome;
    let outcome = match result.outcome {
        SyncOutcome::Applied => pb::SyncOutcome::Applied,
        SyncOutcome::AlreadyInState => pb::SyncOutcome::AlreadyInState,
        SyncOutcome::UnknownStatus => pb::SyncOutcome::UnknownStatus,
        SyncOutcome::Unreachable => pb::SyncOutcome::Unreachable,
    };
    pb::SyncExternalStatusResponse {
        agent: Some(agent_to_pb(&result.agent, policy)),
        transitions: result
            .transitions
            .iter()
            .map(|r| transition_to_pb(r))
            .collect(),
        outcome: outcome as i32,
        target_state: result
            .target
            .map_or(pb::AgentState::Unspecified, state_to_pb) as i32,
        message: result.message.clone(),
    }
}

/// A transition record on the wire.
pub fn transition_to_pb(record: &TransitionRecord) -> pb::StateTransition {
    pb::StateTransition {
        from_state: record.from.map_or(pb::AgentState::Unspecified, state_to_pb) as i32,
        to_state: state_to_pb(record.to) as i32,
        timestamp: Some(timestamp(record.at)),
        reason: record.reason.clone(),
        triggered_by: record.triggered_by.clone(),
        principal: record.principal.clone(),
        metadata: metadata_to_pb(&record.metadata),
        sequence: record.sequence,
        version: record.version,
        agent_id: record.agent_id.to_string(),
    }
}

/// An agent on the wire, with the transitions `policy` allows from its state.
/// The point of an `as_of` field; `None` when unset (now).
///
/// # Errors
/// A time before 1970 or with out-of-range nanoseconds, named by `field`.
pub fn as_of_from_pb(
    field: &str,
    as_of: Option<pb::AsOf>,
) -> Result<Option<crate::service::AsOf>, FieldViolation> {
    use crate::service::AsOf;
    Ok(match as_of.and_then(|a| a.point) {
        None => None,
        Some(pb::as_of::Point::Sequence(sequence)) => Some(AsOf::Sequence(sequence)),
        Some(pb::as_of::Point::Time(time)) => {
            let (Ok(seconds), Ok(nanos)) = (u64::try_from(time.seconds), u32::try_from(time.nanos))
            else {
                return Err(FieldViolation::new(
                    format!("{field}.time"),
                    "must be a time after 1970-01-01T00:00:00Z",
                ));
            };
            if nanos >= 1_000_000_000 {
                return Err(FieldViolation::new(
                    format!("{field}.time"),
                    "nanos must be below 1000000000",
                ));
            }
            Some(AsOf::Time(
                SystemTime::UNIX_EPOCH + std::time::Duration::new(seconds, nanos),
            ))
        }
    })
}

/// An agent as it was at a point: without the last transition and update
/// time when retention deleted them.
pub fn agent_at_to_pb(at: &crate::service::AgentAt, policy: &TransitionPolicy) -> pb::Agent {
    let mut agent = agent_to_pb(&at.agent, policy);
    if !at.last_known {
        agent.last_transition = None;
        agent.updated_at = None;
    }
    agent
}

pub fn agent_to_pb(agent: &Agent, policy: &TransitionPolicy) -> pb::Agent {
    pb::Agent {
        agent_id: agent.id.to_string(),
        name: agent.name.to_string(),
        labels: agent
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        state: state_to_pb(agent.state) as i32,
        version: agent.version,
        valid_transitions: policy
            .allowed_targets(agent.state)
            .iter()
            .map(|s| state_to_pb(*s) as i32)
            .collect(),
        is_operational: agent.state.is_operational(),
        is_available_for_tasks: agent.state.is_available_for_tasks(),
        is_in_error_state: agent.state.is_error(),
        is_in_maintenance: agent.state.is_maintenance(),
        history_count: agent.version,
        last_transition: Some(transition_to_pb(&agent.last_transition)),
        created_at: Some(timestamp(agent.created_at)),
        updated_at: Some(timestamp(agent.updated_at)),
        last_heartbeat: None,
    }
}

/// The WatchEvents message carrying `event`.
pub fn event_to_pb(event: &LifecycleEvent, policy: &TransitionPolicy) -> pb::WatchEventsResponse {
    pb::WatchEventsResponse {
        kind: Some(pb::watch_events_response::Kind::Event(pb::LifecycleEvent {
            sequence: event.sequence(),
            agent_id: event.record.agent_id.to_string(),
            r#type: kind_to_pb(event.kind()) as i32,
            transition: Some(transition_to_pb(&event.record)),
            agent: Some(agent_to_pb(&event.agent, policy)),
        })),
    }
}

/// The WatchEvents message for any watch item.
pub fn watch_item_to_pb(item: WatchItem, policy: &TransitionPolicy) -> pb::WatchEventsResponse {
    use pb::watch_events_response::Kind;
    let kind = match item {
        WatchItem::Event(event) => return event_to_pb(&event, policy),
        WatchItem::Progress { head_sequence } => Kind::Progress(pb::Progress { head_sequence }),
        WatchItem::SnapshotAgent(agent) => Kind::SnapshotAgent(agent_to_pb(&agent, policy)),
        WatchItem::SnapshotComplete {
            head_sequence,
            agent_count,
        } => Kind::SnapshotComplete(pb::SnapshotComplete {
            head_sequence,
            agent_count,
        }),
    };
    pb::WatchEventsResponse { kind: Some(kind) }
}

/// Fleet metrics on the wire.
pub fn metrics_to_pb(metrics: &LifecycleMetrics) -> pb::GetLifecycleMetricsResponse {
    pb::GetLifecycleMetricsResponse {
        total_agents: metrics.total_agents,
        operational_agents: metrics.operational_agents,
        available_agents: metrics.available_agents,
        error_agents: metrics.error_agents,
        maintenance_agents: metrics.maintenance_agents,
        state_distribution: metrics
            .state_distribution
            .iter()
            .map(|(s, n)| (s.as_str().to_string(), *n))
            .collect(),
        head_sequence: metrics.head_sequence,
        hook_failures: metrics.hook_failures,
        watch_backfills: metrics.watch_backfills,
        ..Default::default()
    }
}

/// Analytics on the wire.
pub fn analytics_to_pb(a: &crate::automation::analytics::AgentAnalytics) -> pb::Analytics {
    pb::Analytics {
        agent_id: a.agent_id.map(|id| id.to_string()).unwrap_or_default(),
        seconds_in_state: a
            .time_in_state
            .iter()
            .map(|(state, d)| (state.as_str().to_string(), d.as_secs_f64()))
            .collect(),
        observed_seconds: a.observed.as_secs_f64(),
        transitions: a.transitions,
        error_entries: a.error_entries,
        recoveries: a.recoveries,
        mean_time_to_recovery_seconds: a.mean_time_to_recovery().map_or(0.0, |d| d.as_secs_f64()),
        availability: a.availability(),
        last_error: a.last_error.as_deref().map(transition_to_pb),
    }
}

/// The analytics window a request asks for (default 24 h).
///
/// # Errors
/// A negative, malformed or over-long window.
pub fn analytics_window(
    window: Option<prost_types::Duration>,
) -> Result<std::time::Duration, FieldViolation> {
    const MAX: std::time::Duration = std::time::Duration::from_secs(400 * 86_400);
    let Some(window) = window else {
        return Ok(std::time::Duration::from_secs(86_400));
    };
    let seconds = u64::try_from(window.seconds)
        .ok()
        .filter(|_| (0..1_000_000_000).contains(&window.nanos))
        .ok_or_else(|| FieldViolation::new("window", "must be a positive duration"))?;
    let window = std::time::Duration::new(seconds, window.nanos.unsigned_abs());
    if window.is_zero() || window > MAX {
        return Err(FieldViolation::new(
            "window",
            "must be more than 0 and at most 400 days",
        ));
    }
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::HistoryCursor;

    #[test]
    fn every_state_round_trips_through_the_wire() {
        for state in AgentState::ALL {
            let wire = state_to_pb(state) as i32;
            assert_eq!(wire, state.index() as i32 + 1);
            assert_eq!(state_from_pb("s", wire), Ok(state));
        }
        assert_eq!(
            state_from_pb("target_state", 0).unwrap_err().field,
            "target_state"
        );
        assert!(state_from_pb("target_state", 99).is_err());
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let id = AgentId::generate();
        assert_eq!(parse_list_token(&list_token(id)), Ok(Some(id)));
        let cursor = HistoryCursor { after: 5, upto: 90 };
        assert_eq!(
            parse_history_token(&history_token(cursor)),
            Ok(Some(cursor))
        );
        for bad in ["x", "agents.v1.zz", "history.v1.5", "history.v1.9.1"] {
            assert!(parse_list_token(bad).is_err() || parse_history_token(bad).is_err());
        }
        assert!(parse_list_token("history.v1.1.2").is_err());
    }

    #[test]
    fn metadata_round_trips_and_rejects_nan() {
        let json = serde_json::json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": "e"}});
        let map = json.as_object().cloned().unwrap();
        let wire = metadata_to_pb(&map);
        assert_eq!(metadata_from_pb("metadata", wire).unwrap(), map);
        let bad = Struct {
            fields: [(
                "n".to_string(),
                Value {
                    kind: Some(Kind::NumberValue(f64::NAN)),
                },
            )]
            .into(),
        };
        assert_eq!(
            metadata_from_pb("metadata", Some(bad)).unwrap_err().field,
            "metadata"
        );
    }
}
