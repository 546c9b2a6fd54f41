//! Rendering of wire types for the terminal: text for people, JSON for
//! machines.

use agent_lifecycle::api::grpc::pb;
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
    let seconds = u64::try_from(ts.seconds).unwrap_or(0);
    let nanos = u32::try_from(ts.nanos).unwrap_or(0);
    agent_lifecycle::domain::rfc3339(
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::new(seconds, nanos),
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

/// `value` as YAML: block style, every string double-quoted as JSON quotes
/// it (valid YAML, since YAML's double-quoted scalars take JSON's escapes),
/// so no value is ever read back as another type.
pub fn yaml(value: &Value) -> String {
    let mut out = String::new();
    yaml_into(&mut out, value, 0);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// A mapping key: bare when it is a plain word YAML reads back as the same
/// string, quoted otherwise.
fn yaml_key(key: &str) -> String {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !matches!(
            key.to_ascii_lowercase().as_str(),
            "true" | "false" | "null" | "yes" | "no" | "on" | "off" | "y" | "n" | "~"
        );
    if plain {
        key.to_string()
    } else {
        Value::String(key.to_string()).to_string()
    }
}

fn yaml_scalar(value: &Value) -> String {
    match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(a) if a.is_empty() => "[]".to_string(),
        Value::Object(o) if o.is_empty() => "{}".to_string(),
        // Not a scalar; callers handle these.
        other => other.to_string(),
    }
}

fn is_block(value: &Value) -> bool {
    match value {
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => false,
    }
}

fn yaml_into(out: &mut String, value: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, item) in map {
                let key = yaml_key(key);
                if is_block(item) {
                    out.push_str(&format!("{pad}{key}:\n"));
                    yaml_into(out, item, indent + 2);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", yaml_scalar(item)));
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                if is_block(item) {
                    out.push_str(&format!("{pad}-\n"));
                    yaml_into(out, item, indent + 2);
                } else {
                    out.push_str(&format!("{pad}- {}\n", yaml_scalar(item)));
                }
            }
        }
        scalar => out.push_str(&format!("{pad}{}\n", yaml_scalar(scalar))),
    }
}

/// Prints `value` as JSON (one line) or YAML (a document).
pub fn emit(format: super::Format, value: &Value) {
    match format {
        super::Format::Yaml => print!("---\n{}", yaml(value)),
        _ => println!("{value}"),
    }
}

#[cfg(test)]
mod yaml_tests {
    use serde_json::json;

    #[test]
    fn yaml_is_block_style_with_quoted_strings() {
        let text = super::yaml(&json!({
            "agent": {"id": "a", "labels": {}, "tags": ["x", 1, null]},
            "empty": [],
            "n": 2.5,
            "yes": "true",
        }));
        assert_eq!(
            text,
            "agent:\n  id: \"a\"\n  labels: {}\n  tags:\n    - \"x\"\n    - 1\n    - null\nempty: []\n\"n\": 2.5\n\"yes\": \"true\"\n"
        );
    }
}
