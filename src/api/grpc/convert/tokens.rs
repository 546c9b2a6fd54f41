//! The opaque page tokens of ListAgents, ListTransitions and
//! GetAgentHistory: what they carry, and their parsing, which refuses a
//! token this server did not issue.

use crate::{
    domain::{AgentId, FieldViolation},
    service::HistoryCursor,
};

const LIST_TOKEN_PREFIX: &str = "agents.v1.";
const HISTORY_TOKEN_PREFIX: &str = "history.v1.";

/// The opaque ListAgents token continuing after `id`.
pub fn list_token(id: AgentId) -> String {
    format!("{LIST_TOKEN_PREFIX}{:032x}", id.as_u128())
}

/// Parses a ListAgents token; empty means the first page.
///
/// # Errors
/// A token this server did not issue.
pub fn parse_list_token(token: &str) -> Result<Option<AgentId>, FieldViolation> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(LIST_TOKEN_PREFIX)
        .filter(|hex| hex.len() == 32)
        .and_then(|hex| u128::from_str_radix(hex, 16).ok())
        .map(|v| Some(AgentId::from_u128(v)))
        .ok_or_else(|| FieldViolation::new("page_token", "not a token issued by ListAgents"))
}

const AUDIT_TOKEN_PREFIX: &str = "audit.v1.";

/// The opaque ListTransitions token: the next page holds the records below
/// `before`.
pub fn audit_token(before: u64) -> String {
    format!("{AUDIT_TOKEN_PREFIX}{before:x}")
}

/// Parses a ListTransitions token; `None` (the newest) when empty.
///
/// # Errors
/// A token this server did not issue.
pub fn parse_audit_token(token: &str) -> Result<Option<u64>, FieldViolation> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(AUDIT_TOKEN_PREFIX)
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .map(Some)
        .ok_or_else(|| FieldViolation::new("page_token", "not a token issued by ListTransitions"))
}

/// The opaque GetAgentHistory token for `cursor`.
pub fn history_token(cursor: HistoryCursor) -> String {
    format!("{HISTORY_TOKEN_PREFIX}{:x}.{:x}", cursor.after, cursor.upto)
}

/// Parses a GetAgentHistory token; empty means the first page.
///
/// # Errors
/// A token this server did not issue.
pub fn parse_history_token(token: &str) -> Result<Option<HistoryCursor>, FieldViolation> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .strip_prefix(HISTORY_TOKEN_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(a, u)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(u, 16).ok()?,
            ))
        })
        .filter(|(after, upto)| after <= upto)
        .map(|(after, upto)| Some(HistoryCursor { after, upto }))
        .ok_or_else(|| FieldViolation::new("page_token", "not a token issued by GetAgentHistory"))
}
