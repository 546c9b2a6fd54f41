//! Rendering of wire types for the terminal: text for people, JSON for
//! machines.

use agent_lifecycle::grpc::pb;
use prost_types::{Struct, Timestamp, value::Kind};
use serde_json::{Value, json};

/// Lowercase name of a wire state number ("online"); "unspecified" for 0.
pub fn state_name(value: i32) -> String {
    pb::AgentState::try_from(value)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("AGENT_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("state({value})"))
}

/// Lowercase event type name.
pub fn event_type_name(value: i32) -> String {
    pb::EventType::try_from(value)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("EVENT_TYPE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("type({value})"))
}

/// RFC 3339 UTC text of a timestamp.
pub fn time_text(ts: Option<&Timestamp>) -> String {
    let Some(ts) = ts else {
        return String::new();
    };
    let days = ts.seconds.div_euclid(86_400);
    let secs = ts.seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        ts.nanos / 1000
    )
}

/// JSON of a protobuf Struct.
pub fn struct_json(value: Option<&Struct>) -> Value {
    let Some(value) = value else {
        return json!({});
    };
    Value::Object(
        value
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(value: &prost_types::Value) -> Value {
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::NumberValue(n)) => json!(n),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_json).collect()),
        Some(Kind::StructValue(s)) => struct_json(Some(s)),
    }
}

/// JSON of a transition.
pub fn transition_json(t: &pb::StateTransition) -> Value {
    json!({
        "agent_id": t.agent_id,
        "sequence": t.sequence,
        "version": t.version,
        // Registration has no previous state.
        "from_state": (t.from_state != 0).then(|| state_name(t.from_state)),
        "to_state": state_name(t.to_state),
        "timestamp": time_text(t.timestamp.as_ref()),
        "reason": t.reason,
        "triggered_by": t.triggered_by,
        "principal": t.principal,
        "metadata": struct_json(t.metadata.as_ref()),
    })
}

/// One text line of the audit trail: when, who (principal and
/// triggered_by), which agent, what.
pub fn audit_line(t: &pb::StateTransition) -> String {
    let principal = if t.principal.is_empty() {
        "-"
    } else {
        t.principal.as_str()
    };
    format!(
        "{}  {:<16} {:<16} {}  {} -> {}  {:?}",
        time_text(t.timestamp.as_ref()),
        principal,
        t.triggered_by,
        t.agent_id,
        if t.from_state == 0 {
            "(new)".to_string()
        } else {
            state_name(t.from_state)
        },
        state_name(t.to_state),
        t.reason,
    )
}

/// JSON of an agent.
pub fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "agent_id": a.agent_id,
        "name": a.name,
        "labels": a.labels,
        "state": state_name(a.state),
        "version": a.version,
        "valid_transitions": a.valid_transitions.iter().map(|s| state_name(*s)).collect::<Vec<_>>(),
        "is_operational": a.is_operational,
        "is_available_for_tasks": a.is_available_for_tasks,
        "is_in_error_state": a.is_in_error_state,
        "is_in_maintenance": a.is_in_maintenance,
        "history_count": a.history_count,
        "last_transition": a.last_transition.as_ref().map(transition_json),
        "created_at": time_text(a.created_at.as_ref()),
        "updated_at": time_text(a.updated_at.as_ref()),
    })
}

/// One text line for a transition.
pub fn transition_line(t: &pb::StateTransition) -> String {
    format!(
        "#{:<6} v{:<3} {} -> {}  by {}  {:?}  {}",
        t.sequence,
        t.version,
        if t.from_state == 0 {
            "(new)".to_string()
        } else {
            state_name(t.from_state)
        },
        state_name(t.to_state),
        t.triggered_by,
        t.reason,
        time_text(t.timestamp.as_ref())
    )
}

/// The header row of [`agent_line`]s.
pub fn agent_header() -> String {
    format!(
        "{:<36}  {:<12} {:<5} {}",
        "AGENT ID", "STATE", "VER", "NAME"
    )
}

/// One text line for an agent.
pub fn agent_line(a: &pb::Agent) -> String {
    format!(
        "{}  {:<12} v{:<4} {}",
        a.agent_id,
        state_name(a.state),
        a.version,
        a.name
    )
}

/// A multi-line description of an agent.
pub fn agent_text(a: &pb::Agent) -> String {
    let labels = a
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let valid = a
        .valid_transitions
        .iter()
        .map(|s| state_name(*s))
        .collect::<Vec<_>>()
        .join(", ");
    let mut flags = Vec::new();
    if a.is_operational {
        flags.push("operational");
    }
    if a.is_available_for_tasks {
        flags.push("available");
    }
    if a.is_in_error_state {
        flags.push("error");
    }
    if a.is_in_maintenance {
        flags.push("maintenance");
    }
    let last = a
        .last_transition
        .as_ref()
        .map(transition_line)
        .unwrap_or_default();
    format!(
        "agent_id:    {}\nname:        {}\nlabels:      {labels}\nstate:       {}\nversion:     {}\nvalid next:  {valid}\nflags:       {}\nhistory:     {}\nlast:        {last}\ncreated_at:  {}\nupdated_at:  {}",
        a.agent_id,
        a.name,
        state_name(a.state),
        a.version,
        flags.join(", "),
        a.history_count,
        time_text(a.created_at.as_ref()),
        time_text(a.updated_at.as_ref()),
    )
}
