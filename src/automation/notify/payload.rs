//! What a webhook's receiver is sent for an event, by template:
//!
//! - `json`: the event as the API's JSON, the shape `agent-lifecycle watch
//!   -o json` prints: `type`, `sequence`, `agent_id`, `event_type`
//!   (`registered` or `transitioned`), `transition` (`from_state` is null
//!   for a registration; `timestamp` is RFC 3339 UTC) and `agent` (as the
//!   event left it);
//! - `chat`: `{"text": LINE}`, which Slack and Mattermost incoming webhooks
//!   post as a message (`&`, `<` and `>` escaped as Slack asks, so no text
//!   of a client's becomes a mention or a link);
//! - `discord`: `{"content": LINE, "allowed_mentions": {"parse": []}}`,
//!   for Discord's incoming webhooks (mentions are never pinged).
//!
//! LINE names the agent, the move, the reason and who made it:
//! `summarizer (6f1c7a52): online → error: heartbeats stopped (by
//! health-monitor, #42)`. The body of an event is the same bytes on every
//! attempt. Pure; nothing here does I/O.

use std::{fmt, str::FromStr};

use serde_json::{Value, json};

use crate::domain::{Agent, EventKind, LifecycleEvent, rfc3339};

/// The longest LINE of the chat templates, in characters (Discord takes at
/// most 2000); longer ones are cut with `…`.
const MAX_LINE_CHARS: usize = 1900;

/// What a webhook sends: the shape of its body.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Template {
    /// The event as JSON.
    #[default]
    Json,
    /// `{"text": ...}`: Slack and Mattermost.
    Chat,
    /// `{"content": ...}`: Discord.
    Discord,
}

impl Template {
    /// The name the configuration file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Template::Json => "json",
            Template::Chat => "chat",
            Template::Discord => "discord",
        }
    }

    /// The body of `event`.
    pub fn render(self, event: &LifecycleEvent) -> Vec<u8> {
        let value = match self {
            Template::Json => event_json(event),
            Template::Chat => json!({ "text": slack_escape(&summary(event)) }),
            Template::Discord => json!({
                "content": summary(event),
                "allowed_mentions": { "parse": [] },
            }),
        };
        value.to_string().into_bytes()
    }
}

impl FromStr for Template {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Template::Json),
            "chat" => Ok(Template::Chat),
            "discord" => Ok(Template::Discord),
            _ => Err(format!(
                "unknown template {s:?} (json, chat for Slack and Mattermost, discord)"
            )),
        }
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The event as the API's JSON (see the module doc).
pub fn event_json(event: &LifecycleEvent) -> Value {
    let record = &event.record;
    json!({
        "type": "event",
        "sequence": record.sequence,
        "agent_id": record.agent_id.to_string(),
        "event_type": match event.kind() {
            EventKind::Registered => "registered",
            EventKind::Transitioned => "transitioned",
        },
        "transition": {
            "agent_id": record.agent_id.to_string(),
            "sequence": record.sequence,
            "version": record.version,
            "from_state": record.from.map(|s| s.as_str()),
            "to_state": record.to.as_str(),
            "timestamp": rfc3339(record.at),
            "reason": record.reason,
            "triggered_by": record.triggered_by,
            "principal": record.principal,
            "metadata": record.metadata,
        },
        "agent": agent_json(&event.agent),
    })
}

fn agent_json(agent: &Agent) -> Value {
    json!({
        "agent_id": agent.id.to_string(),
        "name": &*agent.name,
        "labels": &*agent.labels,
        "state": agent.state.as_str(),
        "version": agent.version,
        "is_operational": agent.state.is_operational(),
        "is_available_for_tasks": agent.state.is_available_for_tasks(),
        "is_in_error_state": agent.state.is_error(),
        "is_in_maintenance": agent.state.is_maintenance(),
        "created_at": rfc3339(agent.created_at),
        "updated_at": rfc3339(agent.updated_at),
    })
}

/// One line naming the agent, the move, the reason and who made it, with
/// control characters (line breaks) turned into spaces.
pub fn summary(event: &LifecycleEvent) -> String {
    let record = &event.record;
    let id = record.agent_id.to_string();
    let agent = if event.agent.name.is_empty() {
        id
    } else {
        format!("{} ({})", event.agent.name, id.get(..8).unwrap_or(&id))
    };
    let mut line = match record.from {
        Some(from) => format!("{agent}: {from} → {}", record.to),
        None => format!("{agent}: registered"),
    };
    if !record.reason.is_empty() {
        line.push_str(": ");
        line.push_str(&record.reason);
    }
    line.push_str(" (by ");
    line.push_str(&record.triggered_by);
    if !record.principal.is_empty() && record.principal != record.triggered_by {
        line.push_str(" as ");
        line.push_str(&record.principal);
    }
    line.push_str(&format!(", #{})", record.sequence));
    let line: String = line
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.chars().count() <= MAX_LINE_CHARS {
        return line;
    }
    let mut cut: String = line.chars().take(MAX_LINE_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// `text` with `&`, `<` and `>` escaped as Slack's message formatting asks
/// (Mattermost reads them the same way).
fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        automation::notify::filter::sample_event,
        domain::{AgentState, TransitionRecord},
    };

    #[test]
    fn the_json_template_is_the_event_as_the_api_shows_it() {
        let mut event = sample_event(1, AgentState::Error, "health-monitor");
        let mut record = (*event.record).clone();
        record.principal = "ops".into();
        record.metadata.insert("exit_code".into(), 137.into());
        event.record = Arc::new(record);
        let body: Value =
            serde_json::from_slice(&Template::Json.render(&event)).expect("JSON body");
        assert_eq!(body["type"], "event");
        assert_eq!(body["sequence"], 7);
        assert_eq!(body["event_type"], "transitioned");
        assert_eq!(body["agent_id"], "00000000-0000-0000-0000-000000000001");
        let transition = &body["transition"];
        assert_eq!(transition["from_state"], "online");
        assert_eq!(transition["to_state"], "error");
        assert_eq!(transition["version"], 3);
        assert_eq!(transition["reason"], "why");
        assert_eq!(transition["triggered_by"], "health-monitor");
        assert_eq!(transition["principal"], "ops");
        assert_eq!(transition["metadata"]["exit_code"], 137);
        assert_eq!(transition["timestamp"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(body["agent"]["name"], "summarizer");
        assert_eq!(body["agent"]["labels"]["team"], "ml");
        assert_eq!(body["agent"]["is_in_error_state"], true);
        assert_eq!(
            Template::Json.render(&event),
            Template::Json.render(&event),
            "every attempt sends the same bytes"
        );
    }

    #[test]
    fn chat_lines_name_the_agent_the_move_the_reason_and_who() {
        let event = sample_event(0x6f1c_7a52 << 96, AgentState::Error, "health-monitor");
        assert_eq!(
            summary(&event),
            "summarizer (6f1c7a52): online → error: why (by health-monitor, #7)"
        );
        let mut record: TransitionRecord = (*event.record).clone();
        record.from = None;
        record.to = AgentState::Registered;
        record.reason = "<!channel> a & b\nnext".into();
        record.triggered_by = "oncall".into();
        record.principal = "ops".into();
        let registered = LifecycleEvent::new(Arc::new(record), Arc::clone(&event.agent));
        let chat: Value =
            serde_json::from_slice(&Template::Chat.render(&registered)).expect("chat body");
        assert_eq!(
            chat["text"],
            "summarizer (6f1c7a52): registered: &lt;!channel&gt; a &amp; b next (by oncall as ops, #7)"
        );
        let discord: Value =
            serde_json::from_slice(&Template::Discord.render(&registered)).expect("discord body");
        assert_eq!(
            discord["content"],
            "summarizer (6f1c7a52): registered: <!channel> a & b next (by oncall as ops, #7)"
        );
        assert_eq!(discord["allowed_mentions"]["parse"], json!([]));
    }

    #[test]
    fn long_lines_are_cut_for_discord() {
        let event = sample_event(1, AgentState::Error, "x");
        let mut record = (*event.record).clone();
        record.reason = "é".repeat(3000);
        let long = LifecycleEvent::new(Arc::new(record), Arc::clone(&event.agent));
        let line = summary(&long);
        assert_eq!(line.chars().count(), MAX_LINE_CHARS);
        assert!(line.ends_with('…'));
    }

    #[test]
    fn templates_parse_by_name() {
        for template in [Template::Json, Template::Chat, Template::Discord] {
            assert_eq!(template.as_str().parse::<Template>(), Ok(template));
        }
        let err = "slack".parse::<Template>().expect_err("unknown");
        assert!(err.contains("json, chat"), "{err}");
    }
}
