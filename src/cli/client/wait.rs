//! `wait`: blocks until agents reach a state, as `kubectl wait` does.
//!
//! One WatchEvents stream for the agents, with a snapshot: their current
//! state, then every change after it, with nothing missed in between and
//! no polling. An agent is done once it is in one of its target states;
//! the wait fails as soon as an agent is in an error state (error, failed,
//! timeout) that is not one of its targets, and times out after
//! `--timeout`. A stream the server ends (a restart, a dropped connection)
//! is resumed from the last sequence seen. `apply --wait` uses the same
//! [`wait_for`], with a target per agent.

use std::{collections::HashMap, time::Duration};

use clap::Args;
use serde_json::json;
use tokio::time::Instant;
use tonic::{Code, Status, Streaming};

use agent_lifecycle::{
    api::grpc::{
        convert::state_from_pb,
        pb::{self, watch_events_response::Kind},
    },
    domain::{AgentCategory, AgentState, StateSet},
};

use super::{Client, Exit, Format, Session, agent_json, agent_line, exit, output, status_error};

/// `wait --help`, after the flags.
pub const WAIT_AFTER_HELP: &str = "\
Conditions (--for, repeatable; an agent is done in any state they name):
  state=online            one state
  state=online,idle       any of several
  category=operational    online, busy or idle (also: available, error, maintenance)

An agent in an error state (error, failed, timeout) that no condition names
fails the wait at once, with its last reason.

Exit codes:
  0  every agent reached the condition
  2  bad flags, an unknown agent, or the server cannot be reached
  3  an agent is in or entered an error state; its reason is printed
  4  --timeout (default 30s; 0: look once, do not wait) passed first";

/// Agents a WatchEvents filter may name (the server's limit); a wait for
/// more watches every agent and picks its own.
const MAX_FILTER_IDS: usize = 1000;

/// Time between a stream the server ended and the next attempt.
const RESUME_DELAY: Duration = Duration::from_millis(500);

/// `wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Agent ids; the wait ends when every one is there.
    #[arg(required = true)]
    pub agent_ids: Vec<String>,
    /// The condition: state=NAME[,NAME...] or category=NAME; repeatable
    /// (any of them will do).
    #[arg(long = "for", required = true, value_parser = parse_condition)]
    pub conditions: Vec<StateSet>,
}

/// One `--for`: the states it accepts.
///
/// # Errors
/// Not `state=...` or `category=...`, or a name that is no state or
/// category.
fn parse_condition(text: &str) -> Result<StateSet, String> {
    let usage = || format!("{text:?} is not state=NAME[,NAME...] or category=NAME[,NAME...]");
    let (key, values) = text.split_once('=').ok_or_else(usage)?;
    let mut set = StateSet::EMPTY;
    for value in values.split(',').map(str::trim) {
        if value.is_empty() {
            return Err(usage());
        }
        match key.trim().to_ascii_lowercase().as_str() {
            "state" => set.insert(value.parse::<AgentState>().map_err(|e| {
                format!("{e} in --for {text:?} (registered, deploying, ..., online, ...)")
            })?),
            "category" => {
                let category = value.parse::<AgentCategory>()?;
                for state in AgentState::ALL {
                    if state.in_category(category) {
                        set.insert(state);
                    }
                }
            }
            _ => return Err(usage()),
        }
    }
    Ok(set)
}

/// The names of the states in `set`, comma-separated.
pub(super) fn state_names(set: StateSet) -> String {
    AgentState::ALL
        .into_iter()
        .filter(|s| set.contains(*s))
        .map(AgentState::as_str)
        .collect::<Vec<_>>()
        .join(",")
}

/// An agent to wait for.
#[derive(Clone, Debug)]
pub(super) struct Target {
    pub agent_id: String,
    /// How messages name it (the fleet file's name); empty: the agent's
    /// own name.
    pub name: String,
    /// Done in any of these.
    pub states: StateSet,
}

/// Where one agent of the wait is.
struct Tracked {
    target: Target,
    /// The agent as last seen (none before the snapshot).
    agent: Option<pb::Agent>,
    done: bool,
}

impl Tracked {
    /// `NAME (ID)`, or the id alone when there is no name.
    fn who(&self) -> String {
        let name = match &self.agent {
            Some(agent) if self.target.name.is_empty() => agent.name.as_str(),
            _ => self.target.name.as_str(),
        };
        if name.is_empty() {
            format!("agent {}", self.target.agent_id)
        } else {
            format!("agent {name} ({})", self.target.agent_id)
        }
    }
}

/// How a stream ended that did not end the wait.
enum Read {
    /// Every agent is done.
    Done,
    /// The server ended the stream (`None`) or it failed.
    Broken(Option<Status>),
}

/// The agents of one wait and what is known of them.
struct Waiter {
    agents: HashMap<String, Tracked>,
    /// The ids in the order given, for the request and the messages.
    order: Vec<String>,
    /// The newest sequence seen: where a resumed stream starts.
    head: Option<u64>,
    /// Agents as they reached their targets, in that order.
    reached: Vec<pb::Agent>,
}

impl Waiter {
    fn new(targets: Vec<Target>) -> Self {
        let mut waiter = Waiter {
            agents: HashMap::new(),
            order: Vec::new(),
            head: None,
            reached: Vec::new(),
        };
        for target in targets {
            if !waiter.agents.contains_key(&target.agent_id) {
                waiter.order.push(target.agent_id.clone());
            }
            waiter.agents.insert(
                target.agent_id.clone(),
                Tracked {
                    target,
                    agent: None,
                    done: false,
                },
            );
        }
        waiter
    }

    fn all_done(&self) -> bool {
        self.agents.values().all(|t| t.done)
    }

    /// Takes in the agent as it is now; `transition` is what brought it
    /// there when an event did.
    ///
    /// # Errors
    /// The agent is in an error state that is not one of its targets.
    fn observe(
        &mut self,
        agent: pb::Agent,
        transition: Option<pb::StateTransition>,
        reached: &mut dyn FnMut(&pb::Agent),
    ) -> Result<(), Exit> {
        let Some(tracked) = self.agents.get_mut(&agent.agent_id) else {
            return Ok(());
        };
        // A resumed stream may repeat what was seen.
        if tracked
            .agent
            .as_ref()
            .is_some_and(|seen| seen.version >= agent.version)
        {
            return Ok(());
        }
        let Ok(state) = state_from_pb("state", agent.state) else {
            return Ok(());
        };
        let done_now = !tracked.done && tracked.target.states.contains(state);
        let failed = !tracked.done && !done_now && state.is_error();
        let last = transition.or_else(|| agent.last_transition.clone());
        tracked.agent = Some(agent);
        if done_now {
            tracked.done = true;
            if let Some(agent) = &tracked.agent {
                reached(agent);
                self.reached.push(agent.clone());
            }
        } else if failed {
            let (reason, by) = last.map(|t| (t.reason, t.triggered_by)).unwrap_or_default();
            return Err(Exit {
                code: exit::AGENT_FAILED,
                message: format!(
                    "{} is in state {state}, waiting for {}: {reason:?} (triggered_by {by})",
                    tracked.who(),
                    state_names(tracked.target.states),
                ),
            });
        }
        Ok(())
    }

    /// After a snapshot: every agent must have been in it.
    ///
    /// # Errors
    /// The agents the server does not know.
    fn check_all_seen(&self) -> Result<(), Exit> {
        let missing: Vec<&str> = self
            .order
            .iter()
            .filter(|id| self.agents.get(*id).is_some_and(|t| t.agent.is_none()))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(Exit {
            code: exit::USAGE,
            message: format!("no such agent: {}", missing.join(", ")),
        })
    }

    /// The failure of a wait that took longer than `limit`: which agents
    /// are not there, and where they are.
    fn timed_out(&self, limit: Duration) -> Exit {
        let pending: Vec<String> = self
            .order
            .iter()
            .filter_map(|id| self.agents.get(id))
            .filter(|t| !t.done)
            .map(|t| {
                let state = t
                    .agent
                    .as_ref()
                    .map_or("not seen".to_string(), |a| output::state_name(a.state));
                format!(
                    "{} is {state}, waiting for {}",
                    t.who(),
                    state_names(t.target.states)
                )
            })
            .collect();
        let after = if limit.is_zero() {
            "not there (--timeout 0)".to_string()
        } else {
            format!("timed out after {limit:?}")
        };
        Exit {
            code: exit::TIMED_OUT,
            message: format!("{after}: {}", pending.join("; ")),
        }
    }

    /// Reads one stream until every agent is done or the stream ends.
    ///
    /// # Errors
    /// An agent failed or is unknown, or (`look_once`) the snapshot shows
    /// some not there yet.
    async fn read(
        &mut self,
        mut stream: Streaming<pb::WatchEventsResponse>,
        look_once: bool,
        reached: &mut dyn FnMut(&pb::Agent),
    ) -> Result<Read, Exit> {
        loop {
            let message = match stream.message().await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(Read::Broken(None)),
                Err(status) => return Ok(Read::Broken(Some(status))),
            };
            match message.kind {
                Some(Kind::SnapshotAgent(agent)) => self.observe(agent, None, reached)?,
                Some(Kind::SnapshotComplete(complete)) => {
                    self.head = Some(complete.head_sequence);
                    self.check_all_seen()?;
                    if look_once && !self.all_done() {
                        return Err(self.timed_out(Duration::ZERO));
                    }
                }
                Some(Kind::Event(event)) => {
                    self.head = Some(event.sequence);
                    if let Some(agent) = event.agent {
                        self.observe(agent, event.transition, reached)?;
                    }
                }
                Some(Kind::Progress(progress)) => {
                    self.head = Some(self.head.unwrap_or(0).max(progress.head_sequence));
                }
                None => {}
            }
            if self.all_done() {
                return Ok(Read::Done);
            }
        }
    }

    /// Watches until every agent is done: a snapshot first, then, when
    /// the server ends the stream, again from the last sequence seen (or
    /// a new snapshot when that was compacted away).
    ///
    /// # Errors
    /// As [`Waiter::read`], and a call the server refuses.
    async fn follow(
        &mut self,
        client: &mut Client,
        look_once: bool,
        reached: &mut dyn FnMut(&pb::Agent),
    ) -> anyhow::Result<()> {
        let mut resume: Option<u64> = None;
        loop {
            let agent_ids = if self.order.len() <= MAX_FILTER_IDS {
                self.order.clone()
            } else {
                Vec::new()
            };
            let request = pb::WatchEventsRequest {
                agent_ids,
                include_snapshot: resume.is_none(),
                start_sequence: resume.unwrap_or(0),
                ..Default::default()
            };
            let read = match client.watch_events(request).await {
                Ok(response) => self.read(response.into_inner(), look_once, reached).await?,
                Err(status) => Read::Broken(Some(status)),
            };
            match read {
                Read::Done => return Ok(()),
                Read::Broken(None) => {}
                Read::Broken(Some(status)) if status.code() == Code::OutOfRange => {
                    // The events since the last one seen are gone: look again.
                    self.head = None;
                }
                Read::Broken(Some(status)) if resumable(&status) => {}
                Read::Broken(Some(status)) => return Err(status_error(status)),
            }
            resume = self.head.map(|head| head + 1);
            tokio::time::sleep(RESUME_DELAY).await;
        }
    }
}

/// A stream failure that another attempt may get past.
fn resumable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// Waits until every target is in one of its states; `reached` is called
/// for each as it gets there. With a zero `limit` looks once (the
/// snapshot) and does not wait.
///
/// # Errors
/// [`Exit`] with [`exit::AGENT_FAILED`] when an agent is in an error
/// state that is not one of its targets, [`exit::TIMED_OUT`] after
/// `limit`, [`exit::USAGE`] for an unknown agent; a refused call.
pub(super) async fn wait_for(
    s: &mut Session,
    targets: Vec<Target>,
    limit: Duration,
    reached: &mut dyn FnMut(&pb::Agent),
) -> anyhow::Result<Vec<pb::Agent>> {
    let mut waiter = Waiter::new(targets);
    if waiter.all_done() {
        return Ok(Vec::new());
    }
    let look_once = limit.is_zero();
    // Looking once still needs a bound: the per-call deadline.
    let deadline = Instant::now() + if look_once { s.timeout } else { limit };
    let followed =
        tokio::time::timeout_at(deadline, waiter.follow(&mut s.client, look_once, reached)).await;
    match followed {
        Ok(Ok(())) => Ok(waiter.reached),
        Ok(Err(err)) => Err(err),
        Err(_elapsed) => Err(waiter.timed_out(limit).into()),
    }
}

/// `wait`: every agent in a state `--for` names; one line per agent as it
/// gets there (`-o json`: one document with them all at the end).
pub(super) async fn wait(s: &mut Session, a: WaitArgs) -> anyhow::Result<()> {
    let mut states = StateSet::EMPTY;
    for condition in &a.conditions {
        for state in AgentState::ALL {
            if condition.contains(state) {
                states.insert(state);
            }
        }
    }
    let targets = a
        .agent_ids
        .iter()
        .map(|id| Target {
            agent_id: id.trim().to_ascii_lowercase(),
            name: String::new(),
            states,
        })
        .collect();
    let format = s.format;
    let mut print = |agent: &pb::Agent| {
        if format == Format::Text {
            println!("{}", agent_line(agent));
        }
    };
    let limit = s.wait_limit;
    let reached = wait_for(s, targets, limit, &mut print).await?;
    if format != Format::Text {
        output::emit(
            format,
            &json!({ "agents": reached.iter().map(agent_json).collect::<Vec<_>>() }),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_name_states_and_categories() {
        let set = parse_condition("state=online,IDLE").expect("states");
        assert_eq!(state_names(set), "online,idle");
        let set = parse_condition("category=operational").expect("category");
        assert_eq!(state_names(set), "online,busy,idle");
        let set = parse_condition("category=error,maintenance").expect("categories");
        assert_eq!(
            state_names(set),
            "updating,error,failed,timeout,maintenance,suspended"
        );
        for (text, message) in [
            ("online", "is not state=NAME"),
            ("state=", "is not state=NAME"),
            ("state=online,", "is not state=NAME"),
            ("condition=Ready", "is not state=NAME"),
            ("state=up", "unknown state \"up\""),
            ("category=broken", "unknown category"),
        ] {
            let err = parse_condition(text).expect_err(text);
            assert!(err.contains(message), "{text}: {err}");
        }
    }

    fn agent(id: &str, state: pb::AgentState, version: u64) -> pb::Agent {
        pb::Agent {
            agent_id: id.to_string(),
            name: "n".to_string(),
            state: state as i32,
            version,
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_is_done_in_a_target_state_and_fails_in_an_error_state() {
        let target = |id: &str| Target {
            agent_id: id.to_string(),
            name: String::new(),
            states: parse_condition("state=online").expect("condition"),
        };
        let mut waiter = Waiter::new(vec![target("a"), target("b")]);
        let mut seen = Vec::new();
        let mut note = |agent: &pb::Agent| seen.push(agent.agent_id.clone());
        waiter
            .observe(agent("a", pb::AgentState::Starting, 4), None, &mut note)
            .expect("starting is no failure");
        waiter
            .observe(agent("a", pb::AgentState::Online, 5), None, &mut note)
            .expect("online");
        // A repeat of an older version changes nothing.
        waiter
            .observe(agent("a", pb::AgentState::Starting, 4), None, &mut note)
            .expect("old news");
        assert!(!waiter.all_done());
        let failed = pb::StateTransition {
            reason: "no heartbeat".to_string(),
            triggered_by: "health-monitor".to_string(),
            ..Default::default()
        };
        let err = waiter
            .observe(
                agent("b", pb::AgentState::Timeout, 5),
                Some(failed),
                &mut note,
            )
            .expect_err("timeout fails the wait");
        assert_eq!(err.code, exit::AGENT_FAILED);
        assert!(
            err.message.contains("agent n (b) is in state timeout")
                && err
                    .message
                    .contains("\"no heartbeat\" (triggered_by health-monitor)"),
            "{}",
            err.message
        );
        assert_eq!(seen, vec!["a".to_string()]);
        let timed_out = waiter.timed_out(Duration::from_secs(3));
        assert_eq!(timed_out.code, exit::TIMED_OUT);
        assert!(
            timed_out
                .message
                .starts_with("timed out after 3s: agent n (b) is timeout"),
            "{}",
            timed_out.message
        );
    }

    #[test]
    fn an_error_state_that_is_waited_for_is_no_failure() {
        let mut waiter = Waiter::new(vec![Target {
            agent_id: "a".to_string(),
            name: "summarizer".to_string(),
            states: parse_condition("category=error").expect("condition"),
        }]);
        waiter
            .observe(agent("a", pb::AgentState::Failed, 3), None, &mut |_| {})
            .expect("failed is the target");
        assert!(waiter.all_done());
        let unknown = Waiter::new(vec![Target {
            agent_id: "x".to_string(),
            name: String::new(),
            states: StateSet::EMPTY,
        }]);
        let err = unknown.check_all_seen().expect_err("never seen");
        assert_eq!(
            (err.code, err.message.as_str()),
            (exit::USAGE, "no such agent: x")
        );
    }
}
