//! SQLite queries: each runs on one connection (a reader's, in one
//! snapshot) and decodes its rows with [`super::rows`]. Reads by agent or
//! by principal combine the index tables with the log's unindexed tail
//! (see [`super::index`]). Depends on nothing above the store.
//!
//! A `LIMIT` takes its bound parameter as `?n + 0`, never as a bare `?n`:
//! SQLite plans a bare one with the value bound, so binding any value
//! (even the same again) expires the statement and the next step parses
//! and plans it anew, every call. An expression is planned once.

use std::{sync::Arc, time::SystemTime};

use rusqlite::{Connection, OptionalExtension, params, types::Value};

use super::{
    index::{INDEXED, NOT_IN_AGENT_EVENTS, NOT_IN_PRINCIPAL_EVENTS},
    rows::{EVENT_COLUMNS, INDEXED_EVENT_COLUMNS, decode_labels, record_from_row},
    sql,
};
use crate::{
    domain::{AgentId, TransitionRecord},
    store::{AgentIdentity, AuditQuery, HistoryRange, Result, codec::to_micros},
};

/// An unsigned bound as an SQLite integer (saturating).
fn int(value: u64) -> i64 {
    value.min(i64::MAX as u64) as i64
}

/// The name and labels of each agent of `ids` that the file holds.
pub(super) fn identities(
    conn: &Connection,
    ids: &[AgentId],
) -> Result<Vec<(AgentId, AgentIdentity)>> {
    let mut stmt = conn
        .prepare_cached("SELECT name, labels FROM agents WHERE agent_id = ?1")
        .map_err(sql("reading agents"))?;
    let mut found = Vec::new();
    for id in ids {
        let row = stmt
            .query_row([id.as_bytes()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .optional()
            .map_err(sql("reading agents"))?;
        if let Some((name, labels)) = row {
            let labels = decode_labels(&labels).map_err(sql("reading agents"))?;
            found.push((
                *id,
                AgentIdentity {
                    name: Arc::from(name),
                    labels: Arc::new(labels),
                },
            ));
        }
    }
    Ok(found)
}

/// Up to `max` events after `after`, in sequence order.
pub(super) fn events_after(
    conn: &Connection,
    after: u64,
    max: usize,
) -> Result<Vec<Arc<TransitionRecord>>> {
    let mut stmt = conn
        .prepare_cached(&events_after_statement())
        .map_err(sql("reading events"))?;
    stmt.query_map(params![after as i64, max as i64], record_from_row)
        .and_then(|rows| rows.collect())
        .map_err(sql("reading events"))
}

/// One agent's events in `range`, oldest first.
pub(super) fn history(
    conn: &Connection,
    agent_id: AgentId,
    range: HistoryRange,
) -> Result<Vec<Arc<TransitionRecord>>> {
    let mut stmt = conn
        .prepare_cached(&history_statement())
        .map_err(sql("reading history"))?;
    stmt.query_map(
        params![
            agent_id.as_bytes(),
            range.after as i64,
            int(range.upto),
            range.max as i64
        ],
        record_from_row,
    )
    .and_then(|rows| rows.collect())
    .map_err(sql("reading history"))
}

/// The statement of [`events_after`]: `?1` the bound, `?2` the limit.
fn events_after_statement() -> String {
    format!("SELECT {EVENT_COLUMNS} FROM events WHERE sequence > ?1 ORDER BY sequence LIMIT ?2 + 0")
}

/// The statement of [`history`]: `?1` the agent, `?2` and `?3` the range,
/// `?4` the limit.
fn history_statement() -> String {
    format!(
        "SELECT {INDEXED_EVENT_COLUMNS} FROM agent_events a
         JOIN events e ON e.sequence = a.sequence
         WHERE a.agent_id = ?1 AND a.sequence > ?2 AND a.sequence <= ?3
         UNION ALL
         SELECT {EVENT_COLUMNS} FROM events
         WHERE sequence > max(?2, {INDEXED}) AND sequence <= ?3 AND agent_id = ?1
             AND {NOT_IN_AGENT_EVENTS}
         ORDER BY 1 LIMIT ?4 + 0"
    )
}

/// The sequence of the agent's `n`-th newest event at or below `upto`
/// (`n >= 1`).
pub(super) fn nth_newest(
    conn: &Connection,
    agent_id: AgentId,
    upto: u64,
    n: u64,
) -> Result<Option<u64>> {
    conn.prepare_cached(&format!(
        "SELECT sequence FROM agent_events WHERE agent_id = ?1 AND sequence <= ?2
         UNION ALL
         SELECT sequence FROM events
         WHERE sequence > {INDEXED} AND sequence <= ?2 AND agent_id = ?1
             AND {NOT_IN_AGENT_EVENTS}
         ORDER BY 1 DESC LIMIT 1 OFFSET ?3"
    ))
    .and_then(|mut stmt| {
        stmt.query_row(params![agent_id.as_bytes(), int(upto), int(n - 1)], |r| {
            r.get::<_, i64>(0)
        })
        .optional()
    })
    .map(|s| s.map(|s| s as u64))
    .map_err(sql("reading history"))
}

/// The events with a request tag committed at or after `since`, in
/// sequence order.
pub(super) fn requests_since(
    conn: &Connection,
    since: SystemTime,
) -> Result<Vec<Arc<TransitionRecord>>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE request <> '' AND at >= ?1
             ORDER BY sequence"
        ))
        .map_err(sql("reading recent requests"))?;
    stmt.query_map([to_micros(since)], record_from_row)
        .and_then(|rows| rows.collect())
        .map_err(sql("reading recent requests"))
}

/// The events `query` selects, newest first.
pub(super) fn audit(conn: &Connection, query: &AuditQuery) -> Result<Vec<Arc<TransitionRecord>>> {
    let (text, values) = audit_statement(query);
    let mut stmt = conn
        .prepare_cached(&text)
        .map_err(sql("reading the audit trail"))?;
    stmt.query_map(rusqlite::params_from_iter(values.iter()), record_from_row)
        .and_then(|rows| rows.collect())
        .map_err(sql("reading the audit trail"))
}

/// The statement of [`audit`] and its parameters: `?1` the bound, then the
/// agent and the principal when given, then the limit. By agent or by
/// principal, the index's events and then the log's unindexed tail.
fn audit_statement(query: &AuditQuery) -> (String, Vec<Value>) {
    let mut conditions = vec!["sequence < ?1"];
    let mut values: Vec<Value> = vec![int(query.before).into()];
    if let Some(id) = query.agent_id {
        conditions.push("agent_id = ?2");
        values.push(id.as_bytes().to_vec().into());
    }
    if let Some(principal) = &query.principal {
        conditions.push(if query.agent_id.is_some() {
            "principal = ?3"
        } else {
            "principal = ?2"
        });
        values.push(principal.clone().into());
    }
    values.push((query.max.min(i64::MAX as usize) as i64).into());
    let conditions = conditions.join(" AND ");
    let limit = values.len();
    let text = if query.agent_id.is_some() {
        let by_principal = if query.principal.is_some() {
            " AND e.principal = ?3"
        } else {
            ""
        };
        format!(
            "SELECT {INDEXED_EVENT_COLUMNS} FROM agent_events a
             JOIN events e ON e.sequence = a.sequence
             WHERE a.agent_id = ?2 AND a.sequence < ?1{by_principal}
             UNION ALL
             SELECT {EVENT_COLUMNS} FROM events WHERE sequence > {INDEXED} AND {conditions}
                 AND {NOT_IN_AGENT_EVENTS}
             ORDER BY 1 DESC LIMIT ?{limit} + 0"
        )
    } else if query.principal.is_some() {
        format!(
            "SELECT {INDEXED_EVENT_COLUMNS} FROM principal_events a
             JOIN events e ON e.sequence = a.sequence
             WHERE a.principal = ?2 AND a.sequence < ?1
             UNION ALL
             SELECT {EVENT_COLUMNS} FROM events WHERE sequence > {INDEXED} AND {conditions}
                 AND {NOT_IN_PRINCIPAL_EVENTS}
             ORDER BY 1 DESC LIMIT ?{limit} + 0"
        )
    } else {
        format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE {conditions} ORDER BY sequence DESC LIMIT ?{limit} + 0"
        )
    };
    (text, values)
}

/// How many events of the agent are retained.
pub(super) fn history_count(conn: &Connection, agent_id: AgentId) -> Result<u64> {
    conn.prepare_cached(&format!(
        "SELECT (SELECT count(*) FROM agent_events WHERE agent_id = ?1)
         + (SELECT count(*) FROM events WHERE sequence > {INDEXED} AND agent_id = ?1
             AND {NOT_IN_AGENT_EVENTS})"
    ))
    .and_then(|mut stmt| stmt.query_row([agent_id.as_bytes()], |r| r.get::<_, i64>(0)))
    .map(|c| c as u64)
    .map_err(sql("counting history"))
}

#[cfg(test)]
mod tests {
    use rusqlite::{Connection, StatementStatus, params_from_iter, types::Value};

    use super::*;

    /// Runs `text` three times with `values` on one prepared statement and
    /// returns how often SQLite had to prepare it again.
    fn reprepared(conn: &Connection, text: &str, values: &[Value]) -> i32 {
        let mut stmt = conn.prepare(text).unwrap();
        for _ in 0..3 {
            let rows = stmt
                .query_map(params_from_iter(values.iter()), |_| Ok(()))
                .unwrap();
            assert_eq!(rows.count(), 0);
        }
        stmt.get_status(StatementStatus::RePrepare)
    }

    #[test]
    fn statements_with_a_limit_are_planned_once() {
        let conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&conn).unwrap();
        let agent = Value::Blob(vec![1; 16]);
        let int = |n: i64| Value::Integer(n);
        assert_eq!(
            reprepared(&conn, &events_after_statement(), &[int(0), int(10)]),
            0
        );
        assert_eq!(
            reprepared(
                &conn,
                &history_statement(),
                &[agent.clone(), int(0), int(100), int(11)]
            ),
            0
        );
        for query in [
            AuditQuery {
                before: 100,
                agent_id: None,
                principal: None,
                max: 10,
            },
            AuditQuery {
                before: 100,
                agent_id: Some(AgentId::from_bytes([1; 16])),
                principal: Some("alice".into()),
                max: 10,
            },
            AuditQuery {
                before: 100,
                agent_id: None,
                principal: Some("alice".into()),
                max: 10,
            },
        ] {
            let (text, values) = audit_statement(&query);
            assert_eq!(reprepared(&conn, &text, &values), 0, "{text}");
        }
        // The contrast: a bare parameter as the limit is planned again on
        // every call, which the texts above avoid.
        assert_eq!(
            reprepared(
                &conn,
                "SELECT sequence FROM events ORDER BY sequence LIMIT ?1",
                &[int(5)]
            ),
            3
        );
    }
}
