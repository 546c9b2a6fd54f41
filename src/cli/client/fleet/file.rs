//! The fleet file: the agents a fleet should have and the state each
//! should be in, in TOML.
//!
//! ```toml
//! fleet = "prod"                 # optional: part of every derived id
//!
//! [[agent]]
//! name = "summarizer"            # unique in the file
//! state = "online"               # online | offline | deployed | registered
//! labels = { team = "ml", "docker.container" = "summarizer-1" }
//! # id = "6f1c7a52-..."          # optional: an existing agent's id
//! ```
//!
//! An agent is known by its name: its id is derived from the fleet's and
//! the agent's names ([`derived_id`]), so every run of the same file
//! finds the agents an earlier run registered. Parsing checks everything
//! the server would refuse (label sizes, binding labels) and everything
//! the plan needs (unique names and ids), and names the agent and the line
//! of each problem. Pure: no I/O but reading the file.

use std::collections::BTreeMap;

use ring::digest;
use serde::Deserialize;

use agent_lifecycle::domain::{AgentState, Binding, StateSet, agent::Labels, limits};

/// What the file says of the fleet, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fleet {
    /// The fleet's name (empty when the file gives none).
    pub name: String,
    /// In the file's order.
    pub agents: Vec<DesiredAgent>,
}

/// One agent of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredAgent {
    pub name: String,
    /// Lowercase hyphenated UUID: the file's `id`, or derived from the name.
    pub agent_id: String,
    pub labels: Labels,
    pub state: Desired,
}

/// The state an agent of the file should be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    /// Exists; its state is left to others (the agent itself, the health
    /// monitor, an operator).
    Registered,
    /// Deployed and not running: DEPLOYED or OFFLINE.
    Deployed,
    /// Not running: REGISTERED, DEPLOYED, OFFLINE (or TERMINATED).
    Offline,
    /// Running: ONLINE, BUSY or IDLE.
    Online,
}

impl Desired {
    /// The name the file uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Registered => "registered",
            Desired::Deployed => "deployed",
            Desired::Offline => "offline",
            Desired::Online => "online",
        }
    }

    /// The states in which an agent is where the file wants it.
    pub fn satisfied_by(self) -> StateSet {
        use AgentState::*;
        let states: &[AgentState] = match self {
            // Every state but DELETED, whose id cannot come back.
            Desired::Registered => &[
                Registered,
                Deploying,
                Deployed,
                Starting,
                Online,
                Busy,
                Idle,
                Stopping,
                Updating,
                Scaling,
                Error,
                Failed,
                Timeout,
                Maintenance,
                Suspended,
                Offline,
                Terminated,
            ],
            Desired::Deployed => &[Deployed, Offline],
            Desired::Offline => &[AgentState::Registered, Deployed, Offline, Terminated],
            Desired::Online => &[Online, Busy, Idle],
        };
        states.iter().copied().collect()
    }

    fn parse(text: &str) -> Result<Desired, String> {
        match text {
            "registered" => Ok(Desired::Registered),
            "deployed" => Ok(Desired::Deployed),
            "offline" => Ok(Desired::Offline),
            "online" => Ok(Desired::Online),
            other => Err(format!(
                "state {other:?} is not one of online, offline, deployed, registered"
            )),
        }
    }
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileText {
    #[serde(default)]
    fleet: String,
    #[serde(default)]
    agent: Vec<AgentText>,
}

/// One `[[agent]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentText {
    name: toml::Spanned<String>,
    state: Option<String>,
    id: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// The prefix of every hashed name: ids derived here never equal ids
/// derived for another purpose from the same text.
const AGENT_ID_DOMAIN: &[u8] = b"agent-lifecycle/fleet/agent-id/v1\0";

/// The agent id of `name` in the fleet `fleet`: the first 16 bytes of
/// SHA-256(`agent-lifecycle/fleet/agent-id/v1` NUL fleet NUL name) as a
/// UUID of version 8 (RFC 9562's custom version), variant bits set. The
/// same names give the same id on every machine, in every run.
pub fn derived_id(fleet: &str, name: &str) -> String {
    uuid_of(&[AGENT_ID_DOMAIN, fleet.as_bytes(), b"\0", name.as_bytes()])
}

/// A version-8 UUID (lowercase hyphenated text) from the SHA-256 of the
/// concatenated `parts`.
pub(super) fn uuid_of(parts: &[&[u8]]) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in parts {
        context.update(part);
    }
    let hash = context.finish();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash.as_ref()[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(bytes).hyphenated().to_string()
}

/// The line (from 1) of byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

/// Parses and checks a fleet file's text.
///
/// # Errors
/// Not TOML, an unknown key, no agent, and for an agent (named, with its
/// line): an empty or repeated name, a missing or unknown state, an id
/// that is not a UUID or is another agent's, labels the server would
/// refuse.
pub fn parse(text: &str) -> Result<Fleet, String> {
    let file: FileText = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
    limits::check_text("fleet", &file.fleet, limits::MAX_SHORT_TEXT_BYTES)
        .map_err(|e| e.to_string())?;
    if file.agent.is_empty() {
        return Err("no [[agent]] in the file".to_string());
    }
    let mut agents: Vec<DesiredAgent> = Vec::with_capacity(file.agent.len());
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for entry in file.agent {
        let line = line_of(text, entry.name.span().start);
        let name = entry.name.into_inner();
        let at = |message: String| format!("line {line}: agent {name:?}: {message}");
        if name.trim().is_empty() {
            return Err(format!("line {line}: an agent's name is empty"));
        }
        limits::check_text("name", &name, limits::MAX_SHORT_TEXT_BYTES)
            .map_err(|e| at(e.to_string()))?;
        if let Some(first) = names.insert(name.clone(), line) {
            return Err(at(format!("the name is also on line {first}")));
        }
        let state = Desired::parse(entry.state.as_deref().ok_or_else(|| {
            at("state is missing (online, offline, deployed, registered)".to_string())
        })?)
        .map_err(at)?;
        let agent_id = match &entry.id {
            Some(id) => uuid::Uuid::parse_str(id.trim())
                .map_err(|_| at(format!("id {id:?} is not a UUID")))?
                .hyphenated()
                .to_string(),
            None => derived_id(&file.fleet, &name),
        };
        if let Some(other) = ids.insert(agent_id.clone(), name.clone()) {
            return Err(at(format!("id {agent_id} is also agent {other:?}'s")));
        }
        let labels: Labels = entry.labels;
        limits::check_labels("labels", &labels).map_err(|e| at(e.to_string()))?;
        Binding::of(&labels).map_err(|e| at(e.to_string()))?;
        agents.push(DesiredAgent {
            name,
            agent_id,
            labels,
            state,
        });
    }
    Ok(Fleet {
        name: file.fleet,
        agents,
    })
}

/// Reads and parses the fleet file at `path` (`-`: standard input).
///
/// # Errors
/// The file cannot be read, or as [`parse`] (prefixed with the path).
pub fn load(path: &str) -> Result<Fleet, String> {
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| format!("cannot read standard input: {e}"))?
    } else {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?
    };
    parse(&text).map_err(|e| format!("{path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
fleet = "prod"

[[agent]]
name = "summarizer"
state = "online"
labels = { team = "ml", "docker.container" = "summarizer-1" }

[[agent]]
name = "reviewer"
state = "offline"
id = "6F1C7A52-1F7E-4C8E-9A55-3A0C0F6B2D11"
"#;

    #[test]
    fn a_file_gives_agents_with_stable_ids() {
        let fleet = parse(EXAMPLE).expect("valid");
        assert_eq!(fleet.name, "prod");
        let [summarizer, reviewer] = &fleet.agents[..] else {
            panic!("two agents: {fleet:?}");
        };
        assert_eq!(summarizer.name, "summarizer");
        assert_eq!(summarizer.state, Desired::Online);
        assert_eq!(
            summarizer
                .labels
                .get("docker.container")
                .map(String::as_str),
            Some("summarizer-1")
        );
        assert_eq!(summarizer.agent_id, derived_id("prod", "summarizer"));
        assert_eq!(reviewer.agent_id, "6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2d11");
        assert_eq!(reviewer.state, Desired::Offline);
        assert!(reviewer.labels.is_empty());
        assert_eq!(parse(EXAMPLE).expect("again"), fleet, "the same every time");
    }

    #[test]
    fn the_example_file_is_valid() {
        let fleet = parse(include_str!("../../../../examples/fleet.toml")).expect("the example");
        assert_eq!(fleet.name, "prod");
        assert_eq!(fleet.agents.len(), 6);
        let legacy = fleet
            .agents
            .iter()
            .find(|a| a.name == "legacy-router")
            .expect("legacy");
        assert_eq!(legacy.agent_id, "6f1c7a52-1f7e-4c8e-9a55-3a0c0f6b2d11");
    }

    #[test]
    fn derived_ids_are_version_8_uuids_that_depend_on_both_names() {
        let id = derived_id("prod", "summarizer");
        let uuid = uuid::Uuid::parse_str(&id).expect("a UUID");
        assert_eq!(uuid.get_version_num(), 8);
        assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        // Pinned: ids must not change between releases.
        assert_eq!(id, derived_id("prod", "summarizer"));
        assert_ne!(id, derived_id("", "summarizer"));
        assert_ne!(id, derived_id("prod", "summarizer2"));
        assert_ne!(derived_id("a", "bc"), derived_id("ab", "c"));
    }

    #[test]
    fn problems_name_the_agent_and_the_line() {
        for (text, message) in [
            ("", "no [[agent]] in the file"),
            (
                "[[agent]]\nname = \"a\"\nstate = \"up\"\n",
                "line 2: agent \"a\": state \"up\" is not one of",
            ),
            (
                "[[agent]]\nname = \"a\"\n",
                "line 2: agent \"a\": state is missing",
            ),
            (
                "[[agent]]\nname = \" \"\nstate = \"online\"\n",
                "line 2: an agent's name is empty",
            ),
            (
                "[[agent]]\nname = \"a\"\nstate = \"online\"\n[[agent]]\nname = \"a\"\nstate = \"online\"\n",
                "line 5: agent \"a\": the name is also on line 2",
            ),
            (
                "[[agent]]\nname = \"a\"\nstate = \"online\"\nid = \"x\"\n",
                "agent \"a\": id \"x\" is not a UUID",
            ),
            (
                "[[agent]]\nname = \"a\"\nstate = \"online\"\nlabels = { \"docker.container\" = \"has space\" }\n",
                "agent \"a\": invalid labels: docker.container=\"has space\"",
            ),
            (
                "[[agent]]\nname = \"a\"\nstate = \"online\"\nlabels = { \"\" = \"x\" }\n",
                "agent \"a\": invalid labels: label key \"\" must have",
            ),
            (
                "[[agent]]\nname = \"a\"\nstate = \"online\"\ncolour = \"red\"\n",
                "unknown field `colour`",
            ),
            ("[[agents]]\nname = \"a\"\n", "unknown field `agents`"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(message), "{text:?}: {err}");
        }
        let same = format!(
            "[[agent]]\nname = \"a\"\nstate = \"online\"\n[[agent]]\nname = \"b\"\nstate = \"online\"\nid = \"{}\"\n",
            derived_id("", "a")
        );
        let err = parse(&same).expect_err("one id, two agents");
        assert!(
            err.contains("agent \"b\": id") && err.contains("is also agent \"a\"'s"),
            "{err}"
        );
    }

    #[test]
    fn desired_states_name_the_states_that_satisfy_them() {
        let names = |d: Desired| crate::cli::client::wait::state_names(d.satisfied_by());
        assert_eq!(names(Desired::Online), "online,busy,idle");
        assert_eq!(names(Desired::Deployed), "deployed,offline");
        assert_eq!(
            names(Desired::Offline),
            "registered,deployed,offline,terminated"
        );
        assert!(
            !Desired::Registered
                .satisfied_by()
                .contains(AgentState::Deleted)
        );
        assert!(
            Desired::Registered
                .satisfied_by()
                .contains(AgentState::Maintenance)
        );
    }
}
