//! The columns the SQLite back end selects and their decoding into domain
//! types: each column list sits next to the function that reads its rows,
//! which depends on its order. Depends on the domain and the store's codec.

use std::{str::FromStr, sync::Arc};

use rusqlite::{Row, types::Type};

use crate::{
    domain::{Agent, AgentId, AgentState, Labels, Metadata, RequestTag, TransitionRecord},
    store::codec::{decode_map, decode_request, from_micros},
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

/// [`EVENT_COLUMNS`] of `events e` joined to `agent_events a` (or
/// `principal_events a`): the sequence is the index's, so the rows come in
/// its order without a sort.
pub(super) const INDEXED_EVENT_COLUMNS: &str = "a.sequence, e.agent_id, e.version, e.from_state,
    e.to_state, e.at, e.reason, e.triggered_by, e.metadata, e.principal, e.request";

/// A decoding failure of column `index`, as rusqlite reports its own.
fn invalid(
    index: usize,
    err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(index, Type::Text, err.into())
}

fn metadata(row: &Row<'_>, index: usize) -> rusqlite::Result<Metadata> {
    decode_map(&row.get::<_, String>(index)?).map_err(|e| invalid(0, e))
}

/// JSON labels; also read alone by the identity query.
pub(super) fn decode_labels(text: &str) -> rusqlite::Result<Labels> {
    decode_map(text).map_err(|e| invalid(0, e))
}

fn state(text: &str) -> rusqlite::Result<AgentState> {
    AgentState::from_str(text).map_err(|e| invalid(0, e))
}

fn request(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<Arc<RequestTag>>> {
    decode_request(&row.get::<_, String>(index)?)
        .map_err(|e| invalid(index, std::io::Error::other(e)))
}

fn agent_id(row: &Row<'_>, index: usize) -> rusqlite::Result<AgentId> {
    let bytes: [u8; 16] = row.get(index)?;
    Ok(AgentId::from_bytes(bytes))
}

/// An integer column that holds a sequence or a version (never negative).
fn unsigned(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, i64>(index)? as u64)
}

/// A row of [`EVENT_COLUMNS`] (or [`INDEXED_EVENT_COLUMNS`]).
pub(super) fn record_from_row(row: &Row<'_>) -> rusqlite::Result<Arc<TransitionRecord>> {
    let from: Option<String> = row.get(3)?;
    Ok(Arc::new(TransitionRecord {
        sequence: unsigned(row, 0)?,
        agent_id: agent_id(row, 1)?,
        version: unsigned(row, 2)?,
        from: from.as_deref().map(state).transpose()?,
        to: state(&row.get::<_, String>(4)?)?,
        at: from_micros(row.get(5)?),
        reason: row.get(6)?,
        triggered_by: row.get(7)?,
        metadata: metadata(row, 8)?,
        principal: row.get(9)?,
        request: request(row, 10)?,
    }))
}

/// A row of [`SELECT_AGENTS`].
pub(super) fn agent_from_row(row: &Row<'_>) -> rusqlite::Result<Agent> {
    let id = agent_id(row, 0)?;
    let state_now = state(&row.get::<_, String>(3)?)?;
    let version = unsigned(row, 4)?;
    let updated_at = from_micros(row.get(6)?);
    let last_from: Option<String> = row.get(8)?;
    let last = TransitionRecord {
        agent_id: id,
        from: last_from.as_deref().map(state).transpose()?,
        to: state_now,
        at: updated_at,
        reason: row.get(9)?,
        triggered_by: row.get(10)?,
        metadata: metadata(row, 11)?,
        principal: row.get(12)?,
        request: request(row, 13)?,
        sequence: unsigned(row, 7)?,
        version,
    };
    Ok(Agent {
        id,
        name: Arc::from(row.get::<_, String>(1)?),
        labels: Arc::new(decode_labels(&row.get::<_, String>(2)?)?),
        state: state_now,
        version,
        created_at: from_micros(row.get(5)?),
        updated_at,
        last_transition: Arc::new(last),
    })
}
