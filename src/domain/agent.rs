//! Agents, their transition records and the events built from them.

use std::{collections::BTreeMap, fmt, sync::Arc, time::SystemTime};

use uuid::Uuid;

use super::{limits::FieldViolation, state::AgentState};

/// Free-form JSON object attached to a transition (the seed's `metadata`).
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// Labels given at registration; ordered so that listings and encodings are
/// stable.
pub type Labels = BTreeMap<String, String>;

/// An agent's identity: a UUID. New ids are UUIDv7 (time-ordered), so that
/// listings by id roughly follow registration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(Uuid);

impl AgentId {
    /// A fresh time-ordered id.
    pub fn generate() -> Self {
        AgentId(Uuid::now_v7())
    }

    /// Parses UUID text (any of the forms the `uuid` crate accepts).
    ///
    /// # Errors
    /// A [`FieldViolation`] naming `field` when `text` is not a UUID.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldViolation> {
        Uuid::parse_str(text.trim()).map(AgentId).map_err(|_| {
            FieldViolation::new(
                field,
                format!("{} is not a UUID", super::limits::quoted(text)),
            )
        })
    }

    /// Builds an id from its 128-bit value (as stored).
    pub fn from_u128(value: u128) -> Self {
        AgentId(Uuid::from_u128(value))
    }

    /// The 128-bit value, big-endian order equal to the textual order.
    pub fn as_u128(self) -> u128 {
        self.0.as_u128()
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The 16 bytes, as stored in SQLite.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// Builds an id from its 16 stored bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        AgentId(Uuid::from_bytes(bytes))
    }
}

impl From<Uuid> for AgentId {
    fn from(uuid: Uuid) -> Self {
        AgentId(uuid)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The client's idempotency key of the request a record was made for
/// (AIP-155 `request_id`), with a fingerprint of the request's content: a
/// retry with the same key and fingerprint gets the original response, the
/// same key with other content is refused.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RequestTag {
    /// The client's `request_id`.
    pub id: String,
    /// SHA-256 of the request's content (operation, agent, fields).
    pub fingerprint: [u8; 32],
}

/// What kind of change an event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The agent's first transition, into REGISTERED.
    Registered,
    /// Any later transition.
    Transitioned,
}

/// One committed state change: an entry of the agent's history and of the
/// global event log.
#[derive(Clone, Debug, PartialEq)]
pub struct TransitionRecord {
    /// The agent that changed.
    pub agent_id: AgentId,
    /// `None` for registration.
    pub from: Option<AgentState>,
    /// The new state.
    pub to: AgentState,
    /// Commit time.
    pub at: SystemTime,
    /// Why, as the caller said.
    pub reason: String,
    /// Who, as the caller said.
    pub triggered_by: String,
    /// The authenticated principal that made the change (empty when the
    /// server runs without authentication); unlike `triggered_by`, not the
    /// caller's to choose.
    pub principal: String,
    /// The request it was made for, when the client gave a `request_id`
    /// (every record of that request carries it).
    pub request: Option<Arc<RequestTag>>,
    /// Caller's metadata.
    pub metadata: Metadata,
    /// Global sequence number; 1 is the first event ever committed.
    pub sequence: u64,
    /// The agent's version after this transition (1 for registration).
    pub version: u64,
}

impl TransitionRecord {
    /// The event kind this record produces.
    pub fn kind(&self) -> EventKind {
        match self.from {
            None => EventKind::Registered,
            Some(_) => EventKind::Transitioned,
        }
    }
}

/// An agent as of one version. Immutable: a transition builds a new value,
/// sharing the name and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    /// Identity.
    pub id: AgentId,
    /// Name given at registration.
    pub name: Arc<str>,
    /// Labels given at registration.
    pub labels: Arc<Labels>,
    /// Current state.
    pub state: AgentState,
    /// 1 after registration, +1 per committed transition; also the number of
    /// transitions ever recorded for the agent.
    pub version: u64,
    /// Registration time.
    pub created_at: SystemTime,
    /// Time of the last transition.
    pub updated_at: SystemTime,
    /// The transition that produced this version.
    pub last_transition: Arc<TransitionRecord>,
}

impl Agent {
    /// A new agent, as its registration `record` creates it.
    pub fn registered(
        id: AgentId,
        name: Arc<str>,
        labels: Arc<Labels>,
        record: Arc<TransitionRecord>,
    ) -> Agent {
        Agent {
            id,
            name,
            labels,
            state: record.to,
            version: record.version,
            created_at: record.at,
            updated_at: record.at,
            last_transition: record,
        }
    }

    /// The agent right after `record` was applied to `self`.
    pub fn after(&self, record: Arc<TransitionRecord>) -> Agent {
        let mut next = self.clone();
        next.advance(record);
        next
    }

    /// `self` becomes the agent right after `record` (as [`Agent::after`],
    /// in place).
    pub fn advance(&mut self, record: Arc<TransitionRecord>) {
        self.state = record.to;
        self.version = record.version;
        self.updated_at = record.at;
        self.last_transition = record;
    }

    /// Whether the agent carries every label of `wanted`.
    pub fn has_labels(&self, wanted: &Labels) -> bool {
        wanted
            .iter()
            .all(|(key, value)| self.labels.get(key) == Some(value))
    }
}

/// A committed change as the event stream carries it.
#[derive(Clone, Debug, PartialEq)]
pub struct LifecycleEvent {
    /// The transition (its `sequence` is the event's).
    pub record: Arc<TransitionRecord>,
    /// The agent right after the event.
    pub agent: Arc<Agent>,
}

impl LifecycleEvent {
    /// The event of `record`, with the agent right after it.
    pub fn new(record: Arc<TransitionRecord>, agent: Arc<Agent>) -> Self {
        LifecycleEvent { record, agent }
    }

    /// The global sequence number.
    pub fn sequence(&self) -> u64 {
        self.record.sequence
    }

    /// Registration or transition.
    pub fn kind(&self) -> EventKind {
        self.record.kind()
    }
}
