//! The columns the PostgreSQL back end selects and their decoding into
//! domain types: each column list sits next to the function that reads
//! its rows, which depends on its order. Depends on the domain and the
//! store's codec.

use std::sync::Arc;

use postgres::Row;

use super::corrupt;
use crate::{
    domain::{Agent, AgentId, AgentState, Labels, Metadata, TransitionRecord},
    store::{
        Result,
        codec::{decode_map, decode_request, from_micros},
    },
};

/// An agent's row, read by [`agent_from_row`].
pub(super) const SELECT_AGENTS: &str =
    "SELECT agent_id, name, labels, state, version, created_at, updated_at,
    last_sequence, last_from, last_reason, last_triggered_by, last_metadata, last_principal,
    last_request FROM agents";

/// An event's columns, read by [`record_from_row`].
pub(super) const EVENT_COLUMNS: &str =
    "sequence, agent_id, version, from_state, to_state, at, reason, triggered_by, metadata,
    principal, request";

/// An agent id column.
pub(super) fn decode_id(bytes: &[u8]) -> Result<AgentId> {
    let bytes: [u8; 16] = bytes
        .try_into()
        .map_err(|_| corrupt("agent id", format!("{} bytes", bytes.len())))?;
    Ok(AgentId::from_bytes(bytes))
}

/// A labels column.
pub(super) fn decode_labels(text: &str) -> Result<Labels> {
    decode_map(text).map_err(|e| corrupt("labels", e))
}

fn decode_metadata(text: &str) -> Result<Metadata> {
    decode_map(text).map_err(|e| corrupt("metadata", e))
}

fn decode_state(text: &str) -> Result<AgentState> {
    text.parse().map_err(|e| corrupt("state", e))
}

/// A row of [`EVENT_COLUMNS`].
pub(super) fn record_from_row(row: &Row) -> Result<Arc<TransitionRecord>> {
    let from: Option<&str> = row.get(3);
    Ok(Arc::new(TransitionRecord {
        sequence: row.get::<_, i64>(0) as u64,
        agent_id: decode_id(row.get(1))?,
        version: row.get::<_, i64>(2) as u64,
        from: from.map(decode_state).transpose()?,
        to: decode_state(row.get(4))?,
        at: from_micros(row.get(5)),
        reason: row.get(6),
        triggered_by: row.get(7),
        metadata: decode_metadata(row.get(8))?,
        principal: row.get(9),
        request: decode_request(row.get(10)).map_err(|e| corrupt("request", e))?,
    }))
}

/// A row of [`SELECT_AGENTS`].
pub(super) fn agent_from_row(row: &Row) -> Result<Agent> {
    let id = decode_id(row.get(0))?;
    let state = decode_state(row.get(3))?;
    let version = row.get::<_, i64>(4) as u64;
    let updated_at = from_micros(row.get(6));
    let last_from: Option<&str> = row.get(8);
    let last = TransitionRecord {
        agent_id: id,
        from: last_from.map(decode_state).transpose()?,
        to: state,
        at: updated_at,
        reason: row.get(9),
        triggered_by: row.get(10),
        metadata: decode_metadata(row.get(11))?,
        principal: row.get(12),
        request: decode_request(row.get(13)).map_err(|e| corrupt("request", e))?,
        sequence: row.get::<_, i64>(7) as u64,
        version,
    };
    Ok(Agent {
        id,
        name: Arc::from(row.get::<_, &str>(1)),
        labels: Arc::new(decode_labels(row.get(2))?),
        state,
        version,
        created_at: from_micros(row.get(5)),
        updated_at,
        last_transition: Arc::new(last),
    })
}
