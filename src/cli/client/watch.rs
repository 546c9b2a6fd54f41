//! The stream commands: `watch` prints WatchEvents messages as they come,
//! `top` keeps a live view of the fleet from a snapshot and the events
//! after it. Neither has a deadline; both end with the stream (or their
//! `--count`, `--iterations`).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Duration,
};

use clap::Args;
use serde_json::json;

use agent_lifecycle::{
    api::grpc::pb::{self, watch_events_response::Kind},
    domain::AgentState,
};

use super::{
    Format, Session, agent_json, agent_line, output, parse_event_type, parse_pair, parse_state,
    status_error, transition_json, transition_line, wire_state,
};

/// `watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this agent; repeatable.
    #[arg(long = "agent")]
    pub agent_ids: Vec<String>,
    /// Only events into this state; repeatable.
    #[arg(long = "state", value_parser = parse_state)]
    pub states: Vec<AgentState>,
    /// Only `registered` or `transitioned` events; repeatable.
    #[arg(long = "type", value_parser = parse_event_type)]
    pub types: Vec<pb::EventType>,
    /// Only agents with label KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Replay from this sequence, then follow.
    #[arg(long = "from", default_value_t = 0)]
    pub start_sequence: u64,
    /// Print the matching agents first, then follow.
    #[arg(long)]
    pub snapshot: bool,
    /// Also print progress messages.
    #[arg(long)]
    pub progress: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
}

/// `top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Only agents with label KEY=VALUE; repeatable.
    #[arg(long = "label", value_parser = parse_pair)]
    pub labels: Vec<(String, String)>,
    /// Recent events shown.
    #[arg(long, default_value_t = 15)]
    pub events: usize,
    /// Time between screens.
    #[arg(long, default_value = "1s", value_parser = agent_lifecycle::app::config::parse_duration)]
    pub interval: Duration,
    /// Print this many screens (without clearing the terminal), then stop;
    /// default: until interrupted.
    #[arg(long)]
    pub iterations: Option<u64>,
}

/// `watch`: WatchEvents, one line per message, until the stream ends or
/// `--count` events were printed. No deadline.
pub(super) async fn watch(s: &mut Session, a: WatchArgs) -> anyhow::Result<()> {
    let request = pb::WatchEventsRequest {
        agent_ids: a.agent_ids,
        states: a.states.iter().map(|s| wire_state(*s)).collect(),
        event_types: a.types.iter().map(|t| *t as i32).collect(),
        labels: a.labels.into_iter().collect(),
        start_sequence: a.start_sequence,
        include_snapshot: a.snapshot,
    };
    let mut stream = s
        .client
        .watch_events(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut seen = 0u64;
    while let Some(message) = stream.message().await.map_err(status_error)? {
        let Some(kind) = message.kind else { continue };
        if print_watch_message(s.format, kind, a.progress) {
            seen += 1;
        }
        if a.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}

/// What `top` shows: each agent's state, the newest events, the head.
#[derive(Default)]
struct FleetView {
    /// State (wire number) by agent id.
    states: HashMap<String, i32>,
    /// Newest first, at most `--events`.
    recent: VecDeque<String>,
    head: u64,
    /// The snapshot is complete: screens may be drawn.
    ready: bool,
}

impl FleetView {
    /// Takes in one WatchEvents message, keeping `keep` recent events.
    fn apply(&mut self, kind: Option<Kind>, keep: usize) {
        match kind {
            Some(Kind::SnapshotAgent(agent)) => {
                self.states.insert(agent.agent_id.clone(), agent.state);
            }
            Some(Kind::SnapshotComplete(c)) => {
                self.head = c.head_sequence;
                self.ready = true;
            }
            Some(Kind::Event(e)) => {
                self.head = e.sequence;
                if let Some(agent) = &e.agent {
                    self.states.insert(agent.agent_id.clone(), agent.state);
                }
                if let Some(t) = &e.transition {
                    self.recent
                        .push_front(format!("{}  {}", e.agent_id, transition_line(t)));
                    self.recent.truncate(keep);
                }
            }
            Some(Kind::Progress(p)) => self.head = self.head.max(p.head_sequence),
            None => {}
        }
    }

    /// Prints one screen; `interactive` clears the terminal first.
    fn print(&self, format: Format, interactive: bool) {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for state in self.states.values() {
            *counts.entry(output::state_name(*state)).or_default() += 1;
        }
        match format {
            Format::Text => {
                if interactive {
                    // Clear the screen and go home.
                    print!("\x1b[2J\x1b[H");
                }
                println!("agents: {}   head: #{}", self.states.len(), self.head);
                for (state, n) in &counts {
                    println!("  {state:<12} {n}");
                }
                println!("recent events:");
                for line in &self.recent {
                    println!("  {line}");
                }
            }
            Format::Json | Format::Yaml => output::emit(
                format,
                &json!({
                    "agents": self.states.len(),
                    "head_sequence": self.head,
                    "states": counts,
                    "recent_events": self.recent.iter().collect::<Vec<_>>(),
                }),
            ),
        }
    }
}

/// `top`: a live view of the fleet, from a WatchEvents snapshot and the
/// events after it: agents per state and the most recent events, redrawn
/// every `interval`.
pub(super) async fn top(s: &mut Session, a: TopArgs) -> anyhow::Result<()> {
    let request = pb::WatchEventsRequest {
        labels: a.labels.into_iter().collect(),
        include_snapshot: true,
        ..Default::default()
    };
    let mut stream = s
        .client
        .watch_events(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut view = FleetView::default();
    let mut screens = 0u64;
    let mut ticks = tokio::time::interval(a.interval.max(Duration::from_millis(100)));
    let interactive =
        a.iterations.is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        tokio::select! {
            message = stream.message() => {
                let Some(message) = message.map_err(status_error)? else {
                    return Ok(());
                };
                view.apply(message.kind, a.events);
            }
            _ = ticks.tick(), if view.ready => {
                view.print(s.format, interactive);
                screens += 1;
                if a.iterations.is_some_and(|n| screens >= n) {
                    return Ok(());
                }
            }
        }
    }
}

/// Prints one WatchEvents message (progress only when `progress`); true
/// for an event, which is what `--count` counts.
fn print_watch_message(format: Format, kind: Kind, progress: bool) -> bool {
    match (kind, format) {
        (Kind::Event(e), Format::Json | Format::Yaml) => {
            output::emit(
                format,
                &json!({
                    "type": "event",
                    "sequence": e.sequence,
                    "agent_id": e.agent_id,
                    "event_type": output::event_type_name(e.r#type),
                    "transition": e.transition.as_ref().map(transition_json),
                    "agent": e.agent.as_ref().map(agent_json),
                }),
            );
            true
        }
        (Kind::Event(e), Format::Text) => {
            let line = e
                .transition
                .as_ref()
                .map(transition_line)
                .unwrap_or_default();
            println!("{}  {}", e.agent_id, line);
            true
        }
        (Kind::Progress(p), Format::Json | Format::Yaml) if progress => {
            output::emit(
                format,
                &json!({"type": "progress", "head_sequence": p.head_sequence}),
            );
            false
        }
        (Kind::Progress(p), Format::Text) if progress => {
            println!("progress head={}", p.head_sequence);
            false
        }
        (Kind::Progress(_), _) => false,
        (Kind::SnapshotAgent(agent), Format::Json | Format::Yaml) => {
            output::emit(
                format,
                &json!({"type": "snapshot_agent", "agent": agent_json(&agent)}),
            );
            false
        }
        (Kind::SnapshotAgent(agent), Format::Text) => {
            println!("snapshot {}", agent_line(&agent));
            false
        }
        (Kind::SnapshotComplete(c), Format::Json | Format::Yaml) => {
            output::emit(
                format,
                &json!({"type": "snapshot_complete", "head_sequence": c.head_sequence, "agent_count": c.agent_count}),
            );
            false
        }
        (Kind::SnapshotComplete(c), Format::Text) => {
            println!(
                "snapshot complete: {} agents at sequence {}",
                c.agent_count, c.head_sequence
            );
            false
        }
    }
}
